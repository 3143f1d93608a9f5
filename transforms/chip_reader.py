"""Reading a tile for the chipper: its settings, planning under the guards, and one strip task.

:meth:`TileReader.plan` opens a tile once and, before a pixel is cut, holds it to its guards:
the header (``transforms/rasters.py``), then a preview's values against the card's valid range
and its drift reference (``transforms/radiometry.py``). :meth:`TileReader.chip` reads one strip
task in one window and cuts it (``transforms/chip_cut.py``), row by row when a block is corrupt.
Every read goes through ``transforms/storage.py``'s retries and circuit breaker, within a budget
per tile. The DoFns built on this base (``transforms/chips.py``, the paced one in
``transforms/pacing.py``) only route what it returns.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from model.card import ModelCard
from transforms import storage
from transforms.bq_rows import crs_label
from transforms.chip_cut import Cut, StripLayout, cut_row, prepare, strip_layout
from transforms.geometry import chip_starts, pixel_area_m2, strip_chip_rows, strip_footprints
from transforms.guards import DEFAULT_MAX_TILE_PIXELS, InputAllowList, describe
from transforms.radiometry import check_distribution, check_radiometry, strip_band_counts
from transforms.rasters import RasterCache, TileRasters
from transforms.records import Chip, ChipBlock, StripTask, TileGrid, TileRef

REPORTS_TAG = "reports"
PREVIEW_ROWS = 16  # a file whose preview fails: the first readable of this many chip rows


@dataclass(frozen=True)
class ChipSettings:
    card: ModelCard
    chip_size: int
    stride: int
    min_valid_fraction: float
    allow: InputAllowList | None = None  # the stream's allow-list, checked again before opening
    max_tile_pixels: int = DEFAULT_MAX_TILE_PIXELS
    input_scale: float = 1.0  # raw * input_scale + input_offset, before the card's scaling
    input_offset: float = 0.0
    max_out_of_range: float = 0.5  # largest fraction of preview pixels outside the valid range
    read_budget_secs: float = 120.0  # retries and breaker pauses for one tile, in all
    max_chips_in_flight: int = 0  # pace strip tasks to the model (in-process runner); 0: off

    @classmethod
    def from_card(cls, card: ModelCard, chip_size: int = 0, stride: int = 0,
                  min_valid_fraction: float = 0.0, **guards) -> ChipSettings:
        size = chip_size or card.input.chip_size
        step = stride or (card.input.stride if not chip_size else size)
        if not 0 < step <= size:
            raise ValueError(f"stride must be in 1..chip_size ({size}), got {step}")
        if not 0.0 <= min_valid_fraction <= 1.0:
            raise ValueError(f"min_valid_fraction must be in [0, 1], got {min_valid_fraction}")
        settings = cls(card, size, step, min_valid_fraction, **guards)
        if settings.max_tile_pixels < size * size:
            raise ValueError(f"max_tile_pixels must be at least one chip ({size * size})")
        if not (math.isfinite(settings.input_scale) and settings.input_scale != 0
                and math.isfinite(settings.input_offset)):
            raise ValueError("input_scale must be finite and non-zero, input_offset finite")
        return settings

    def radiometry(self, tile: TileRef) -> tuple[float, float]:
        """(scale, offset) for this tile: its announcement's attributes, else the options."""
        attrs = dict(tile.attributes)
        return (float(attrs.get("input_scale", self.input_scale)),
                float(attrs.get("input_offset", self.input_offset)))


