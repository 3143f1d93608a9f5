"""A new user's first hour (issue 26): each test walks a path a newcomer took with the real
command line on a real stack, where it crashed, failed silently or answered wrong."""

from __future__ import annotations

import json
import os
import signal
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


def test_run_refuses_a_misspelt_flag_with_the_suggestion_and_takes_beams_own():
    """A misspelt flag used to be discarded with a warning lost in the start-up log, and the job
    ran with the default; Beam's own flags (Dataflow, workers) still pass."""
    common = ["--input_glob=/nonexistent/*.tif", "--bq_dataset=p:d", "--output_prefix=/tmp/o",
              "--release=a/../b"]  # a later refusal: nothing starts in this test
    done = tilestream("run", *common, "--max_batch_sise=64", "--lcoal")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "--max_batch_sise (did you mean --max_batch_size?)" in done.stderr
    assert "--lcoal (did you mean --local?)" in done.stderr
    beams = tilestream("run", *common, "--runner=DataflowRunner", "--project=p",
                       "--region=europe-west1", "--temp_location=gs://b/t",
                       "--experiments=a", "--experiments=b", "--num_workers=2",
                       "--worker_machine_type=n1-standard-4", "--sdk_container_image=x",
                       "--no_use_public_ips", "--dataflow_service_options=x",
                       "--max_batch_size", "16")
    assert beams.returncode == 2 and "unknown flag" not in beams.stderr, beams.stderr[-2000:]
    assert "--release" in beams.stderr


