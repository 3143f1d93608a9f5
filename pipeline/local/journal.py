"""Local mode only: a journal that makes a killed in-process stream lose nothing.

Beam's in-process runner acknowledges Pub/Sub messages as soon as it has pulled them; on Dataflow
the service acknowledges only after the work is durably committed. To give the local default the
same guarantee, every pulled message is appended (and fsynced) to a journal in the stack's run
directory *before* it is acknowledged. When the stream starts again, the journal is reconciled
with the books in BigQuery: a message is finished when it is in a tile row
(``source_message_ids``) whose chip rows are all in, the ``events`` table or the ``dead_letters``
table. Unfinished messages have their partial rows deleted and are published again, so each
tile ends up scored exactly once: one tile row, one chip row per chip, one COG (same path,
rewritten). Each replay names the message it stands for and that message's first publish time
(``transforms.announcements.REPLAY_OF``/``FIRST_PUBLISHED``), so latency runs from the first
publish; the original is booked ``replayed`` in ``events`` ("replayed as <new id>"), so every
message id still has exactly one outcome. The replays are made as ``local-journal``, an identity
of this machine only (GCP redelivers on its own).

A stop (SIGTERM) drains: pulls come back empty, the source's watermark moves past the end of
the global window so the stream's drain paths fire (``patches.pubsub_drain``; docs/operations.md,
"What a drain does"), and the process waits until the books account for everything it pulled
(:func:`drain`), as Dataflow's drain finishes what a job has read.
The same client keeps each pull short (``PULL_WAIT_SECS``) and lifts gRPC's 4 MB message limit.
Nothing here is used on Dataflow: ``pipeline.main`` installs it only with ``--local``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.local.stack import LocalStack
from transforms.sinks import BigQueryTables

LOG = logging.getLogger(__name__)
JOURNAL_DIR = "journal"
JOURNAL_IDENTITY = "local-journal"
REPLAYED = "replayed"  # the events disposition of a message the journal published again
PULL_LIMIT_BYTES = 64 << 20  # gRPC's 4 MB default would fail a pull of a few large messages
# The in-process runner pulls with a 30 s deadline and holds the source's watermark until the
# pull returns, so on a quiet subscription every trigger and timer downstream waited up to 30 s
# (tile rows 18-33 s apart between identical runs; chip-row load jobs 30 s late). A short pull
# lets the watermark, and so the stream's timers, follow the clock. A pull also holds the
# runner's only worker thread: at 1 s, that thread sat idle for 27 s of a paced 7,320² tile's
# 82 s, between strip tasks; at 0.1 s the tile took 65 s.
PULL_WAIT_SECS = 0.1


# Set by :func:`drain`: from then on every pull comes back empty.
_DRAINING = threading.Event()


def journal_path(stack: LocalStack, subscription: str, tables: BigQueryTables) -> Path:
    """One journal per (subscription, dataset): each is reconciled with its own books."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{subscription}__{tables.tiles.rsplit('.', 1)[0]}")
    return Path(stack.run_dir) / JOURNAL_DIR / f"{name}.jsonl"


@dataclass(frozen=True)
class JournalEntry:
    message_id: str
    data: bytes
    attributes: dict[str, str]
    published: float = 0.0  # this delivery's publish time


class _JournalingSubscriber:
    """A SubscriberClient whose ``pull`` journals what it received before anyone can ack it."""

    def __init__(self, client, path: Path):
        self._client = client
        self._path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def pull(self, *args, **kwargs):
        from google.api_core.exceptions import DeadlineExceeded
        from google.pubsub_v1.types import PullResponse

        if _DRAINING.is_set():  # a draining job reads nothing more; the clock still moves
            time.sleep(PULL_WAIT_SECS)
            return PullResponse()
        kwargs["timeout"] = min(kwargs.get("timeout") or PULL_WAIT_SECS, PULL_WAIT_SECS)
        try:
            response = self._client.pull(*args, **kwargs)
        except DeadlineExceeded:  # nothing arrived in time: an empty pull, as the runner expects
            return PullResponse()
        if response.received_messages:
            lines = [json.dumps({"id": rm.message.message_id,
                                 "data": base64.b64encode(rm.message.data).decode(),
                                 "attributes": dict(rm.message.attributes),
                                 "published": rm.message.publish_time.timestamp()})
                     for rm in response.received_messages]
            with self._lock, open(self._path, "a") as out:
                out.write("\n".join(lines) + "\n")
                out.flush()
                os.fsync(out.fileno())
        return response

    def __getattr__(self, name):
        return getattr(self._client, name)


