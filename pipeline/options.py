"""TileStream's pipeline options: Beam flags with help text, also the Flex Template parameters.

Every user-facing option here has a twin in templates/metadata.json (a test keeps them equal).
The module imports neither Beam nor torch until ``TileStreamOptions`` itself is asked for, so
``tilestream run --help`` answers at once.
"""

from __future__ import annotations

from pathlib import Path

from transforms.guards import DEFAULT_MAX_TILE_PIXELS
from transforms.presets import DEFAULT_BAND_ALIASES, DEFAULT_GRANULE_PATTERN, PRESETS

# The Dataflow accelerator hint a --device=GPU stream puts on its inference step.
DEFAULT_ACCELERATOR = "type:nvidia-l4;count:1;install-nvidia-driver"
# Where the model runs: `tilestream run` and `tilestream check` share the default, so a check
# without flags checks what a run without flags would do (CPU: every machine has one).
DEVICES = ("CPU", "GPU")
DEFAULT_DEVICE = "CPU"

# This tree's release: setup.py's version (tests/test_release.py keeps them equal), the default
# of --release, written on every row, and the name of its recorded graph in templates/releases/.
RELEASE = "0.3.0"

DEFAULT_MODEL_URI = str(
    Path(__file__).resolve().parents[1] / "model" / "artifacts" / "landcover-student" / "v1"
)


def flag(value: str) -> bool:
    """A boolean that is also accepted as ``--name=true|false`` (how Flex Templates pass it)."""
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


# The latency SLO's threshold: a tile is "fast" when its row lands within this many seconds of
# the first publish of its message. The stream's SLI counters (transforms/slis.py, given it by
# pipeline/graph.py), `tilestream slo` and docs/operations.md use it; kept here, free of Beam, so
# that the command line shows it without importing Beam.
LATENCY_SLO_S = 120.0
# How long an answer's event waits for the answer to be readable (chip rows arrive by load job
# every --chip_rows_load_secs, 180 s on BigQuery): well past several loads, then dead-lettered.
RESULTS_WAIT_SECS = 900.0
# How often a stream re-reads the registry's channels: the bound on every channels change taking
# effect (a promotion, a rollback, a blue-green cut-over).
CHANNELS_POLL_SECS = 30.0

# Options that only make sense on this machine, not as Flex Template parameters.
LOCAL_ONLY = ("local", "stack_dir", "metrics_file", "input_glob", "max_chips_in_flight")


