"""Change between acquisitions, the pure part (docs/changes.md): the rules, which acquisitions
are compared (by acquisition time, one model version), what fires, and the ``changes`` row.

No Beam here, so that it is tested, and usable by tools, without a pipeline runtime; the stream's
step is ``transforms/changes.py``, the change raster ``transforms/change_raster.py``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transforms.answered import ANSWER_ROLES
from transforms.guards import safe_id

DIRECTIONS = ("gain", "loss")

# The shipped rules: new water (a flood, a filled reservoir), water gone (a drought), and
# vegetation cleared (forest loss). Thresholds in area-share points and in hectares: both must
# be met, so a small tile's few pixels and a big tile's fraction of a point are not alerts.
DEFAULT_RULES_JSON = json.dumps({"rules": [
    {"name": "water-gain", "class": "water", "direction": "gain", "min_points": 5,
     "min_hectares": 10},
    {"name": "water-loss", "class": "water", "direction": "loss", "min_points": 5,
     "min_hectares": 10},
    {"name": "forest-loss", "class": "forest", "direction": "loss", "min_points": 5,
     "min_hectares": 10},
]})


@dataclass(frozen=True)
class ChangeRule:
    """Fires when ``class_name``'s share of the tile's classified area moves by at least
    ``min_points`` percentage points AND its area by at least ``min_hectares``, in
    ``direction``."""

    name: str
    class_name: str
    direction: str  # gain | loss
    min_points: float
    min_hectares: float


MAX_RULES_BYTES = 64 * 1024  # a rules file is a few rules, never a dataset


def load_rules(spec: str | None) -> tuple[ChangeRule, ...]:
    """``--change_rules``: inline JSON (starts with ``{``), or a path/URI of a JSON file; empty
    or None: the shipped rules. Raises ValueError naming what is wrong."""
    text = spec.strip() if spec else DEFAULT_RULES_JSON
    if not text.startswith("{"):
        from apache_beam.io.filesystems import FileSystems

        try:
            with FileSystems.open(text) as source:
                raw = source.read(MAX_RULES_BYTES + 1)
        except Exception as exc:  # missing, unreadable, an unknown scheme: said, not raised raw
            raise ValueError(f"--change_rules: cannot read {text[:200]!r}: {exc}") from None
        if len(raw) > MAX_RULES_BYTES:
            raise ValueError(f"--change_rules: {text[:200]!r} is over {MAX_RULES_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"--change_rules: {text[:200]!r} is not UTF-8 JSON") from None
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--change_rules is not JSON: {exc}") from None
    rules = document.get("rules") if isinstance(document, dict) else None
    if not isinstance(rules, list):
        raise ValueError('--change_rules must be {"rules": [...]}')
    out = []
    for i, rule in enumerate(rules):
        where = f"--change_rules rule {i}"
        if not isinstance(rule, dict):
            raise ValueError(f"{where} is not an object")
        unknown = set(rule) - {"name", "class", "direction", "min_points", "min_hectares"}
        if unknown:
            raise ValueError(f"{where} has unknown keys {sorted(unknown)}")
        name = safe_id(rule.get("name"), f"{where} name")
        if rule.get("direction") not in DIRECTIONS:
            raise ValueError(f"{where} ({name}): direction must be one of {DIRECTIONS}")
        if not isinstance(rule.get("class"), str) or not rule["class"]:
            raise ValueError(f"{where} ({name}): class must be a class name of the model card")
        thresholds = []
        for key in ("min_points", "min_hectares"):
            value = rule.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ValueError(f"{where} ({name}): {key} must be a number >= 0")
            thresholds.append(float(value))
        out.append(ChangeRule(name, rule["class"], rule["direction"], *thresholds))
    if len({r.name for r in out}) != len(out):
        raise ValueError("--change_rules: rule names must be unique")
    return tuple(out)


def check_rules(rules: Sequence[ChangeRule], class_names: Sequence[str]) -> None:
    """Refuse rules about a class the model does not have (a typo would never fire)."""
    for rule in rules:
        if rule.class_name not in class_names:
            raise ValueError(f"change rule {rule.name}: class {rule.class_name!r} is not one of "
                             f"the model's {list(class_names)}")


@dataclass(frozen=True)
class Acquisition:
    """What change detection keeps of one answered tile version: small, no pixels."""

    tile_id: str
    generation: str
    acquired: float  # UNIX seconds: the order of acquisitions
    model: str  # name/version: only one model version's answers are compared
    role: str
    raster_uri: str
    stac_uri: str | None
    footprint: str
    areas: tuple[tuple[str, float], ...]  # class name, area m2, in class order

    @property
    def version(self) -> tuple[str, str, str]:
        return self.tile_id, self.generation, self.model


def _seconds(value: object) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        stamp = value
    else:
        try:
            stamp = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)).timestamp()


def role_of(row: Mapping[str, Any]) -> str:
    return row.get("role") or "live"  # NULL / "" is live, as answered.sql reads it


def acquisition_of(row: Mapping[str, Any]) -> Acquisition | None:
    """The acquisition a tile row records; None when it cannot be compared: written partial
    (not an answer), or without an acquisition time (nothing to order it by)."""
    acquired = _seconds(row.get("acquired"))
    if not row.get("complete") or acquired is None:
        return None
    return Acquisition(
        tile_id=row["tile_id"], generation=str(row["tile_generation"]), acquired=acquired,
        model=f"{row['model_name']}/{row['model_version']}", role=role_of(row),
        raster_uri=row["raster_uri"], stac_uri=row.get("stac_uri"),
        footprint=row.get("footprint") or "",
        areas=tuple((c["name"], float(c["area_m2"])) for c in row.get("classes") or ()))


def remember(history: Sequence[Acquisition], new: Acquisition,
             limit: int) -> tuple[Acquisition, ...]:
    """``history`` with ``new`` in it, by acquisition time: a newer generation of the same tile
    and model replaces the older one; the oldest go first past ``limit`` per model version."""
    kept = [a for a in history if (a.tile_id, a.model) != (new.tile_id, new.model)]
    kept.append(new)
    kept.sort(key=lambda a: (a.acquired, a.tile_id, a.generation))
    out: list[Acquisition] = []
    for model in {a.model for a in kept}:
        out += [a for a in kept if a.model == model][-limit:]
    return tuple(sorted(out, key=lambda a: (a.acquired, a.tile_id, a.generation)))


def pairs(history: Sequence[Acquisition], new: Acquisition,
          ) -> list[tuple[Acquisition, Acquisition]]:
    """(before, after) pairs that ``new`` makes consecutive among one model version's
    acquisitions of a location, by acquisition time, not by arrival: with the one acquired just
    before it, and with the one just after it (a late scene lands between two known ones).
    Another tile acquired at the same instant is neither before nor after."""
    same = [a for a in history if a.model == new.model and a.tile_id != new.tile_id]
    before = [a for a in same if a.acquired < new.acquired]
    after = [a for a in same if a.acquired > new.acquired]
    out = []
    if before:
        out.append((max(before, key=lambda a: a.acquired), new))
    if after:
        following = min(after, key=lambda a: a.acquired)
        if following.role in ANSWER_ROLES:
            out.append((new, following))
    return out


def comparisons(history: Sequence[Acquisition], new: Acquisition,
                ) -> list[tuple[Acquisition, Acquisition]]:
    """What the arrival of ``new`` compares: nothing for a shadow row (a baseline, never an
    answer) or for a tile version already known (a replay); else :func:`pairs`."""
    if new.role not in ANSWER_ROLES or any(a.version == new.version for a in history):
        return []
    return pairs(history, new)


@dataclass(frozen=True)
class Firing:
    rule: ChangeRule
    before_m2: float
    after_m2: float
    before_share: float  # of the classified area, 0..1
    after_share: float

    @property
    def delta_points(self) -> float:
        return (self.after_share - self.before_share) * 100.0

    @property
    def delta_hectares(self) -> float:
        return (self.after_m2 - self.before_m2) / 10_000.0


def shares(acquisition: Acquisition) -> dict[str, tuple[float, float]]:
    """class -> (area m2, share of the classified area)."""
    total = sum(a for _, a in acquisition.areas)
    return {name: (area, area / total if total else 0.0) for name, area in acquisition.areas}


def evaluate(before: Acquisition, after: Acquisition,
             rules: Iterable[ChangeRule]) -> list[Firing]:
    """The rules the change from ``before`` to ``after`` fires."""
    b, a = shares(before), shares(after)
    fired = []
    for rule in rules:
        b_m2, b_share = b.get(rule.class_name, (0.0, 0.0))
        a_m2, a_share = a.get(rule.class_name, (0.0, 0.0))
        firing = Firing(rule, b_m2, a_m2, b_share, a_share)
        sign = 1.0 if rule.direction == "gain" else -1.0
        if (sign * firing.delta_points >= rule.min_points
                and sign * firing.delta_hectares >= rule.min_hectares
                and sign * firing.delta_points > 0):
            fired.append(firing)
    return fired


def utc_text(seconds: float) -> str:
    """UNIX seconds -> RFC 3339 in UTC with microseconds: the times of change rows and Items."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="microseconds")


def change_id(location: str, before: Acquisition, after: Acquisition, rule: str) -> str:
    """Stable over replays and restarts: a consumer dedupes rows and events on it."""
    return hashlib.sha1("|".join([location, *before.version, *after.version, rule])
                        .encode()).hexdigest()


def change_row(location: str, before: Acquisition, after: Acquisition, firing: Firing,
               change_raster: tuple[str, str] | None, detected_at: float) -> dict:
    """One row of the ``changes`` table: what a ``changed`` event carries, too."""
    b, a = shares(before), shares(after)
    model_name, _, model_version = after.model.partition("/")
    return {
        "change_id": change_id(location, before, after, firing.rule.name),
        "location_key": location,
        "rule": firing.rule.name,
        "class_name": firing.rule.class_name,
        "direction": firing.rule.direction,
        "rule_min_points": firing.rule.min_points,
        "rule_min_hectares": firing.rule.min_hectares,
        "delta_points": firing.delta_points,
        "delta_hectares": firing.delta_hectares,
        "model_name": model_name,
        "model_version": model_version,
        "role": after.role,
        "before_tile_id": before.tile_id,
        "before_generation": before.generation,
        "before_acquired": utc_text(before.acquired),
        "before_raster_uri": before.raster_uri,
        "before_stac_uri": before.stac_uri,
        "after_tile_id": after.tile_id,
        "after_generation": after.generation,
        "after_acquired": utc_text(after.acquired),
        "after_raster_uri": after.raster_uri,
        "after_stac_uri": after.stac_uri,
        "footprint": after.footprint or None,
        "classes": [{"name": name, "before_area_m2": b.get(name, (0.0, 0.0))[0],
                     "after_area_m2": a.get(name, (0.0, 0.0))[0],
                     "before_share": b.get(name, (0.0, 0.0))[1],
                     "after_share": a.get(name, (0.0, 0.0))[1]}
                    for name in dict.fromkeys([n for n, _ in after.areas]
                                              + [n for n, _ in before.areas])],
        "change_raster_uri": change_raster[0] if change_raster else None,
        "change_stac_uri": change_raster[1] if change_raster else None,
        "detected_at": utc_text(detected_at),
    }
