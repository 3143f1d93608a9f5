"""The automatic rollback rule, without a person, on a running stream.

A canary that raises on every real chip (it passes publication, which scores one blank chip)
answers half the tiles. ``tilestream model watch --every`` runs beside the stream as the local
stand-in for its production home (a Cloud Run job on a Cloud Scheduler trigger,
``templates/terraform/rollback.tf``): it sees the canary's dead-letter rate, rolls it back in
channels.json, and the stream, which follows the channels, answers every later tile with live.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
import uuid

import pytest
import torch

from model.card import CARD_FILE
from model.registry import Registry
from pipeline.ops.watch import WATCHER
from tests import tiles
from tests.conftest import REPORT
from tests.streams import TilePublisher, fresh_input, query, start_stream, stop_stream, wait_until
from tests.test_registry import STUDENT

pytestmark = [pytest.mark.stack, pytest.mark.slow]


class _RaisesOnRealChips(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x != 0).any()):
            raise RuntimeError("this canary fails on every real chip")
        return self.inner(x)


def faulty_canary(tmp_path) -> str:
    """The shipped student as version 2, wrapped to raise on any chip that is not blank."""
    target = tmp_path / "faulty-v2"
    shutil.copytree(STUDENT, target)
    card = json.loads((target / CARD_FILE).read_text())
    weights = target / card["weights"]["file"]
    torch.jit.script(_RaisesOnRealChips(torch.jit.load(str(weights)))).save(str(weights))
    card["version"] = "2"
    card["weights"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (target / CARD_FILE).write_text(json.dumps(card))
    return str(target)


def test_a_failing_canary_is_rolled_back_without_a_person_and_the_stream_follows(
        stack, model_uri, tmp_path):
    registry_uri = f"{stack.registry_prefix}/rule-{uuid.uuid4().hex[:6]}"
    registry = Registry(registry_uri, gcs_client=stack.storage())
    live, _ = registry.publish(str(STUDENT))
    canary, _ = registry.publish(faulty_canary(tmp_path))
    registry.promote(live, by="test")
    registry.canary(canary, 0.5, by="test")
    topic, subscription, dataset = fresh_input(stack, "rule")
    stream = start_stream(stack, model_uri, tmp_path / "stream.log",
                          f"--subscription={subscription}",
                          f"--bq_dataset={stack.project}:{dataset}",
                          f"--output_prefix={stack.output_prefix}/{dataset}",
                          f"--model_registry={registry_uri}", "--channels_poll_secs=1",
                          "--window_secs=1")
    # The scheduler's stand-in: the rule every 3 s, as the Cloud Run job runs it each time.
    with open(tmp_path / "watch.log", "wb") as out:
        watcher = subprocess.Popen(
            [sys.executable, "-m", "pipeline.ops.cli", "model", "watch", "--every=3",
             f"--registry={registry_uri}", "--local", f"--stack_dir={stack.run_dir}",
             f"--bq_dataset={stack.project}:{dataset}", "--hours=1", "--min_tiles=4"],
            stdout=out, stderr=subprocess.STDOUT)
    crop = tiles.crop(tmp_path / "crop.tif", 0, 0, 100, 100)

    def rolled_back() -> bool:
        channels, _ = registry.read_channels()
        return channels.candidate is None

    def switched() -> list[dict]:  # the stream's own record of taking the new channels
        return query(stack, f"SELECT time FROM `{dataset}.events` WHERE disposition = 'model' "
                            "AND STARTS_WITH(reason, 'channels now') "
                            "AND reason LIKE \"%'candidate': None%\"")

    try:
        with TilePublisher(stack, topic, crop, "rule", every_s=1.0) as traffic:
            started = time.time()
            assert wait_until(rolled_back, 240, stream, 1), (
                (tmp_path / "watch.log").read_text()[-2000:])
            decided = time.time()
            assert wait_until(switched, 60, stream, 1)
            followed = time.time()
            assert wait_until(lambda: len(traffic.since(followed)) >= 4, 60)
        after = traffic.since(followed)
        assert wait_until(lambda: {r["tile_id"] for r in query(
            stack, f"SELECT tile_id FROM `{dataset}.tiles`")} >= set(after), 120, stream, 2)
    finally:
        watcher.terminate()
        watcher.wait(timeout=30)
        stop_stream(stream)
    channels, _ = registry.read_channels()
    last = channels.history[-1]
    assert (last["action"], last["by"]) == ("rollback", WATCHER)
    assert last["before"]["candidate"] == str(canary) and "dead-letter rate" in last["why"]
    assert channels.live == live
    # Every tile published after the stream took the rollback is answered by live.
    answers = query(stack, "SELECT tile_id, model_version, role, chips_failed FROM "
                           f"`{dataset}.tiles` WHERE tile_id IN UNNEST({after!r})")
    assert {(r["model_version"], r["role"], r["chips_failed"]) for r in answers} == {
        ("1", "live", 0)}
    failed = query(stack, f"SELECT COUNT(*) AS n FROM `{dataset}.dead_letters` "
                          "WHERE stage = 'inference' AND STARTS_WITH(reason, 'model raised')")
    REPORT["releases"] += [(
        "a canary (50 %) that fails every real chip; `tilestream model watch --every 3` beside "
        "the stream, tiles published every 1 s",
        "rolled back without a person; the stream follows",
        f"rolled back {decided - started:.0f} s after traffic began ({failed[0]['n']} "
        f"inference dead letters by then: \"{last['why'][:120]}\"); the stream took the new "
        f"channels {followed - decided:.1f} s later; the {len(after)} tiles published after "
        "all answered by live v1")]
