"""Entry point: PipelineOptions -> validated configuration -> the graph -> a running job.

On Dataflow this submits the job and returns. On the in-process runner it supervises the stream:
counters are written to ``--metrics_file`` every few seconds, and SIGTERM/SIGINT stop it cleanly.

``--local`` needs a :class:`LocalEnvironment` (``pipeline/local/launch.py``, which
``tilestream run`` passes in): this module never imports the local room, so the Flex Template
launcher and the workers cannot load it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import apache_beam as beam
from apache_beam.options.pipeline_options import (
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
    WorkerOptions,
)

from model.card import ModelCard, load_card
from model.serving import Snapshot
from pipeline import graph
from pipeline.options import TileStreamOptions, load_temp_location, release_prefix
from transforms.chips import ChipSettings
from transforms.guards import InputAllowList, Refused
from transforms.sinks import BigQueryTables, ensure_tables

LOG = logging.getLogger("tilestream")
# A stream runs on Beam's in-process streaming runner; a backfill (bounded input) on the portable
# FnApiRunner, whose SDK worker processes (one per core, pipeline/local/launch.py) run the same
# Fn API harness as Dataflow's workers.
DEFAULT_LOCAL_RUNNER = "BundleBasedDirectRunner"
BATCH_RUNNER = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"
# Runners that run the job on this machine: the only ones --local may point at the emulators.
LOCAL_RUNNERS = ("BundleBasedDirectRunner", "DirectRunner", "SwitchingDirectRunner",
                 BATCH_RUNNER, "FnApiRunner")
METRICS_EVERY_SECS = 2.0
# Chip rows go to BigQuery in load jobs this often: BigQuery allows 1,500 load jobs per table and
# day, shared by the stream, a blue-green trial's second job and backfills; every 3 minutes keeps
# all three under it with headroom (docs/operations.md, "The load-job budget"; the local stack
# sets its own default).
LOAD_SECS = 180


class ConfigError(ValueError):
    """Options that cannot make a job; raised before anything starts."""


class LocalEnvironment(Protocol):
    """What ``--local`` needs from the local room (``pipeline/local/launch.py``)."""

    def prepare(self, options: PipelineOptions) -> Any:
        """Point this process at the emulators and fill the options' local defaults; returns
        the stack."""

    def before_run(self, job: Job) -> None:
        """Last steps before the job runs in this process (journal, runner fixes)."""

    def drain(self, job: Job) -> None:
        """On a stop: read nothing more and finish what was read, as Dataflow's drain does."""


@dataclass
class Job:
    options: PipelineOptions
    card: ModelCard
    tables: BigQueryTables
    streaming: bool
    allow: InputAllowList
    stack: Any = None  # the emulators (pipeline.local.stack.LocalStack), with --local
    start: Snapshot | None = None  # with --model_registry: the channels validated at start-up


def runner_name(options: PipelineOptions) -> str:
    bounded = bool(options.view_as(TileStreamOptions).input_glob)
    runner = (options.view_as(StandardOptions).runner
              or (BATCH_RUNNER if bounded else DEFAULT_LOCAL_RUNNER))
    return runner if isinstance(runner, str) else type(runner).__name__


