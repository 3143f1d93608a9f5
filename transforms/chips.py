"""Stage 4: TileRef -> strip tasks -> ChipBlocks, read with rasterio windows a strip at a time.

A planner opens each tile once and cuts it into strip tasks (``transforms/geometry.py``: runs of
whole chip rows, about 512 pixel rows and at most ~2 Mpx); each task is keyed on its own, so a
runner spreads one tile's tasks over its workers. A task reads its rows in one window, so memory
follows a strip, never the whole tile, emits its chips as one block (the runner's per-element
cost is paid per strip, not per chip) and reports what it found; the tile's manifest is the
merge of its reports. Edge chips are padded (padding is invalid and ignored downstream). Chips
whose valid-pixel fraction is under the threshold are skipped and counted in the tile's
manifest, never lost.

Before a pixel is read, a tile must pass its guards: URIs in the input allow-list, GeoTIFF only
(``transforms/storage.py``), a header within ``--max_tile_pixels``, no complex bands, and a sample
(overviews, or a grid of single-block windows) whose values mostly lie in the card's valid range
(``transforms/radiometry.py``). Reads go through ``transforms/storage.py``'s retries and circuit
breaker; any other exception about a tile is that tile's dead letter.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (
    BagStateSpec,
    ReadModifyWriteStateSpec,
    TimerSpec,
    on_timer,
)
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp

from model.card import CardError, ModelCard
from transforms import pacing, storage
from transforms.deadletter import DEAD_LETTER_TAG, dead_letter, superseded
from transforms.geometry import chip_starts, pixel_area_m2, strip_chip_rows, strip_footprints
from transforms.guards import DEFAULT_MAX_TILE_PIXELS, InputAllowList, Refused, describe
from transforms.radiometry import check_distribution, check_radiometry, strip_band_counts
from transforms.records import (
    KEYED,
    Chip,
    ChipBlock,
    StripReport,
    StripTask,
    TileGrid,
    TileManifest,
    TileRef,
    pack_mask,
)
from transforms.sinks import crs_label

STAGE = "chips"
MANIFESTS_TAG = "manifests"
REPORTS_TAG = "reports"
PREVIEW_PIXELS = 256  # long side of the decimated radiometry preview (overviews, small files)
PREVIEW_GRID = 3  # a big file without overviews: a 3 x 3 grid of windows, on block edges,
PREVIEW_WINDOW = 128  # of at most 128 x 128 pixels (147,456 sampled pixels in all)
PREVIEW_ROWS = 16  # a file whose preview fails: the first readable of this many chip rows
OPEN_TILES = 4  # a strip reader keeps this many tiles' rasters open within a bundle

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


class _Sources:
    """The open rasters of one tile and which band of which file feeds each card band."""

    def __init__(self, tile: TileRef, settings: ChipSettings, stack: ExitStack):

        card = settings.card
        if settings.allow is not None:
            for uri in tile.band_uris:
                settings.allow.check(uri, "band file")
        self.datasets = [stack.enter_context(storage.open_geotiff(uri)) for uri in tile.band_uris]
        for uri, ds in zip(tile.band_uris, self.datasets, strict=True):
            _check_header(uri, ds, settings.max_tile_pixels)
        first = self.datasets[0]
        if len(self.datasets) == 1:
            self.band_map = [(0, i + 1) for i in card.band_indices(first.descriptions)]
        else:
            if len(self.datasets) != len(card.input.bands):
                raise CardError(f"{len(self.datasets)} band files for "
                                f"{len(card.input.bands)} card bands")
            for uri, ds in zip(tile.band_uris[1:], self.datasets[1:], strict=True):
                if (ds.shape, ds.transform, ds.crs) != (first.shape, first.transform, first.crs):
                    raise ValueError(
                        f"band file {uri} is on another grid ({ds.crs}, {ds.shape}, "
                        f"{tuple(ds.transform)[:6]}) than {tile.band_uris[0]} ({first.crs}, "
                        f"{first.shape}, {tuple(first.transform)[:6]})"
                    )
            self.band_map = [(i, 1) for i in range(len(self.datasets))]
        if first.crs is None:
            raise ValueError(f"{tile.band_uris[0]} has no CRS")
        self.height, self.width = first.shape
        self.transform = first.transform
        self.crs = first.crs
        # A pixel is invalid where any band equals its raster's nodata or the card's.
        self.nodata = [
            {v for v in (self.datasets[d].nodatavals[b - 1], card.input.nodata) if v is not None}
            for d, b in self.band_map
        ]

    def read_strip(self, row: int, height: int) -> np.ndarray:
        """``(C, height, width)`` raw values of rows ``row..row+height`` for the card's bands."""
        from rasterio.windows import Window

        window = Window(0, row, self.width, height)
        if len(self.datasets) == 1:  # one call: GDAL de-interleaves a pixel-interleaved block once
            return self.datasets[0].read([b for _, b in self.band_map], window=window)
        return np.stack([self.datasets[d].read(b, window=window) for d, b in self.band_map])

    def preview(self) -> np.ndarray:
        """A sample of the tile for the radiometry check, for a fraction of a full read.

        With overviews, or a file of at most a few blocks, the decimated file (long side 256).
        Otherwise a decimated read would decode every block, as much as chipping reads: a
        ``PREVIEW_GRID``² grid of windows spread over the tile is read instead, each starting on
        a block boundary and at most ``PREVIEW_WINDOW`` square (one block of a tiled file, a few
        strips of a striped one), and returned side by side as ``(C, 1, n)``.
        """
        from rasterio.enums import Resampling
        from rasterio.windows import Window

        first = self.datasets[0]
        block_h, block_w = first.block_shapes[0]
        blocks = math.ceil(self.height / block_h) * math.ceil(self.width / block_w)
        if first.overviews(1) or blocks <= PREVIEW_GRID ** 2:
            factor = max(1, math.ceil(max(self.height, self.width) / PREVIEW_PIXELS))
            shape = (max(1, self.height // factor), max(1, self.width // factor))
            return np.stack([self.datasets[d].read(b, out_shape=shape,
                                                   resampling=Resampling.nearest)
                             for d, b in self.band_map])
        side_h, side_w = min(self.height, PREVIEW_WINDOW), min(self.width, PREVIEW_WINDOW)
        windows = []
        for i in range(PREVIEW_GRID):
            for j in range(PREVIEW_GRID):
                row = int((i + 0.5) * self.height / PREVIEW_GRID) // block_h * block_h
                col = int((j + 0.5) * self.width / PREVIEW_GRID) // block_w * block_w
                windows.append(Window(col, row, min(side_w, self.width - col),
                                      min(side_h, self.height - row)))
        return np.stack([np.concatenate([self.datasets[d].read(b, window=w).ravel()
                                         for w in windows])[None]
                         for d, b in self.band_map])

    def invalid(self, values: np.ndarray) -> np.ndarray:
        """Pixels where any band is nodata (the raster's or the card's) or not finite."""
        shared = self.nodata[0] if all(n == self.nodata[0] for n in self.nodata) else None
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
        for band, nodata in enumerate(self.nodata):
            for value in nodata:
                np.equal(values[band], value, out=hit)
                invalid |= hit
        if np.issubdtype(values.dtype, np.floating):
            invalid |= ~np.isfinite(values).all(axis=0)
        return invalid



def _check_header(uri: str, ds, max_pixels: int) -> None:
    """Refuse from the header alone, before any pixel is read."""
    if ds.width * ds.height > max_pixels:
        raise Refused(f"{uri} declares {ds.width:,} x {ds.height:,} pixels, over "
                      f"--max_tile_pixels={max_pixels:,}")
    if ds.count > 1000:
        raise Refused(f"{uri} declares {ds.count:,} bands")
    complex_bands = sorted({t for t in ds.dtypes if t.startswith("complex")})
    if complex_bands:
        raise Refused(f"{uri} has complex band types {complex_bands}; only real-valued "
                      "rasters are scored")


class _TileReader(beam.DoFn):
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
            scale, offset = self._s.radiometry(tile)
            size, stride = self._s.chip_size, self._s.stride
            starts = chip_starts(src.height, size, stride)
            try:
                sample = self._with_retries(tile, deadline, src.preview)
            except Exception:  # a damaged file: the first chip row that reads decides
                sample = None
                for row in starts[:PREVIEW_ROWS]:  # bounded: unreadable rows are reported later
                    try:
                        sample = src.read_strip(row, min(size, src.height - row))
                    except Exception:  # unreadable rows are the strip tasks' to report
                        continue
                    if not src.invalid(sample).all():
                        break
            if sample is not None:
                invalid, uris = src.invalid(sample), ", ".join(tile.band_uris)
                check_radiometry(sample, invalid, self._s.card, scale, offset,
                                 self._s.max_out_of_range, uris)
                check_distribution(sample, invalid, self._s.card, self._reference, scale,
                                   offset, uris)
            grid = TileGrid(src.height, src.width, tuple(src.transform)[:6], src.crs.to_wkt(),
                            pixel_area_m2(src.transform, src.crs, src.height, src.width),
                            size, stride)
        strips = strip_chip_rows(src.height, src.width, size, stride)
        return [StripTask(tile, grid, i, len(strips), first, stop)
                for i, (first, stop) in enumerate(strips)]

    def chip(self, task: StripTask) -> Iterator:
        """The task's chips as one :class:`ChipBlock` (none if every chip was skipped or
        failed), then its :class:`StripReport` on ``REPORTS_TAG``. Never raises: whatever
        cannot be read is reported as failed chip rows, with the reason."""
        import rasterio

        tile, grid = task.tile, task.grid
        size = grid.chip_size
        starts = chip_starts(grid.height, size, grid.stride)
        cols = chip_starts(grid.width, size, grid.stride)
        rows = range(task.first_row, task.stop_row)
        deadline = time.monotonic() + self._s.read_budget_secs
        cut = _Cut(len(rows))
        block: list[Chip] = []

        def fresh_end(row: int) -> int:  # rows up to the next chip row's start count once
            return starts[row + 1] if row + 1 < len(starts) else grid.height

        try:
            with rasterio.Env(**storage.GDAL_ENV):
                src = self._with_retries(tile, deadline, lambda: self._sources(tile))
                if (src.height, src.width) != (grid.height, grid.width):
                    raise ValueError(f"{tile.band_uris[0]} changed size while being read")
                scale, offset = self._s.radiometry(tile)
                windows = [(starts[r], min(size, grid.height - starts[r])) for r in rows]
                widths = [min(size, grid.width - c) for c in cols]
                outlines = strip_footprints(src.transform, src.crs, windows, cols, widths)
                top = starts[task.first_row]
                bottom = min(starts[task.stop_row - 1] + size, grid.height)
                begun = time.perf_counter()
                try:
                    window = self._with_retries(tile, deadline,
                                                lambda: src.read_strip(top, bottom - top))
                    self.strip_ms.update(int((time.perf_counter() - begun) * 1000))
                    values, valid = self._prepare(src, window, fresh_end(task.stop_row - 1) - top,
                                                  scale, offset, cut)
                except Exception:  # a corrupt block: read row by row, so only its rows fail
                    values = None
                for k, (row, (start, height)) in enumerate(zip(rows, windows, strict=True)):
                    if values is not None:
                        part = values[:, start - top : start - top + height]
                        part_valid = valid[start - top : start - top + height]
                    else:
                        try:
                            raw = self._with_retries(tile, deadline, lambda s=start, h=height:
                                                     src.read_strip(s, h))
                        except Exception as exc:
                            cut.fail(k, len(cols), f"rows {start}..{start + height}: "
                                                   f"{describe(exc)}")
                            continue
                        part, part_valid = self._prepare(src, raw, fresh_end(row) - start,
                                                         scale, offset, cut)
                    cut.expected[k] = 0
                    block.extend(self._cut_row(task, part, part_valid, row, cols, widths,
                                               outlines[k], cut, k))
                # Still the generation the tile was planned at: every byte read was its own.
                self._with_retries(tile, deadline, lambda: [
                    storage.check_generation(uri, generation) for uri, generation in
                    zip(tile.band_uris, tile.band_generations, strict=False)])
        except Exception as exc:  # could not open it at all: every row not yet cut fails
            self.close_sources(tile)  # a handle that failed is not reused
            if isinstance(exc, storage.Superseded):  # replaced while read: nothing of it holds
                block.clear()
                cut = _Cut(len(rows))
            reason = f"rows {starts[task.first_row]}..: {describe(exc)}"
            for k in range(len(rows)):
                if cut.expected[k] is None:
                    cut.fail(k, len(cols), reason)
        if block:
            yield ChipBlock(tile, task.index, tuple(block))
        self.total.inc(len(rows) * len(cols))
        self.skipped.inc(cut.skipped)
        self.failed.inc(cut.failed)
        yield beam.pvalue.TaggedOutput(REPORTS_TAG, StripReport(
            task, tuple(n or 0 for n in cut.expected), cut.skipped, cut.failed,
            tuple(cut.unreadable), tuple(tuple(int(n) for n in c) for c in cut.counts or ())))

    def _prepare(self, src: _Sources, values: np.ndarray, fresh: int, scale: float,
                 offset: float, cut: _Cut) -> tuple[np.ndarray, np.ndarray]:
        """Rows just read -> (values ready to cut, valid mask): drift counted on the first
        ``fresh`` rows (the rest belong to the next read), the per-source rescale applied, and
        nodata set to 0 under the mask, like padding. ``values`` is ours to change."""
        invalid = src.invalid(values)
        if self._reference is not None:
            counts = strip_band_counts(self._reference, values[:, :fresh], invalid[:fresh],
                                       self._s.card, scale, offset)
            cut.counts = counts if cut.counts is None else [
                a + b for a, b in zip(cut.counts, counts, strict=True)]
        if (scale, offset) != (1.0, 0.0):  # a per-source rescale: float32 from here on
            values = values.astype(np.float32) * np.float32(scale) + np.float32(offset)
        values[:, invalid] = 0
        return values, ~invalid

    def _cut_row(self, task: StripTask, strip: np.ndarray, valid_strip: np.ndarray, row: int,
                 cols: list[int], widths: list[int], outlines: list[str], cut: _Cut,
                 k: int) -> Iterator[Chip]:
        """The chips of one chip row, from its (prepared) pixels and valid mask.

        A full chip's pixels are a view of the strip, not a copy: the block holds every chip of
        the strip anyway, overlapping chips then share their pixels, and whatever encodes the
        block between stages writes each chip's own window."""
        grid, tile = task.grid, task.tile
        size, stride = grid.chip_size, grid.stride
        start, height = row * stride, strip.shape[1]
        crs = crs_label(grid.crs_wkt)
        a, b, c, d, e, f = grid.transform
        for col_number, (col, width) in enumerate(zip(cols, widths, strict=True)):
            fraction = int(np.count_nonzero(valid_strip[:, col : col + width])) / (height * width)
            if fraction < self._s.min_valid_fraction or fraction == 0.0:
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
                index=row * len(cols) + col_number,
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

    def _sources(self, tile: TileRef) -> _Sources:
        """The tile's open rasters, kept open across its strip tasks in this bundle: GDAL's
        block cache belongs to an open dataset, and neighbouring tasks share a block row (the
        chips overlapping their boundary), which a fresh handle would decode again."""
        cache = self.__dict__.setdefault("_open", {})
        key = _opened(tile)
        if key not in cache:
            while len(cache) >= OPEN_TILES:
                self.close_sources(None, next(iter(cache)))
            stack = ExitStack()  # opened under the caller's rasterio.Env(**storage.GDAL_ENV)
            try:
                cache[key] = (stack, _Sources(tile, self._s, stack))
            except BaseException:
                stack.close()
                raise
        return cache[key][1]

    def close_sources(self, tile: TileRef | None = None, key: tuple | None = None) -> None:
        """Close the kept rasters of one tile, or all of them."""
        cache = self.__dict__.get("_open", {})
        if tile is not None:
            key = _opened(tile)
        for opened in [key] if key is not None else list(cache):
            entry = cache.pop(opened, None)
            if entry is not None:
                entry[0].close()

    def finish_bundle(self):
        self.close_sources()

    def teardown(self):
        self.close_sources()

    def _with_retries(self, tile: TileRef, deadline: float, read):
        """``read()`` through :func:`transforms.storage.with_retries`, counting retries."""
        return storage.with_retries(read, tile.band_uris, deadline, self._s.read_budget_secs,
                                    on_retry=self.retries.inc)


def _opened(tile: TileRef) -> tuple:
    """What a kept raster handle is: these URIs at these generations."""
    return tile.band_uris, tile.band_generations


@dataclass
class _Cut:
    """Running totals of one strip task."""

    rows: int
    expected: list[int | None] = field(default_factory=list)  # None: not reached yet
    skipped: int = 0
    failed: int = 0
    unreadable: list[str] = field(default_factory=list)
    counts: list[np.ndarray] | None = None

    def __post_init__(self):
        self.expected = [None] * self.rows

    def fail(self, k: int, chips: int, reason: str) -> None:
        self.expected[k] = 0
        self.failed += chips
        self.unreadable.append(reason)


def chips_in(outputs: Iterable) -> Iterator[Chip]:
    """The chips among a chipper's outputs, out of their blocks."""
    for item in outputs:
        if isinstance(item, ChipBlock):
            yield from item.chips


def _refusal(tile: TileRef, exc: Exception) -> beam.pvalue.TaggedOutput:
    """A tile that is not chipped: superseded (its object was replaced first: set aside), or
    refused or unreadable (a dead letter), booked against every message the tile answers."""
    if isinstance(exc, storage.Superseded):
        return superseded(STAGE, str(exc), tile=tile)
    reason = describe(exc)
    if not isinstance(exc, Refused):
        reason = f"cannot chip {', '.join(tile.band_uris)}: {reason}"
    return dead_letter(STAGE, reason, tile=tile, payload=repr(tile))


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


class ChipTileFn(_TileReader):
    """One tile -> its chips, strip reports and manifest, in one call: plan, every strip task,
    merge (what `tilestream check` and the benchmarks run; the stream spreads the tasks)."""

    def process(self, tile: TileRef) -> Iterator:
        try:
            tasks = self.plan(tile)
        except Exception as exc:  # the stage boundary: one tile, one letter
            self.close_sources(tile)
            yield _refusal(tile, exc)
            return
        reports = []
        try:
            for task in tasks:
                for item in self.chip(task):
                    if isinstance(item, beam.pvalue.TaggedOutput):
                        reports.append(item.value)
                    yield item
        finally:
            self.close_sources(tile)
        self.tiles.inc()
        yield beam.pvalue.TaggedOutput(MANIFESTS_TAG, merge_reports(reports))


class _PlanStripsFn(_TileReader):
    def process(self, tile: TileRef) -> Iterator:
        try:
            tasks = self.plan(tile)
        except Exception as exc:  # the stage boundary: one tile, one letter
            yield _refusal(tile, exc)
            return
        finally:  # its strips are read by ChipStrips, maybe elsewhere
            self.close_sources(tile)
        self.tiles.inc()
        yield from tasks


class _ChipStripOnceFn(_TileReader):
    """A strip task -> its chips and report, with no state: a backfill's chipper.

    A runner keeps a stateful step's keys apart, and Beam's portable runner goes further: it
    runs a stateful stage on one SDK worker only (``fn_runner._get_bundle_manager``), and the
    model's steps fuse into the chipper's stage. A bounded job never paces, so it needs no
    state, and its tasks are spread by a reshuffle instead of a key.
    """

    def process(self, task: StripTask) -> Iterator:
        yield from self.chip(task)


class _ChipStripFn(_TileReader):
    """A strip task, keyed on its own, -> its chips and report.

    Keying each task apart is what spreads a tile over workers. With ``--max_chips_in_flight``
    a task that would run ahead of the model is parked in state and retried on a timer, so its
    thread (and the bundle, whose chips reach the model only when it commits) moves on.
    """

    TASK = ReadModifyWriteStateSpec("task", PickleCoder())
    RETRY = TimerSpec("retry", TimeDomain.REAL_TIME)
    # A drain (the input's watermark passes the end of the global window) chips a parked task
    # at once: the job finishes what it read, unpaced (docs/operations.md, "What a drain does").
    END_OF_INPUT = TimerSpec("end_of_input", TimeDomain.WATERMARK)

    def process(self, element: tuple[str, StripTask], parked=beam.DoFn.StateParam(TASK),
                retry=beam.DoFn.TimerParam(RETRY),
                end=beam.DoFn.TimerParam(END_OF_INPUT)) -> Iterator:
        _, task = element
        if self._may_start():
            yield from self._run(task)
        else:
            parked.write(task)
            retry.set(Timestamp.of(time.time() + pacing.PACE_RETRY_SECS))
            end.set(GlobalWindow().max_timestamp())

    @on_timer(END_OF_INPUT)
    def on_end_of_input(self, parked=beam.DoFn.StateParam(TASK),
                        retry=beam.DoFn.TimerParam(RETRY)) -> Iterator:
        task = parked.read()
        parked.clear()
        retry.clear()
        if task is not None:
            yield from self._run(task)

    @on_timer(RETRY)
    def on_retry(self, parked=beam.DoFn.StateParam(TASK),
                 retry=beam.DoFn.TimerParam(RETRY)) -> Iterator:
        task = parked.read()
        if task is None:
            return
        if self._may_start():
            parked.clear()
            yield from self._run(task)
        else:
            retry.set(Timestamp.of(time.time() + pacing.PACE_RETRY_SECS))

    def _may_start(self) -> bool:
        # Never wait here: the in-process runner has one worker thread, and this bundle's chips
        # reach the model only once it commits.
        limit = self._s.max_chips_in_flight
        return not limit or pacing.in_flight().admits(limit, wait=0)

    def _run(self, task: StripTask) -> Iterator:
        for item in self.chip(task):
            if self._s.max_chips_in_flight and isinstance(item, ChipBlock):
                pacing.in_flight().add(len(item))
            yield item


class _MergeReportsFn(beam.DoFn):
    """The reports of a tile's strip tasks -> its manifest, once all of them are in."""

    REPORTS = BagStateSpec("reports", PickleCoder())

    def process(self, element: tuple[str, StripReport],
                reports=beam.DoFn.StateParam(REPORTS)) -> Iterator[TileManifest]:
        _, report = element
        reports.add(report)
        held = list(reports.read())
        if len({r.task.index for r in held}) == report.task.count:
            reports.clear()
            yield merge_reports(held)


class ChippedTiles(NamedTuple):
    chips: beam.PCollection  # ChipBlock, one per strip task that cut any chip
    reports: beam.PCollection  # StripReport, one per strip task, as soon as it is read
    manifests: beam.PCollection  # TileManifest, once all strips of a tile are read
    dead_letters: beam.PCollection


class ChipTiles(beam.PTransform):
    """TileRef -> strip tasks -> (spread over workers) -> blocks of chips, plus one manifest
    per tile.

    The planner opens each tile once for its header and guards; its strip tasks are then keyed
    one by one, which shuffles them: on Dataflow a big tile is read by many workers, and its first
    chips are scored while later strips are still being read.
    """

    def __init__(self, settings: ChipSettings, streaming: bool = True):
        super().__init__()
        self._settings = settings
        self._streaming = streaming

    def expand(self, tiles) -> ChippedTiles:
        planned = tiles | "PlanStrips" >> beam.ParDo(_PlanStripsFn(self._settings)).with_outputs(
            DEAD_LETTER_TAG, main="tasks")
        if self._streaming:
            tasks = (planned.tasks
                     | "ByTask" >> beam.Map(lambda t: (f"{t.tile.assignment_key}#{t.index}", t))
                     .with_output_types(KEYED))
            fn: beam.DoFn = _ChipStripFn(self._settings)
        else:  # a backfill: spread the tasks over workers, no state (see _ChipStripOnceFn)
            tasks = planned.tasks | "SpreadTasks" >> beam.Reshuffle()
            fn = _ChipStripOnceFn(self._settings)
        chipped = tasks | "ChipStrips" >> beam.ParDo(fn).with_outputs(REPORTS_TAG, main="chips")
        chips, reports = chipped.chips, chipped[REPORTS_TAG]
        if not self._streaming:  # else the stateful merge fuses into the chipper's stage
            reports = reports | "GatherReports" >> beam.Reshuffle()
        manifests = (reports
                     | "ByTile" >> beam.Map(lambda r: (r.task.tile.assignment_key, r))
                     .with_output_types(KEYED)
                     | "MergeReports" >> beam.ParDo(_MergeReportsFn()))
        return ChippedTiles(chips, reports, manifests, planned[DEAD_LETTER_TAG])

