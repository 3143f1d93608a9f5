"""transforms/geometry.py on its own: the one tiling rule the chipper and assembly share."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import rasterio

from pipeline.ops.check import SAMPLE_TILE
from tests import tiles
from transforms import geometry as g

GRIDS = [(352, 349, 64, 48), (349, 349, 64, 64), (64, 64, 64, 32), (10, 70, 64, 48),
         (3660, 3660, 64, 48), (7320, 7320, 64, 48), (600, 7320, 64, 48), (1100, 900, 64, 40)]


@pytest.mark.parametrize(("length", "size", "stride"), [(352, 64, 48), (349, 64, 64), (64, 64, 32),
                                                        (10, 64, 48), (65, 64, 1)])
def test_chip_starts_cover_every_pixel_and_stop_at_the_far_edge(length, size, stride):
    starts = g.chip_starts(length, size, stride)
    covered = np.zeros(length, int)
    for s in starts:
        covered[s : s + size] += 1
    assert covered.min() >= 1
    assert starts == tiles.starts(length, size, stride)
    assert starts[-1] < length and (len(starts) == 1 or starts[-2] + size < length)


@pytest.mark.parametrize("grid", GRIDS)
def test_strips_partition_the_rows_and_are_the_strip_tasks(grid):
    height, width, size, stride = grid
    bounds = g.strip_bounds(*grid)
    tasks = g.strip_chip_rows(*grid)
    starts = g.chip_starts(height, size, stride)
    assert bounds[0][0] == 0 and bounds[-1][1] == height
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
    assert len(tasks) == len(bounds)
    assert tasks[0][0] == 0 and tasks[-1][1] == len(starts)
    for (first, stop), (start, _) in zip(tasks, bounds, strict=True):
        assert starts[first] == start and stop > first
    # a strip holds at most about STRIP_PIXELS, and never more than about STRIP_ROWS rows
    assert max(e - s for s, e in bounds) * width <= g.STRIP_PIXELS + stride * width
    assert max(e - s for s, e in bounds) <= g.STRIP_ROWS + stride


@pytest.mark.parametrize("grid", GRIDS)
def test_each_chip_has_one_own_strip_among_those_it_touches(grid):
    height, _width, size, stride = grid
    bounds = g.strip_bounds(*grid)
    for r, row in enumerate(g.chip_starts(height, size, stride)):
        touched = g.strips_touched(row, min(size, height - row), bounds)
        own = g.own_strip(row, bounds)
        assert own == touched[0] and touched == list(range(touched[0], touched[-1] + 1))
        for j in touched:
            assert r in g.rows_touching(*grid, j)


@pytest.mark.parametrize("grid", GRIDS)
def test_expected_counts_count_every_chip_once_over_own_strips(grid):
    height, _width, size, stride = grid
    rows = len(g.chip_starts(height, size, stride))
    per_row = tuple((r * 7) % 5 for r in range(rows))  # any numbers of chips per chip row
    strips = len(g.strip_bounds(*grid))
    own = [g.expected_in_strip(*grid, per_row, j, own_only=True) for j in range(strips)]
    touching = [g.expected_in_strip(*grid, per_row, j) for j in range(strips)]
    assert sum(own) == sum(per_row)
    assert all(t >= o for t, o in zip(touching, own, strict=True))


def test_wider_tiles_get_narrower_strips():
    assert g.chip_rows_per_strip(3660, 48) == 10
    assert g.chip_rows_per_strip(7320, 48) == 5
    assert g.chip_rows_per_strip(100, 48) == g.STRIP_ROWS // 48


def test_strip_footprints_match_the_per_chip_outline():
    with rasterio.open(SAMPLE_TILE) as src:
        transform, crs = src.transform, src.crs
    cols, widths = [0, 48, 96, 336], [64, 64, 64, 13]
    rows = [(96, 64), (144, 64), (336, 13)]
    together = g.strip_footprints(transform, crs, rows, cols, widths)
    assert together == [[g.footprint_wkt(transform, crs, r, c, h, w)
                         for c, w in zip(cols, widths, strict=True)] for r, h in rows]
    ring = together[0][0][len("POLYGON(("):-2].split(", ")
    assert len(ring) == 17 and ring[0] == ring[-1]  # 4 points per edge, closed
    lon, lat = (float(v) for v in ring[0].split())
    assert -35.0 < lon < -34.8 and -8.1 < lat < -7.9  # Olinda


def test_pixel_area_is_exact_for_a_projected_crs():
    with rasterio.open(SAMPLE_TILE) as src:
        area = g.pixel_area_m2(src.transform, src.crs, src.height, src.width)
    assert area == pytest.approx(28.5**2, rel=1e-6)
