"""``tilestream``: the one command line of the project.

Verbs: run (the stream), announce (publish tiles), demo, local (the emulator stack), smoke
(checks the stack with a minimal stream), check (a worker image before launch), stats (the
books), follow (the result events as they arrive), stac (a static STAC catalog of the
predictions), status (the stream at a glance), query
(the shipped SQL by name), slo (SLO attainment and error budget), schemas (BigQuery JSON), iam,
release, model (train, distill, evaluate, export; registry: publish, promote, canary, shadow,
rollback, watch; drift). What a user reads is the help each parser carries, not this docstring.

Every verb that reads the stream's resources takes the same flags (``pipeline/ops/clients.py``):
``--local`` [``--stack_dir``] or GCP, and ``--bq_dataset PROJECT:DATASET``. Flags are snake_case.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from pipeline.local import stack as local_stack
from pipeline.ops import clients, model_cli

# Whom each verb acts as. On GCP that is the credentials it runs with; on the local stack every
# call carries this name, so the least-privilege check (pipeline/ops/iam.py) can evaluate it
# against the grants the Terraform gives that identity.
IDENTITIES = {"run": "worker", "announce": "publisher", "model": "model-operator",
              "watch": "rollback-rule", "release": "model-operator", "map": "map"}
OPERATOR = "operator"


def _stack_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stack_dir", default=None,
                        help="run directory of the local stack (default .tilestream/stack, or "
                        "$TILESTREAM_STACK_DIR)")


def _fail(verb: str, message: str) -> int:
    print(f"tilestream {verb}: {message}", file=sys.stderr)
    return 2


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
    from pipeline.local import launch
    from pipeline.options import unknown_flags

    refused = unknown_flags(rest)  # Beam would drop it with a warning and run on without it
    if refused:
        return _fail("run", refused)
    _record_local_stream(rest)
    try:
        code = main.run(rest, local=launch)
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
            from pipeline.ops.status import record_stream

            record_stream(local_stack.load(known.stack_dir))
        except local_stack.StackError:
            pass  # main.run says what is missing


def cmd_stac(args) -> int:
    from pipeline.ops import stac_catalog

    target = clients.resolve(args)
    try:
        summary = stac_catalog.run(args.out, target.bigquery(), target.storage(),
                                   target.need_dataset())
    except stac_catalog.StacValidationError as exc:
        return _fail("stac", str(exc))
    print(json.dumps(summary, sort_keys=True))
    return 0


def cmd_status(args) -> int:
    from pipeline.ops.status import report

    target = clients.resolve(args)
    registry = model_cli._registry(args) if args.registry else None
    result = report(target, args.hours, args.subscription, registry)
    print(json.dumps(result, indent=2, sort_keys=True, default=str))
    return 0 if all(result.get("stack", {}).values()) else 1


def cmd_follow(args) -> int:
    from pipeline.ops.follow import follow

    target = clients.resolve(args)
    topic = args.topic or (target.stack.results_topic_path if target.stack is not None else None)
    if not topic:
        return _fail("follow", "--topic projects/P/topics/T is required without --local "
                     "(Terraform's output results_topic)")
    print(f"following {topic}" + (f" where {args.filter}" if args.filter else "")
          + " (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        follow(target.subscriber(), topic, filter_=args.filter, max_events=args.max_events,
               timeout_s=args.timeout_secs)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_announce(args) -> int:
    from pipeline.ops import announce

    if args.stac:
        return _announce_stac(args)
    if args.json and (not args.tile_id or not args.acquired):
        return _fail("announce", "--json needs --tile_id and --acquired")
    if args.json and (bool(args.band) == bool(args.paths) or len(args.paths) > 1):
        return _fail("announce", "--json takes one multi-band PATH or --band name=PATH ...")
    if not args.paths and not args.band:
        return _fail("announce", "nothing to announce: give a GeoTIFF PATH or gs:// URI "
                     "(or --json with --band, or --stac ITEM.json)")
    try:
        for path in [*args.paths, *(b.partition("=")[2] for b in args.band)]:
            announce.check_raster(path)
    except announce.AnnounceError as exc:
        return _fail("announce", str(exc))
    target = clients.resolve(args)
    topic = args.topic or (target.stack.topic_path if target.stack else None)
    bucket = args.bucket or (target.stack.bucket if target.stack else None)
    if not topic:
        return _fail("announce", "--topic is required without --local")
    publisher, store = target.publisher(), target.storage()

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
    from pipeline.ops import announce
    from transforms.stac_read import is_stac_item, rfc3339

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
    target = clients.resolve(args)
    topic = args.topic or (target.stack.topic_path if target.stack else None)
    if not topic:
        return _fail("announce", "--topic is required without --local")
    publisher = target.publisher()
    for data, item_id in items:
        attributes = {"eventTime": rfc3339(time.time())}
        print(f"{announce.publish(publisher, topic, data, attributes)} {item_id}")
    return 0


def cmd_demo(args) -> int:
    from pipeline.local import demo
    from pipeline.options import DEFAULT_MODEL_URI

    summary = demo.run_demo(out_dir=args.out, keep_stack=args.keep_stack,
                            model_uri=args.model_uri or DEFAULT_MODEL_URI)
    print(json.dumps(summary, sort_keys=True))
    return 0 if summary["tiles_scored"] >= 1 else 1


def cmd_smoke(args) -> int:
    from pipeline.local import smoke

    result = smoke.run_smoke(local_stack.load(args.stack_dir))
    print(json.dumps(result, sort_keys=True, default=str))
    return 0


def cmd_check(args) -> int:
    from pipeline.ops.check import run_check
    from pipeline.options import DEFAULT_MODEL_URI

    try:
        report = run_check(args.model_uri or DEFAULT_MODEL_URI, args.device)
    except Exception as exc:  # the point of the check is to say what is wrong
        print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}))
        return 1
    print(json.dumps(report, sort_keys=True))
    return 0 if report["ok"] else 1


def cmd_stats(args) -> int:
    from pipeline.ops import stats

    target = clients.resolve(args)
    pulled = None
    if target.stack is not None:  # the journal: every message the local stream pulled
        from pipeline.local import journal

        pulled = journal.pulled_ids(target.stack, target.need_dataset())
    report = stats.books(target.bigquery(), target.need_dataset(), args.hours, pulled)
    if target.stack is not None:
        report["pubsub_dead_letter_topic"] = stats.pubsub_dead_letters(target.stack)
    print(json.dumps(report, indent=2, sort_keys=True, default=str))
    return 0


def cmd_query(args) -> int:
    from google.api_core.exceptions import NotFound

    from pipeline.ops import queries

    files = (queries.QUERIES_FILE, queries.OPERATIONS_FILE)
    if args.list or not (args.name or args.sql):
        for path in files:
            for name, about in queries.describe(path).items():
                print(f"{name:<28} {about}  [{path.name}]")
        return 0
    if args.name and args.sql:
        return _fail("query", "give a NAME or --sql, not both")
    sql = args.sql
    if sql is None:
        sql = next((q[args.name] for q in map(queries.load_queries, files) if args.name in q),
                   None)
    if sql is None:
        return _fail("query", f"no query named {args.name!r} (`tilestream query --list`)")
    sql = queries.strip_comments(sql)
    try:
        params = dict(queries.parse_param(p) for p in args.param)
    except ValueError as exc:
        return _fail("query", str(exc))
    needed = queries.parameters(sql)
    missing = [p for p in needed if p not in params and p not in queries.DEFAULTS]
    if missing:
        return _fail("query", f"{args.name or 'the SQL'} binds "
                     f"{', '.join('@' + p for p in missing)}: add "
                     + " ".join(f"--param {p}=..." for p in missing))
    unknown = sorted(set(params) - set(needed))
    if unknown:
        return _fail("query", f"{args.name or 'the SQL'} has no parameter {', '.join(unknown)} "
                     f"(it binds {', '.join(needed) or 'none'})")
    target = clients.resolve(args)
    client, dataset = target.bigquery(), target.need_dataset()
    deadline = time.monotonic() + args.wait_secs
    while True:
        try:
            rows, absent = queries.run_sql(client, sql, dataset, **params), None
        except NotFound as exc:  # the stream creates its tables when it first writes
            rows, absent = [], exc
        if rows or time.monotonic() >= deadline:
            break
        time.sleep(2.0)
    for row in rows:
        print(json.dumps(row, default=str, ensure_ascii=False, sort_keys=True))
    note = ""
    if absent is not None:
        note = f"; not found: {absent.message} (a stream creates its tables when it first writes)"
    elif "include_drifted" in needed and not params.get("include_drifted"):
        flagged = len(queries.run_sql(client, sql, dataset,
                                      **{**params, "include_drifted": True})) - len(rows)
        if flagged > 0:
            note = (f"; {flagged} more of tiles the model flagged as unlike its training data "
                    "(drifted): --param include_drifted=true shows them")
    print(f"{len(rows)} row(s){note}", file=sys.stderr)
    return 1 if args.wait_secs and not rows else 0


def cmd_schemas(args) -> int:
    from transforms.sinks import write_schema_files

    for path in write_schema_files(args.directory):
        print(path)
    return 0


def cmd_slo(args) -> int:
    import datetime as dt

    from pipeline.ops import slo

    try:
        window = slo.parse_window(args.window)
        end = dt.datetime.fromisoformat(args.end) if args.end else None
        if end is not None and end.tzinfo is None:
            end = end.replace(tzinfo=dt.UTC)
        target = clients.resolve(args)
        report = slo.compute(target.bigquery(), target.need_dataset(), window, end,
                             args.latency_s, args.latency_target, args.error_target,
                             args.freshness_s)
    except (slo.SloError, ValueError) as exc:
        return _fail("slo", str(exc))
    print(json.dumps(report.to_dict(), default=str, indent=2) if args.json else report.text())
    return 0


def cmd_map(args) -> int:
    from pipeline.map import server

    return server.serve(args)


def cmd_iam(args, rest: list[str]) -> int:
    from pipeline.ops import iam

    return iam.main(rest)


def cmd_release(args, rest: list[str]) -> int:
    from pipeline.ops import release

    return release.main(rest)


def parser() -> argparse.ArgumentParser:
    from pipeline.options import RELEASE

    top = argparse.ArgumentParser(
        prog="tilestream", description="Score new satellite tiles as they arrive: the stream, "
        "its local emulator stack, and the verbs to operate it.",
        epilog="`tilestream VERB --help` describes a verb and its flags. Verbs that read the "
        "stream's resources take --local [--stack_dir DIR] for the local stack, or reach GCP "
        "with --bq_dataset PROJECT:DATASET.")
    top.add_argument("--version", action="version", version=f"%(prog)s {RELEASE}",
                     help="print the release of this tilestream and exit")
    verbs = top.add_subparsers(dest="verb", required=True, metavar="VERB")

    run = verbs.add_parser("run", help="run the stream (Beam PipelineOptions follow; "
                           "`tilestream run --help` lists them)", add_help=False)
    run.set_defaults(func=cmd_run, passthrough=True)

    ann = verbs.add_parser("announce", help="upload a tile if needed and publish its "
                           "notification or a JSON announcement")
    ann.add_argument("paths", nargs="*", metavar="PATH_OR_GS_URI",
                     help="tile files to upload (local) or announce (gs://), one message each")
    clients.add_arguments(ann, dataset=False)
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

    local = verbs.add_parser("local", help="the local emulator stack: up, status, env, down")
    actions = local.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, help_text in (
            ("up", "start Pub/Sub, BigQuery and GCS emulators (or reuse running ones), create "
                   "the topic, subscriptions, buckets and dataset; print the run directory and "
                   "environment as JSON"),
            ("status", "is each emulator answering? exit 1 if one is not"),
            ("env", "`export` lines that point Google clients, Beam and GDAL at the stack"),
            ("down", "stop exactly the processes `up` started")):
        _stack_arg(actions.add_parser(action, help=help_text))
    local.set_defaults(func=cmd_local)

    smoke = verbs.add_parser("smoke", help="check the local stack with a minimal stream")
    _stack_arg(smoke)
    smoke.set_defaults(func=cmd_smoke)

    check = verbs.add_parser("check", help="before launching: torch sees the device, the "
                             "model card loads, one real chip scores")
    check.add_argument("--model_uri", default=None, help="model directory (default: shipped)")
    from pipeline.options import DEFAULT_DEVICE, DEVICES

    check.add_argument("--device", default=DEFAULT_DEVICE, choices=DEVICES,
                       help="where the chip is scored, as `tilestream run --device`; GPU fails "
                       "when torch sees no CUDA device (default %(default)s)")
    check.set_defaults(func=cmd_check)

    stat = verbs.add_parser("stats", help="the books for a window: every message in and its "
                            "one outcome, ids still pending, tiles, chips, reasons")
    clients.add_arguments(stat)
    stat.add_argument("--hours", type=float, default=24.0, help="window, hours back from now")
    stat.set_defaults(func=cmd_stats)

    stac = verbs.add_parser("stac", help="write a static STAC catalog (one collection per "
                            "model version) of the prediction COGs in the tiles table")
    stac.add_argument("--out", required=True, metavar="DIR_OR_GS_PREFIX",
                      help="local directory or gs:// prefix for catalog.json and the rest")
    clients.add_arguments(stac)
    stac.set_defaults(func=cmd_stac)

    status = verbs.add_parser("status", help="the stream: running or not, subscription "
                              "backlog, last tile scored, recent dead letters")
    clients.add_arguments(status)
    status.add_argument("--subscription", default=None, help="subscription whose backlog to "
                        "count (default: the stack's)")
    status.add_argument("--hours", type=float, default=1.0,
                        help="window for counting dead letters (hours)")
    clients.add_registry_argument(status, None, "model registry whose channels name the "
                                  "live, candidate and green (none: the rows alone)")
    status.set_defaults(func=cmd_status)

    fol = verbs.add_parser("follow", help="print the stream's result events (answered, refused, "
                           "dead-lettered, changed) as they arrive, one JSON object a line")
    clients.add_arguments(fol, dataset=False)
    fol.add_argument("--topic", default=None, help="the results topic (default with --local: "
                     "the stack's; on GCP, Terraform's output results_topic)")
    fol.add_argument("--filter", default="", help="a Pub/Sub subscription filter on the events' "
                     "attributes, e.g. 'attributes.outcome = \"answered\"' (docs/results.md)")
    fol.add_argument("--max_events", type=int, default=0,
                     help="stop after this many events (0: never)")
    fol.add_argument("--timeout_secs", type=float, default=0.0,
                     help="stop after this many seconds (0: never)")
    fol.set_defaults(func=cmd_follow)

    query = verbs.add_parser(
        "query", help="run a shipped SQL query by name and print its rows, one JSON object a line",
        description="Run a named query of pipeline/ops/sql/queries.sql (what a consumer runs) "
        "or operations.sql (SLOs, comparisons) against the stream's dataset and print its rows "
        "as JSON lines. Queries leave out tiles the model flagged as drifted unless you pass "
        "--param include_drifted=true.")
    query.add_argument("name", nargs="?", help="query name (none, or --list: list them all)")
    query.add_argument("--sql", default=None, help="run this SQL instead of a named query "
                       "(`{dataset}` is replaced by the dataset, comments are dropped)")
    query.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                       help="bind @NAME; true/false, numbers and ISO 8601 times are typed, "
                       "the rest are strings; repeat per parameter")
    query.add_argument("--list", action="store_true", help="list the queries and what each "
                       "answers")
    query.add_argument("--wait_secs", type=float, default=0.0,
                       help="repeat the query until it returns a row or this many seconds "
                       "pass; exit 1 if none came (default: run once)")
    clients.add_arguments(query)
    query.set_defaults(func=cmd_query)

    schemas = verbs.add_parser("schemas", help="write the BigQuery table schemas as JSON")
    schemas.add_argument("directory", nargs="?", default="templates/bigquery",
                         help="where the JSON files go (default %(default)s)")
    schemas.set_defaults(func=cmd_schemas)

    from pipeline.ops import slo as slo_defaults

    slo = verbs.add_parser("slo", help="SLO attainment and error budget left, from the "
                           "BigQuery rows over a window (local or real dataset)")
    clients.add_arguments(slo)
    slo.add_argument("--window", default=slo_defaults.DEFAULT_WINDOW,
                     help="e.g. 1h, 7d (default %(default)s)")
    slo.add_argument("--end", default=None, help="end of the window, ISO 8601 (default: now)")
    slo.add_argument("--latency_s", type=float, default=slo_defaults.LATENCY_SLO_S,
                     help="a tile is on time when its complete row lands within this many "
                     "seconds of publish (default %(default)s)")
    slo.add_argument("--latency_target", type=float, default=slo_defaults.LATENCY_TARGET,
                     help="share of tiles that must be on time (default %(default)s)")
    slo.add_argument("--error_target", type=float, default=slo_defaults.ERROR_TARGET,
                     help="share of messages that must not be dead-lettered "
                     "(default %(default)s)")
    slo.add_argument("--freshness_s", type=float, default=slo_defaults.FRESHNESS_S,
                     help="the newest row may be at most this old (default %(default)s)")
    slo.add_argument("--json", action="store_true", help="machine-readable output")
    slo.set_defaults(func=cmd_slo)

    from pipeline.map import server as map_server

    map_verb = verbs.add_parser("map", help="serve a live web map of the recent tiles: outcomes, "
                                "prediction COGs in class colours (TiTiler), new tiles as they "
                                "land")
    map_server.add_arguments(map_verb)
    map_verb.set_defaults(func=cmd_map)

    access = verbs.add_parser("iam", help="least privilege: the recorded needs of each identity "
                              "against the Terraform's grants", add_help=False)
    access.set_defaults(func=cmd_iam, passthrough=True)

    rel = verbs.add_parser("release", help="the stream's own releases: update check, recorded "
                           "graphs, blue-green (green, compare, cutover, abort)", add_help=False)
    rel.set_defaults(func=cmd_release, passthrough=True)

    model_cli.add_parser(verbs)
    describe(top)
    return top


def describe(parser: argparse.ArgumentParser) -> None:
    """Give every sub-verb without a description its one-line help as one, so that
    ``tilestream VERB --help`` says what the verb does, not only its usage."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if not sub.description and helps.get(name):
                    sub.description = helps[name][:1].upper() + helps[name][1:] + "."
                describe(sub)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    for noisy in ("apache_beam.runners.direct", "apache_beam.runners.portability",
                  "apache_beam.typehints", "apache_beam.io.gcp.bigquery_tools",
                  "google", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parser().parse_known_args(argv)
    identity = (IDENTITIES.get(getattr(args, "model_verb", None) or "")
                or IDENTITIES.get(args.verb, OPERATOR))
    os.environ.setdefault("TILESTREAM_IDENTITY", identity)
    if rest and not getattr(args, "passthrough", False):
        parser().error(f"unrecognized arguments: {' '.join(rest)}")
    from google.api_core.exceptions import NotFound

    from pipeline.ops.queries import missing_table, nothing_yet

    try:
        return args.func(args, rest) if getattr(args, "passthrough", False) else args.func(args)
    except (clients.TargetError, local_stack.StackError) as exc:
        return _fail(args.verb, str(exc))
    except NotFound as exc:  # a verb that reads the rows before any stream has written them
        table = missing_table(exc)
        if table is None or args.verb == "run":
            raise
        print(f"tilestream {args.verb}: {nothing_yet(table)}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
