"""The ``tilestream`` command line, as a user types it."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from pipeline.ops.check import SAMPLE_TILE


def tilestream(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.ops.cli", *args], capture_output=True,
                          text=True, timeout=120, **kwargs)


def test_help_lists_the_verbs():
    out = tilestream("--help").stdout
    for verb in ("run", "announce", "demo", "local", "smoke", "check", "stac", "status", "schemas",
                 "model"):
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
