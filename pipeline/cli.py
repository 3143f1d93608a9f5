"""``tilestream``: the one command line of the project.

Verbs: run (the stream), announce (publish tiles), demo, local (the emulator stack), smoke
(checks the stack with a minimal stream), check (a worker image before launch), stats (the
books), stac (a static STAC catalog of the predictions), status (the local stream at a glance),
slo (SLO attainment and error budget), schemas (BigQuery JSON), model (train, distill, evaluate,
export; registry: publish, promote, canary, shadow, rollback; drift).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from pipeline.local import stack as local_stack


def _stack_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stack_dir", default=None,
                        help="run directory of the local stack (default .tilestream/stack, or "
                        "$TILESTREAM_STACK_DIR)")


def cmd_local(args) -> int:
    if args.action == "up":
        started = time.monotonic()
        stack = local_stack.up(args.stack_dir)
        print(f"local stack up in {time.monotonic() - started:.1f}s at {stack.run_dir}",
              file=sys.stderr)
        print(json.dumps({"run_dir": stack.run_dir, **stack.env()}, indent=2))
        return 0
    if args.action == "down":
        stopped = local_stack.down(args.stack_dir)
        print(f"stopped process groups {stopped}" if stopped else "no stack was running",
              file=sys.stderr)
        return 0
    stack = local_stack.load(args.stack_dir)
    if args.action == "env":
        for key, value in stack.env().items():
            print(f"export {key}={value}")
        return 0
    health = local_stack.status(stack)
    print(json.dumps({"run_dir": stack.run_dir, "services": health, "pids": stack.pids},
                     indent=2))
    return 0 if all(health.values()) else 1


class _RunHelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                        argparse.RawDescriptionHelpFormatter):
    """Every option with its default; the model summary below keeps its lines."""


def _card_summary(rest: list[str]) -> str:
    """The bands and classes of the model ``--model_uri`` names (or the shipped one), for help."""
    from model.card import CARD_FILE, card_from_dict
    from pipeline.options import DEFAULT_MODEL_URI

    model_uri = DEFAULT_MODEL_URI
    for i, arg in enumerate(rest):
        if arg.startswith("--model_uri="):
            model_uri = arg.split("=", 1)[1]
        elif arg == "--model_uri" and i + 1 < len(rest):
            model_uri = rest[i + 1]
    if "://" in model_uri:
        return f"model {model_uri}: its card is read when the stream starts"
    try:
        with open(f"{model_uri.rstrip('/')}/{CARD_FILE}") as f:
            card = card_from_dict(json.load(f), model_uri)
    except (OSError, ValueError) as exc:
        return f"model {model_uri}: no readable model card ({exc})"
    return (f"model {card.model_id} ({model_uri})\n  bands, in order: "
            f"{', '.join(card.input.bands)}\n  classes: "
            f"{', '.join(f'{c.id}={c.name}' for c in card.classes)}\n  chips: "
            f"{card.input.chip_size} px, stride {card.input.stride}")


def cmd_run(args, rest: list[str]) -> int:
    if "-h" in rest or "--help" in rest:  # answered without importing Beam or torch
        from pipeline.options import TileStreamArguments

        usage = argparse.ArgumentParser(
            prog="tilestream run", description="Run the stream. Any Beam PipelineOptions flag "
            "(--runner, --project, --region, --temp_location, ...) is accepted too.",
            formatter_class=_RunHelpFormatter,
            epilog=_card_summary(rest))
        TileStreamArguments._add_argparse_args(usage)
        usage.print_help()
        return 0
    from model.card import CardError
    from pipeline import main

    _record_local_stream(rest)
    try:
        code = main.run(rest)
    except (main.ConfigError, CardError, local_stack.StackError) as exc:
        return _fail("run", str(exc))
    main.exit_now(code)
    return code


def _record_local_stream(rest: list[str]) -> None:
    """A local stream leaves its PID in the stack's run directory for ``tilestream status``."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--local", action="store_true")
    parser.add_argument("--stack_dir", default=None)
    known, _ = parser.parse_known_args(rest)
    if known.local:
        try:
            from pipeline.status import record_stream

            record_stream(local_stack.load(known.stack_dir))
        except local_stack.StackError:
            pass  # main.run says what is missing