class TileStreamArguments:
    """The options' definitions; ``TileStreamOptions`` is these on Beam's PipelineOptions."""

    @classmethod
    def _add_argparse_args(cls, parser):
        inputs = parser.add_argument_group("input")
        inputs.add_argument(
            "--subscription",
            help="Pub/Sub subscription (projects/P/subscriptions/S) carrying GCS notifications "
            "and JSON tile announcements. Streaming input.",
        )
        inputs.add_argument(
            "--input_glob",
            help="Bounded backfill instead of Pub/Sub: score every GeoTIFF matching this glob "
            "(local or gs://); per-band files are grouped into granules as in streaming.",
        )
        inputs.add_argument(
            "--input_buckets", default="",
            help="Comma-separated gs://bucket[/prefix] entries: the only places rasters are read "
            "from (required on Dataflow; --local defaults to the stack's bucket, --input_glob "
            "adds the glob's own folder). Other URIs, schemes and paths are dead-lettered.",
        )
        inputs.add_argument(
            "--granule_pattern", default=DEFAULT_GRANULE_PATTERN,
            help="Regex on an object's file name with named groups 'granule' and 'band'; "
            "matching objects are one band of a granule, others whole tiles.",
        )
        inputs.add_argument(
            "--band_aliases", default=DEFAULT_BAND_ALIASES,
            help="Comma-separated TOKEN=band pairs mapping file-name band tokens (and STAC asset "
            "keys) to the model card's band names (default: HLS S30 / Sentinel-2); laid over "
            "--band_preset's.",
        )
        inputs.add_argument(
            "--band_preset", default=None, choices=sorted(PRESETS),
            help="Band names and granule file names of a public product: "
            + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values())
            + ". Sets --granule_pattern and --band_aliases (unless given) and reads the "
            "acquisition time from granule names.",
        )
        model = parser.add_argument_group("model")
        model.add_argument(
            "--model_uri", default=DEFAULT_MODEL_URI,
            help="Directory (local or gs://) holding model_card.json and the TorchScript file.",
        )
        model.add_argument(
            "--model_registry", default=None,
            help="Model registry (local directory or gs:// prefix, see `tilestream model`): the "
            "stream scores with its channels' live version, runs shadow and canary candidates, "
            "and follows channels.json without a restart. Overrides --model_uri.",
        )
        model.add_argument(
            "--channels_poll_secs", type=float, default=CHANNELS_POLL_SECS,
            help="With --model_registry: re-read channels.json this often; a promotion, canary "
            "or rollback takes effect within this many seconds.",
        )
        model.add_argument(
            "--device", default=DEFAULT_DEVICE, choices=DEVICES,
            help="GPU adds the Dataflow accelerator hint to the inference step and refuses to "
            "start on a worker without CUDA.",
        )
        model.add_argument(
            "--accelerator", default=DEFAULT_ACCELERATOR,
            help="Dataflow accelerator resource hint used with --device=GPU.",
        )
        chips = parser.add_argument_group("chipping and batching")
        chips.add_argument("--chip_size", type=int, default=0,
                           help="Chip size in pixels; 0 takes the model card's.")
        chips.add_argument("--stride", type=int, default=0,
                           help="Chip stride in pixels (< chip size overlaps and blends); "
                           "0 takes the model card's.")
        chips.add_argument("--min_valid_fraction", type=float, default=0.05,
                           help="Chips with a smaller fraction of valid (non-nodata) pixels are "
                           "skipped and counted.")
        chips.add_argument("--max_tile_pixels", type=int, default=DEFAULT_MAX_TILE_PIXELS,
                           help="Largest tile (width x height, from the header) that is read; "
                           "larger ones are dead-lettered before any pixel is read.")
        chips.add_argument("--input_scale", type=float, default=1.0,
                           help="Raw values are multiplied by this before the card's own "
                           "scaling (e.g. 0.0255 to feed uint16 reflectance to an 8-bit DN "
                           "model); an announcement's input_scale attribute overrides it.")
        chips.add_argument("--input_offset", type=float, default=0.0,
                           help="Added to raw values after --input_scale; an announcement's "
                           "input_offset attribute overrides it.")
        chips.add_argument("--max_out_of_range_fraction", type=float, default=0.5,
                           help="A tile whose sampled values lie outside the card's valid range "
                           "more often than this is dead-lettered with the observed range.")
        chips.add_argument("--read_budget_secs", type=float, default=120.0,
                           help="Time one tile may spend on retries of transient storage errors "
                           "and paused behind a failing bucket before it is dead-lettered.")
        chips.add_argument("--max_chips_in_flight", type=int, default=None,
                           help="A local stream's chipper waits while this many chips are cut "
                           "but not yet scored, so memory follows a strip task, not the tile "
                           "(the in-process runner has no back-pressure; docs/ARCHITECTURE.md "
                           "has the numbers). Default 2048 with --local, else 0 (off): "
                           "Dataflow paces itself.")
        chips.add_argument("--window_secs", type=float, default=5.0,
                           help="Fixed window for micro-batching chips across tiles.")
        chips.add_argument("--min_batch_size", type=int, default=0,
                           help="RunInference minimum batch size; 0 (the default) takes "
                           "--max_batch_size: full batches from the first, and a bundle's "
                           "end still flushes a short one.")
        chips.add_argument("--max_batch_size", type=int, default=32,
                           help="RunInference maximum batch size.")
        chips.add_argument("--max_batch_duration_secs", type=int, default=0,
                           help="Longest time a chip waits for a batch to fill (stateful "
                           "batching); 0 batches within bundles only.")
        outputs = parser.add_argument_group("outputs")
        outputs.add_argument("--bq_dataset",
                             help="BigQuery dataset [project:]dataset for the chips, tiles and "
                             "dead_letters tables (created when absent).")
        outputs.add_argument("--output_prefix",
                             help="gs:// (or local) prefix for prediction COGs and dead-letter "
                             "JSON lines.")
        outputs.add_argument("--release", default=RELEASE,
                             help="The stream release this job runs (default: this tree's): "
                             "written on every row, prefixes its prediction COGs, and decides "
                             "its rows' role during a blue-green release (docs/operations.md).")
        outputs.add_argument("--chip_rows_load_secs", type=int, default=None,
                             help="Chip rows reach BigQuery in a load job every this many "
                             "seconds; 0 streams them row by row (insertAll). Default 180 on "
                             "BigQuery (1,500 load jobs per table per day, shared by the "
                             "stream, a blue-green trial and backfills), 2 on the local stack. "
                             "Tile rows and dead letters always stream.")
        outputs.add_argument("--results_topic", default=None,
                             help="Pub/Sub topic (projects/P/topics/T) the stream publishes one "
                             "event to per outcome consumers read: a tile answered (once its "
                             "rows, COG and STAC Item are readable), refused or dead-lettered "
                             "(docs/results.md). A shadow or green job publishes nothing. "
                             "Default: none (the local stack passes its own).")
        outputs.add_argument("--results_wait_secs", type=float, default=RESULTS_WAIT_SECS,
                             help="How long an answer may wait for its chip rows, COG and "
                             "STAC Item to be readable before its event is dead-lettered "
                             "instead of published.")
        outputs.add_argument("--confidence_band", type=flag, nargs="?", const=True,
                             default=False,
                             help="Add a confidence band (percent) to each prediction COG "
                             "(--confidence_band or --confidence_band=true|false).")
        changes = parser.add_argument_group("change between acquisitions")
        changes.add_argument("--change_rules", default=None,
                             help='Change rules as JSON {"rules": [...]} or a path/gs:// URI '
                             "of such a file (docs/changes.md). Default: water gain and loss, "
                             "forest loss, each 5 points and 10 ha.")
        changes.add_argument("--change_history", type=int, default=8,
                             help="Acquisitions of each location and model version kept to "
                             "compare with (keyed state).")
        timing = parser.add_argument_group("timeouts")
        timing.add_argument("--granule_timeout_secs", type=float, default=600.0,
                            help="An incomplete granule is dead-lettered this long after its "
                            "first band arrived.")
        timing.add_argument("--tile_timeout_secs", type=float, default=900.0,
                            help="A tile whose chips have not all come back after this long is "
                            "written as partial and dead-lettered.")
        timing.add_argument("--dedup_ttl_secs", type=float, default=86400.0,
                            help="How long a tile version is remembered to drop re-deliveries.")
        local = parser.add_argument_group("local stack")
        local.add_argument("--local", action="store_true", default=False,
                           help="Run against the local emulator stack (tilestream local up); "
                           "fills subscription, dataset and output prefix from it.")
        local.add_argument("--stack_dir", default=None,
                           help="Run directory of the local stack (default .tilestream/stack).")
        local.add_argument("--metrics_file", default=None,
                           help="Write the job's counters here as JSON, every few seconds and "
                           "at exit (local runs).")