def install(stack: LocalStack, subscription: str, tables: BigQueryTables) -> None:
    """Route the in-process runner's Pub/Sub reads through a journaling, large-message client
    that carries this process's identity (``pipeline/local/identity.py``)."""
    from google.cloud import pubsub
    from google.pubsub_v1.services.subscriber.transports.grpc import SubscriberGrpcTransport

    from pipeline.local import identity, patches

    path = journal_path(stack, subscription, tables)
    _DRAINING.clear()  # a stream started in this process reads, whatever one before it did

    def make_client():
        channel = identity.identity_channel(
            stack.pubsub_host, [("grpc.max_receive_message_length", PULL_LIMIT_BYTES)])
        client = pubsub.SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))
        return _JournalingSubscriber(client, path)

    patches.pubsub_reader(make_client).install()
    patches.pubsub_drain(_DRAINING.is_set).install()


def pulled_ids(stack: LocalStack, dataset: str) -> set[str]:
    """Every message id the journals of ``dataset``'s streams hold (pulled, not yet reconciled
    by a restart: a running stream's whole intake)."""
    suffix = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset.replace(".", ":", 1))
    ids: set[str] = set()
    for path in (Path(stack.run_dir) / JOURNAL_DIR).glob(f"*__{suffix}.jsonl"):
        ids |= {e.message_id for e in read(path)}
    return ids


def read(path: Path) -> list[JournalEntry]:
    if not path.exists():
        return []
    entries: dict[str, JournalEntry] = {}
    for line in path.read_text().splitlines():
        try:
            raw = json.loads(line)
            entries[raw["id"]] = JournalEntry(raw["id"], base64.b64decode(raw["data"]),
                                              dict(raw["attributes"]),
                                              float(raw.get("published") or 0.0))
        except (ValueError, KeyError, TypeError):
            LOG.warning("skipping a torn journal line (the stream died while writing it)")
    return list(entries.values())


def finished(stack: LocalStack, tables: BigQueryTables,
             ids: list[str]) -> tuple[set[str], list[str]]:
    """Which of ``ids`` the books account for: an event, a dead letter, or tile rows of any role
    that are all whole (``sql/answered.sql``: every chip row in; chip rows are loaded in
    batches, so a tile row can land first). Also the row ids of tile rows written for messages
    that are not finished, to be removed before the replay writes them again."""
    from google.api_core.exceptions import NotFound
    from google.cloud import bigquery

    from pipeline.ops.queries import ALL_TIME, compose

    bq = stack.bigquery()
    dataset = _sql(tables.tiles).rsplit(".", 1)[0]

    def rows(sql: str) -> list[dict]:
        config = bigquery.QueryJobConfig(
            query_parameters=[bigquery.ArrayQueryParameter("ids", "STRING", ids)])
        try:
            return [dict(row) for row in bq.query(compose(sql, dataset),
                                                  job_config=config).result()]
        except NotFound:  # a dataset no stream has written to yet
            return []

    done = {r["id"] for r in rows(  # a letter books every message it names
        f"WITH {{answered since {ALL_TIME}}} SELECT DISTINCT message_id AS id "
        "FROM message_outcomes WHERE written_in != 'tiles' AND message_id IN UNNEST(@ids)")}
    tile_rows = rows(
        f"WITH {{answered since {ALL_TIME}}} SELECT row_id, whole, source_message_ids "
        "FROM answered_tiles "
        "WHERE EXISTS (SELECT 1 FROM UNNEST(source_message_ids) AS m WHERE m IN UNNEST(@ids))")
    whole: dict[str, bool] = {}
    for r in tile_rows:
        for m in r["source_message_ids"]:
            whole[m] = whole.get(m, True) and r["whole"]
    done |= {m for m, complete in whole.items() if complete and m in ids}
    unfinished_rows = [r["row_id"] for r in tile_rows
                       if not all(whole.get(m, False) for m in r["source_message_ids"])]
    return done, unfinished_rows


def drain(stack: LocalStack, subscription: str, tables: BigQueryTables,
          timeout_s: float, every_s: float = 1.0) -> list[str]:
    """Stop pulling and wait until the books account for every message this stream pulled, as
    Dataflow's drain stops reading and finishes the work in flight (a blue-green cut-over
    relies on it). The input's end fires each step's drain path, which books work that can no
    longer complete as ``drained``. Returns the ids still unfinished after ``timeout_s``: the
    journal keeps them, and the next start on this subscription replays them."""
    from pipeline.local.identity import acting_as

    _DRAINING.set()
    path = journal_path(stack, subscription, tables)
    deadline = time.monotonic() + timeout_s
    with acting_as(JOURNAL_IDENTITY):  # a mechanism of this machine: Dataflow drains itself
        while True:
            ids = [e.message_id for e in read(path)]
            left = sorted(set(ids) - finished(stack, tables, ids)[0]) if ids else []
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(every_s)


