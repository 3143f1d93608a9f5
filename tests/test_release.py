"""Releasing the stream itself: the update check, the recorded graphs, and ``deploy.sh update``
refusing an incompatible update before Dataflow is called.

The graphs are translated offline by DataflowRunner's own ``--dry_run``; Dataflow itself cannot
run here, so ``deploy.sh`` meets stand-ins for ``gcloud`` and ``terraform`` that record how they
were called and answer what the real ones would.
"""

from __future__ import annotations

import copy
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from model.channels import retiring_release
from model.registry import Registry
from pipeline.ops import release
from pipeline.ops.release import BLUE_GREEN, IN_PLACE, compare
from pipeline.options import RELEASE
from tests.streams import empty_dataset

ROOT = Path(__file__).resolve().parents[1]
SUBSCRIPTION = "projects/tilestream-prod/subscriptions/tilestream-tiles-sub"


@pytest.fixture(scope="module")
def current() -> dict:
    return release.surface()


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(release.record_path(RELEASE).read_text())


def test_setup_py_ships_the_release_the_options_name():
    version = re.search(r'version="([^"]+)"', (ROOT / "setup.py").read_text()).group(1)
    assert version == RELEASE


def test_the_recorded_graph_is_this_trees_and_its_verdict_is_current(current, recorded):
    """A change of the job graph shows in review: the record must be rewritten with it
    (`tilestream release record`), verdict included."""
    assert current == recorded["surface"], (
        "the job graph changed: run `tilestream release record` and review its verdict")
    previous = release.previous_release(RELEASE)
    old = json.loads(release.record_path(previous).read_text())["surface"]
    assert recorded["update_from"] == {"release": previous, **compare(old, current).to_dict()}


def test_release_0_2_0_needs_blue_green_and_says_why():
    verdict = release.read_record("0.2.0")["update_from"]
    assert verdict["method"] == BLUE_GREEN
    reasons = "\n".join(verdict["reasons"])
    # Beam's AnomalyDetection named its stateful step after a fresh uuid: never mappable.
    assert "DetectDriftChange/RunOneDetector' is gone" in reasons
    # Late bands are answered from a new state cell of the granule assembler.
    assert "_AssembleGranuleFn)': state 'expired' absent" in reasons


def _stateful(surface: dict, part: str) -> str:
    return next(name for name in surface["steps"] if part in name)


def test_a_changed_state_coder_is_refused_naming_the_step(current):
    changed = copy.deepcopy(current)
    step = _stateful(changed, "Deduplicate")
    [name] = list(changed["steps"][step]["state"])[:1]
    changed["steps"][step]["state"][name] = "bag:python:PickleCoder"
    verdict = compare(current, changed)
    assert verdict.method == BLUE_GREEN
    assert any(step in r and name in r for r in verdict.reasons), verdict.reasons


def test_a_new_record_field_with_a_default_updates_in_place(current):
    grown = copy.deepcopy(current)
    grown["records"]["TileRef"].append("priority")
    assert compare(current, grown).method == IN_PLACE
    required = copy.deepcopy(current)
    required["records"]["TileRef"].append("priority!")
    verdict = compare(current, required)
    assert verdict.method == BLUE_GREEN and "TileRef gains priority" in verdict.reasons[0]


def test_a_wrapped_composite_is_mapped_not_refused(current):
    """Steps that moved whole (here every step of the tile assembly under a new composite)
    update in place with the name mapping gcloud takes."""
    def moved(name: str) -> str:
        return "Tiles/" + name if name.startswith("AssembleTiles") else name

    wrapped = copy.deepcopy(current)
    wrapped["transforms"] = sorted({moved(n) for n in current["transforms"]} | {"Tiles"})
    wrapped["steps"] = {moved(k): v for k, v in current["steps"].items()}
    verdict = compare(current, wrapped)
    assert verdict.method == IN_PLACE, verdict.reasons
    assert verdict.mapping == {"AssembleTiles": "Tiles/AssembleTiles"}


# --- deploy.sh update ----------------------------------------------------------------------------