def cmd_stac(args) -> int:
    from pipeline import stac_catalog

    if args.local:
        try:
            stack = local_stack.load(args.stack_dir)
        except local_stack.StackError as exc:
            return _fail("stac", str(exc))
        bigquery, storage = stack.bigquery(), stack.storage()
        dataset = args.bq_dataset or f"{stack.project}.{stack.dataset}"
    elif not args.bq_dataset:
        return _fail("stac", "--bq_dataset is required without --local")
    else:
        from google.cloud import bigquery as bq
        from google.cloud import storage as gcs

        bigquery, storage, dataset = bq.Client(), gcs.Client(), args.bq_dataset
    try:
        summary = stac_catalog.run(args.out, bigquery, storage, dataset)
    except stac_catalog.StacValidationError as exc:
        return _fail("stac", str(exc))
    print(json.dumps(summary, sort_keys=True))
    return 0


def cmd_status(args) -> int:
    from pipeline.status import report

    try:
        stack = local_stack.load(args.stack_dir)
    except local_stack.StackError as exc:
        return _fail("status", str(exc))
    result = report(stack, args.dataset, args.hours, args.subscription)
    print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0 if all(result["stack"].values()) else 1


def cmd_announce(args) -> int:
    from google.cloud import pubsub_v1, storage

    from pipeline import announce

    if args.stac:
        return _announce_stac(args)
    if args.json and (not args.tile_id or not args.acquired):
        return _fail("announce", "--json needs --tile_id and --acquired")
    if args.json and (bool(args.band) == bool(args.paths) or len(args.paths) > 1):
        return _fail("announce", "--json takes one multi-band PATH or --band name=PATH ...")
    if args.local:
        stack = local_stack.load(args.stack_dir)
        publisher, store = stack.publisher(), stack.storage()
        topic, bucket = args.topic or stack.topic_path, args.bucket or stack.bucket
    elif not args.topic:
        return _fail("announce", "--topic is required without --local")
    else:
        publisher, store, topic, bucket = (pubsub_v1.PublisherClient(), storage.Client(),
                                           args.topic, args.bucket)

    def stored(path: str) -> tuple[str, int]:
        """(gs:// URI, generation) of an existing object, or of a local file once uploaded."""
        if path.startswith("gs://"):
            name_bucket, _, name = path[len("gs://"):].partition("/")
            blob = store.bucket(name_bucket).get_blob(name)
            if blob is None:
                raise SystemExit(f"tilestream announce: {path} does not exist")
            return path, int(blob.generation)
        if not bucket:
            raise SystemExit("tilestream announce: --bucket is needed to upload local files")
        return announce.upload(store, path, bucket, announce.object_name(args.prefix, path))

    if not args.json:
        for path in args.paths:
            uri, generation = stored(path)
            name_bucket, _, name = uri[len("gs://"):].partition("/")
            data, attributes = announce.gcs_notification(name_bucket, name, generation)
            print(f"{announce.publish(publisher, topic, data, attributes)} {uri}#{generation}")
        return 0
    bands = {name: stored(path)[0] for name, path in (b.split("=", 1) for b in args.band)}
    data, attributes = announce.json_announcement(
        args.tile_id, args.acquired, uri=stored(args.paths[0])[0] if args.paths else None,
        bands=bands or None, sensor=args.sensor,
        attributes=dict(a.split("=", 1) for a in args.attr))
    print(announce.publish(publisher, topic, data, attributes))
    return 0


def _announce_stac(args) -> int:
    """Publish STAC Item files as they are: the stream reads the item itself (docs/stac.md)."""
    from pipeline import announce
    from transforms.stac import is_stac_item, rfc3339

    items = []
    for path in args.stac:
        try:
            with open(path, "rb") as f:
                data = f.read()
            item = json.loads(data)
        except (OSError, ValueError) as exc:
            return _fail("announce", f"cannot read {path} as JSON: {exc}")
        if not is_stac_item(item):
            return _fail("announce", f"{path} is not a STAC Item (a Feature with stac_version)")
        items.append((data, item["id"]))
    if args.local:
        stack = local_stack.load(args.stack_dir)
        publisher, topic = stack.publisher(), args.topic or stack.topic_path
    elif not args.topic:
        return _fail("announce", "--topic is required without --local")
    else:
        from google.cloud import pubsub_v1

        publisher, topic = pubsub_v1.PublisherClient(), args.topic
    for data, item_id in items:
        attributes = {"eventTime": rfc3339(time.time())}
        print(f"{announce.publish(publisher, topic, data, attributes)} {item_id}")
    return 0


def _fail(verb: str, message: str) -> int:
    print(f"tilestream {verb}: {message}", file=sys.stderr)
    return 2


def cmd_demo(args) -> int:
    from pipeline import demo
    from pipeline.options import DEFAULT_MODEL_URI

    summary = demo.run_demo(out_dir=args.out, keep_stack=args.keep_stack,
                            model_uri=args.model_uri or DEFAULT_MODEL_URI)
    print(json.dumps(summary, sort_keys=True))
    return 0 if summary["tiles_scored"] >= 1 else 1


