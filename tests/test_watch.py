"""The automatic rollback rule, judging a candidate on rows in the BigQuery emulator."""

from __future__ import annotations

import subprocess
import sys

import pytest

from model.registry import Registry
from pipeline.ops.watch import WATCHER, RollbackRule, judge
from tests.streams import empty_dataset
from tests.test_compare import chip, tile
from tests.test_registry import STUDENT, V1, V2, variant

pytestmark = pytest.mark.stack


@pytest.fixture()
def registry(tmp_path) -> Registry:
    reg = Registry(str(tmp_path / "registry"))
    reg.publish(str(STUDENT))
    reg.publish(str(variant(tmp_path, "2")))
    reg.promote(V1, by="ana")
    return reg


def dataset_with(stack, tiles: list[dict], chips: list[dict], letters: list[dict]) -> str:
    bq = stack.bigquery()
    name = empty_dataset(stack, "watch")
    for table, rows in (("tiles", tiles), ("chips", chips), ("dead_letters", letters)):
        if rows:
            assert bq.insert_rows_json(f"{stack.project}.{name}.{table}", rows) == []
    return f"{stack.project}.{name}"


def canary_rows(bad: int, canary_tiles: int = 25) -> tuple[list[dict], list[dict]]:
    tiles = [tile(f"t{i}", "1", "live", (10, 80, 10), 3.0) for i in range(30)]
    tiles += [tile(f"c{i}", "2", "canary", (10, 80, 10), 3.0) for i in range(canary_tiles)]
    letters = [{"stage": "inference", "reason": "model raised RuntimeError", "tile_id": f"c{i}",
                "time": tiles[0]["completed_at"]} for i in range(bad)]
    return tiles, letters


def test_a_failing_canary_is_rolled_back_with_its_numbers_in_the_history(stack, registry):
    registry.canary(V2, 0.5, by="bo")
    tiles, letters = canary_rows(bad=10)
    verdict = judge(registry, stack.bigquery(), dataset_with(stack, tiles, [], letters))
    assert verdict.action == "rollback"
    channels, _ = registry.read_channels()
    assert (channels.live, channels.candidate) == (V1, None)
    last = channels.history[-1]
    assert (last["action"], last["by"], last["before"]["candidate"]) == ("rollback", WATCHER,
                                                                         str(V2))
    assert "dead-letter rate 0.400 > live 0.000 + 0.02" in last["why"]
    assert "25 tiles" in last["why"]


def test_a_healthy_canary_is_kept_and_a_young_one_waits(stack, registry):
    registry.canary(V2, 0.5, by="bo")
    before = registry.read_channels()
    tiles, letters = canary_rows(bad=0)
    assert judge(registry, stack.bigquery(), dataset_with(stack, tiles, [], letters)
                 ).action == "keep"
    tiles, letters = canary_rows(bad=3, canary_tiles=5)  # 60 % bad, but only 5 tiles
    verdict = judge(registry, stack.bigquery(), dataset_with(stack, tiles, [], letters))
    assert verdict.action == "wait" and "fewer than 20" in verdict.reason
    assert registry.read_channels() == before


def test_a_shadow_that_disagrees_with_live_is_rolled_back(stack, registry):
    registry.shadow(V2, by="bo")
    tiles, chips = [], []
    for i in range(25):
        tiles += [tile(f"s{i}", "1", "live", (80, 20, 0), 3.0),
                  tile(f"s{i}", "2", "shadow", (20, 80, 0), 3.0)]
        for k in range(4):  # the candidate calls forest what live calls developed on 3 of 4
            chips.append(chip(f"s{i}", k, "1", "live", (80, 20, 0), 0.8))
            chips.append(chip(f"s{i}", k, "2", "shadow", (20, 80, 0) if k else (80, 20, 0),
                              0.7))
    verdict = judge(registry, stack.bigquery(), dataset_with(stack, tiles, chips, []),
                    RollbackRule(min_agreement=0.6))
    assert verdict.action == "rollback"
    assert "chip agreement 0.250 < 0.6 on 100 chips" in verdict.reason
    assert registry.read_channels()[0].candidate is None


def test_cli_watch_once(stack, registry):
    registry.canary(V2, 0.25, by="bo")
    tiles, letters = canary_rows(bad=10)
    dataset = dataset_with(stack, tiles, [], letters)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.ops.cli", "model", "watch", "--registry", registry.prefix,
         "--local", f"--stack_dir={stack.run_dir}", f"--bq_dataset={dataset}"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("rollback: automatic rollback of landcover-student/2 (canary)")
    assert "rollback: live landcover-student/1, candidate landcover-student/2 (canary 25%) -> " \
           "live landcover-student/1; by tilestream-model-watch" in done.stdout
