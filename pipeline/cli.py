"""``tilestream``: the one command line of the project.

Verbs: run (the stream), announce (publish tiles), demo, local (the emulator stack), smoke
(checks the stack with a minimal stream), check (a worker image before launch), schemas
(BigQuery JSON), slo (SLO attainment and error budget), model (train, distill, evaluate,
export; registry: publish, promote, canary, shadow, rollback; drift).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from pipeline import local_stack


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


def cmd_run(args, rest: list[str]) -> int:
    from model.card import CardError
    from pipeline import main

    if "-h" in rest or "--help" in rest:
        from pipeline.options import TileStreamOptions

        usage = argparse.ArgumentParser(
            prog="tilestream run", description="Run the stream. Any Beam PipelineOptions flag "
            "(--runner, --project, --region, --temp_location, ...) is accepted too.")
        TileStreamOptions._add_argparse_args(usage)
        usage.print_help()
        return 0
    try:
        code = main.run(rest)
    except (main.ConfigError, CardError, local_stack.StackError) as exc:
        return _fail("run", str(exc))
    main.exit_now(code)
    return code


def cmd_announce(args) -> int:
    from google.cloud import pubsub_v1, storage

    from pipeline import announce

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
    for noisy in ("apache_beam.runners.direct", "apache_beam.io.gcp", "apache_beam.typehints",
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