def _stand_ins(bin_dir: Path, log: Path, outputs: dict[str, str]) -> None:
    """``gcloud`` and ``terraform`` that log their arguments; terraform answers ``outputs``."""
    bin_dir.mkdir()
    scripts = {
        "gcloud": f'printf "%s\\n" "$*" >> {log}\n',
        "terraform": "".join(f'[[ "$*" == *"output -raw {k}" ]] && {{ echo "{v}"; exit 0; }}\n'
                             for k, v in outputs.items()) + 'echo "unknown"\n',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture()
def deployment(tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    registry.publish(str(ROOT / "model" / "artifacts" / "landcover-student" / "v1"))
    registry.promote(*[r for r in registry.versions()][:1], by="test")
    registry.release_live("0.1.0", SUBSCRIPTION, "tilestream", by="test")
    log = tmp_path / "calls.log"
    _stand_ins(tmp_path / "bin", log, {
        "registry": str(tmp_path / "registry"), "bq_dataset": "tilestream-prod:tilestream",
        "subscription": SUBSCRIPTION,
        "input_buckets": "gs://tilestream-prod-tilestream-tiles/incoming",
        "output_prefix": "gs://tilestream-prod-tilestream-tiles/output",
        "results_topic": "projects/tilestream-prod/topics/tilestream-results",
        "dataflow_bucket": "tilestream-prod-dataflow",
        "image_repository": "us-central1-docker.pkg.dev/tilestream-prod/tilestream",
        "worker_service_account": "worker@tilestream-prod.iam.gserviceaccount.com"})
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
           "PROJECT": "tilestream-prod", "TAG": "test", "PYTHON": sys.executable}
    return tmp_path, registry, log, env


def _update(env: dict, running: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "templates/deploy.sh", "update"], cwd=ROOT,
                          env={**env, "RUNNING_SURFACE": str(running)}, capture_output=True,
                          text=True, timeout=300)


def test_deploy_update_refuses_a_changed_state_coder_before_calling_dataflow(deployment,
                                                                           current):
    tmp_path, registry, log, env = deployment
    running = copy.deepcopy(current)
    step = _stateful(running, "AssembleGranules")
    running["steps"][step]["input"] = "kv(bytes, python:PickleCoder)"
    (tmp_path / "running.json").write_text(json.dumps({"surface": running}))
    done = _update(env, tmp_path / "running.json")
    assert done.returncode == 3, done.stderr[-2000:]
    assert "refused before Dataflow was called" in done.stderr
    assert "input coder" in done.stderr and "deploy.sh bluegreen" in done.stderr
    assert "flex-template" not in (log.read_text() if log.exists() else "")
    channels, _ = registry.read_channels()
    assert channels.live_release.release == "0.1.0"  # nothing moved


def test_deploy_update_that_only_adds_a_field_goes_in_place(deployment, current):
    tmp_path, registry, log, env = deployment
    running = copy.deepcopy(current)
    running["records"]["TileRef"].remove("band_generations")  # the new tree adds it, defaulted
    (tmp_path / "running.json").write_text(json.dumps({"surface": running}))
    done = _update(env, tmp_path / "running.json")
    assert done.returncode == 0, done.stderr[-2000:]
    [launch] = [c for c in log.read_text().splitlines() if c.startswith("dataflow flex-template")]
    assert launch.startswith("dataflow flex-template run tilestream ") and "--update" in launch
    assert f"release={RELEASE}" in launch and "--transform-name-mappings" not in launch
    channels, _ = registry.read_channels()
    assert channels.live_release.release == RELEASE


@pytest.mark.parametrize("value", ["-1", "nan", "soon"])
def test_cutover_refuses_a_wait_or_poll_that_is_no_duration(value, capsys):
    """A negative or NaN poll bound would shrink the handover and let blue go early."""
    for flag in ("--green_poll_secs", "--wait_secs"):
        with pytest.raises(SystemExit) as exit_:
            release.parser().parse_args(["cutover", "0.2.0", f"{flag}={value}"])
        assert exit_.value.code == 2 and flag in capsys.readouterr().err
    args = release.parser().parse_args(["cutover", "0.2.0", "--green_poll_secs=0"])
    assert args.green_poll_secs == 0.0


# --- blue-green: deploy.sh names the job it drains by its role ---------------------------------

SUBSCRIPTION_B = f"{SUBSCRIPTION}-b"
GREEN_JOB = "tilestream-0-3-0"


def _deploy(env: dict, *argv: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "templates/deploy.sh", *argv], cwd=ROOT,
                          env={**env, **extra}, capture_output=True, text=True, timeout=300)


def _drained(log: Path) -> list[str]:
    """The jobs deploy.sh looked up to drain, by name, in order."""
    calls = log.read_text().splitlines() if log.exists() else []
    return [re.search(r"--filter=name=(\S+)", c).group(1) for c in calls
            if c.startswith("dataflow jobs list")]


