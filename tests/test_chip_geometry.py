"""The chipper's pure parts on their own, without Beam or a raster: where each strip task reads,
the cut of its pixels into padded chips, the nodata mask, and the tile's manifest from reports.

A user sees these as: every pixel of a tile scored (chips cover it, strips read it), drift
counted once per pixel, padding and nodata never scored, and a tile's counts whatever order its
strips finished in."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.tiles import starts
from transforms.chip_cut import (
    Cut,
    cut_row,
    invalid_mask,
    merge_reports,
    prepare,
    strip_layout,
)
from transforms.geometry import strip_chip_rows
from transforms.records import StripTask, TileGrid, TileRef

TILE = TileRef("t", ("mem://t.tif",), "1", 0.0, 0.0)

grids = st.tuples(st.integers(1, 1200), st.integers(1, 700), st.sampled_from([16, 32, 64]),
                  st.integers(1, 64)).filter(lambda g: g[3] <= g[2])
small_grids = st.tuples(st.integers(1, 300), st.integers(1, 200), st.sampled_from([16, 32]),
                        st.integers(4, 32)).filter(lambda g: g[3] <= g[2])


def _grid(height: int, width: int, size: int, stride: int) -> TileGrid:
    return TileGrid(height, width, (10.0, 0.0, 500_000.0, 0.0, -10.0, 4_000_000.0),
                    "EPSG:32633", 100.0, size, stride)


def _tasks(grid: TileGrid) -> list[StripTask]:
    strips = strip_chip_rows(grid.height, grid.width, grid.chip_size, grid.stride)
    return [StripTask(TILE, grid, i, len(strips), first, stop)
            for i, (first, stop) in enumerate(strips)]


def _cut_task(task: StripTask, values: np.ndarray, valid: np.ndarray,
              min_valid_fraction: float = 0.0, unreadable: int | None = None) -> tuple[list, Cut]:
    """What the reader does with one task's read: its chip rows, cut from the tile's pixels
    (but its ``unreadable``-th, which fails)."""
    layout = strip_layout(task.grid, task.first_row, task.stop_row)
    cut, chips = Cut(len(layout.windows)), []
    for k, (start, height) in enumerate(layout.windows):
        if k == unreadable:
            cut.fail(k, len(layout.cols), f"rows {start}..{start + height}: bad block")
            continue
        outlines = [f"outline {start} {c}" for c in layout.cols]
        chips += cut_row(task, layout, k, values[:, start : start + height],
                         valid[start : start + height], outlines, "EPSG:32633",
                         min_valid_fraction, cut)
    return chips, cut


@settings(max_examples=150, deadline=None)
@given(grids)
def test_strip_reads_cover_their_chips_and_fresh_rows_count_each_pixel_once(grid):
    height, _, size, stride = grid
    seen_fresh = np.zeros(height, int)
    previous_bottom = None
    for task in _tasks(_grid(*grid)):
        layout = strip_layout(task.grid, task.first_row, task.stop_row)
        # the one read holds every pixel row of every chip of the task, and no more
        assert layout.top == layout.windows[0][0]
        assert layout.bottom == max(start + h for start, h in layout.windows)
        assert all(layout.top <= s and s + h <= layout.bottom <= height
                   for s, h in layout.windows)
        # neighbouring tasks overlap by the chips' margin (size - stride rows), never more
        if previous_bottom is not None:
            assert previous_bottom - layout.top == min(size - stride, height - layout.top)
        previous_bottom = layout.bottom
        for k, (start, _) in enumerate(layout.windows):
            seen_fresh[start : layout.fresh_end(task.first_row + k)] += 1
    assert (seen_fresh == 1).all(), "drift must count every pixel row exactly once"


@settings(max_examples=40, deadline=None)
@given(small_grids)
def test_the_chips_of_all_strips_cover_the_tile_and_only_it(grid):
    height, width, size, _ = grid
    g = _grid(*grid)
    values = np.arange(height * width, dtype=np.int32).reshape(1, height, width) + 1
    valid = np.ones((height, width), bool)
    covered = np.zeros((height, width), int)
    indices = []
    for task in _tasks(g):
        chips, cut = _cut_task(task, values, valid)
        assert sum(cut.expected) == len(chips) and cut.skipped == cut.failed == 0
        for chip in chips:
            indices.append(chip.index)
            window = values[0, chip.row : chip.row + chip.height, chip.col : chip.col + chip.width]
            assert chip.raw.shape == (1, size, size)
            assert np.array_equal(chip.raw[0, : chip.height, : chip.width], window)
            mask = chip.valid
            assert mask[: chip.height, : chip.width].all()
            # padding beyond the tile's edge: zeros, and never valid (never scored)
            assert mask.sum() == chip.height * chip.width
            assert not chip.raw[0][~mask].any()
            covered[chip.row : chip.row + chip.height, chip.col : chip.col + chip.width] += 1
            _, _, c, _, _, f = chip.transform
            assert (c, f) == (500_000.0 + 10.0 * chip.col, 4_000_000.0 - 10.0 * chip.row)
    assert covered.min() >= 1, "a pixel of the tile no chip holds"
    assert sorted(indices) == list(range(len(indices))), "chip indices are unique and dense"


def test_overlapping_chips_share_the_margin_rows_and_columns():
    """stride < size: the overlap a user asked for, exactly size - stride pixels wide."""
    grid = _grid(100, 100, 32, 24)
    [task] = _tasks(grid)
    values = np.arange(100 * 100, dtype=np.int32).reshape(1, 100, 100)
    chips, _ = _cut_task(task, values, np.ones((100, 100), bool))
    by_place = {(c.row, c.col): c for c in chips}
    assert sorted({c.col for c in chips}) == [0, 24, 48, 72]
    left, right = by_place[(0, 0)], by_place[(0, 24)]
    assert np.array_equal(left.raw[0, :, 24:], right.raw[0, :, :8])
    below = by_place[(24, 0)]
    assert np.array_equal(left.raw[0, 24:, :], below.raw[0, :8, :])
    # the last column and row are edge chips: 28 pixels of tile, 4 of padding
    assert (by_place[(72, 72)].height, by_place[(72, 72)].width) == (28, 28)


def test_chips_under_the_valid_fraction_are_skipped_and_counted_never_lost():
    grid = _grid(64, 96, 32, 32)
    [task] = _tasks(grid)
    values = np.ones((2, 64, 96), np.uint16)
    valid = np.ones((64, 96), bool)
    valid[:32, :32] = False  # chip (0, 0): nothing valid
    valid[:32, 32:64] = False
    valid[:4, 32:64] = True  # chip (0, 32): 4 rows of 32 valid: 12.5 %
    chips, cut = _cut_task(task, values, valid, min_valid_fraction=0.2)
    assert {(c.row, c.col) for c in chips} == {(0, 64), (32, 0), (32, 32), (32, 64)}
    assert cut.skipped == 2 and cut.expected == [1, 3]
    report = cut.report(task)
    assert (report.expected, report.skipped, report.failed) == ((1, 3), 2, 0)
    assert {c.valid_fraction for c in chips} == {1.0}


@pytest.mark.parametrize(("dtype", "nodata"), [
    ("uint16", [{0}, {0}, {0}]),  # one shared floor: the fast path
    ("uint8", [{255}, {255}, {255}]),  # one shared ceiling
    ("int16", [{-9999}, {-9999, 0}, set()]),  # per band, one band without
    ("float32", [{-1.0}, {-1.0}, {-1.0}]),
])
def test_a_pixel_is_nodata_where_any_band_is_and_the_model_never_sees_its_values(dtype, nodata):
    rng = np.random.default_rng(11)
    values = rng.integers(1, 100, (3, 20, 30)).astype(dtype)
    expected = np.zeros((20, 30), bool)
    for band, band_nodata in enumerate(nodata):
        for value in band_nodata:
            rows, cols = rng.integers(0, 20, 15), rng.integers(0, 30, 15)
            values[band, rows, cols] = value
            expected[rows, cols] = True
    if dtype == "float32":
        values[2, 0, 0] = np.nan  # not finite: invalid whatever the nodata
        values[1, 19, 29] = np.inf
        expected[0, 0] = expected[19, 29] = True
    invalid = invalid_mask(values, nodata)
    assert expected.any() and np.array_equal(invalid, expected)
    ready, valid = prepare(values.copy(), invalid, 1.0, 0.0)
    assert np.array_equal(valid, ~expected)
    assert not ready[:, expected].any(), "nodata reaches the model as 0, like padding"
    assert np.array_equal(ready[:, valid], values[:, valid])


def test_a_per_source_rescale_is_applied_before_the_cut_and_keeps_nodata_at_zero():
    values = np.array([[[0, 100], [200, 0]]], np.uint16)
    invalid = invalid_mask(values, [{0}])
    ready, valid = prepare(values, invalid, 0.5, 10.0)
    assert ready.dtype == np.float32
    assert ready.tolist() == [[[0.0, 60.0], [110.0, 0.0]]]
    assert valid.tolist() == [[False, True], [True, False]]


def test_a_tiles_manifest_is_the_same_whatever_order_its_strips_finish_in():
    grid = _grid(1100, 300, 64, 48)
    tasks = _tasks(grid)
    assert len(tasks) >= 2
    values = np.ones((1, 1100, 300), np.uint8)
    valid = np.ones((1100, 300), bool)
    valid[:, 200:] = False  # the last column of chips has nothing valid: skipped
    reports = []
    for task in tasks:
        _, cut = _cut_task(task, values, valid, 0.05, unreadable=0 if task.index == 1 else None)
        reports.append(cut.report(task))
    one = merge_reports(reports)
    random.Random(5).shuffle(reports)
    other = merge_reports(reports)
    assert (one.expected_per_row, one.chips_total, one.chips_skipped, one.chips_failed,
            one.failures) == (other.expected_per_row, other.chips_total, other.chips_skipped,
                              other.chips_failed, other.failures)
    rows, cols = len(starts(1100, 64, 48)), len(starts(300, 64, 48))
    assert one.chips_total == rows * cols and len(one.expected_per_row) == rows
    assert one.chips_failed == cols and one.chips_skipped == rows - 1
    assert sum(one.expected_per_row) == (rows - 1) * (cols - 1)
    assert "bad block" in one.failures and f"1 of {rows} strips" in one.failures


def test_the_pure_modules_import_without_beam():
    """They stay testable, and usable by tools, without a pipeline runtime."""
    code = ("import sys, transforms.chip_cut, transforms.geometry; "
            "sys.exit('apache_beam' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
