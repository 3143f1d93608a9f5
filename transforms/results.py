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
import json
import logging
import time
import zlib
from collections.abc import Mapping
from typing import Any

import apache_beam as beam
from apache_beam.coders import BooleanCoder, PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, on_timer

from transforms import timeouts
from transforms.answered import ANSWER_ROLES, compose
from transforms.deadletter import DEAD_LETTER_TAG, dead_letter
from transforms.records import DEAD_LETTER, DeadLetter
from transforms.result_events import (
    Pending,
    PendingChange,
    ResultEvent,
    answer_event,
    change_event,
    decide,
    decide_changes,
    letter_event,
    pending_of,
    utc_time,
)
from transforms.sinks import stamped

LOG = logging.getLogger(__name__)
STAGE = "results"
SHARDS = 4  # keys the waiting answers are spread over: one check query per shard
PUBLISH_DEADLINE_S = 60.0

# The check, derived from THE definition of an answer (transforms/answered.py): the
# answer of each waiting tile id, bounded by the earliest event time waiting.
CHECK_SQL = """WITH {answered since @since}
SELECT * EXCEPT (footprint) FROM tile_answers WHERE tile_id IN UNNEST(@tile_ids)"""
# (The footprint is the one the waiting row wrote, carried in ``Pending``: the local emulator
# cannot return a GEOGRAPHY beside the REPEATED classes in one row.)




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
    """(shard, Pending | PendingChange) -> ``answered`` events once readable, ``changed``
    events once their row is queryable; dead letters."""

    WALL_CLOCK, END_OF_INPUT = timeouts.timer_specs()
    WAITING = BagStateSpec("waiting", PickleCoder())
    ARMED = ReadModifyWriteStateSpec("armed", BooleanCoder())

    def __init__(self, topic: str, dataset: str, check_secs: float, wait_secs: float,
                 streaming: bool):
        self._topic, self._dataset = topic, dataset
        # Composed here, when the pipeline is built: workers have no pipeline/ops/sql.
        self._sql = compose(CHECK_SQL, dataset)
        self._check, self._wait, self._streaming = check_secs, wait_secs, streaming
        self.published = Metrics.counter("tilestream", "results_published")
        self.checks = Metrics.counter("tilestream", "results_checks")
        self.failed = Metrics.counter("tilestream", "results_failed")
        self.settled = Metrics.counter("tilestream", "results_settled")

    def setup(self):
        self._publisher = _Publisher(self._topic)
        self._bq = None

    def process(self, element: tuple[int, Pending | PendingChange],
                waiting=beam.DoFn.StateParam(WAITING), armed=beam.DoFn.StateParam(ARMED),
                wall=beam.DoFn.TimerParam(WALL_CLOCK), end=beam.DoFn.TimerParam(END_OF_INPUT)):
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
        """A drain: publish what is readable now; what is not gets a dead letter, never an
        event. Waiting here would hold the very bundles that write the rows it waits for (the
        drain would stall to the bound), so a drain checks once (docs/results.md)."""
        wall.clear()
        left = yield from self._check_once(list(waiting.read()))
        for p in left:
            self.failed.inc()
            tile_id = p.row.get("after_tile_id") if isinstance(p, PendingChange) else p.tile_id
            yield dead_letter(STAGE, "drained before its rows were readable: no event published "
                              "(republish from the tables)", tile_id=str(tile_id or ""))
        waiting.clear()
        armed.clear()

    def _check_once(self, waiting: list):
        """Check what waits once (a query for answers, one for changes); publish, dead-letter;
        returns what still waits."""
        changes = [w for w in waiting if isinstance(w, PendingChange)]
        pending = [w for w in waiting if isinstance(w, Pending)]
        left: list = []
        if changes:
            left += yield from self._check_changes(changes)
        if not pending:
            return left
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
        return left + decision.wait

    def _check_changes(self, changes: list[PendingChange]):
        """The ``changes`` rows are written by streaming inserts in a branch beside this one;
        a ``changed`` event goes out once its row is queryable, never before."""
        from google.cloud import bigquery

        now = time.time()
        ids = sorted({c.row["change_id"] for c in changes})
        try:
            if self._bq is None:
                self._bq = bigquery_client(self._dataset.split(".")[0])
            config = bigquery.QueryJobConfig(query_parameters=[
                bigquery.ArrayQueryParameter("ids", "STRING", ids)])
            self.checks.inc()
            found = {r["change_id"] for r in self._bq.query(
                f"SELECT change_id FROM `{self._dataset}.changes` "
                "WHERE change_id IN UNNEST(@ids)", job_config=config).result()}
        except Exception as exc:  # BigQuery unreachable: wait (bounded), never publish blind
            LOG.warning("results: checking %d changes failed: %s", len(ids), exc)
            found = set()
        publish, wait, expired = decide_changes(changes, found, now, self._wait)
        for c in publish:
            problem = self._publisher.publish(change_event(c.row))
            if problem:
                self.failed.inc()
                yield dead_letter(STAGE, problem, tile_id=str(c.row.get("after_tile_id") or ""))
            else:
                self.published.inc()
        for c in expired:
            self.failed.inc()
            yield dead_letter(STAGE, f"change {c.row['change_id']} not queryable in the changes "
                              f"table after {self._wait:g}s: no event published",
                              tile_id=str(c.row.get("after_tile_id") or ""))
        return wait

    def _answers(self, pending: list[Pending]) -> dict[str, Mapping[str, Any]]:
        from google.cloud import bigquery

        project = self._dataset.split(".")[0]
        if self._bq is None:
            self._bq = bigquery_client(project)
        since = min(utc_time(p.event_time) for p in pending) - dt.timedelta(seconds=1)
        config = bigquery.QueryJobConfig(query_parameters=[
            bigquery.ScalarQueryParameter("since", "TIMESTAMP", since),
            bigquery.ArrayQueryParameter("tile_ids", "STRING",
                                         sorted({p.tile_id for p in pending}))])
        self.checks.inc()
        rows = self._bq.query(self._sql, job_config=config).result()
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


