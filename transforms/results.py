"""Results out as events: one Pub/Sub message per outcome a consumer reads (docs/results.md).

``answered``: a live or canary tile answer, published only once a consumer can read all of it:
its tile row is THE answer of the tile (``tile_answers`` of ``transforms/sql/answered.sql``,
which also requires every chip row; chip rows arrive by load job, after the tile row) and its
COG and STAC Item exist. Answers wait in keyed state (a few shard keys) and are checked in
batches: one query per shard every ``check_secs`` while any waits, the payload built from the
row the query returns, so the event says what the tables say. One still unreadable after
``wait_secs`` is dead-lettered (stage ``results``), never published.

``refused`` (the input: stages parse, granules, chips) and ``dead_lettered`` (the stream's own
failure to answer) carry the reason and every source message id; the event is the whole record.

Event ids are derived from the answer (tile version, model, release, role), so a replay
publishes the same id with the same payload. A shadow row, and every letter of a job whose
release is not live (green on trial), publishes nothing. Publishing is retried, then
dead-lettered; it never holds scoring back: this is a branch of its own after the tile rows.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.coders import BooleanCoder, PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, on_timer

from transforms import timeouts
from transforms.answered import ANSWER_ROLES
from transforms.deadletter import DEAD_LETTER_TAG, dead_letter
from transforms.records import DEAD_LETTER, DeadLetter

LOG = logging.getLogger(__name__)
STAGE = "results"
SCHEMA_ID = "https://tilestream.dev/schemas/result-event/v1"
ANSWERED, REFUSED, DEAD_LETTERED, CHANGED = "answered", "refused", "dead_lettered", "changed"
# Stages whose dead letters are about the input itself (the stream refused it); every other
# stage's are the stream failing to answer.
INPUT_STAGES = frozenset({"parse", "granules", "chips"})
SHARDS = 4  # keys the waiting answers are spread over: one check query per shard
PUBLISH_DEADLINE_S = 60.0

# The check, derived from THE definition of an answer (transforms/answered.py): the
# answer of each waiting tile id, bounded by the earliest event time waiting.
CHECK_SQL = """WITH {answered since @since}
SELECT * EXCEPT (footprint) FROM tile_answers WHERE tile_id IN UNNEST(@tile_ids)"""
# (The footprint is the one the waiting row wrote, carried in ``Pending``: the local emulator
# cannot return a GEOGRAPHY beside the REPEATED classes in one row.)


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
    ident = event_id(CHANGED, json.dumps(body, sort_keys=True))
    attributes = {"outcome": CHANGED, "changed": "true"}
    for key, name in (("location_key", "location"), ("tile_id", "tile_id")):
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


def _when(value: Any) -> dt.datetime:
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
            if not mine and _when(answer["generation_time"]) > _when(p.event_time):
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


def publisher_client() -> Any:
    """The Pub/Sub publisher of this process (the local stack binds it to its emulator)."""
    from google.cloud import pubsub_v1

    return pubsub_v1.PublisherClient()


def bigquery_client(project: str) -> Any:
    """A BigQuery client where the stream's writes go (Beam's module; the local stack's)."""
    from apache_beam.io.gcp import bigquery_tools

    return bigquery_tools.gcp_bigquery.Client(project=project)


class _Publisher:
    """Publishes events with retries; returns why one could not be published."""

    def __init__(self, topic: str):
        self._topic = topic
        self._client = None

    def publish(self, event: ResultEvent) -> str | None:
        from google.api_core import exceptions, retry

        if self._client is None:
            self._client = publisher_client()
        transient = retry.if_exception_type(exceptions.Aborted, exceptions.DeadlineExceeded,
                                            exceptions.InternalServerError,
                                            exceptions.ServiceUnavailable,
                                            exceptions.TooManyRequests, exceptions.Unknown)
        policy = retry.Retry(predicate=transient, initial=0.2, maximum=5.0,
                             timeout=PUBLISH_DEADLINE_S)
        data = json.dumps(event.payload, sort_keys=True).encode()
        try:
            self._client.publish(self._topic, data, retry=policy, event_id=event.event_id,
                                 **dict(event.attributes)).result(timeout=PUBLISH_DEADLINE_S)
        except Exception as exc:
            return f"publishing event {event.event_id} to {self._topic} failed: {exc!r}"[:1000]
        return None