def configure(argv: list[str] | None, local: LocalEnvironment | None = None) -> Job:
    """Parse and check options; with ``--local`` (a runner in this process only), ``local``
    points the process at the emulators first."""
    options = PipelineOptions(argv)
    o = options.view_as(TileStreamOptions)
    standard = options.view_as(StandardOptions)
    gcp = options.view_as(GoogleCloudOptions)
    standard.runner = runner_name(options)
    stack = None
    if o.local:
        if standard.runner not in LOCAL_RUNNERS:
            raise ConfigError(
                f"--local points clients at the emulators in this process; it cannot be used "
                f"with --runner={standard.runner}"
            )
        if local is None:
            raise ConfigError("--local runs through `tilestream run --local`, which brings the "
                              "local stack")
        stack = local.prepare(options)
    if bool(o.subscription) == bool(o.input_glob):
        raise ConfigError("give exactly one input: --subscription (streaming) or --input_glob")
    if o.input_glob and o.results_topic:
        raise ConfigError("--results_topic publishes a stream's answers as they become readable;"
                          " a backfill (--input_glob) publishes no events: its consumers read "
                          "the tables once it has ended (docs/results.md)")
    if o.input_glob and "://" not in o.input_glob:  # read, and allowed, where the user stands
        o.input_glob = os.path.abspath(o.input_glob)
    if not o.bq_dataset or not o.output_prefix:
        raise ConfigError("--bq_dataset and --output_prefix are required (or use --local)")
    try:
        release_prefix(o)
    except Refused as exc:
        raise ConfigError(f"--release: {exc}") from exc
    image = options.view_as(WorkerOptions).sdk_container_image
    if standard.runner == "DataflowRunner" and "://" not in o.model_uri and not image:
        raise ConfigError(f"Dataflow workers cannot read --model_uri={o.model_uri}: pass a gs:// "
                          "model directory, or run the TileStream image (--sdk_container_image), "
                          "where the launcher and the workers share the shipped model's path")
    streaming = not o.input_glob
    standard.streaming = streaming
    if not streaming and o.max_chips_in_flight:
        raise ConfigError("--max_chips_in_flight paces a streaming job on the in-process runner;"
                          " a backfill (--input_glob) runs stage by stage and cannot honour it: "
                          "leave it out")
    if o.max_chips_in_flight is None or not streaming:
        o.max_chips_in_flight = 0
    if o.max_chips_in_flight < 0:
        raise ConfigError("--max_chips_in_flight must not be negative")
    start = None
    if o.model_registry:
        card, start = registry_start(o)
    else:
        card = load_card(o.model_uri)
    _check_stage_options(o, card)
    if o.chip_rows_load_secs is None:
        o.chip_rows_load_secs = LOAD_SECS
    if not 0 <= o.chip_rows_load_secs <= 3600:
        raise ConfigError("--chip_rows_load_secs must be in [0, 3600]")
    if o.chip_rows_load_secs and not load_temp_location(o).startswith("gs://"):
        raise ConfigError("chip-row load jobs stage files on GCS: give a gs:// --temp_location "
                          "or --output_prefix, or --chip_rows_load_secs=0 to stream rows")
    # The network must keep the card's promise before a single message is pulled.
    from model.contract import load_checked

    load_checked(card)
    tables = BigQueryTables.in_dataset(o.bq_dataset, gcp.project)
    return Job(options, card, tables, streaming, input_allow_list(o), stack, start)


def registry_start(o: TileStreamOptions) -> tuple[ModelCard, Snapshot]:
    """The registry's live version, validated, and the channels the stream starts with."""
    from model.channels import RegistryError
    from model.serving import start_snapshot
    from transforms import process

    if not 1.0 <= o.channels_poll_secs <= 3600.0:
        raise ConfigError("--channels_poll_secs must be in [1, 3600]")
    try:
        card, start = start_snapshot(o.model_registry, process.model_cache())
    except RegistryError as exc:
        raise ConfigError(f"--model_registry={o.model_registry}: {exc}") from exc
    o.model_uri = card.uri  # what the logs and `tilestream check` report
    return card, start