class _ReleaseGatedFn(beam.DoFn):
    """Publishes only while this job's release answers (``model.channels.release_role``):
    always without a registry; with one, as the process's channels follower last read them. Any
    doubt is not live: a green job on trial publishes nothing."""

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

    def _publish(self, event: ResultEvent, tile_id: str):
        problem = self._publisher.publish(event)
        if problem:
            self.failed.inc()
            yield dead_letter(STAGE, problem, tile_id=tile_id)
        else:
            self.published.inc()


class _PublishChangesFn(_ReleaseGatedFn):
    """``changes`` rows -> rows waiting to be published (``AwaitAnswers`` publishes each once
    its row is queryable: the write is a branch beside this one, nothing orders the two). A row
    of a shadow tile, or any row while this job's release is not live, publishes nothing."""

    def process(self, row: dict):
        if (row.get("role") or "live") in ANSWER_ROLES and self._live():
            # The payload is the row as written: ``WriteRows`` stamps the release on it.
            yield PendingChange(stamped(row, self._release), time.time())


class _PublishLettersFn(_ReleaseGatedFn):
    """Dead letters -> ``refused`` / ``dead_lettered`` events, while this job's release is live."""

    def process(self, letter: DeadLetter):
        if letter.disposition != DEAD_LETTER or letter.stage == STAGE or not self._live():
            return
        yield from self._publish(letter_event(letter, self._release), letter.tile_id)


def check_secs(load_secs: int | None) -> float:
    """How often waiting answers are checked: a few times per chip-row load (the rows they wait
    for), at least every 2 s and at most every 30 s (docs/results.md has the cost)."""
    return min(30.0, max(2.0, (load_secs or 0) / 3))


def _tile_of(waiting: Pending | PendingChange) -> str:
    return waiting.tile_id if isinstance(waiting, Pending) else str(waiting.row["after_tile_id"])


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
        waiting = [answers | "Waiting" >> beam.FlatMap(
            lambda row: [p for p in [pending_of(row, release, time.time())] if p])]
        if pcolls.get("changes") is not None:
            waiting.append(pcolls["changes"] | "PublishChanges" >> beam.ParDo(_PublishChangesFn(
                self._topic, release, self._follower_args)))
        awaited = (waiting | "AllWaiting" >> beam.Flatten()
                   | "ByShard" >> beam.Map(lambda p: (_shard(_tile_of(p)), p))
                   | "AwaitAnswers" >> beam.ParDo(_AwaitAnswersFn(
                       self._topic, self._dataset, self._check, self._wait, self._streaming)
                   ).with_outputs(DEAD_LETTER_TAG, main="none"))
        refusals = letters | "PublishLetters" >> beam.ParDo(_PublishLettersFn(
            self._topic, release, self._follower_args)).with_outputs(DEAD_LETTER_TAG, main="none")
        failed = [awaited[DEAD_LETTER_TAG], refusals[DEAD_LETTER_TAG]]
        return failed | "ResultDeadLetters" >> beam.Flatten()
