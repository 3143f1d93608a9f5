"""The events of the results topic, without Beam: their shapes, their stable ids, and the
decision which waiting answer is published (docs/results.md). ``transforms/results.py`` holds the
stream's steps that publish them; tools and tests use these without a pipeline runtime."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from transforms.answered import ANSWER_ROLES
from transforms.records import DeadLetter

SCHEMA_ID = "https://tilestream.dev/schemas/result-event/v1"
ANSWERED, REFUSED, DEAD_LETTERED, CHANGED = "answered", "refused", "dead_lettered", "changed"
# Stages whose dead letters are about the input itself (the stream refused it); every other
# stage's are the stream failing to answer.
INPUT_STAGES = frozenset({"parse", "granules", "chips"})


@dataclass(frozen=True)
class Pending:
    """An answer of this job waiting to be readable; enough to recognise its row."""

    tile_id: str
    tile_generation: str
    row_id: str
    release: str
    role: str
    event_time: str  # RFC 3339, the tile version's; bounds the check query
    since: float  # when the publisher took it (epoch seconds)
    location_key: str | None = None
    changed: bool = False
    footprint: str = ""  # WKT, as the row wrote it


@dataclass(frozen=True)
class ResultEvent:
    """One Pub/Sub message: JSON ``payload`` and filterable string ``attributes``."""

    event_id: str
    payload: dict
    attributes: tuple[tuple[str, str], ...]


def event_id(*parts: object) -> str:
    """A stable id: the same answer (or letter) always gets the same one."""
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()[:32]


def _rfc3339(value: Any) -> str | None:
    from transforms.stac import _time_text

    return _time_text(value)


def answer_event(row: Mapping[str, Any], location_key: str | None = None,
                 changed: bool = False, footprint: str | None = None) -> ResultEvent:
    """The ``answered`` event of an answer row as BigQuery returns it (or a tile row dict)."""
    from transforms.geometry import footprint_geojson

    role = row.get("role") or "live"
    classes = sorted(row.get("classes") or [], key=lambda c: int(c["class_id"]))
    total = sum(int(c["pixels"]) for c in classes)
    location = row.get("location_key") or location_key
    drifted = row.get("drifted")
    ident = event_id(ANSWERED, row["tile_id"], row["tile_generation"], row["model_name"],
                     row["model_version"], row.get("release") or "", role)
    payload = {
        "schema": SCHEMA_ID,
        "event_id": ident,
        "outcome": ANSWERED,
        "tile_id": row["tile_id"],
        "tile_generation": row["tile_generation"],
        "acquired": _rfc3339(row.get("acquired")),
        "footprint": footprint_geojson(str(footprint or row["footprint"])),
        "model": {"name": row["model_name"], "version": row["model_version"]},
        "release": row.get("release"),
        "role": role,
        "complete": bool(row["complete"]),
        "classes": [{"class_id": int(c["class_id"]), "name": c["name"],
                     "pixels": int(c["pixels"]), "area_m2": float(c["area_m2"]),
                     "fraction": int(c["pixels"]) / total if total else 0.0}
                    for c in classes],
        "drifted": None if drifted is None else bool(drifted),
        "raster_uri": row["raster_uri"],
        "stac_uri": row.get("stac_uri"),
        "published": _rfc3339(row["published"]),
        "completed_at": _rfc3339(row["completed_at"]),
        "latency_s": float(row["latency_s"]),
        "location_key": location,
        "changed": bool(changed),
        "source_message_ids": list(row.get("source_message_ids") or []),
    }
    attributes = {"outcome": ANSWERED, "tile_id": row["tile_id"],
                  "model": f"{row['model_name']}/{row['model_version']}",
                  "drifted": "true" if drifted else "false",
                  "changed": "true" if changed else "false"}
    if location:
        attributes["location"] = location
    return ResultEvent(ident, payload, tuple(sorted(attributes.items())))


def letter_event(letter: DeadLetter, release: str) -> ResultEvent:
    """The ``refused`` or ``dead_lettered`` event of a dead letter."""
    outcome = REFUSED if letter.stage in INPUT_STAGES else DEAD_LETTERED
    ids = sorted(letter.message_ids or ((letter.message_id,) if letter.message_id else ()))
    ident = event_id(outcome, letter.tile_id, letter.stage, letter.reason, *ids)
    payload = {"schema": SCHEMA_ID, "event_id": ident, "outcome": outcome,
               "tile_id": letter.tile_id or None, "stage": letter.stage,
               "reason": letter.reason, "source_message_ids": ids, "release": release}
    # No time in it: a replayed letter is the same event (the message's publish time says when).
    attributes = {"outcome": outcome}
    if letter.tile_id:
        attributes["tile_id"] = letter.tile_id
    return ResultEvent(ident, payload, tuple(sorted(attributes.items())))


def change_event(row: Mapping[str, Any]) -> ResultEvent:
    """The ``changed`` event of a ``changes`` row: the row itself is the payload."""
    body = json.loads(json.dumps(dict(row), sort_keys=True, default=str))
    # The change's own id (location, both tile versions, model, rule): found again after a
    # replay it is the same change and the same event; only ``detected_at`` can differ.
    ident = event_id(CHANGED, body.get("change_id") or json.dumps(body, sort_keys=True))
    attributes = {"outcome": CHANGED, "changed": "true"}
    for key, name in (("location_key", "location"), ("after_tile_id", "tile_id")):
        if body.get(key):
            attributes[name] = str(body[key])
    if body.get("model_name"):
        attributes["model"] = f"{body['model_name']}/{body.get('model_version', '')}"
    payload = {"schema": SCHEMA_ID, "event_id": ident, "outcome": CHANGED, **body}
    return ResultEvent(ident, payload, tuple(sorted(attributes.items())))


def pending_of(row: Mapping[str, Any], release: str, now: float) -> Pending | None:
    """A tile row of this job as a waiting answer; None for a row that answers nobody."""
    role = row.get("role") or "live"
    if role not in ANSWER_ROLES:
        return None
    return Pending(row["tile_id"], row["tile_generation"], row["row_id"], release, role,
                   str(row["event_time"]), now, row.get("location_key"),
                   bool(row.get("changed", False)), str(row["footprint"]))


@dataclass
class Decision:
    """What one check decided about the waiting answers."""

    publish: list[tuple[Pending, Mapping[str, Any]]]
    wait: list[Pending]
    settled: list[tuple[Pending, str]]  # no event from this job, and why (not an error)
    expired: list[tuple[Pending, str]]


def utc_time(value: Any) -> dt.datetime:
    """A BigQuery TIMESTAMP (datetime or RFC 3339 text) as an aware UTC datetime."""
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    stamp = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)


def decide(pending: Iterable[Pending], answers: Mapping[str, Mapping[str, Any]],
           readable: Callable[[Mapping[str, Any]], bool], now: float,
           wait_secs: float) -> Decision:
    """Sort waiting answers by the tiles' answers as BigQuery gives them (``tile_answers``)."""
    out = Decision([], [], [], [])
    for p in pending:
        answer = answers.get(p.tile_id)
        if answer is not None:
            mine = (answer["row_id"] == p.row_id and (answer.get("release") or "") == p.release
                    and answer.get("read_role") == p.role)
            if mine and readable(answer):
                out.publish.append((p, answer))
                continue
            if not mine and answer["tile_generation"] == p.tile_generation:
                out.settled.append((p, f"answered by release {answer.get('release')}"))
                continue
            if not mine and utc_time(answer["generation_time"]) > utc_time(p.event_time):
                out.settled.append((p, f"superseded by generation {answer['tile_generation']}"))
                continue
        if now - p.since > wait_secs:
            out.expired.append((p, (
                f"tile {p.tile_id}@{p.tile_generation} not readable after {wait_secs:g}s (its "
                "chip rows, COG or STAC Item missing, or not the tile's answer): no event "
                "published")))
        else:
            out.wait.append(p)
    return out


@dataclass(frozen=True)
class PendingChange:
    """A ``changes`` row of this job waiting to be queryable (its event is the row as written)."""

    row: dict
    since: float  # when the publisher took it (epoch seconds)


def decide_changes(pending: Iterable[PendingChange], found: set[str], now: float,
                   wait_secs: float) -> tuple[list[PendingChange], list[PendingChange],
                                              list[PendingChange]]:
    """(publish, wait, expired): a change is published once its row is queryable (``found``:
    the change ids the ``changes`` table returned), never after ``wait_secs`` without it."""
    publish, wait, expired = [], [], []
    for p in pending:
        if p.row["change_id"] in found:
            publish.append(p)
        else:
            (expired if now - p.since > wait_secs else wait).append(p)
    return publish, wait, expired