def input_allow_list(o: TileStreamOptions) -> InputAllowList:
    """``--input_buckets``, plus the folder of an ``--input_glob`` backfill (local or gs://)."""
    import glob as globs

    entries = [e for e in (o.input_buckets or "").split(",") if e.strip()]
    local_roots = []
    if o.input_glob:
        root = o.input_glob
        magic = [i for i, ch in enumerate(root) if globs.has_magic(ch)]
        root = root[: magic[0]] if magic else root
        root = root.rsplit("/", 1)[0] or "/"
        if root.startswith("gs://"):
            entries.append(root)
        else:
            local_roots.append(os.path.abspath(root))
    if not entries and not local_roots:
        raise ConfigError("--input_buckets is required: the gs://bucket[/prefix] entries rasters "
                          "may be read from (the bucket notification's bucket)")
    try:
        return InputAllowList.parse(entries, local_roots)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _check_stage_options(o: TileStreamOptions, card: ModelCard) -> None:
    """Stage settings that would otherwise fail while the graph is built, as ConfigErrors."""
    import re

    from transforms.change_rules import check_rules, load_rules
    from transforms.presets import parse_aliases

    try:
        chip_settings(o, card)
        parse_aliases(o.band_aliases)
        check_rules(load_rules(o.change_rules), [c.name for c in card.classes])
        groups = re.compile(o.granule_pattern).groupindex
    except (ValueError, re.error) as exc:
        raise ConfigError(str(exc)) from exc
    if not {"granule", "band"} <= set(groups):
        raise ConfigError("--granule_pattern needs named groups (?P<granule>…) and (?P<band>…)")
    if not 1 <= o.change_history <= 100:
        raise ConfigError("--change_history must be in [1, 100] (acquisitions kept per location)")
    if not 0 < o.results_wait_secs <= 86400:
        raise ConfigError("--results_wait_secs must be in (0, 86400]")
    o.min_batch_size = o.min_batch_size or o.max_batch_size
    if o.max_batch_size < o.min_batch_size or o.min_batch_size < 1:
        raise ConfigError("need 1 <= --min_batch_size <= --max_batch_size")


def chip_settings(o: TileStreamOptions, card: ModelCard,
                  allow: InputAllowList | None = None) -> ChipSettings:
    if not 0.0 <= o.max_out_of_range_fraction <= 1.0:
        raise ValueError("--max_out_of_range_fraction must be in [0, 1]")
    if o.read_budget_secs < 0:
        raise ValueError("--read_budget_secs must not be negative")
    return ChipSettings.from_card(
        card, o.chip_size, o.stride, o.min_valid_fraction, allow=allow,
        max_tile_pixels=o.max_tile_pixels, input_scale=o.input_scale,
        input_offset=o.input_offset, max_out_of_range=o.max_out_of_range_fraction,
        read_budget_secs=o.read_budget_secs, max_chips_in_flight=o.max_chips_in_flight)


def build_pipeline(job: Job) -> beam.Pipeline:
    p = beam.Pipeline(options=job.options)
    o = job.options.view_as(TileStreamOptions)
    graph.build(p, o, job.card, job.tables, job.streaming, job.allow,
                chip_settings(o, job.card, job.allow), job.start)
    return p


def counters(result) -> dict[str, int]:
    """The job's ``tilestream`` counters by name (committed values)."""
    found = result.metrics().query(beam.metrics.MetricsFilter().with_namespace("tilestream"))
    totals: dict[str, int] = {}
    for counter in found["counters"]:
        value = max(counter.committed or 0, counter.attempted or 0)
        totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + (value or 0)
    return totals


def _write_metrics(path: str | None, result) -> None:
    if not path:
        return
    target = Path(path)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps(counters(result), sort_keys=True, indent=1) + "\n")
    os.replace(tmp, target)


def supervise(result, metrics_file: str | None,
              drain: Callable[[], None] | None = None) -> int:
    """Keep a local streaming job running until SIGTERM/SIGINT, writing counters meanwhile;
    then ``drain`` (the job keeps running while it finishes what it read).

    Returns 1 when the job itself failed (the direct runner re-raises a DoFn's exception from
    wait_until_finish), 0 after a requested stop. It does not cancel the job: the direct runner's
    cancel joins executor threads that may sit in a 30 s Pub/Sub pull, so the caller, a process
    of its own, exits instead (see ``exit_now``).
    """
    stop = threading.Event()
    failure: list[BaseException] = []

    def wait() -> None:
        try:
            result.wait_until_finish()
        except BaseException as exc:  # reported below, after the counters are saved
            failure.append(exc)
        finally:
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=wait, name="tilestream-wait", daemon=True).start()
    while not stop.wait(METRICS_EVERY_SECS):
        _write_metrics(metrics_file, result)
    if drain is not None and not failure:
        drain()
    _write_metrics(metrics_file, result)
    if failure:
        LOG.error("the stream failed: %s", failure[0], exc_info=failure[0])
        return 1
    LOG.info("stopping the local stream")
    return 0