class _AwaitAnswersFn(beam.DoFn):
    """(shard, Pending) -> ``answered`` events published once readable; dead letters."""

    WALL_CLOCK, END_OF_INPUT = timeouts.timer_specs()
    WAITING = BagStateSpec("waiting", PickleCoder())
    ARMED = ReadModifyWriteStateSpec("armed", BooleanCoder())

    def __init__(self, topic: str, dataset: str, check_secs: float, wait_secs: float,
                 streaming: bool):
        self._topic, self._dataset = topic, dataset
        self._check, self._wait, self._streaming = check_secs, wait_secs, streaming
        self.published = Metrics.counter("tilestream", "results_published")
        self.checks = Metrics.counter("tilestream", "results_checks")
        self.failed = Metrics.counter("tilestream", "results_failed")
        self.settled = Metrics.counter("tilestream", "results_settled")

    def setup(self):
        self._publisher = _Publisher(self._topic)
        self._bq = None

    def process(self, element: tuple[int, Pending], waiting=beam.DoFn.StateParam(WAITING),
                armed=beam.DoFn.StateParam(ARMED), wall=beam.DoFn.TimerParam(WALL_CLOCK),
                end=beam.DoFn.TimerParam(END_OF_INPUT)):
        waiting.add(element[1])
        if not armed.read():
            armed.write(True)
            timeouts.arm(wall, end, self._streaming, self._check)

    @on_timer(WALL_CLOCK)
    def on_wall_clock(self, waiting=beam.DoFn.StateParam(WAITING),
                      armed=beam.DoFn.StateParam(ARMED), wall=beam.DoFn.TimerParam(WALL_CLOCK),
                      end=beam.DoFn.TimerParam(END_OF_INPUT)):
        left = yield from self._check_once(list(waiting.read()))
        waiting.clear()
        for p in left:
            waiting.add(p)
        armed.write(bool(left))
        if left:
            timeouts.arm(wall, end, self._streaming, self._check)

    @on_timer(END_OF_INPUT)
    def on_end_of_input(self, waiting=beam.DoFn.StateParam(WAITING),
                        armed=beam.DoFn.StateParam(ARMED),
                        wall=beam.DoFn.TimerParam(WALL_CLOCK)):
        """A drain: check until what waits is readable or its bound has passed."""
        wall.clear()
        left = list(waiting.read())
        while left:
            left = yield from self._check_once(left)
            if left:
                time.sleep(self._check)
        waiting.clear()
        armed.clear()

    def _check_once(self, pending: list[Pending]):
        """Check ``pending`` once (one query); publish, dead-letter; returns what waits."""
        if not pending:
            return []
        now = time.time()
        try:
            answers = self._answers(pending)
        except Exception as exc:  # BigQuery unreachable: wait (bounded), never publish blind
            LOG.warning("results: checking %d answers failed: %s", len(pending), exc)
            answers = {}
        decision = decide(pending, answers, _readable, now, self._wait)
        for p, answer in decision.publish:
            problem = self._publisher.publish(answer_event(answer, p.location_key, p.changed,
                                                             p.footprint))
            if problem:
                self.failed.inc()
                yield dead_letter(STAGE, problem, tile_id=p.tile_id)
            else:
                self.published.inc()
        for p, why in decision.settled:
            self.settled.inc()
            LOG.info("results: no event for %s@%s from this job: %s", p.tile_id,
                     p.tile_generation, why)
        for p, reason in decision.expired:
            self.failed.inc()
            yield dead_letter(STAGE, reason, tile_id=p.tile_id)
        return decision.wait

    def _answers(self, pending: list[Pending]) -> dict[str, Mapping[str, Any]]:
        from google.cloud import bigquery

        from transforms.answered import compose

        project = self._dataset.split(".")[0]
        if self._bq is None:
            self._bq = bigquery_client(project)
        since = min(_when(p.event_time) for p in pending) - dt.timedelta(seconds=1)
        config = bigquery.QueryJobConfig(query_parameters=[
            bigquery.ScalarQueryParameter("since", "TIMESTAMP", since),
            bigquery.ArrayQueryParameter("tile_ids", "STRING",
                                         sorted({p.tile_id for p in pending}))])
        self.checks.inc()
        rows = self._bq.query(compose(CHECK_SQL, self._dataset), job_config=config).result()
        return {row["tile_id"]: dict(row) for row in rows}


def _readable(answer: Mapping[str, Any]) -> bool:
    """The answer's COG and (when the row names one) STAC Item exist."""
    from apache_beam.io.filesystems import FileSystems

    uris = [answer["raster_uri"], *([answer["stac_uri"]] if answer.get("stac_uri") else [])]
    try:
        return all(FileSystems.exists(uri) for uri in uris)
    except Exception as exc:  # unreadable storage: not readable yet (bounded by the wait)
        LOG.warning("results: cannot check %s: %s", uris, exc)
        return False