def cmd_smoke(args) -> int:
    from pipeline import smoke

    result = smoke.run_smoke(local_stack.load(args.stack_dir))
    print(json.dumps(result, sort_keys=True, default=str))
    return 0


def cmd_check(args) -> int:
    from pipeline.check import run_check
    from pipeline.options import DEFAULT_MODEL_URI

    try:
        report = run_check(args.model_uri or DEFAULT_MODEL_URI, args.device)
    except Exception as exc:  # the point of the check is to say what is wrong
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(report, sort_keys=True))
    return 0 if report["ok"] else 1


def cmd_stats(args) -> int:
    from pipeline import stats

    if args.local:
        stack = local_stack.load(args.stack_dir)
        bq, dataset = stack.bigquery(), args.dataset or f"{stack.project}.{stack.dataset}"
    elif not args.dataset:
        return _fail("stats", "--dataset project.dataset is required without --local")
    else:
        from google.cloud import bigquery

        bq, dataset = bigquery.Client(), args.dataset.replace(":", ".", 1)
    report = stats.books(bq, dataset, args.hours)
    if args.local:
        report["pubsub_dead_letter_topic"] = stats.pubsub_dead_letters(stack)
    print(json.dumps(report, indent=2, sort_keys=True, default=str))
    return 0


def cmd_schemas(args) -> int:
    from transforms.sinks import write_schema_files

    for path in write_schema_files(args.directory):
        print(path)
    return 0


def cmd_slo(args) -> int:
    import datetime as dt

    from pipeline import slo

    try:
        window = slo.parse_window(args.window)
        end = dt.datetime.fromisoformat(args.end) if args.end else None
        if end is not None and end.tzinfo is None:
            end = end.replace(tzinfo=dt.UTC)
        if args.local:
            stack = local_stack.load(args.stack_dir)
            client, dataset = stack.bigquery(), f"{stack.project}.{stack.dataset}"
            if args.bq_dataset:
                dataset = args.bq_dataset.replace(":", ".")
        elif not args.bq_dataset:
            return _fail("slo", "--bq_dataset PROJECT:DATASET is required without --local")
        else:
            from google.cloud import bigquery

            dataset = args.bq_dataset.replace(":", ".")
            client = bigquery.Client(project=dataset.split(".")[0])
        report = slo.compute(client, dataset, window, end, args.latency_s, args.latency_target,
                             args.error_target, args.freshness_s)
    except (slo.SloError, ValueError, local_stack.StackError) as exc:
        return _fail("slo", str(exc))
    print(json.dumps(report.to_dict(), default=str, indent=2) if args.json else report.text())
    return 0


