"""Dead letters: every stage's unusable input, written to a BigQuery table and to JSON lines on GCS.

Each stage emits ``DeadLetter`` records on a tagged output; the graph flattens them into
``WriteDeadLetters``. Nothing is dropped silently: the reason names the stage and the cause.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import FixedWindows

from transforms.records import DeadLetter
from transforms.sinks import ERROR_SCHEMA, BigQueryTables, bq_timestamp, write_rows

DEAD_LETTER_TAG = "dead_letters"
PAYLOAD_EXCERPT = 1000
_counter = Metrics.counter("tilestream", "dead_letters")


def dead_letter(
    stage: str,
    reason: str,
    *,
    message_id: str = "",
    tile_id: str = "",
    payload: object = "",
) -> beam.pvalue.TaggedOutput:
    """A tagged dead-letter output; counted once here so every stage counts the same way."""
    if isinstance(payload, bytes):
        payload = payload.decode("utf-8", errors="replace")
    _counter.inc()
    letter = DeadLetter(
        stage=stage,
        reason=reason,
        message_id=message_id,
        tile_id=tile_id,
        payload=str(payload)[:PAYLOAD_EXCERPT],
        time=time.time(),
    )
    return beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, letter)


def error_row(letter: DeadLetter) -> dict:
    row = asdict(letter)
    row["time"] = bq_timestamp(letter.time)
    return row


class WriteDeadLetters(beam.PTransform):
    """BigQuery errors table (for SQL) plus windowed JSON-lines files under the output prefix."""

    def __init__(self, tables: BigQueryTables, output_prefix: str, window_secs: int = 60):
        super().__init__()
        self._tables = tables
        self._prefix = output_prefix.rstrip("/")
        self._window_secs = window_secs

    def expand(self, letters):
        rows = letters | "ToRow" >> beam.Map(error_row)
        rows | "ToBigQuery" >> write_rows(self._tables.errors, ERROR_SCHEMA)
        return (
            rows
            | "ToJson" >> beam.Map(json.dumps, sort_keys=True)
            | "FileWindows" >> beam.WindowInto(FixedWindows(self._window_secs))
            | "ToGcs"
            >> fileio.WriteToFiles(
                path=f"{self._prefix}/dead_letters",
                file_naming=fileio.default_file_naming("dead-letters", ".jsonl"),
                shards=1,
            )
        )


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
