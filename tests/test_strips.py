"""A tile as strip tasks: read by many workers in any order, the same chips and manifest as one
reader; pacing that keeps the chipper within reach of the model and never stops it for good."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import pytest

from model.card import load_card
from transforms import chips, pacing
from transforms.chip_reader import TileReader
from transforms.geometry import chip_starts
from transforms.records import Chip, ChipBlock, StripReport, StripTask, TileRef

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from mosaics import mosaic


@pytest.fixture(scope="module")
def tile(tmp_path_factory):
    path = mosaic(tmp_path_factory.mktemp("strips") / "mosaic.tif", 1100, 900)
    return TileRef("mosaic", (str(path),), "1", 0.0, 0.0)


def _chip_key(chip: Chip) -> tuple:
    return (chip.index, chip.row, chip.col, chip.raw.tobytes(), chip.valid_bits.tobytes(),
            chip.footprint_wkt, chip.transform, chip.valid_fraction)


def test_strip_tasks_on_many_workers_give_what_one_reader_gives(tile, model_uri):
    settings = chips.ChipSettings.from_card(load_card(model_uri), min_valid_fraction=0.05)
    one = chips.ChipTileFn(settings)
    one.setup()
    outputs = list(one.process(tile))
    expected_chips = sorted(_chip_key(c) for c in chips.chips_in(outputs))
    [expected] = [o.value for o in outputs if getattr(o, "tag", "") == chips.MANIFESTS_TAG]

    planner = chips._PlanStripsFn(settings)
    planner.setup()
    tasks = list(planner.process(tile))
    assert len(tasks) >= 3 and {t.count for t in tasks} == {len(tasks)}
    random.Random(3).shuffle(tasks)
    got_chips, reports = [], []
    for task in tasks:  # each task on a worker of its own, in the order the shuffle gives
        worker = TileReader(settings)
        worker.setup()
        for item in worker.chip(task):
            if isinstance(item, ChipBlock):
                assert item.task == task.index and all(c.tile == task.tile for c in item.chips)
                got_chips.extend(_chip_key(c) for c in item.chips)
            else:
                assert isinstance(item.value, StripReport)
                reports.append(item.value)
    merged = chips.merge_reports(reports)
    assert sorted(got_chips) == expected_chips
    assert merged.expected_per_row == expected.expected_per_row
    assert sum(merged.expected_per_row) == len(expected_chips)
    assert (merged.chips_total, merged.chips_skipped, merged.chips_failed, merged.band_counts) \
        == (expected.chips_total, expected.chips_skipped, expected.chips_failed,
            expected.band_counts)


def test_pacing_waits_for_the_model_and_never_for_ever(monkeypatch):
    """The stall limit is judged on pacing's clock, set here by hand: a slow machine cannot
    make it pass between two steps of the test."""
    import threading
    import types

    now = [1000.0]
    monkeypatch.setattr(pacing, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    gate = pacing.InFlight()
    gate.add(10)
    started = time.monotonic()
    assert not gate.admits(10, wait=0.2)  # the model has not caught up: the task is parked
    assert time.monotonic() - started >= 0.2
    threading.Timer(0.1, gate.done).start()  # a chip comes back while a task waits
    assert gate.admits(10, wait=60)
    gate.add(5)
    assert not gate.admits(10, wait=0)
    now[0] += pacing.PACE_STALL_SECS
    assert not gate.admits(10, wait=0)
    now[0] += 0.001  # nothing came back for longer than the stall limit: start anyway
    assert gate.admits(10, wait=0)


def test_a_failing_read_is_reported_not_raised(tile, model_uri, tmp_path):
    settings = chips.ChipSettings.from_card(load_card(model_uri))
    planner = chips._PlanStripsFn(settings)
    planner.setup()
    task = next(iter(planner.process(tile)))
    gone = tmp_path / "gone.tif"
    moved = StripTask(TileRef("mosaic", (str(gone),), "1", 0.0, 0.0), task.grid,
                      task.index, task.count, task.first_row, task.stop_row)
    worker = TileReader(settings)
    worker.setup()
    [report] = [i.value for i in worker.chip(moved)]
    rows = task.stop_row - task.first_row
    cols = len(chip_starts(task.grid.width, task.grid.chip_size, task.grid.stride))
    assert report.failed == rows * cols and report.expected == (0,) * rows
    assert "gone.tif" in report.unreadable[0]


@pytest.mark.parametrize("streaming", [False, True])
def test_a_backfill_chips_in_a_stage_every_worker_can_run(tile, model_uri, streaming):
    """Beam's portable runner (the local backfill's, the Fn API harness Dataflow runs) gives a
    stage that holds state to one SDK worker only. A bounded job's chipper must therefore be
    fused into a stage without state, or a backfill runs on one core whatever the workers; a
    stream keeps its keyed, paced chipper."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    settings = chips.ChipSettings.from_card(load_card(model_uri))
    p = beam.Pipeline()
    _ = p | beam.Create([tile]) | "ChipTiles" >> chips.ChipTiles(settings, streaming)
    _, stages = FnApiRunner().create_stages(p.to_runner_api())
    [stage] = [s for s in stages
               if any(t.unique_name.startswith("ChipTiles/ChipStrips/") for t in s.transforms)]
    assert stage.is_stateful() == streaming