def replay_unfinished(stack: LocalStack, subscription: str,
                      tables: BigQueryTables) -> dict[str, int]:
    """Reconcile the journal with the books; publish unfinished messages again. Returns counts."""

    from pipeline.local.identity import acting_as

    path = journal_path(stack, subscription, tables)
    entries = read(path)
    if not entries:
        return {"journalled": 0, "replayed": 0}
    with acting_as(JOURNAL_IDENTITY):  # a mechanism of this machine: no identity's on GCP
        return _replay(stack, subscription, tables, path, entries)


def _replay(stack: LocalStack, subscription: str, tables: BigQueryTables, path: Path,
            entries: list[JournalEntry]) -> dict[str, int]:
    from google.api_core.exceptions import NotFound
    from google.cloud import bigquery

    from transforms.announcements import FIRST_PUBLISHED, REPLAY_OF, first_publish
    from transforms.sinks import bq_timestamp

    done, stale_tile_rows = finished(stack, tables, [e.message_id for e in entries])
    pending = [e for e in entries if e.message_id not in done]
    if pending:
        ids = [e.message_id for e in pending]
        for sql, values in (
                (f"DELETE FROM `{_sql(tables.chips)}` WHERE EXISTS (SELECT 1 FROM "
                 "UNNEST(source_message_ids) AS m WHERE m IN UNNEST(@ids))", ids),
                (f"DELETE FROM `{_sql(tables.tiles)}` WHERE row_id IN UNNEST(@ids)",
                 stale_tile_rows)):
            if not values:
                continue
            try:
                stack.bigquery().query(sql, job_config=bigquery.QueryJobConfig(
                    query_parameters=[bigquery.ArrayQueryParameter("ids", "STRING",
                                                                   values)])).result()
            except NotFound:
                pass
        _book_in(stack, tables, pending)
        publisher = stack.publisher(identity=JOURNAL_IDENTITY)
        topic = stack.subscriber().get_subscription(subscription=subscription).topic
        replays = []
        for entry in pending:
            # Latency runs from the first publish: a replay of a replay keeps the first one's.
            first, _ = first_publish(entry.attributes, entry.published or time.time())
            attributes = {**entry.attributes, REPLAY_OF: entry.message_id,
                          FIRST_PUBLISHED: bq_timestamp(first)}
            new_id = publisher.publish(topic, entry.data, **attributes).result(timeout=30)
            replays.append({
                "disposition": REPLAYED, "stage": "journal", "message_id": entry.message_id,
                "source_message_ids": [entry.message_id], "tile_id": "",
                "reason": f"replayed as {new_id}: the stream that pulled it stopped before it "
                          "was finished", "time": bq_timestamp(time.time())})
        try:
            errors = stack.bigquery().insert_rows_json(_sql(tables.events), replays)
        except NotFound as exc:
            errors = [str(exc)]
        if errors:
            LOG.error("could not book the replays in %s: %s", tables.events, errors[:3])
        LOG.warning("replayed %d unfinished messages from the journal of a stopped stream",
                    len(pending))
    path.unlink(missing_ok=True)
    return {"journalled": len(entries), "replayed": len(pending)}


def _book_in(stack: LocalStack, tables: BigQueryTables, pending: list[JournalEntry]) -> None:
    """Entry rows for pulled messages whose own never landed (the stream died first): the
    journal is where they entered, so the books count them in before booking them replayed."""
    from google.api_core.exceptions import NotFound
    from google.cloud import bigquery

    from transforms.announcements import entry_row, first_publish

    config = bigquery.QueryJobConfig(query_parameters=[bigquery.ArrayQueryParameter(
        "ids", "STRING", [e.message_id for e in pending])])
    try:
        known = {r["message_id"] for r in stack.bigquery().query(
            f"SELECT DISTINCT message_id FROM `{_sql(tables.messages)}` "
            "WHERE message_id IN UNNEST(@ids)", job_config=config).result()}
    except NotFound:
        known = set()
    rows = []
    for entry in pending:
        if entry.message_id in known:
            continue
        delivered = entry.published or time.time()
        first, replay_of = first_publish(entry.attributes, delivered)
        rows.append(entry_row(entry.message_id, first, delivered, replay_of,
                              "notification" if "eventType" in entry.attributes else "message"))
    if rows:
        errors = stack.bigquery().insert_rows_json(_sql(tables.messages), rows)
        if errors:
            LOG.error("could not book in %d pulled messages: %s", len(rows), errors[:3])


def _sql(table: str) -> str:
    """``project:dataset.table`` -> ``project.dataset.table`` for standard SQL."""
    return table.replace(":", ".", 1)
