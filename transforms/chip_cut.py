"""The cut: a strip task's pixels -> chips, and its reports -> the tile's manifest.

Pure functions of arrays and records, no Beam and no I/O, so they are tested on their own
(``tests/test_chip_geometry.py``): where a strip task's read and chip windows lie
(:func:`strip_layout`, on the grid of ``transforms/geometry.py``), which pixels are nodata
(:func:`invalid_mask`), values made ready for the model (:func:`prepare`), one chip row cut into
padded chips (:func:`cut_row`) and the tile's manifest from its strips' reports
(:func:`merge_reports`). The reader (``transforms/chip_reader.py``) feeds them what it read.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from transforms.geometry import chip_starts
from transforms.records import Chip, StripReport, StripTask, TileGrid, TileManifest, pack_mask


@dataclass(frozen=True)
class StripLayout:
    """Where a strip task's chips lie in its tile, in pixels."""

    starts: tuple[int, ...]  # first pixel row of every chip row of the tile
    cols: tuple[int, ...]  # first pixel column of every chip column
    widths: tuple[int, ...]  # in-tile width of every chip column (the last may be short)
    windows: tuple[tuple[int, int], ...]  # (first pixel row, height) of each of the task's rows
    top: int  # the task's one read: pixel rows top..bottom
    bottom: int
    height: int  # the tile's

    def fresh_end(self, row: int) -> int:
        """End of chip row ``row``'s own pixel rows: those up to the next chip row's start (the
        rest of the chip is the next row's), so a pixel is counted once per tile."""
        return self.starts[row + 1] if row + 1 < len(self.starts) else self.height


def strip_layout(grid: TileGrid, first_row: int, stop_row: int) -> StripLayout:
    """The layout of chip rows ``first_row .. stop_row`` of a tile on ``grid``."""
    size = grid.chip_size
    starts = tuple(chip_starts(grid.height, size, grid.stride))
    cols = tuple(chip_starts(grid.width, size, grid.stride))
    return StripLayout(
        starts=starts,
        cols=cols,
        widths=tuple(min(size, grid.width - c) for c in cols),
        windows=tuple((starts[r], min(size, grid.height - starts[r]))
                      for r in range(first_row, stop_row)),
        top=starts[first_row],
        bottom=min(starts[stop_row - 1] + size, grid.height),
        height=grid.height,
    )


def invalid_mask(values: np.ndarray, nodata: Sequence[set]) -> np.ndarray:
    """``(H, W)`` pixels of ``(C, H, W)`` values where any band holds one of its ``nodata``
    values or, for floats, is not finite."""
    shared = nodata[0] if all(n == nodata[0] for n in nodata) else None
    if values.dtype.kind in "ui" and shared and len(shared) == 1:
        # The usual case, one nodata for every band at the type's floor or ceiling (e.g. 0):
        # a pixel holds it in some band exactly when its band minimum (maximum) does.
        [value] = shared
        limits = np.iinfo(values.dtype)
        if value == limits.min:
            return values.min(axis=0) == value
        if value == limits.max:
            return values.max(axis=0) == value
    invalid = np.zeros(values.shape[1:], bool)
    hit = np.empty_like(invalid)
    for band, band_nodata in enumerate(nodata):
        for value in band_nodata:
            np.equal(values[band], value, out=hit)
            invalid |= hit
    if np.issubdtype(values.dtype, np.floating):
        invalid |= ~np.isfinite(values).all(axis=0)
    return invalid


def prepare(values: np.ndarray, invalid: np.ndarray, scale: float,
            offset: float) -> tuple[np.ndarray, np.ndarray]:
    """Values read -> (values ready to cut, valid mask): the per-source rescale applied (float32
    from there on) and nodata set to 0, like padding. ``values`` may be changed in place."""
    if (scale, offset) != (1.0, 0.0):
        values = values.astype(np.float32) * np.float32(scale) + np.float32(offset)
    values[:, invalid] = 0
    return values, ~invalid


