"""Dead letters: every stage's unusable input, written to a BigQuery table and to JSON lines on GCS.

Each stage emits ``DeadLetter`` records on a tagged output; the graph flattens them into
``WriteDeadLetters``. Nothing is dropped silently: the reason names the stage and the cause.
Messages set aside on purpose (filtered, duplicates) travel the same output with another
disposition and land in the ``events`` table, so the books balance in SQL, not only in counters.
The writer itself never fails the stream: a dead letter that cannot be stored is logged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.records import (
    DEAD_LETTER,
    DRAINED,
    DUPLICATE,
    FILTERED,
    SUPERSEDED,
    DeadLetter,
    TileRef,
)
from transforms.sinks import (
    ERROR_SCHEMA,
    EVENT_SCHEMA,
    BigQueryTables,
    WriteRows,
    bq_timestamp,
    row_problem,
)

DEAD_LETTER_TAG = "dead_letters"
PAYLOAD_EXCERPT = 1000
_counter = Metrics.counter("tilestream", "dead_letters")
LOG = logging.getLogger(__name__)


def _ids(tile: TileRef | None, message_id: str, message_ids: tuple[str, ...],
         tile_id: str) -> tuple[str, tuple[str, ...], str]:
    """(first message id, every message id, tile id) of a letter: a tile's are all of its
    source messages (every band file of a granule), so each message it answers is booked."""
    if tile is not None:
        message_ids = message_ids or tile.message_ids
        tile_id = tile_id or tile.tile_id
    ids = tuple(message_ids) or ((message_id,) if message_id else ())
    return message_id or (ids[0] if ids else ""), ids, tile_id


def dead_letter(
    stage: str,
    reason: str,
    *,
    tile: TileRef | None = None,
    message_id: str = "",
    message_ids: tuple[str, ...] = (),
    tile_id: str = "",
    payload: object = "",
) -> beam.pvalue.TaggedOutput:
    """A tagged dead-letter output about one message, or about a ``tile`` (then it carries
    every message the tile answers); counted once here so every stage counts the same way."""
    if isinstance(payload, bytes):
        payload = payload.decode("utf-8", errors="replace")
    _counter.inc()
    Metrics.counter("tilestream", f"dead_letters_{stage}").inc()
    first, ids, tile_id = _ids(tile, message_id, message_ids, tile_id)
    letter = DeadLetter(
        stage=stage,
        reason=reason,
        message_id=first,
        tile_id=tile_id,
        payload=str(payload)[:PAYLOAD_EXCERPT],
        time=time.time(),
        message_ids=ids,
    )
    return beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, letter)


def set_aside(disposition: str, stage: str, reason: str, *, tile: TileRef | None = None,
              message_id: str = "", message_ids: tuple[str, ...] = (),
              tile_id: str = "") -> beam.pvalue.TaggedOutput:
    """A message (or a tile's messages) not scored on purpose (``filtered``, ``duplicate``,
    ``superseded``), counted by reason."""
    Metrics.counter("tilestream", f"messages_{disposition}").inc()
    Metrics.counter("tilestream", f"{disposition}_{reason.split()[0]}").inc()
    first, ids, tile_id = _ids(tile, message_id, message_ids, tile_id)
    return beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, DeadLetter(
        stage=stage, reason=reason, message_id=first, tile_id=tile_id, time=time.time(),
        disposition=disposition, message_ids=ids))


def filtered(stage: str, reason: str, **ids) -> beam.pvalue.TaggedOutput:
    return set_aside(FILTERED, stage, reason, **ids)


def duplicate(stage: str, reason: str, **ids) -> beam.pvalue.TaggedOutput:
    return set_aside(DUPLICATE, stage, reason, **ids)


def superseded(stage: str, reason: str, **ids) -> beam.pvalue.TaggedOutput:
    return set_aside(SUPERSEDED, stage, reason, **ids)


def drained(stage: str, reason: str, **ids) -> beam.pvalue.TaggedOutput:
    """Work cut by a drain (docs/operations.md, "What a drain does"): not an answer and not a
    refusal of the input; the reason says what the next job needs to answer it."""
    return set_aside(DRAINED, stage, reason, **ids)


def error_row(letter: DeadLetter) -> dict:
    return {"stage": letter.stage, "reason": letter.reason, "message_id": letter.message_id,
            "source_message_ids": list(letter.message_ids), "tile_id": letter.tile_id,
            "payload": letter.payload, "time": bq_timestamp(letter.time)}


def event_row(letter: DeadLetter) -> dict:
    return {"disposition": letter.disposition, "stage": letter.stage, "reason": letter.reason,
            "message_id": letter.message_id, "source_message_ids": list(letter.message_ids),
            "tile_id": letter.tile_id, "time": bq_timestamp(letter.time)}


class _JsonLinesPerBundleFn(beam.DoFn):
    """One JSON-lines object per bundle, under an hourly Hive-style path.

    Written at the end of each bundle rather than per window, so dead letters show up at once
    whatever the watermark does (a stuck watermark is exactly when you want to read them). The
    object is named by its content and dated by its earliest letter, so a retried bundle writes
    the same object again instead of a second copy.
    """

    def __init__(self, prefix: str):
        self._prefix = prefix
        self.failed = Metrics.counter("tilestream", "dead_letter_files_failed")

    def start_bundle(self):
        self._lines: list[str] = []
        self._first = ""

    def process(self, row: dict):
        self._lines.append(json.dumps(row, sort_keys=True, default=str))
        when = str(row.get("time") or "")
        self._first = min(self._first, when) if self._first else when

    def finish_bundle(self):
        from apache_beam.io.filesystems import FileSystems

        if not self._lines:
            return
        lines, self._lines = sorted(self._lines), []
        content = ("\n".join(lines) + "\n").encode()
        try:
            day = dt.datetime.fromisoformat(self._first)
        except ValueError:
            day = dt.datetime.now(dt.UTC)
        path = (f"{self._prefix}/dead_letters/dt={day:%Y-%m-%d}/hour={day:%H}/"
                f"{hashlib.sha1(content).hexdigest()[:20]}.jsonl")
        try:
            with FileSystems.create(path, mime_type="application/x-ndjson") as out:
                out.write(content)
        except Exception as exc:  # the dead-letter writer must never be the fault
            self.failed.inc(len(lines))
            LOG.error("could not write %d dead letters to %s (they are in BigQuery): %s",
                      len(lines), path, exc)


class WriteDeadLetters(beam.PTransform):
    """BigQuery errors table (for SQL) plus JSON-lines files under the output prefix."""

    def __init__(self, tables: BigQueryTables, output_prefix: str, release: str):
        super().__init__()
        self._tables, self._release = tables, release
        self._prefix = output_prefix.rstrip("/")

    def expand(self, letters):
        errors, events = letters | "ByDisposition" >> beam.Partition(
            lambda letter, _: 0 if letter.disposition == DEAD_LETTER else 1, 2)
        events | "EventRows" >> beam.Map(event_row) | "EventsToBigQuery" >> WriteRows(
            self._tables.events, EVENT_SCHEMA, self._release)
        rows = errors | "ToRow" >> beam.Map(error_row)
        rows | "ToBigQuery" >> WriteRows(self._tables.errors, ERROR_SCHEMA, self._release)
        return rows | "ToGcs" >> beam.ParDo(_JsonLinesPerBundleFn(self._prefix))


class _BigQueryFailureFn(beam.DoFn):
    def process(self, failure):
        table, row, errors = failure
        yield dead_letter("bigquery", f"insert into {table} failed: {errors}",
                          message_id=row.get("message_id") or "", tile_id=row.get("tile_id", ""),
                          payload=json.dumps(row, default=str))


class BigQueryFailures(beam.PTransform):
    """``WriteToBigQuery(...).failed_rows_with_errors`` -> dead letters."""

    def expand(self, failures):
        outputs = failures | beam.ParDo(_BigQueryFailureFn()).with_outputs(DEAD_LETTER_TAG)
        return outputs[DEAD_LETTER_TAG]


class _CheckRowFn(beam.DoFn):
    def __init__(self, table: str, schema: dict):
        self._table, self._fields = table, schema["fields"]

    def process(self, row: dict):
        try:
            problem = row_problem(row, self._fields)
        except Exception as exc:  # the guard itself must not fail the bundle
            problem = f"row could not be checked: {exc!r}"
        if problem is None:
            yield row
            return
        yield dead_letter("bigquery", f"row refused for {self._table}: {problem}",
                          message_id=str(row.get("message_id") or ""),
                          tile_id=str(row.get("tile_id") or ""),
                          payload=json.dumps(row, default=str)[:2000])


class CheckRows(beam.PTransform):
    """Rows -> rows BigQuery will load (main) and dead letters for the rest (``dead_letters``):
    before a load job, where one bad row would fail every row loaded with it."""

    def __init__(self, table: str, schema: dict):
        super().__init__()
        self._table, self._schema = table, schema

    def expand(self, rows):
        return rows | beam.ParDo(_CheckRowFn(self._table, self._schema)).with_outputs(
            DEAD_LETTER_TAG, main="rows")
