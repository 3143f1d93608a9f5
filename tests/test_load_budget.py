"""The chip-row load-job budget: what the option defaults spend of BigQuery's 1,500 load jobs
per table per day, for the stream, a blue-green trial beside it and a backfill.

Computed from the defaults the job really takes (``--chip_rows_load_secs`` left unset) and from
Beam's own partition size; docs/operations.md, "The load-job budget", explains the figures.
"""

from __future__ import annotations

from apache_beam.io.gcp import bigquery_file_loads

from pipeline import main
from pipeline.local import launch
from pipeline.options import TileStreamOptions
from transforms.sinks import (
    FILES_PER_LOAD_JOB,
    LOAD_JOBS_PER_TABLE_DAY,
    batch_load_jobs,
    stream_load_jobs_per_day,
)

# A blue-green trial: the live job and the green one load into one `chips` table all day.
STREAMING_JOBS = 2
# Backfills beside the stream: one of up to a million staged files, or the batch schedule of
# docs/performance.md every 15 minutes (96 bounded jobs of one partition each).
BACKFILL_FILES = 1_000_000
HEADROOM = 0.25  # for retried (failed) load jobs, a restart, a second backfill


def _default_load_secs() -> int:
    """The interval a Dataflow job runs with when the option is left out."""
    unset = TileStreamOptions([]).chip_rows_load_secs
    return main.LOAD_SECS if unset is None else unset


def test_beams_partition_is_the_one_the_budget_counts():
    assert FILES_PER_LOAD_JOB == bigquery_file_loads._MAXIMUM_SOURCE_URIS


def test_a_stream_a_trial_and_a_backfill_stay_under_the_load_job_quota_with_headroom():
    every = _default_load_secs()
    backfill = max(batch_load_jobs(BACKFILL_FILES), 96 * batch_load_jobs(1))
    used = STREAMING_JOBS * stream_load_jobs_per_day(every) + backfill
    assert used <= (1 - HEADROOM) * LOAD_JOBS_PER_TABLE_DAY, (
        f"{STREAMING_JOBS} streaming jobs loading every {every}s and a backfill make {used} "
        f"load jobs a day of BigQuery's {LOAD_JOBS_PER_TABLE_DAY} per table: raise "
        "--chip_rows_load_secs' default")


def test_the_local_stack_keeps_chip_rows_quick():
    """Tests that wait for chip rows run with the local default, not the production one."""
    assert launch.LOCAL_LOAD_SECS == 2