class TileReader(beam.DoFn):
    """Opening a tile's rasters under the guards, with retries, a breaker and metrics."""

    def __init__(self, settings: ChipSettings):
        self._s = settings
        self.retries = Metrics.counter("tilestream", "read_retries")
        self.tiles = Metrics.counter("tilestream", "tiles_chipped")
        self.total = Metrics.counter("tilestream", "chips_total")
        self.skipped = Metrics.counter("tilestream", "chips_skipped")
        self.failed = Metrics.counter("tilestream", "chips_failed")
        self.strip_ms = Metrics.distribution("tilestream", "chip_strip_read_ms")
        self._reference = None  # the card's drift reference, parsed in setup

    def setup(self):
        from model.drift import reference_from_card

        self._reference = reference_from_card(self._s.card)

    def plan(self, tile: TileRef) -> list[StripTask]:
        """The tile's strip tasks, once its header and a sample of its values pass the guards
        (raises for a tile that cannot or must not be read)."""
        import rasterio

        deadline = time.monotonic() + self._s.read_budget_secs
        if self._s.allow is not None:  # before any request about the tile, metadata included
            for uri in tile.band_uris:
                self._s.allow.check(uri, "band file")
        pinned = self._with_retries(tile, deadline, lambda: storage.pin(tile.band_uris,
                                                                        tile.band_generations))
        tile = dataclasses.replace(tile, band_generations=pinned)
        # The rasters stay open after planning: a reader that chips the tile too reuses them.
        with rasterio.Env(**storage.GDAL_ENV):
            src = self._with_retries(tile, deadline, lambda: self._sources(tile))
            size, stride = self._s.chip_size, self._s.stride
            sample = self._sample(tile, deadline, src, chip_starts(src.height, size, stride))
            if sample is not None:
                self._check_values(tile, src, sample)
            grid = TileGrid(src.height, src.width, tuple(src.transform)[:6], src.crs.to_wkt(),
                            pixel_area_m2(src.transform, src.crs, src.height, src.width),
                            size, stride)
        strips = strip_chip_rows(src.height, src.width, size, stride)
        return [StripTask(tile, grid, i, len(strips), first, stop)
                for i, (first, stop) in enumerate(strips)]

    def _sample(self, tile: TileRef, deadline: float, src: TileRasters,
                starts: list[int]) -> np.ndarray | None:
        """The preview, or for a damaged file the first chip row that reads and holds a valid
        pixel (bounded: unreadable rows are the strip tasks' to report); None if none does."""
        try:
            return self._with_retries(tile, deadline, src.preview)
        except Exception:
            sample = None
            for row in starts[:PREVIEW_ROWS]:
                try:
                    sample = src.read_strip(row, min(self._s.chip_size, src.height - row))
                except Exception:
                    continue
                if not src.invalid(sample).all():
                    break
            return sample

    def _check_values(self, tile: TileRef, src: TileRasters, sample: np.ndarray) -> None:
        """The radiometry and drift guards on a sample (raise :class:`Refused`)."""
        scale, offset = self._s.radiometry(tile)
        invalid, uris = src.invalid(sample), ", ".join(tile.band_uris)
        check_radiometry(sample, invalid, self._s.card, scale, offset,
                         self._s.max_out_of_range, uris)
        check_distribution(sample, invalid, self._s.card, self._reference, scale, offset, uris)

    def chip(self, task: StripTask) -> Iterator:
        """The task's chips as one :class:`ChipBlock` (none if every chip was skipped or
        failed), then its :class:`StripReport` on ``REPORTS_TAG``. Never raises: whatever
        cannot be read is reported as failed chip rows, with the reason."""
        import rasterio

        tile, grid = task.tile, task.grid
        layout = strip_layout(grid, task.first_row, task.stop_row)
        rows, cols = len(layout.windows), len(layout.cols)
        deadline = time.monotonic() + self._s.read_budget_secs
        cut = Cut(rows)
        block: list[Chip] = []
        try:
            with rasterio.Env(**storage.GDAL_ENV):
                src = self._with_retries(tile, deadline, lambda: self._sources(tile))
                if (src.height, src.width) != (grid.height, grid.width):
                    raise ValueError(f"{tile.band_uris[0]} changed size while being read")
                block.extend(self._cut(task, layout, src, deadline, cut))
                # Still the generation the tile was planned at: every byte read was its own.
                self._with_retries(tile, deadline, lambda: [
                    storage.check_generation(uri, generation) for uri, generation in
                    zip(tile.band_uris, tile.band_generations, strict=False)])
        except Exception as exc:  # could not open it at all: every row not yet cut fails
            self.close_sources(tile)  # a handle that failed is not reused
            if isinstance(exc, storage.Superseded):  # replaced while read: nothing of it holds
                block.clear()
                cut = Cut(rows)
            cut.fail_rest(cols, f"rows {layout.top}..: {describe(exc)}")
        if block:
            yield ChipBlock(tile, task.index, tuple(block))
        self.total.inc(rows * cols)
        self.skipped.inc(cut.skipped)
        self.failed.inc(cut.failed)
        yield beam.pvalue.TaggedOutput(REPORTS_TAG, cut.report(task))

    def _cut(self, task: StripTask, layout: StripLayout, src: TileRasters, deadline: float,
             cut: Cut) -> Iterator[Chip]:
        """The task's chips: its rows read in one window, or row by row after a failed read
        (a corrupt block), so that only the rows it holds fail."""
        tile, top = task.tile, layout.top
        scale, offset = self._s.radiometry(tile)
        outlines = strip_footprints(src.transform, src.crs, list(layout.windows),
                                    list(layout.cols), list(layout.widths))
        crs = crs_label(task.grid.crs_wkt)
        begun = time.perf_counter()
        try:
            window = self._with_retries(tile, deadline,
                                        lambda: src.read_strip(top, layout.bottom - top))
            self.strip_ms.update(int((time.perf_counter() - begun) * 1000))
            values, valid = self._prepare(src, window, layout.fresh_end(task.stop_row - 1) - top,
                                          scale, offset, cut)
        except Exception:
            values = None
        for k, (start, height) in enumerate(layout.windows):
            if values is not None:
                part = values[:, start - top : start - top + height]
                part_valid = valid[start - top : start - top + height]
            else:
                try:
                    raw = self._with_retries(tile, deadline, lambda s=start, h=height:
                                             src.read_strip(s, h))
                except Exception as exc:
                    cut.fail(k, len(layout.cols), f"rows {start}..{start + height}: "
                                                  f"{describe(exc)}")
                    continue
                part, part_valid = self._prepare(
                    src, raw, layout.fresh_end(task.first_row + k) - start, scale, offset, cut)
            yield from cut_row(task, layout, k, part, part_valid, outlines[k], crs,
                               self._s.min_valid_fraction, cut)

    def _prepare(self, src: TileRasters, values: np.ndarray, fresh: int, scale: float,
                 offset: float, cut: Cut) -> tuple[np.ndarray, np.ndarray]:
        """Rows just read -> (values ready to cut, valid mask), drift counted on the first
        ``fresh`` rows (the rest belong to the next read). ``values`` is ours to change."""
        invalid = src.invalid(values)
        if self._reference is not None:
            cut.add_counts(strip_band_counts(self._reference, values[:, :fresh],
                                             invalid[:fresh], self._s.card, scale, offset))
        return prepare(values, invalid, scale, offset)

    def _sources(self, tile: TileRef) -> TileRasters:
        """The tile's open rasters, kept open across its strip tasks in this bundle."""
        s = self._s
        return self._cache().get(tile, lambda stack: TileRasters(
            tile, s.card, s.allow, s.max_tile_pixels, stack))

    def _cache(self) -> RasterCache:
        # Made on first use: a DoFn is pickled before it runs, open handles are not.
        return self.__dict__.setdefault("_open", RasterCache())

    def close_sources(self, tile: TileRef | None = None) -> None:
        """Close the kept rasters of one tile, or all of them."""
        self._cache().close(tile)

    def finish_bundle(self):
        self.close_sources()

    def teardown(self):
        self.close_sources()

    def _with_retries(self, tile: TileRef, deadline: float, read):
        """``read()`` through :func:`transforms.storage.with_retries`, counting retries."""
        return storage.with_retries(read, tile.band_uris, deadline, self._s.read_budget_secs,
                                    on_retry=self.retries.inc)
