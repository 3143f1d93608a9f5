"""A new user's first hour (issue 26): each test walks a path a newcomer took with the real
command line on a real stack, where it crashed, failed silently or answered wrong."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from pipeline.ops.check import SAMPLE_TILE


def tilestream(*args: str, timeout_s: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.ops.cli", *args], capture_output=True,
                          text=True, timeout=timeout_s, **kwargs)


def test_check_without_flags_checks_the_device_run_uses_by_default(model_uri):
    """`tilestream check` as typed: it checks what `tilestream run` would use (CPU), so it
    passes on a machine without a GPU instead of failing on every one."""
    done = tilestream("check", f"--model_uri={model_uri}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert report["device"] == "CPU" and report["ok"] is True


@pytest.mark.stack
def test_read_only_verbs_on_a_dataset_no_stream_wrote_answer_nothing_yet(stack):
    """`tilestream slo` (and the other verbs that read rows) before any stream ran: an answer
    that says so, exit 0, not a NotFound traceback."""
    dataset = f"fresh_{uuid.uuid4().hex[:6]}"
    stack.bigquery().create_dataset(dataset)
    common = ["--local", f"--stack_dir={stack.run_dir}", f"--bq_dataset={stack.project}:{dataset}"]
    for verb in (["slo"], ["slo", "--json"], ["status"], ["stats"],
                 ["release", "compare", "--blue=0.1.0", "--green=0.2.0"]):
        done = tilestream(*verb, *common)
        assert done.returncode == 0, (verb, done.stderr[-3000:])
        assert "Traceback" not in done.stderr, (verb, done.stderr[-3000:])
    slo = tilestream("slo", *common)
    assert "nothing yet" in slo.stdout and "no events in the window" in slo.stdout
    report = json.loads(tilestream("slo", "--json", *common).stdout)
    assert report["note"].startswith("nothing yet") and report["slis"]["tiles"] == 0


@pytest.mark.stack
def test_announce_refuses_what_it_cannot_announce_before_publishing(stack, tmp_path):
    """A missing file, no path at all, and a PNG: each refused with the reason and exit 2, and
    nothing published (a PNG used to be uploaded, announced and then silently filtered)."""
    name = f"newcomer-{uuid.uuid4().hex[:6]}"
    topic = f"projects/{stack.project}/topics/{name}"
    sub = f"projects/{stack.project}/subscriptions/{name}"
    stack.publisher().create_topic(name=topic)
    stack.subscriber().create_subscription(name=sub, topic=topic)
    png = tmp_path / "quicklook.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    disguised = tmp_path / "quicklook.tif"
    disguised.write_bytes(png.read_bytes())
    common = ["--local", f"--stack_dir={stack.run_dir}", f"--topic={topic}", "--prefix=newcomer"]
    cases = {str(tmp_path / "missing.tif"): "no such file", None: "nothing to announce",
             str(png): "not a GeoTIFF", str(disguised): "not a TIFF",
             f"gs://{stack.bucket}/incoming/x.png": "not a GeoTIFF"}
    for path, reason in cases.items():
        done = tilestream("announce", *common, *([path] if path else []))
        assert done.returncode == 2 and reason in done.stderr, (path, done.stderr[-2000:])
        assert "Traceback" not in done.stderr
    assert stack.storage().bucket(stack.bucket).get_blob("newcomer/quicklook.png") is None
    good = tilestream("announce", *common, str(SAMPLE_TILE))
    assert good.returncode == 0, good.stderr[-2000:]
    pulled = stack.subscriber().pull(subscription=sub, max_messages=10, timeout=30)
    assert [m.message.attributes["objectId"] for m in pulled.received_messages] == [
        "newcomer/L7_ETMs.tif"]