def cmd_model(args, rest: list[str]) -> int:
    from model import cli as model_cli

    return model_cli.main(rest)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tilestream", description=__doc__.split("\n\n")[0])
    verbs = top.add_subparsers(dest="verb", required=True, metavar="VERB")

    run = verbs.add_parser("run", help="run the stream (Beam PipelineOptions follow; "
                           "`tilestream run --help` lists them)", add_help=False)
    run.set_defaults(func=cmd_run, passthrough=True)

    ann = verbs.add_parser("announce", help="upload a tile if needed and publish its "
                           "notification or a JSON announcement")
    ann.add_argument("paths", nargs="*", metavar="PATH_OR_GS_URI")
    ann.add_argument("--local", action="store_true", help="use the local stack")
    _stack_arg(ann)
    ann.add_argument("--topic", help="topic path (default: the local stack's)")
    ann.add_argument("--bucket", help="bucket for uploads (default: the local stack's)")
    ann.add_argument("--prefix", default="incoming", help="object prefix for uploads")
    ann.add_argument("--json", action="store_true",
                     help="publish a tilestream.announcement/v1 JSON message instead")
    ann.add_argument("--tile_id", help="tile id (JSON announcements)")
    ann.add_argument("--acquired", default=None, help="acquisition time, RFC 3339 (JSON)")
    ann.add_argument("--sensor", default=None, help="sensor name (JSON)")
    ann.add_argument("--band", action="append", default=[], metavar="NAME=PATH",
                     help="one band file of a JSON announcement; repeat per band")
    ann.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE",
                     help="extra attribute carried to the output rows (JSON)")
    ann.add_argument("--stac", action="append", default=[], metavar="ITEM.json",
                     help="publish a STAC Item file as it is (its assets must be gs:// "
                     "objects); repeat per item")
    ann.set_defaults(func=cmd_announce)

    demo = verbs.add_parser("demo", help="local stack up, score the sample tile, print SQL "
                            "results and a quicklook, stop everything")
    demo.add_argument("--out", default="out/demo", help="where the quicklook and logs go")
    demo.add_argument("--keep_stack", action="store_true", help="leave the stack running")
    demo.add_argument("--model_uri", default=None, help="model directory (default: the "
                      "shipped student)")
    demo.set_defaults(func=cmd_demo)

    local = verbs.add_parser("local", help="the local emulator stack")
    local.add_argument("action", choices=["up", "down", "status", "env"])
    _stack_arg(local)
    local.set_defaults(func=cmd_local)

    smoke = verbs.add_parser("smoke", help="check the local stack with a minimal stream")
    _stack_arg(smoke)
    smoke.set_defaults(func=cmd_smoke)

    check = verbs.add_parser("check", help="before launching: torch sees the device, the "
                             "model card loads, one real chip scores")
    check.add_argument("--model_uri", default=None, help="model directory (default: shipped)")
    check.add_argument("--device", default="GPU", choices=["CPU", "GPU"])
    check.set_defaults(func=cmd_check)

    stat = verbs.add_parser("stats", help="the books for a window: messages in = scored + "
                            "dead-lettered + filtered + duplicates, tiles, chips, reasons")
    stat.add_argument("--local", action="store_true", help="read the local stack's dataset")
    _stack_arg(stat)
    stat.add_argument("--dataset", help="project.dataset (default: the local stack's)")
    stat.add_argument("--hours", type=float, default=24.0, help="window, hours back from now")
    stat.set_defaults(func=cmd_stats)

    stac = verbs.add_parser("stac", help="write a static STAC catalog (one collection per "
                            "model version) of the prediction COGs in the tiles table")
    stac.add_argument("--out", required=True, metavar="DIR_OR_GS_PREFIX",
                      help="local directory or gs:// prefix for catalog.json and the rest")
    stac.add_argument("--local", action="store_true", help="read the local stack's tables")
    _stack_arg(stac)
    stac.add_argument("--bq_dataset", default=None,
                      help="project.dataset holding the tiles table (default with --local: "
                      "the stack's)")
    stac.set_defaults(func=cmd_stac)

    status = verbs.add_parser("status", help="the local stream: running or not, subscription "
                              "backlog, last tile scored, recent dead letters")
    _stack_arg(status)
    status.add_argument("--dataset", default=None, help="dataset of the stream's tables "
                        "(default: the stack's)")
    status.add_argument("--subscription", default=None, help="subscription whose backlog to "
                        "count (default: the stack's)")
    status.add_argument("--hours", type=float, default=1.0,
                        help="window for counting dead letters (hours)")
    status.set_defaults(func=cmd_status)

    schemas = verbs.add_parser("schemas", help="write the BigQuery table schemas as JSON")
    schemas.add_argument("directory", nargs="?", default="templates/bigquery")
    schemas.set_defaults(func=cmd_schemas)

    from pipeline import slo as slo_defaults

    slo = verbs.add_parser("slo", help="SLO attainment and error budget left, from the "
                           "BigQuery rows over a window (local or real dataset)")
    slo.add_argument("--local", action="store_true", help="the local stack's BigQuery")
    _stack_arg(slo)
    slo.add_argument("--bq_dataset", default=None, help="PROJECT:DATASET (default with "
                     "--local: the stack's)")
    slo.add_argument("--window", default=slo_defaults.DEFAULT_WINDOW,
                     help="e.g. 1h, 7d (default %(default)s)")
    slo.add_argument("--end", default=None, help="end of the window, ISO 8601 (default: now)")
    slo.add_argument("--latency_s", type=float, default=slo_defaults.LATENCY_SLO_S)
    slo.add_argument("--latency_target", type=float, default=slo_defaults.LATENCY_TARGET)
    slo.add_argument("--error_target", type=float, default=slo_defaults.ERROR_TARGET)
    slo.add_argument("--freshness_s", type=float, default=slo_defaults.FRESHNESS_S)
    slo.add_argument("--json", action="store_true", help="machine-readable output")
    slo.set_defaults(func=cmd_slo)

    model = verbs.add_parser("model", help="train, distill, evaluate and export the student; "
                             "publish, promote, canary, shadow, roll back (`tilestream model "
                             "--help`)", add_help=False)
    model.set_defaults(func=cmd_model, passthrough=True)
    return top


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    for noisy in ("apache_beam.runners.direct", "apache_beam.typehints",
                  "google", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parser().parse_known_args(argv)
    if getattr(args, "passthrough", False):
        return args.func(args, rest)
    if rest:
        parser().error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
