"""BigQuery sinks: the writers, and the one import for everything about the stream's tables.

The rest lives by concern and is re-exported here, so ``from transforms.sinks import X`` keeps
working for every caller: schemas and partitioning (``transforms/bq_schemas.py``), table names
from ``--bq_dataset`` (``transforms/bq_tables.py``), table creation at launch
(``transforms/bq_setup.py``), row validation (``transforms/bq_check.py``) and row builders
(``transforms/bq_rows.py``).
"""

from __future__ import annotations

import math

import apache_beam as beam
from apache_beam.io.gcp.bigquery_tools import RetryStrategy

from transforms import process  # noqa: F401 - installs the runtime's Beam patches (its docstring)
from transforms.bq_check import row_problem
from transforms.bq_rows import (
    bq_timestamp,
    chip_row,
    chip_rows,
    class_records,
    crs_label,
    provenance,
    row_id,
    tile_row,
)
from transforms.bq_schemas import (
    CHANGE_SCHEMA,
    CHIP_SCHEMA,
    ERROR_SCHEMA,
    EVENT_SCHEMA,
    MESSAGE_SCHEMA,
    SCHEMAS,
    TILE_SCHEMA,
    table_parameters,
    write_schema_files,
)
from transforms.bq_setup import ensure_tables, missing_columns
from transforms.bq_tables import BigQueryTables, dataset_ref

__all__ = [
    "CHANGE_SCHEMA", "CHIP_SCHEMA", "ERROR_SCHEMA", "EVENT_SCHEMA", "FILES_PER_LOAD_JOB",
    "LOAD_JOBS_PER_TABLE_DAY", "MESSAGE_SCHEMA", "SCHEMAS", "TILE_SCHEMA", "BigQueryTables",
    "WriteRows", "batch_load_jobs", "bq_timestamp", "chip_row", "chip_rows", "class_records",
    "crs_label", "dataset_ref", "ensure_tables", "missing_columns", "provenance", "row_id",
    "row_problem", "stamped", "stream_load_jobs_per_day", "table_parameters", "tile_row",
    "write_schema_files",
]


def stamped(row: dict, release: str) -> dict:
    return {**row, "release": release}


# BigQuery's quota on load jobs into one table per day, failed ones included
# (cloud.google.com/bigquery/quotas, "Load jobs per table per day"). Copy jobs into the table
# count against the same table-operations limit.
LOAD_JOBS_PER_TABLE_DAY = 1500
# Beam's file loads put at most this many files in one load job (``_MAXIMUM_SOURCE_URIS``); a
# bounded job with more makes one load per partition into temporary tables and one copy job per
# partition into the table.
FILES_PER_LOAD_JOB = 10_000


def stream_load_jobs_per_day(every_secs: float) -> int:
    """Load jobs one streaming job makes into the chips table per day, at most: Beam fires the
    load once per ``every_secs`` while rows arrive (one partition: a firing's files are far
    fewer than :data:`FILES_PER_LOAD_JOB`)."""
    return math.ceil(86_400 / every_secs)


def batch_load_jobs(files: int) -> int:
    """Load (or copy) jobs into the table of a bounded job that stages ``files`` files: it loads
    once, at the end, one job per partition."""
    return max(1, math.ceil(files / FILES_PER_LOAD_JOB))


class WriteRows(beam.PTransform):
    """Rows -> ``table``, each stamped with the ``release`` of the job that wrote it: streaming
    inserts, or with ``load_jobs`` load jobs of the rows gathered over ``every_secs`` (a
    streaming pipeline; a batch one loads once at the end). Returns Beam's ``WriteResult``.

    Load jobs are for the chip rows, thousands per tile: the insertAll path costs per row (Beam
    sizes each row; the API bills by the byte; the local emulator spent 5 CPU-seconds on 5,776
    rows, against 0.14 s for one load job of the same rows). A load job fails as a whole on one
    bad row, so rows go through ``deadletter.CheckRows`` first.
    """

    def __init__(self, table: str, schema: dict, release: str, *, load_jobs: bool = False,
                 every_secs: int | None = None, temp_location: str | None = None):
        super().__init__()
        self._table, self._schema, self._release = table, schema, release
        self._load_jobs, self._every_secs = load_jobs, every_secs
        self._temp_location = temp_location

    def expand(self, rows):
        kind = next(k for k, s in SCHEMAS.items() if s is self._schema)
        common = dict(schema=self._schema,
                      create_disposition=beam.io.BigQueryDisposition.CREATE_IF_NEEDED,
                      write_disposition=beam.io.BigQueryDisposition.WRITE_APPEND,
                      additional_bq_parameters=table_parameters(kind))
        if self._load_jobs:
            write = beam.io.WriteToBigQuery(
                self._table, method=beam.io.WriteToBigQuery.Method.FILE_LOADS,
                triggering_frequency=self._every_secs,
                custom_gcs_temp_location=self._temp_location, **common)
        else:
            write = beam.io.WriteToBigQuery(
                self._table, method=beam.io.WriteToBigQuery.Method.STREAMING_INSERTS,
                insert_retry_strategy=RetryStrategy.RETRY_ON_TRANSIENT_ERROR, **common)
        return rows | "Release" >> beam.Map(stamped, self._release) | "Write" >> write
