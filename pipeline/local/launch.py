"""``tilestream run --local``: the job on the in-process runner, against the local stack.

:mod:`pipeline.main` does everything else; this brings what only this machine has
(:class:`pipeline.main.LocalEnvironment`): the emulators' clients, the local defaults, the
journal of pulled messages and the runner fixes.
"""

from __future__ import annotations

import codecs
import logging
import re
from typing import Any

from apache_beam.options.pipeline_options import (
    DirectOptions,
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
)

from pipeline.local import patches
from pipeline.local import stack as local_stack
from pipeline.main import BATCH_RUNNER
from pipeline.options import TileStreamOptions

# Chip rows are queryable a couple of seconds after their tile (the emulator has no quota on
# load jobs; BigQuery's 1,500 per table and day set the production default, 180 s).
LOCAL_LOAD_SECS = 2
# The local stream paces its chipper to the model: about three strip tasks in flight, whatever
# the tile's width (a strip holds at most ~2 Mpx); with two the model waited between them
# (docs/ARCHITECTURE.md, "Known limits of the in-process runner", has the measurements).
LOCAL_CHIPS_IN_FLIGHT = 2048
# A stop waits this long at most for what the stream read to be finished (Dataflow's drain has
# no bound; a local stop must end). The drain paths book what cannot complete at once, so this
# bounds only work in flight. A message still waiting then is replayed at the next start.
LOCAL_DRAIN_SECS = 30.0


def prepare(options: PipelineOptions) -> local_stack.LocalStack:
    """Point this process at the stack and fill the options it leaves to the stack."""
    o = options.view_as(TileStreamOptions)
    gcp = options.view_as(GoogleCloudOptions)
    stack = local_stack.load(o.stack_dir)
    local_stack.require_up(stack)  # a dead emulator: say which, rather than retry forever
    patches.apply(stack)
    gcp.project = gcp.project or stack.project
    o.subscription = o.subscription or (None if o.input_glob else stack.subscription_path)
    o.bq_dataset = o.bq_dataset or f"{stack.project}:{stack.dataset}"
    o.output_prefix = o.output_prefix or stack.output_prefix
    o.input_buckets = o.input_buckets or f"gs://{stack.bucket}"
    gcp.temp_location = gcp.temp_location or stack.temp_location
    if o.results_topic is None and not o.input_glob:  # a backfill publishes no events
        o.results_topic = stack.results_topic_path
    if o.chip_rows_load_secs is None:
        o.chip_rows_load_secs = LOCAL_LOAD_SECS
    if o.max_chips_in_flight is None and not o.input_glob:
        o.max_chips_in_flight = LOCAL_CHIPS_IN_FLIGHT
    if options.view_as(StandardOptions).runner == BATCH_RUNNER:
        _worker_processes(options)
    return stack


def before_run(job: Any) -> None:
    """Replay what a killed stream left unfinished, journal what this one pulls, and take the
    in-process runner's scheduling costs out."""
    import logging

    from pipeline.local import journal

    o = job.options.view_as(TileStreamOptions)
    if job.streaming:
        replayed = journal.replay_unfinished(job.stack, o.subscription, job.tables)
        if replayed["replayed"]:
            logging.getLogger("tilestream").warning("journal: %s", replayed)
        journal.install(job.stack, o.subscription, job.tables)
    patches.install_runner_fixes()


def drain(job: Any) -> None:
    """A stop of the local stream is a drain, as on Dataflow: nothing more is read, the input's
    end fires the same drain paths (what cannot complete is booked ``drained``), and the process
    stays until the books account for what it read (``journal.drain``), at most
    ``LOCAL_DRAIN_SECS``; what is left then is replayed at the next start."""
    import logging

    from pipeline.local import journal

    if job.stack is None or not job.streaming:
        return
    o = job.options.view_as(TileStreamOptions)
    log = logging.getLogger("tilestream")
    log.info("draining: reading nothing more, finishing what was read")
    left = journal.drain(job.stack, o.subscription, job.tables, LOCAL_DRAIN_SECS)
    if left:
        log.warning("drain: %d pulled messages not finished after %gs (first: %s); the next "
                    "start on this subscription replays them", len(left), LOCAL_DRAIN_SECS,
                    ", ".join(left[:3]))
    else:
        log.info("drained: every message this stream read is finished")


def _worker_processes(options: PipelineOptions) -> None:
    """A backfill on the FnApiRunner: one SDK worker process per core (``--direct_num_workers``
    says otherwise), each started as ``python -m pipeline.local.worker``, which installs the
    local stack in it before Beam's harness starts."""
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner
    from apache_beam.transforms.environments import SubprocessSDKEnvironment

    from pipeline.local import worker

    given = " ".join(getattr(options, "_flags", None) or [])  # what the command line said
    direct = options.view_as(DirectOptions)
    if "--direct_num_workers" not in given:
        direct.direct_num_workers = 0  # the FnApiRunner's "one per core"
    # Left "in_memory": the other modes replace the runner's worker command with Beam's own
    # (so the runner's advice to change it, logged at start, does not apply here).
    direct.direct_running_mode = "in_memory"
    logging.getLogger("apache_beam.runners.portability.fn_api_runner.fn_runner").addFilter(
        lambda record: "direct_running_mode should be" not in record.getMessage())
    forwarded = logging.getLogger("apache_beam.runners.portability.local_job_service")
    forwarded.setLevel(logging.INFO)  # the workers' own lines (one per tile answered) included
    forwarded.addFilter(_worker_log_line)
    options.view_as(StandardOptions).runner = FnApiRunner(
        default_environment=SubprocessSDKEnvironment.from_command_string(worker.command()))


# What SDK workers log reaches the runner as a LogEntry printed whole (timestamps, thread, file
# on one line); the workers' own complaint that `resource` is missing comes with every bundle.
_WORKER_FIELD = r'{}: "((?:[^"\\]|\\.)*)"'
_WORKER_NOISE = ("Resource module is not available", "No semi_persistent_directory found")


def _worker_field(text: str, name: str) -> str | None:
    found = re.search(_WORKER_FIELD.format(name), text)
    return (codecs.escape_decode(found.group(1).encode())[0].decode("utf-8", "replace")
            if found else None)


def _worker_log_line(record: logging.LogRecord) -> bool:
    """Keep a worker's log line short, its message alone; of Beam's own lines only warnings and
    errors, as in this process; drop the per-bundle noise."""
    text = record.getMessage()
    message = _worker_field(text, "message")
    if not text.startswith("Worker: ") or message is None:
        return record.levelno >= logging.WARNING
    beams = "site-packages" in (_worker_field(text, "log_location") or "site-packages")
    if (beams and record.levelno < logging.WARNING) or any(n in message for n in _WORKER_NOISE):
        return False
    record.name, record.msg, record.args = "worker", "%s", (message,)
    return True