def _here(cwd, *argv: str, timeout_s: float = 420) -> subprocess.CompletedProcess:
    """The CLI run from ``cwd`` (a user's own folder), with this tree's code."""
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    return subprocess.run([sys.executable, "-m", "pipeline.ops.cli", *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout_s,
                          env={**os.environ, "PYTHONPATH": root})


@pytest.mark.stack
def test_a_relative_backfill_glob_scores_and_a_bounded_run_ends_with_a_summary(stack, tmp_path):
    """The README's `run --local --input_glob 'archive/*.tif'` from the user's folder: the tile
    is scored (it was dead-lettered as outside the allow-list), the log is short and names the
    tile answered, and the run ends with a one-line summary; a folder of nothing usable exits 1
    with the reason."""
    import shutil

    dataset = f"backfill_{uuid.uuid4().hex[:6]}"
    stack.bigquery().create_dataset(dataset)
    (tmp_path / "archive").mkdir()
    shutil.copy(SAMPLE_TILE, tmp_path / "archive" / "L7_ETMs.tif")
    common = ["run", "--local", f"--stack_dir={stack.run_dir}",
              f"--bq_dataset={stack.project}:{dataset}"]
    done = _here(tmp_path, *common, "--input_glob", "archive/*.tif")
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert summary.startswith("backfill ") and "1 file read, 1 tile scored" in summary, summary
    answered = [line for line in done.stderr.splitlines() if "tile L7_ETMs@" in line]
    assert len(answered) == 1 and "49 chips scored" in answered[0], done.stderr[-3000:]
    assert f"gs://{stack.bucket}/" in answered[0] and answered[0].rstrip().endswith(".tif")
    assert len(done.stderr.splitlines()) < 40, done.stderr[-3000:]  # was ~1,200 lines
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.tif").write_bytes(b"not a raster at all")
    refused = _here(tmp_path, *common, "--input_glob", "junk/*.tif")
    summary = refused.stdout.strip().splitlines()[-1] if refused.stdout.strip() else ""
    assert refused.returncode == 1, refused.stdout + refused.stderr[-3000:]
    assert "0 tiles scored, 1 dead-lettered: 1x " in summary and "notes.tif" in summary, summary


def _local(run_dir, *argv: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return tilestream(*argv, f"--stack_dir={run_dir}", timeout_s=timeout_s)


@pytest.mark.stack
def test_two_ups_at_once_share_one_stack_and_down_finds_every_process(tmp_path):
    """Two `local up` of one directory at once: the second waits for the first and finds its
    stack (they used to race, and orphan the loser's emulators); `down` stops every process
    the stack started, also when its record is gone."""
    from pipeline.local import stack as local_stack

    run_dir = tmp_path / "stack"
    command = [sys.executable, "-m", "pipeline.ops.cli", "local", "up", f"--stack_dir={run_dir}"]
    try:
        ups = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
        answers = [up.communicate(timeout=400) for up in ups]
        assert [up.returncode for up in ups] == [0, 0], [a[1][-2000:] for a in answers]
        first, second = (json.loads(a[0]) for a in answers)
        assert first == second  # one stack: the same ports
        running = local_stack.started_by(run_dir)
        assert len(running) >= 6, running
        (run_dir / "stack.json").unlink()  # the record lost, as after a killed start
        done = _local(run_dir, "local", "down")
        assert done.returncode == 0 and "no stack was running" not in done.stderr
        assert local_stack.started_by(run_dir) == []
    finally:
        local_stack.down(run_dir)


@pytest.mark.stack
def test_run_on_a_stack_whose_bigquery_died_fails_fast_and_local_up_restarts_it(tmp_path):
    """The BigQuery emulator killed under a stack: `run --local` names it and the fix at once
    (it used to retry forever), and `local up` restarts the dead server alone."""
    from pipeline.local import stack as local_stack

    run_dir = tmp_path / "stack"
    try:
        assert _local(run_dir, "local", "up").returncode == 0
        before = local_stack.load(run_dir)
        os.killpg(before.pids["bigquery"], signal.SIGKILL)
        assert _wait(lambda: not local_stack.status(before)["bigquery"])
        done = _local(run_dir, "run", "--local", timeout_s=120)
        assert done.returncode == 2, done.stderr[-3000:]
        assert "bigquery" in done.stderr and "tilestream local up" in done.stderr
        assert _local(run_dir, "local", "up").returncode == 0
        after = local_stack.load(run_dir)
        assert all(local_stack.status(after).values())
        assert after.pids["pubsub"] == before.pids["pubsub"]  # the live ones kept
        assert after.bigquery_port == before.bigquery_port
    finally:
        local_stack.down(run_dir)
    assert local_stack.started_by(run_dir) == []


def _wait(condition, timeout_s: float = 30.0) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return condition()


@pytest.mark.stack
def test_two_demos_at_once_the_second_refuses_at_once_and_no_process_is_left(tmp_path):
    """Two `make demo` in one folder: the second refuses at once (it used to fail after 150 s
    and orphan six emulators); the first scores the sample tile and, a bare notification
    carrying no acquisition time, says so in SQL and STAC instead of dating it by the upload;
    then no process of the demo's stack is left."""
    import time

    from pipeline.local import stack as local_stack

    root = str(SAMPLE_TILE.resolve().parents[3])
    env = {**os.environ, "PYTHONPATH": root}
    run_dir = tmp_path / ".tilestream" / "demo-stack"
    demo = [sys.executable, "-m", "pipeline.ops.cli", "demo", "--keep_stack"]
    first = subprocess.Popen(demo, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert _wait(lambda: (run_dir / "stack.json").exists(), 180)  # the first is starting
        started = time.monotonic()
        second = subprocess.run(demo, cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert "in use by another demo" in second.stderr
        assert time.monotonic() - started < 60
        out, err = first.communicate(timeout=600)
        assert first.returncode == 0, err[-3000:]
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["tiles_scored"] == 1 and summary["acquired"] is None
        assert "acquisition time unknown  L7_ETMs" in out
        stack = local_stack.load(run_dir)
        [row] = [dict(r) for r in stack.bigquery().query(
            f"SELECT acquired, stac_uri FROM `{stack.project}.{stack.dataset}.tiles`").result()]
        assert row["acquired"] is None
        bucket, _, name = row["stac_uri"][len("gs://"):].partition("/")
        item = json.loads(stack.storage().bucket(bucket).blob(name).download_as_bytes())
        props = item["properties"]
        assert props["datetime"] is None and props["tilestream:acquisition"] == "unknown"
        assert props["start_datetime"] == "1970-01-01T00:00:00Z" and props["end_datetime"]
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGTERM)
            first.wait(timeout=120)
        local_stack.down(run_dir)
    assert local_stack.started_by(run_dir) == []