class _PublishChangesFn(beam.DoFn):
    """``changes`` rows -> ``changed`` events (a shadow job writes none)."""

    def __init__(self, topic: str):
        self._topic = topic
        self.published = Metrics.counter("tilestream", "results_published")
        self.failed = Metrics.counter("tilestream", "results_failed")

    def setup(self):
        self._publisher = _Publisher(self._topic)

    def process(self, row: dict):
        problem = self._publisher.publish(change_event(row))
        if problem:
            self.failed.inc()
            yield dead_letter(STAGE, problem, tile_id=str(row.get("tile_id") or ""))
        else:
            self.published.inc()


class _PublishLettersFn(beam.DoFn):
    """Dead letters -> ``refused`` / ``dead_lettered`` events, only while this job's release
    answers (``model.channels.release_role``): always without a registry; with one, as the
    process's channels follower last read them. Any doubt is not live: a green job publishes
    nothing."""

    def __init__(self, topic: str, release: str, follower_args: tuple | None):
        self._topic, self._release, self._follower_args = topic, release, follower_args
        self.published = Metrics.counter("tilestream", "results_published")
        self.failed = Metrics.counter("tilestream", "results_failed")

    def setup(self):
        self._publisher = _Publisher(self._topic)
        self._follower = None
        if self._follower_args:
            from transforms.routing import process_follower

            self._follower = process_follower(*self._follower_args)
            self._follower.start_background()

    def _live(self) -> bool:
        if self._follower is None:
            return not self._follower_args
        try:
            from model.channels import release_role

            return release_role(self._follower.snapshot.channels, self._release) == "live"
        except Exception:
            return False

    def process(self, letter: DeadLetter):
        if letter.disposition != DEAD_LETTER or letter.stage == STAGE or not self._live():
            return
        problem = self._publisher.publish(letter_event(letter, self._release))
        if problem:
            self.failed.inc()
            yield dead_letter(STAGE, problem, tile_id=letter.tile_id)
        else:
            self.published.inc()


def check_secs(load_secs: int | None) -> float:
    """How often waiting answers are checked: a few times per chip-row load (the rows they wait
    for), at least every 2 s and at most every 30 s (docs/results.md has the cost)."""
    return min(30.0, max(2.0, (load_secs or 0) / 3))


def _shard(tile_id: str) -> int:
    return zlib.crc32(tile_id.encode()) % SHARDS


class PublishResults(beam.PTransform):
    """``{"answers", "letters"[, "changes"]}`` -> events on ``topic``; returns its own dead
    letters (stage ``results``, about no message: the message was answered, its event was not
    published), to be written by a writer of their own (they cannot go back into the stream's).

    ``answers``: tile rows of this job (``location_key``, ``changed`` read when present);
    ``changes``: rows of the ``changes`` table; ``letters``: every dead letter and event.
    """

    def __init__(self, topic: str, dataset: str, release: str, *, check_secs: float,
                 wait_secs: float, streaming: bool, follower_args: tuple | None = None):
        super().__init__()
        self._topic, self._dataset, self._release = topic, dataset, release
        self._check, self._wait, self._streaming = check_secs, wait_secs, streaming
        self._follower_args = follower_args  # (registry, card, start, poll) with a registry

    def expand(self, pcolls):
        answers, letters = pcolls["answers"], pcolls["letters"]
        release = self._release
        waiting = (answers
                   | "Waiting" >> beam.FlatMap(
                       lambda row: [p for p in [pending_of(row, release, time.time())] if p])
                   | "ByShard" >> beam.Map(lambda p: (_shard(p.tile_id), p))
                   | "AwaitAnswers" >> beam.ParDo(_AwaitAnswersFn(
                       self._topic, self._dataset, self._check, self._wait, self._streaming)
                   ).with_outputs(DEAD_LETTER_TAG, main="none"))
        refusals = letters | "PublishLetters" >> beam.ParDo(_PublishLettersFn(
            self._topic, release, self._follower_args)).with_outputs(DEAD_LETTER_TAG, main="none")
        failed = [waiting[DEAD_LETTER_TAG], refusals[DEAD_LETTER_TAG]]
        if pcolls.get("changes") is not None:
            failed.append((pcolls["changes"] | "PublishChanges" >> beam.ParDo(
                _PublishChangesFn(self._topic)).with_outputs(DEAD_LETTER_TAG, main="none")
                           )[DEAD_LETTER_TAG])
        return failed | "ResultDeadLetters" >> beam.Flatten()