def load_temp_location(o) -> str:
    """Where chip-row load jobs stage their files (``o``: the pipeline's options, any view):
    ``--temp_location``, else under the output prefix, the bucket the stream already writes."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    prefix = (o.output_prefix or "").rstrip("/")
    return o.view_as(GoogleCloudOptions).temp_location or f"{prefix}/tmp/bigquery"


def release_prefix(o) -> str:
    """Where this job's prediction COGs go: ``<output_prefix>/releases/<release>``, so two
    releases running side by side (blue-green) never write the same object."""
    from model.card import join_uri
    from transforms.guards import safe_id

    return join_uri(o.output_prefix or "", f"releases/{safe_id(o.release, 'release')}")


def __getattr__(name: str):
    """``TileStreamOptions`` is built on first use: Beam's PipelineOptions import costs seconds."""
    if name != "TileStreamOptions":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from apache_beam.options.pipeline_options import PipelineOptions

    options = type("TileStreamOptions", (TileStreamArguments, PipelineOptions),
                   {"__module__": __name__, "__doc__": "TileStream's options as a Beam view."})
    globals()["TileStreamOptions"] = options
    return options


def unknown_flags(argv: list[str]) -> str | None:
    """Why ``argv`` cannot start a job, when it names a flag that no PipelineOptions class knows
    (TileStream's or any of Beam's: --runner, --project, --experiments, worker flags, ...).

    Beam itself only logs "Discarding unparseable args" among its start-up lines and runs on
    without the flag, so a misspelt ``--max_batch_sise=64`` would silently run with the default.
    """
    import difflib

    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    globals().get("TileStreamOptions") or __getattr__("TileStreamOptions")  # registers it
    class Parser(_BeamArgumentParser):
        def error(self, message):  # a bad value is for Beam's own parse to report
            raise ValueError(message)

    parser = Parser(allow_abbrev=False)
    classes = {str(cls): cls for cls in PipelineOptions.__subclasses__()}  # as Beam reads them
    for cls in classes.values():
        cls._add_argparse_args(parser)
    try:
        _, unknown = parser.parse_known_args(argv)
    except ValueError:
        return None
    flags = [a for a in unknown if a.startswith("-")]
    if not flags:
        return None
    known = [s for action in parser._actions for s in action.option_strings]
    reasons = []
    for given in flags:
        name = given.split("=", 1)[0]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        reasons.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return (f"unknown flag{'s' if len(reasons) > 1 else ''}: {'; '.join(reasons)}. "
            "`tilestream run --help` lists TileStream's; Beam's PipelineOptions are accepted too")