@dataclass
class Cut:
    """Running totals of one strip task."""

    rows: int
    expected: list[int | None] = field(default_factory=list)  # None: not reached yet
    skipped: int = 0
    failed: int = 0
    unreadable: list[str] = field(default_factory=list)
    counts: list[np.ndarray] | None = None  # drift bins of the fresh rows read so far

    def __post_init__(self):
        self.expected = [None] * self.rows

    def fail(self, k: int, chips: int, reason: str) -> None:
        """Chip row ``k`` (of the task) could not be read: its ``chips`` failed."""
        self.expected[k] = 0
        self.failed += chips
        self.unreadable.append(reason)

    def fail_rest(self, chips: int, reason: str) -> None:
        """Every chip row not reached yet failed, for one ``reason``."""
        for k in range(self.rows):
            if self.expected[k] is None:
                self.fail(k, chips, reason)

    def add_counts(self, counts: list[np.ndarray]) -> None:
        self.counts = counts if self.counts is None else [
            a + b for a, b in zip(self.counts, counts, strict=True)]

    def report(self, task: StripTask) -> StripReport:
        return StripReport(task, tuple(n or 0 for n in self.expected), self.skipped, self.failed,
                           tuple(self.unreadable),
                           tuple(tuple(int(n) for n in c) for c in self.counts or ()))


def cut_row(task: StripTask, layout: StripLayout, k: int, strip: np.ndarray,
            valid_strip: np.ndarray, outlines: Sequence[str], crs: str,
            min_valid_fraction: float, cut: Cut) -> Iterator[Chip]:
    """The chips of the task's ``k``-th chip row, from its prepared ``(C, h, W)`` pixels and
    ``(h, W)`` valid mask; a chip under ``min_valid_fraction`` valid (or with none) is counted
    as skipped. Edge chips are padded to the chip size with invalid zeros.

    A full chip's pixels are a view of the strip, not a copy: the block holds every chip of
    the strip anyway, overlapping chips then share their pixels, and whatever encodes the
    block between stages writes each chip's own window."""
    grid, tile = task.grid, task.tile
    size, stride = grid.chip_size, grid.stride
    row = task.first_row + k
    start, height = row * stride, strip.shape[1]
    a, b, c, d, e, f = grid.transform
    cut.expected[k] = 0
    for col_number, (col, width) in enumerate(zip(layout.cols, layout.widths, strict=True)):
        fraction = int(np.count_nonzero(valid_strip[:, col : col + width])) / (height * width)
        if fraction < min_valid_fraction or fraction == 0.0:
            cut.skipped += 1
            continue
        if height == width == size:  # the usual chip: its window, no padding
            valid = valid_strip[:, col : col + size]
            raw = strip[:, :, col : col + size]
        else:
            valid = np.zeros((size, size), bool)
            valid[:height, :width] = valid_strip[:, col : col + width]
            raw = np.zeros((strip.shape[0], size, size), strip.dtype)
            raw[:, :height, :width] = strip[:, :, col : col + width]
        cut.expected[k] += 1
        yield Chip(
            tile=tile,
            index=row * len(layout.cols) + col_number,
            row=start,
            col=col,
            height=height,
            width=width,
            size=size,
            stride=stride,
            tile_height=grid.height,
            tile_width=grid.width,
            transform=(a, b, c + col * a + start * b, d, e, f + col * d + start * e),
            crs=crs,
            footprint_wkt=outlines[col_number],
            pixel_area_m2=grid.pixel_area_m2,
            valid_fraction=fraction,
            valid_bits=pack_mask(valid),
            chipped_at=time.time(),
            raw=raw,
        )


def merge_reports(reports: list[StripReport]) -> TileManifest:
    """The tile's manifest from all of its strip tasks' reports (in any order)."""
    reports = sorted(reports, key=lambda r: r.task.index)
    task, grid = reports[0].task, reports[0].task.grid
    tile = task.tile
    rows = sum(r.task.stop_row - r.task.first_row for r in reports)
    cols = len(chip_starts(grid.width, grid.chip_size, grid.stride))
    total = rows * cols
    failed = sum(r.failed for r in reports)
    unreadable = [u for r in reports for u in r.unreadable]
    band_counts: list[list[int]] = []
    for r in reports:
        band_counts = ([list(c) for c in r.band_counts] if not band_counts else
                       [[x + y for x, y in zip(a, b, strict=True)]
                        for a, b in zip(band_counts, r.band_counts, strict=True)])
    return TileManifest(
        tile=tile,
        grid=grid,
        chips_total=total,
        chips_skipped=sum(r.skipped for r in reports),
        chips_failed=failed,
        chipped_at=time.time(),
        expected_per_row=tuple(n for r in reports for n in r.expected),
        band_counts=tuple(tuple(c) for c in band_counts),
        failures=(f"{len(unreadable)} of {rows} strips of {', '.join(tile.band_uris)} "
                  f"unreadable ({failed} of {total} chips failed): " + "; ".join(unreadable))
        if unreadable else "",
    )
