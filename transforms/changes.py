"""Change between acquisitions: each new answer of a location against the previous acquisition
of that location by the same model version (docs/changes.md).

The pure part (rules, which acquisitions are compared, the ``changes`` row) has no Beam in it and
is tested on its own; :class:`DetectChanges` is the stream's step: keyed state per location key
(``transforms/location.py``) holding the last N acquisitions, a cache of the ``tiles`` table that
is seeded from it the first time a job sees a location, so a restart, a drain and a new job
compare with what the stream answered before.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from transforms.deadletter import DEAD_LETTER_TAG, dead_letter
from transforms.guards import describe, safe_id
from transforms.records import KEYED, NODATA_CLASS

STAGE = "changes"
CHANGES_TAG = "changes"
# Roles whose rows are answers (answered.sql's tile_answers reads the same two): only they fire.
ANSWER_ROLES = ("live", "canary")
DEFAULT_HISTORY = 8  # acquisitions remembered per location and model version
# How far back a job looks in the tiles table when it first sees a location.
SEED_LOOKBACK_DAYS = 400
DIRECTIONS = ("gain", "loss")
LOG = logging.getLogger("tilestream")

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


def load_rules(spec: str | None) -> tuple[ChangeRule, ...]:
    """``--change_rules``: inline JSON (starts with ``{``), or a path/URI of a JSON file; empty
    or None: the shipped rules. Raises ValueError naming what is wrong."""
    text = spec.strip() if spec else DEFAULT_RULES_JSON
    if not text.startswith("{"):
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.open(text) as source:
            text = source.read().decode()
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


def _rfc3339(seconds: float) -> str:
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
        "before_acquired": _rfc3339(before.acquired),
        "before_raster_uri": before.raster_uri,
        "before_stac_uri": before.stac_uri,
        "after_tile_id": after.tile_id,
        "after_generation": after.generation,
        "after_acquired": _rfc3339(after.acquired),
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
        "detected_at": _rfc3339(detected_at),
    }


# --- the change raster -------------------------------------------------------------------------

def change_raster_uri(before: Acquisition, after: Acquisition) -> str:
    """Beside the after tile's prediction COG, named by the before tile version."""
    stem = after.raster_uri[: -len(".tif")] if after.raster_uri.endswith(".tif") else \
        after.raster_uri
    return (f"{stem}.change-from-{safe_id(before.tile_id, 'tile_id')}-"
            f"{safe_id(before.generation, 'generation')}.tif")


def change_code(from_class: int, to_class: int, num_classes: int) -> int:
    """A change raster's pixel: ``from * K + to`` (K classes; K <= 15 fits uint8 under 255)."""
    return from_class * num_classes + to_class


def write_change_raster(before: Acquisition, after: Acquisition, class_names: Sequence[str],
                        colours: Sequence[tuple[int, int, int]], scratch: str | None,
                        ) -> tuple[str, str] | None:
    """The from/to change COG and its STAC Item beside the after prediction; None when the two
    predictions are not on the same grid (CRS, transform, shape), where pixels do not pair up."""
    import numpy as np
    import rasterio
    import rasterio.shutil
    from apache_beam.io.filesystems import FileSystems

    from transforms import cog, stac

    k = len(class_names)
    if k * k > NODATA_CLASS:
        return None
    with tempfile.TemporaryDirectory(prefix="change-", dir=scratch) as tmp:
        local = []
        for i, uri in enumerate((before.raster_uri, after.raster_uri)):
            local.append(os.path.join(tmp, f"{i}.tif"))
            with FileSystems.open(uri) as src, open(local[-1], "wb") as out:
                shutil.copyfileobj(src, out, 8 << 20)
        with rasterio.open(local[0]) as b, rasterio.open(local[1]) as a:
            if (b.crs != a.crs or b.transform != a.transform or b.shape != a.shape):
                return None
            from_, to = b.read(1), a.read(1)
            profile = {"crs": a.crs, "transform": a.transform, "height": a.height,
                       "width": a.width}
        valid = (from_ != NODATA_CLASS) & (to != NODATA_CLASS) & (from_ < k) & (to < k)
        codes = np.where(valid, from_.astype(np.uint16) * k + to, NODATA_CLASS).astype(np.uint8)
        plain = os.path.join(tmp, "plain.tif")
        with rasterio.open(plain, "w", driver="GTiff", count=1, dtype="uint8",
                           nodata=NODATA_CLASS, **profile) as dst:
            dst.write(codes, 1)
            # Unchanged pixels grey, changed ones the colour of the class they became.
            dst.write_colormap(1, {change_code(f, t, k): ((128, 128, 128, 255) if f == t
                                                          else (*colours[t], 255))
                                   for f in range(k) for t in range(k)})
            dst.update_tags(1, encoding=f"from_class*{k}+to_class",
                            classes=",".join(class_names))
        out = os.path.join(tmp, "change.tif")
        rasterio.shutil.copy(plain, out, driver="COG", compress="DEFLATE",
                             overview_resampling="nearest")
        uri = change_raster_uri(before, after)
        cog.upload(out, uri)
        item_uri = stac.item_uri(uri)
        item = stac.change_item(
            before=_item_facts(before), after=_item_facts(after), href=item_uri, raster_uri=uri,
            transform=tuple(profile["transform"])[:6], crs=profile["crs"].to_string(),
            shape=(profile["height"], profile["width"]), class_names=class_names,
            codes=[(f, t, int(n)) for f in range(k) for t in range(k)
                   if (n := int(np.count_nonzero(codes == change_code(f, t, k))))])
        with FileSystems.create(item_uri, mime_type="application/geo+json") as sink:
            sink.write(json.dumps(item, indent=1).encode())
    return uri, item_uri


def _item_facts(a: Acquisition) -> dict[str, Any]:
    return {"tile_id": a.tile_id, "generation": a.generation, "acquired": _rfc3339(a.acquired),
            "model": a.model, "raster_uri": a.raster_uri, "stac_uri": a.stac_uri,
            "footprint": a.footprint}


# --- the step ----------------------------------------------------------------------------------

def seed_sql(tiles_table: str) -> str:
    """The acquisitions of one location the tiles table holds, one row per tile version and
    model version (a retried insert lands a row twice; the first written is kept, as
    answered.sql keeps it), newest first. Complete rows only: a partial row is no answer."""
    project, rest = tiles_table.split(":", 1)
    return (
        "SELECT tile_id, tile_generation, acquired, model_name, model_version, role, complete, "
        "raster_uri, stac_uri, ST_ASTEXT(footprint) AS footprint, classes "
        f"FROM `{project}.{rest}` "
        "WHERE location_key = @location AND complete AND acquired IS NOT NULL "
        f"AND event_time >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL {SEED_LOOKBACK_DAYS} DAY) "
        "QUALIFY ROW_NUMBER() OVER (PARTITION BY tile_id, tile_generation, model_name, "
        "model_version, IFNULL(role, 'live') ORDER BY completed_at) = 1 "
        "ORDER BY acquired DESC LIMIT @limit")


def read_seed(tiles_table: str, location: str, limit: int) -> list[dict]:
    """Rows of :func:`seed_sql`, through Beam's BigQuery client (the stream's own endpoint)."""
    from apache_beam.io.gcp import bigquery_tools
    from google.cloud import bigquery

    config = bigquery.QueryJobConfig(query_parameters=[
        bigquery.ScalarQueryParameter("location", "STRING", location),
        bigquery.ScalarQueryParameter("limit", "INT64", limit)])
    client = bigquery_tools.BigQueryWrapper().gcp_bq_client
    project = tiles_table.split(":", 1)[0]
    return [dict(r) for r in client.query(seed_sql(tiles_table), job_config=config,
                                          project=project).result()]


def comparable_key(row: Mapping[str, Any]) -> bool:
    key = row.get("location_key")
    return bool(key) and not str(key).endswith(":unknown")


class _DetectFn(beam.DoFn):
    """Per location: remember, compare, fire. State is the last N acquisitions per model
    version, a cache of the tiles table, seeded from it at the first element a job sees."""

    HISTORY = ReadModifyWriteStateSpec("history", PickleCoder())  # None until seeded

    def __init__(self, rules: tuple[ChangeRule, ...], tiles_table: str | None, limit: int,
                 class_names: tuple[str, ...], colours: tuple[tuple[int, int, int], ...]):
        self._rules, self._table, self._limit = rules, tiles_table, limit
        self._names, self._colours = class_names, colours
        self._scratch: str | None = None
        self.fired = Metrics.counter("tilestream", "changes_fired")
        self.seeded = Metrics.counter("tilestream", "change_locations_seeded")

    def setup(self):
        self._scratch = tempfile.mkdtemp(prefix="tilestream-changes-")

    def teardown(self):
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def process(self, element: tuple[str, dict], history=beam.DoFn.StateParam(HISTORY)):
        location, row = element
        new = acquisition_of(row)
        if new is None:  # partial, or no acquisition time: nothing to remember or compare
            yield {**row, "changed": False}
            return
        known = history.read()
        if known is None:
            known = self._seed(location, new)
            if known is None:  # unreadable table: fail closed, nothing fires, retried next time
                yield {**row, "changed": False}
                yield dead_letter(STAGE, f"location {location}: the tiles table could not be "
                                         "read to seed its history; tile not compared",
                                  tile_id=row["tile_id"])
                return
        pending = comparisons(known, new)
        history.write(remember(known, new, self._limit))
        changed = False
        for before, after in pending:
            fired = evaluate(before, after, self._rules)
            if not fired:
                continue
            raster = None
            try:
                raster = write_change_raster(before, after, self._names, self._colours,
                                             self._scratch)
            except Exception as exc:  # the change row still goes out, without its raster
                yield dead_letter(STAGE, f"change raster {before.tile_id} -> {after.tile_id} "
                                         f"could not be written: {describe(exc)}",
                                  tile_id=after.tile_id)
            now = time.time()
            for firing in fired:
                self.fired.inc()
                changed |= after is new
                LOG.info("change at %s: %s, %s -> %s (%+.1f points, %+.1f ha)", location,
                         firing.rule.name, before.tile_id, after.tile_id, firing.delta_points,
                         firing.delta_hectares)
                yield beam.pvalue.TaggedOutput(CHANGES_TAG, change_row(
                    location, before, after, firing, raster, now))
        yield {**row, "changed": changed}

    def _seed(self, location: str, new: Acquisition) -> tuple[Acquisition, ...] | None:
        if not self._table:
            return ()
        try:
            rows = read_seed(self._table, location, self._limit * 4)
        except Exception as exc:
            LOG.warning("seeding change history of %s failed: %s", location, describe(exc))
            return None
        self.seeded.inc()
        known: tuple[Acquisition, ...] = ()
        for seen in reversed(rows):  # oldest first
            a = acquisition_of(seen)
            if a is not None and a.version != new.version:
                known = remember(known, a, self._limit)
        return known


class DetectedChanges(NamedTuple):
    answers: beam.PCollection  # every tile row, with location_key and changed
    changes: beam.PCollection  # rows of the changes table
    dead_letters: beam.PCollection


class DetectChanges(beam.PTransform):
    """Tile rows -> the same rows annotated with ``changed``, the ``changes`` rows the rules
    fire, and dead letters. ``tiles_table`` (``project:dataset.tiles``) seeds a location's
    history the first time a job sees it; None keeps history in state only."""

    def __init__(self, rules: tuple[ChangeRule, ...], tiles_table: str | None,
                 class_names: Sequence[str], colours: Sequence[tuple[int, int, int]],
                 history: int = DEFAULT_HISTORY):
        super().__init__()
        if history < 1:
            raise ValueError("--change_history must be at least 1")
        check_rules(rules, class_names)
        self._fn = _DetectFn(tuple(rules), tiles_table, history, tuple(class_names),
                             tuple(tuple(c) for c in colours))

    def expand(self, rows) -> DetectedChanges:
        split = rows | "ByLocation" >> beam.Partition(
            lambda row, _: 0 if comparable_key(row) else 1, 2)
        unplaced = split[1] | "NoLocation" >> beam.Map(lambda row: {**row, "changed": False})
        detected = (split[0]
                    | "LocationKeys" >> beam.Map(lambda row: (row["location_key"], row))
                    .with_output_types(KEYED)
                    | "Compare" >> beam.ParDo(self._fn).with_outputs(
                        CHANGES_TAG, DEAD_LETTER_TAG, main="answers"))
        answers = (detected.answers, unplaced) | "Answers" >> beam.Flatten()
        return DetectedChanges(answers, detected[CHANGES_TAG], detected[DEAD_LETTER_TAG])

