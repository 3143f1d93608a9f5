"""The ``tilestream`` command line, as a user types it."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import uuid

import pytest

from pipeline.ops.check import SAMPLE_TILE
from tests.streams import empty_dataset


def tilestream(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.ops.cli", *args], capture_output=True,
                          text=True, timeout=120, **kwargs)


def test_help_lists_the_verbs():
    out = tilestream("--help").stdout
    for verb in ("run", "announce", "demo", "local", "smoke", "check", "stac", "status", "schemas",
                 "follow", "model"):
        assert f"    {verb} " in out


def test_run_help_lists_the_stream_options():
    out = tilestream("run", "--help").stdout
    for option in ("--subscription", "--input_glob", "--model_uri", "--device", "--bq_dataset",
                   "--output_prefix", "--max_batch_size", "--local"):
        assert option in out


def test_run_without_an_input_says_what_is_missing():
    done = tilestream("run", "--bq_dataset=p:d", "--output_prefix=gs://b/o")
    assert done.returncode == 2
    assert "exactly one input" in done.stderr


def test_check_on_cpu_scores_one_chip(model_uri):
    done = tilestream("check", "--device=CPU", f"--model_uri={model_uri}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0 and report["ok"] is True
    assert sum(report["chip_class_counts"].values()) > 0


@pytest.mark.stack
def test_announce_uploads_and_publishes_notifications_and_json(stack):
    name = f"cli-{uuid.uuid4().hex[:6]}"
    topic = f"projects/{stack.project}/topics/{name}"
    sub = f"projects/{stack.project}/subscriptions/{name}"
    stack.publisher().create_topic(name=topic)
    stack.subscriber().create_subscription(name=sub, topic=topic)
    common = ["--local", f"--stack_dir={stack.run_dir}", f"--topic={topic}", "--prefix=cli"]
    plain = tilestream("announce", *common, str(SAMPLE_TILE))
    assert plain.returncode == 0, plain.stderr
    as_json = tilestream("announce", *common, "--json", "--tile_id=olinda",
                         "--acquired=2001-07-15T12:30:00Z", "--sensor=landsat-7",
                         "--attr=site=olinda", str(SAMPLE_TILE))
    assert as_json.returncode == 0, as_json.stderr
    pulled = stack.subscriber().pull(subscription=sub, max_messages=10, timeout=30)
    messages = sorted((m.message for m in pulled.received_messages),
                      key=lambda m: "eventType" not in m.attributes)
    assert len(messages) == 2
    notification, announcement = messages
    assert notification.attributes["eventType"] == "OBJECT_FINALIZE"
    assert notification.attributes["objectId"] == "cli/L7_ETMs.tif"
    blob = stack.storage().bucket(stack.bucket).get_blob("cli/L7_ETMs.tif")
    assert blob is not None and blob.size == SAMPLE_TILE.stat().st_size
    payload = json.loads(announcement.data)
    assert payload["uri"] == f"gs://{stack.bucket}/cli/L7_ETMs.tif"
    assert (payload["tile_id"], payload["sensor"], payload["attributes"]) == (
        "olinda", "landsat-7", {"site": "olinda"})


def test_announce_json_without_tile_id_is_refused(tmp_path):
    done = tilestream("announce", "--topic=projects/p/topics/t", "--json", str(SAMPLE_TILE))
    assert done.returncode == 2 and "--tile_id" in done.stderr


@pytest.mark.parametrize(("flag", "message"), [
    ("--stride=100", "stride must be in 1..chip_size"),
    ("--granule_pattern=^(.+)\\.tif$", "named groups"),
    ("--band_aliases=B02:blue", "not TOKEN=band"),
    ("--max_batch_size=0", "min_batch_size"),
])
def test_run_refuses_bad_stage_options_before_starting(flag, message):
    done = tilestream("run", "--input_glob=/nonexistent/*.tif", "--bq_dataset=p:d",
                      "--output_prefix=/tmp/out", flag)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]


# Help is written for a user: every verb says what it does, every flag what it means, and no
# reStructuredText of the module docstrings leaks into it.
MARKUP = re.compile(r":(func|mod|data|class|meth|attr):|``")


def _parsers():
    """(name, parser) of every verb and sub-verb, the pass-through ones (run, iam, release)
    included."""
    from pipeline.ops import cli, iam, release
    from pipeline.options import TileStreamArguments

    run = argparse.ArgumentParser(prog="tilestream run")
    TileStreamArguments._add_argparse_args(run)
    todo = [("tilestream", cli.parser()), ("tilestream release", release.parser()),
            ("tilestream iam", iam.parser()), ("tilestream run", run)]
    while todo:
        name, parser = todo.pop()
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {verb}", sub) for verb, sub in action.choices.items()]


def test_every_verb_and_flag_has_help_without_markup():
    missing, marked, undescribed = [], [], []
    for name, parser in _parsers():
        if name not in ("tilestream run", "tilestream iam") and not parser.description:
            undescribed.append(name)
        for text in (parser.description, parser.epilog):
            if text and MARKUP.search(text):
                marked.append(name)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                missing += [f"{name} {v}" for v in action.choices if not helps.get(v)]
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
            elif MARKUP.search(action.help):
                marked.append(f"{name} {action.dest}")
    assert not missing, f"without help: {missing}"
    assert not marked, f"reStructuredText in help: {marked}"
    assert not undescribed, f"no description line: {undescribed}"


@pytest.mark.parametrize("argv", [("model", "--help"), ("release", "--help"), ("--help",)])
def test_help_output_has_no_markup(argv):
    done = tilestream(*argv)
    assert done.returncode == 0 and not MARKUP.search(done.stdout), done.stdout


def test_read_only_verbs_take_no_author():
    for name, parser in _parsers():
        flags = {f for a in parser._actions for f in a.option_strings}
        verb = name.split()[-1]
        if verb in ("status", "list", "compare", "watch"):
            assert not {"--by", "--reason"} & flags, name


def test_local_up_help_is_its_own():
    out = tilestream("local", "up", "--help").stdout
    assert out.startswith("usage: tilestream local up") and "emulators" in out


def test_version():
    from pipeline.options import RELEASE

    done = tilestream("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"tilestream {RELEASE}"


def test_model_status_of_an_empty_registry_says_what_a_stream_scores(tmp_path):
    done = tilestream("model", "status", f"--registry={tmp_path}")
    status = json.loads(done.stdout)
    assert status["live"] is None and "--model_uri" in status["note"]


def test_query_sql_loses_its_comments_but_not_its_strings():
    from pipeline.ops.queries import parameters, parse_param, strip_comments

    sql = "SELECT '--@kept' AS a, @n AS n  -- not @m\n-- nor @k\nFROM t"
    assert strip_comments(sql) == "SELECT '--@kept' AS a, @n AS n\nFROM t"
    assert parameters(strip_comments(sql)) == ["n"]
    assert strip_comments(r"SELECT 'it\'s -- a string' AS s -- a comment") == \
        r"SELECT 'it\'s -- a string' AS s"
    assert [parse_param(p)[1] for p in ("a=true", "a=3", "a=0.5", "a=x y")] == [
        True, 3, 0.5, "x y"]
    assert parse_param("a=2026-05-04T12:00:00Z")[1].isoformat() == "2026-05-04T12:00:00+00:00"


@pytest.mark.stack
def test_query_runs_shipped_sql_by_name_and_says_what_the_drift_filter_left_out(stack):
    from tests.test_compare import chip

    bq, name = stack.bigquery(), empty_dataset(stack, "query")
    now = "2026-12-01T12:00:00+00:00"
    assert bq.insert_rows_json(f"{stack.project}.{name}.tiles", [{
        "row_id": "r1", "tile_id": "olinda", "tile_generation": "1", "complete": True,
        "chips_total": 1, "chips_scored": 1, "chips_skipped": 0, "chips_failed": 0, "width": 1,
        "height": 1, "crs": "EPSG:4326", "footprint": "POINT(0 0)", "raster_uri": "gs://b/o.tif",
        "classes": [{"class_id": 4, "name": "forest", "pixels": 10, "area_m2": 2e6}],
        "event_time": now, "published": now, "source": "gcs", "source_uris": [],
        "attributes": [], "model_name": "landcover-student", "model_version": "1",
        "role": "live", "completed_at": now, "latency_s": 5.0, "drifted": True}]) == []
    # its one chip row: a tile row is an answer only once whole (sql/answered.sql)
    assert bq.insert_rows_json(f"{stack.project}.{name}.chips", [
        chip("olinda", 0, "1", "live", (0, 10, 0), 0.9)]) == []
    where = ["--local", f"--stack_dir={stack.run_dir}", f"--bq_dataset={stack.project}:{name}"]

    left_out = tilestream("query", "class_area_per_tile_and_day", *where)
    assert left_out.returncode == 0 and left_out.stdout == ""
    assert "1 more" in left_out.stderr and "include_drifted=true" in left_out.stderr
    shown = tilestream("query", "class_area_per_tile_and_day", *where,
                       "--param", "include_drifted=true")
    [row] = [json.loads(line) for line in shown.stdout.splitlines()]
    assert (row["tile_id"], row["class_name"], row["area_km2"]) == ("olinda", "forest", 2.0)

    own = tilestream("query", *where, "--param", "n=3",
                     "--sql", "SELECT @n AS n  -- the emulator would count @m as a parameter")
    assert own.returncode == 0 and json.loads(own.stdout) == {"n": 3}, own.stderr
    missing = tilestream("query", "tiles_ready", *where)
    assert missing.returncode == 2 and "--param days=" in missing.stderr