@pytest.fixture()
def on_trial(deployment):
    """The deployment with release 0.3.0 green on slot b, beside 0.1.0 live (job tilestream);
    BigQuery unreachable (no credentials), so no handover can be checked."""
    tmp_path, registry, log, env = deployment
    registry.release_green("0.3.0", SUBSCRIPTION_B, GREEN_JOB, by="test")
    env = {**env, "RELEASE": "0.3.0",
           "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "no-credentials.json")}
    return tmp_path, registry, log, env


def test_deploy_drain_says_which_job_or_drains_none(on_trial):
    _, _, log, env = on_trial
    done = _deploy(env, "drain")
    assert done.returncode == 2 and "drain retiring|green|live" in done.stderr
    assert _drained(log) == []
    usage = _deploy(env, "help")
    assert "drain ROLE" in usage.stdout and "retiring" in usage.stdout


def test_deploy_abort_ends_the_trial_then_drains_green_not_the_live_job(on_trial):
    _, registry, log, env = on_trial
    done = _deploy(env, "abort")
    assert done.returncode == 0, done.stderr[-2000:]
    assert _drained(log) == [GREEN_JOB]
    assert f"draining the green job {GREEN_JOB}" in done.stderr
    channels, _ = registry.read_channels()
    assert channels.green_release is None and channels.live_release.job == "tilestream"


def test_deploy_drains_the_retiring_job_only_after_the_handover_passes(on_trial):
    """No cut-over: nothing is retiring. After one whose handover cannot be checked (BigQuery
    unreachable), neither `cutover` nor `drain retiring` drains the old job; `drain live`
    names the new live job."""
    _, registry, log, env = on_trial
    early = _deploy(env, "drain", "retiring")
    assert early.returncode == 2 and "no cut-over to release 0.1.0" in early.stderr
    cut = _deploy(env, "cutover", WAIT_SECS="5")
    assert cut.returncode != 0 and _drained(log) == []
    channels, _ = registry.read_channels()
    assert channels.live_release.release == "0.3.0"
    assert retiring_release(channels).job == "tilestream"
    again = _deploy(env, "drain", "retiring", WAIT_SECS="5")
    assert again.returncode != 0 and _drained(log) == []
    live = _deploy(env, "drain", "live")
    assert live.returncode == 0 and _drained(log) == [GREEN_JOB]


def test_the_cut_over_and_the_retiring_release_are_read_from_the_history(tmp_path):
    registry = Registry(str(tmp_path / "registry"))
    registry.release_live("0.1.0", SUBSCRIPTION, "blue", by="test")
    channels, _ = registry.read_channels()
    assert release.last_cutover(channels, "0.1.0") is None and retiring_release(channels) is None
    registry.release_green("0.2.0", SUBSCRIPTION_B, "green", by="test")
    registry.release_cutover("0.2.0", by="test")
    channels, _ = registry.read_channels()
    cut = release.last_cutover(channels, "0.2.0")
    assert cut.blue == "0.1.0" and cut.trial_began <= cut.at
    assert retiring_release(channels).job == "blue"
    registry.release_green("0.3.0", SUBSCRIPTION, "next", by="test")  # a later trial
    channels, _ = registry.read_channels()
    assert release.last_cutover(channels, "0.2.0") is None and retiring_release(channels) is None


# --- the handover waits until its answer is stable --------------------------------------------

class _AfterFirstPoll:
    """A BigQuery client that runs ``then`` once, just before its second query: something
    happens between two polls of the handover."""

    def __init__(self, client, then):
        self._client, self._then, self.queries = client, then, 0

    def query(self, *args, **kwargs):
        self.queries += 1
        if self.queries == 2:
            self._then()
        return self._client.query(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


@pytest.mark.stack
def test_the_handover_passes_only_once_its_answer_held(stack):
    """A message green took in shows up after a first poll found everything answered (a
    streaming insert that landed late): the handover must not pass on that first empty poll."""
    import datetime as dt
    import time


    bq = stack.bigquery()
    name = empty_dataset(stack, "settle")
    now = dt.datetime.now(dt.UTC)
    since, until, at = (now - dt.timedelta(minutes=10), now - dt.timedelta(minutes=1),
                        now - dt.timedelta(minutes=5))

    def insert(table: str, row: dict) -> None:
        assert bq.insert_rows_json(f"{stack.project}.{name}.{table}", [row]) == []

    def took_in(message_id: str) -> None:
        insert("messages", {"message_id": message_id, "published": at.isoformat(),
                            "delivered": at.isoformat(), "received_at": at.isoformat(),
                            "kind": "notification", "release": "G"})

    def blue_answers(message_id: str) -> None:  # a dead letter of blue answers a message
        insert("dead_letters", {"stage": "parse", "reason": "r", "message_id": message_id,
                                "time": at.isoformat(), "release": "B"})

    took_in("m1")
    blue_answers("m1")
    dataset = f"{stack.project}.{name}"
    late = _AfterFirstPoll(bq, lambda: took_in("m2"))
    state = release.wait_for_handover(late, dataset, "B", "G", since, until,
                                      time.monotonic() + 15, every_s=1, settle_secs=8)
    assert late.queries >= 2 and not state.passed(8)
    assert state.pending == ["m2"] and "do not drain" in state.text("B", "G", 8)
    blue_answers("m2")
    started = time.monotonic()
    state = release.wait_for_handover(bq, dataset, "B", "G", since, until,
                                      time.monotonic() + 60, every_s=1, settle_secs=3)
    assert state.passed(3) and state.messages == 2 and state.by_blue == 2
    assert time.monotonic() - started >= 3  # polled across the settle interval
    assert "the old job can be drained" in state.text("B", "G", 3)