def exit_now(code: int) -> None:
    """Leave the process at once, logs flushed, without joining the runner's threads."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(argv: list[str] | None = None, local: LocalEnvironment | None = None) -> int:
    job = configure(argv, local)
    o = job.options.view_as(TileStreamOptions)
    LOG.info("model %s from %s; tables %s", job.card.model_id, o.model_uri, job.tables)
    if not job.options.get_all_options().get("dry_run"):  # a dry run reaches nothing
        created = ensure_tables(job.tables)  # readers find every table from the first minute
        if created:
            LOG.info("created or widened tables %s", created)
    if job.stack is not None and local is not None:
        local.before_run(job)
    started = time.time()  # a bounded run's dead letters are those written from here on
    result = build_pipeline(job).run()
    if runner_name(job.options) not in LOCAL_RUNNERS:
        job_id = getattr(result, "job_id", lambda: None)()
        LOG.info("submitted %s job %s", runner_name(job.options), job_id)
        return 0
    if job.streaming:
        return supervise(result, o.metrics_file,
                         None if local is None else lambda: local.drain(job))
    result.wait_until_finish()
    _write_metrics(o.metrics_file, result)
    line, code = backfill_summary(job, counters(result), started)
    print(line, flush=True)
    return code


def backfill_summary(job: Job, totals: dict[str, int], since: float) -> tuple[str, int]:
    """The one line a bounded run ends with, and its exit status: 1 when no tile was scored,
    not even in part (every file refused, or none matched), so a script notices; the refusals'
    commonest reasons from the ``dead_letters`` table."""
    o = job.options.view_as(TileStreamOptions)
    files, scored = totals.get("messages_in", 0), totals.get("tiles_written", 0)
    partial, letters = totals.get("tiles_partial", 0), totals.get("dead_letters", 0)
    line = (f"backfill {o.input_glob}: {files} file{'s' if files != 1 else ''} read, "
            f"{scored} tile{'s' if scored != 1 else ''} scored"
            + (f" ({partial} partial)" if partial else "") + f", {letters} dead-lettered")
    if letters:
        reasons = _dead_letter_reasons(job, since)
        if reasons:
            line += ": " + "; ".join(f"{n}x {stage}: {reason}" for stage, reason, n in reasons)
        line += f" (all of them: the {job.tables.errors} table)"
    if not files:
        line += "; no file matched"
    return line, 0 if scored or partial else 1


def _dead_letter_reasons(job: Job, since: float, top: int = 3) -> list[tuple[str, str, int]]:
    """The commonest (stage, reason, count) of the dead letters written since ``since``; none
    when they cannot be read (the summary's counts stand on their own)."""
    import datetime as dt

    from google.cloud import bigquery

    project, rest = job.tables.errors.split(":", 1)
    client = job.stack.bigquery() if job.stack is not None else bigquery.Client(project=project)
    config = bigquery.QueryJobConfig(query_parameters=[bigquery.ScalarQueryParameter(
        "since", "TIMESTAMP", dt.datetime.fromtimestamp(since - 1, dt.UTC))])
    sql = (f"SELECT stage, reason, COUNT(*) AS n FROM `{project}.{rest}` WHERE time >= @since "
           f"GROUP BY stage, reason ORDER BY n DESC, stage, reason LIMIT {int(top)}")
    try:
        return [(r["stage"], r["reason"], int(r["n"]))
                for r in client.query(sql, job_config=config).result()]
    except Exception as exc:  # an answer without reasons beats none
        LOG.warning("could not read the dead letters' reasons: %s", exc)
        return []


if __name__ == "__main__":  # the Flex Template launcher runs this file with the parameters
    logging.basicConfig(level=logging.INFO)
    sys.exit(run())
