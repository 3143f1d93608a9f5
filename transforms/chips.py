"""Stage 4: TileRef -> strip tasks -> ChipBlocks, read with rasterio windows a strip at a time.

A planner opens each tile once and cuts it into strip tasks of about ``STRIP_ROWS`` rows (fewer
on a tile wider than an HLS tile: a strip holds at most ~``STRIP_PIXELS``); each task is keyed
on its own, so a runner spreads one tile's tasks over its workers. A task reads
its rows in one window, so memory follows a strip, never the whole tile, emits its chips as one
block (the runner's per-element cost is paid per strip, not per chip) and reports what it
found; the tile's manifest is the merge of its reports. The chip grid covers every pixel: starts
are ``0, stride, 2*stride, ...`` until a chip reaches the far edge, and edge chips are padded
(padding is invalid and ignored downstream). Chips whose valid-pixel fraction is under the
threshold are skipped and counted in the tile's manifest, never lost.

Before a pixel is read, a tile must pass its guards: URIs in the input allow-list, GeoTIFF only
(no VRT or other indirection), a header within ``--max_tile_pixels``, no complex bands, and a
sample (overviews, or a grid of single-block windows) whose values mostly lie in the card's
valid range. Transient storage errors are
retried with backoff and jitter; a bucket that keeps failing opens a circuit breaker that pauses
reading from it rather than burning every tile on it. Any other exception about a tile is that
tile's dead letter.
"""

from __future__ import annotations

import functools
import math
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

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
from apache_beam.utils.timestamp import Timestamp

from model.card import CardError, ModelCard
from transforms.deadletter import DEAD_LETTER_TAG, dead_letter
from transforms.guards import DEFAULT_MAX_TILE_PIXELS, InputAllowList, Refused, describe
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
STRIP_ROWS = 512  # a strip task is whole chip rows, about this many pixel rows tall
STRIP_PIXELS = 2_000_000  # ... and at most about this many pixels: 512 rows of an HLS tile
# Only GeoTIFF (COGs included) is opened: VRT and other formats can point anywhere.
DRIVER = "GTiff"
# GDAL settings for reading COGs from object storage: no directory listing, bounded waits, a few
# retries of its own (the delay doubles each time) under ours.
GDAL_ENV = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff",
    "GDAL_HTTP_TIMEOUT": "30",
    "GDAL_HTTP_CONNECTTIMEOUT": "10",
    "GDAL_HTTP_LOW_SPEED_TIME": "15",
    "GDAL_HTTP_LOW_SPEED_LIMIT": "1",
    "GDAL_HTTP_MAX_RETRY": "2",
    "GDAL_HTTP_RETRY_DELAY": "0.5",
}
PREVIEW_PIXELS = 256  # long side of the decimated radiometry preview (overviews, small files)
PREVIEW_GRID = 3  # a big file without overviews: a 3 x 3 grid of windows, one block each,
PREVIEW_WINDOW = 128  # of at most 128 x 128 pixels (147,456 sampled pixels in all)
PREVIEW_ROWS = 16  # a file whose preview fails: the first readable of this many chip rows
_TRANSIENT = re.compile(
    r"HTTP (?:response )?code:? ?(?:429|5\d\d)|couldn't connect|"
    r"connection (?:refused|reset)|timed? ?out|empty reply|failed to connect|"
    r"server returned nothing", re.IGNORECASE)
T = TypeVar("T")


class TransientReadError(OSError):
    """Storage kept failing with errors that are usually temporary."""


def is_transient(exc: BaseException) -> bool:
    return not isinstance(exc, Refused | CardError) and bool(_TRANSIENT.search(str(exc)))


@dataclass
class CircuitBreaker:
    """Per bucket: after ``threshold`` consecutive transient failures, pause reading from it.

    While open, readers wait (the stream slows down instead of dead-lettering every tile of an
    unhealthy bucket); after the cool-down one read is let through, and each failure of that
    probe doubles the cool-down up to ``max_cooldown``.
    """

    threshold: int = 3
    cooldown: float = 5.0
    max_cooldown: float = 60.0
    _failures: dict[str, int] = field(default_factory=dict)
    _open_until: dict[str, float] = field(default_factory=dict)

    def wait(self, bucket: str, deadline: float) -> None:
        until = self._open_until.get(bucket, 0.0)
        now = time.monotonic()
        if until > now:
            time.sleep(max(0.0, min(until, deadline) - now))

    def is_open(self, bucket: str) -> bool:
        return self._open_until.get(bucket, 0.0) > time.monotonic()

    def success(self, bucket: str) -> None:
        self._failures.pop(bucket, None)
        self._open_until.pop(bucket, None)

    def failure(self, bucket: str) -> None:
        failures = self._failures.get(bucket, 0) + 1
        self._failures[bucket] = failures
        if failures >= self.threshold:
            pause = min(self.max_cooldown, self.cooldown * 2 ** (failures - self.threshold))
            self._open_until[bucket] = time.monotonic() + pause


@functools.lru_cache(maxsize=1)
def _gdal_library():
    """The GDAL shared library rasterio runs on (its wheel bundles one), for cache control."""
    import ctypes
    import ctypes.util
    import glob
    import os

    import rasterio

    bundled = glob.glob(os.path.join(os.path.dirname(rasterio.__file__), os.pardir,
                                     "rasterio.libs", "libgdal*"))
    path = bundled[0] if bundled else ctypes.util.find_library("gdal")
    return ctypes.CDLL(path) if path else None


def forget_cached_reads(uris: tuple[str, ...]) -> None:
    """Make GDAL forget what it cached about these objects (a failed answer included).

    GDAL remembers a failed request for an object, so without this a retry never reaches the
    server again and a transient error becomes permanent.
    """
    gdal = _gdal_library()
    if gdal is None:
        return
    for uri in uris:
        if uri.startswith("gs://"):
            gdal.VSICurlPartialClearCache(("/vsigs/" + uri[len("gs://"):]).encode())


def bucket_of(uri: str) -> str:
    return uri[len("gs://"):].split("/", 1)[0] if uri.startswith("gs://") else "(local)"


def chip_starts(length: int, size: int, stride: int) -> list[int]:
    """Offsets along one axis so that chips of ``size`` every ``stride`` cover ``length``."""
    if length <= size:
        return [0]
    return [i * stride for i in range(math.ceil((length - size) / stride) + 1)]


def chip_rows_per_strip(width: int, stride: int) -> int:
    """Chip rows in one strip task (and one output strip): about ``STRIP_ROWS`` pixel rows, fewer
    for a tile wider than an HLS tile, so that what a strip holds (its read, its block of chips,
    its blend) is the same however wide the tile is."""
    return max(1, min(STRIP_ROWS // stride, STRIP_PIXELS // (stride * width)))


def chip_grid(height: int, width: int, size: int, stride: int) -> list[tuple[int, int]]:
    cols = chip_starts(width, size, stride)
    return [(r, c) for r in chip_starts(height, size, stride) for c in cols]


def footprint_wkt(transform, crs, row: int, col: int, height: int, width: int,
                  points_per_edge: int = 4) -> str:
    """EPSG:4326 polygon (lon/lat, counter-clockwise) of a pixel window, edges densified."""
    from rasterio.warp import transform as warp

    steps = np.linspace(0.0, 1.0, points_per_edge + 1)[:-1]
    # Walk the window's outline counter-clockwise in map space: left edge down, bottom edge
    # right, right edge up, top edge left (rows grow downwards).
    rows = np.concatenate([row + steps * height, np.full_like(steps, row + height),
                           row + height - steps * height, np.full_like(steps, row)])
    cols = np.concatenate([np.full_like(steps, col), col + steps * width,
                           np.full_like(steps, col + width), col + width - steps * width])
    xs, ys = transform @ (cols, rows)
    lons, lats = warp(crs, "EPSG:4326", list(xs), list(ys))
    ring = [*zip(lons, lats, strict=True), (lons[0], lats[0])]
    return "POLYGON((" + ", ".join(f"{x:.7f} {y:.7f}" for x, y in ring) + "))"


def strip_footprints(transform, crs, rows: list[tuple[int, int]], cols: list[int],
                     widths: list[int], points_per_edge: int = 4) -> list[list[str]]:
    """:func:`footprint_wkt` of every chip window of a strip task, one list per chip row of
    ``rows`` (each ``(first pixel row, height)``), with one reprojection call for them all."""
    from rasterio.warp import transform as warp

    steps = np.linspace(0.0, 1.0, points_per_edge + 1)[:-1]
    n = len(steps)
    top = np.repeat(np.asarray([r for r, _ in rows], float), len(cols))[:, None]
    h = np.repeat(np.asarray([h for _, h in rows], float), len(cols))[:, None]
    col0 = np.tile(np.asarray(cols, float), len(rows))[:, None]
    w = np.tile(np.asarray(widths, float), len(rows))[:, None]
    ones = np.ones((len(top), n))
    rings = len(top)
    pixel_rows = np.concatenate([top + steps * h, (top + h) * ones, top + h - steps * h,
                                 top * ones], 1)
    pixel_cols = np.concatenate([col0 * ones, col0 + steps * w, (col0 + w) * ones,
                                 col0 + w - steps * w], 1)
    xs, ys = transform @ (pixel_cols.ravel(), pixel_rows.ravel())
    lons, lats = (np.asarray(v).reshape(rings, 4 * n)
                  for v in warp(crs, "EPSG:4326", list(xs), list(ys)))
    ring = np.empty((rings, 4 * n + 1, 2))  # closed rings of (lon, lat), one per chip
    ring[:, :-1, 0], ring[:, :-1, 1] = lons, lats
    ring[:, -1] = ring[:, 0]
    polygon = _polygon_format(4 * n + 1)
    outlines = [polygon % tuple(points) for points in ring.reshape(rings, -1).tolist()]
    return [outlines[i : i + len(cols)] for i in range(0, rings, len(cols))]


@functools.lru_cache(maxsize=8)
def _polygon_format(points: int) -> str:
    """One ``%`` format for a whole ring: a single C-level call per chip instead of one
    f-string per coordinate (the per-chip formatting was most of the footprint cost)."""
    return "POLYGON((" + ", ".join(["%.7f %.7f"] * points) + "))"


def pixel_area_m2(transform, crs, height: int, width: int) -> float:
    """Area of one pixel: exact for projected CRSs, spherical at the tile centre for geographic."""
    from rasterio.warp import transform as warp

    cell = abs(transform.a * transform.e - transform.b * transform.d)
    if crs.is_projected:
        metres = crs.linear_units_factor[1]
        return cell * metres * metres
    x, y = transform * (width / 2, height / 2)
    centre_lat = warp(crs, "EPSG:4326", [x], [y])[1][0]
    return cell * 111_320.0 * math.cos(math.radians(centre_lat)) * 110_574.0


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
        self.datasets = [stack.enter_context(_open(uri)) for uri in tile.band_uris]
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
        ``PREVIEW_GRID``² grid of windows spread over the tile is read instead, each inside one
        block, and returned side by side as ``(C, 1, n)``.
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
        side = min(block_h, block_w, PREVIEW_WINDOW)
        windows = []
        for i in range(PREVIEW_GRID):
            for j in range(PREVIEW_GRID):
                row = int((i + 0.5) * self.height / PREVIEW_GRID) // block_h * block_h
                col = int((j + 0.5) * self.width / PREVIEW_GRID) // block_w * block_w
                windows.append(Window(col, row, min(side, self.width - col),
                                      min(side, self.height - row)))
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


def _open(uri: str):
    """Open as GeoTIFF only; anything else (a VRT named .tif, HTML, junk) is refused by name."""
    import rasterio

    try:
        return rasterio.open(uri, driver=DRIVER)
    except rasterio.errors.RasterioIOError as exc:
        if "not recognized as being in a supported file format" in str(exc):
            raise Refused(f"{uri} is not a GeoTIFF (only GeoTIFF/COG is read; VRT and other "
                          "formats are refused)") from exc
        if re.search(r"HTTP response code: 404|No such file", str(exc)):
            raise Refused(f"{uri} does not exist") from exc
        raise


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


def check_radiometry(preview: np.ndarray, invalid: np.ndarray, card: ModelCard, scale: float,
                     offset: float, max_out_of_range: float, uri: str) -> None:
    """Refuse a tile whose (rescaled) values mostly lie outside the card's valid input range."""
    valid_range = card.input.valid_range
    if valid_range is None:
        return
    values = preview[:, ~invalid].astype(np.float64) * scale + offset
    if values.size == 0:
        return
    low, high = valid_range
    outside = float(((values < low) | (values > high)).mean())
    if outside > max_out_of_range:
        p1, p99 = np.percentile(values, [1, 99])
        raise Refused(
            f"{uri}: {outside:.0%} of sampled values lie outside the model's valid input range "
            f"[{low:g}, {high:g}] (observed min {values.min():g}, p1 {p1:g}, p99 {p99:g}, max "
            f"{values.max():g}, after scale {scale:g} and offset {offset:g}); rescale with "
            "--input_scale/--input_offset or the announcement attributes input_scale/input_offset")


def strip_band_counts(reference, strip: np.ndarray, invalid: np.ndarray, card: ModelCard,
                      scale: float, offset: float) -> list[np.ndarray]:
    """Drift bins of one strip's valid pixels (after the input and card scaling): a pure
    function whose results add up over the strips of a tile, so drift needs no second read."""
    from model.drift import band_counts

    if strip.dtype.kind in "ui" and strip.dtype.itemsize <= 2:
        return _integer_band_counts(reference, strip, invalid, card, scale, offset)
    values = strip[:, ~invalid].astype(np.float64) * scale + offset
    return band_counts(reference, values * card.input.scale + card.input.offset)


def _integer_band_counts(reference, strip: np.ndarray, invalid: np.ndarray, card: ModelCard,
                         scale: float, offset: float) -> list[np.ndarray]:
    """:func:`strip_band_counts` for 8- and 16-bit rasters: count each distinct value once
    (a histogram of the raw values), then bin the values, not every pixel. Each value goes
    through the same float64 arithmetic as the general path, so the counts are identical."""
    unsigned = np.dtype(f"u{strip.dtype.itemsize}")
    codes = strip.view(unsigned)  # signed values by their bit patterns: bincount wants >= 0
    levels = 1 << (8 * strip.dtype.itemsize)
    values = np.arange(levels, dtype=unsigned).view(strip.dtype).astype(np.float64)
    values = (values * scale + offset) * card.input.scale + card.input.offset
    counts = []
    for band, column in zip(reference.bands, codes, strict=True):
        per_value = np.bincount(column.ravel(), minlength=levels)
        if invalid.any():
            per_value -= np.bincount(column[invalid], minlength=levels)
        edges = np.asarray(band.edges)
        bins = np.searchsorted(edges, values, side="left")
        counts.append(np.bincount(bins, weights=per_value, minlength=len(edges) + 1)
                      .round().astype(np.int64))
    return counts


class InFlight:
    """Chips cut but not yet back from the model, in this process: the chipper's pacing.

    Beam's in-process runner has no back-pressure: a fast chipper would cut a whole tile while the
    model scores its first batches, and memory would follow the tile. With ``--max_chips_in_flight``
    a strip task waits (parked, not blocking its thread) until the model has caught up.
    Dataflow paces bundles itself, so the default there is no limit.
    """

    def __init__(self):
        self._count = 0
        self._returned_at = time.monotonic()
        self._changed = threading.Condition()

    def add(self, n: int) -> None:
        with self._changed:
            if self._count == 0:
                self._returned_at = time.monotonic()
            self._count += n

    def done(self, n: int = 1) -> None:
        with self._changed:
            self._count = max(0, self._count - n)
            self._returned_at = time.monotonic()
            self._changed.notify_all()

    def admits(self, limit: int, wait: float) -> bool:
        """Whether a task may start: under ``limit`` (waiting up to ``wait`` seconds for it),
        or nothing has come back for ``PACE_STALL_SECS`` (a lost count must never stop the
        chipper for good: it is pacing, not accounting)."""
        with self._changed:
            return self._changed.wait_for(
                lambda: (self._count < limit
                         or time.monotonic() - self._returned_at > PACE_STALL_SECS), wait)


IN_FLIGHT = InFlight()
OPEN_TILES = 4  # a strip reader keeps this many tiles' rasters open within a bundle
PACE_RETRY_SECS = 0.1  # a parked strip task is retried this often
PACE_STALL_SECS = 10.0  # no chip back from the model for this long: start anyway


class _TileReader(beam.DoFn):
    """Opening a tile's rasters under the guards, with retries, a breaker and metrics."""

    def __init__(self, settings: ChipSettings):
        self._s = settings
        self._breaker = CircuitBreaker()
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
        with rasterio.Env(**GDAL_ENV):  # kept open: a reader that chips the tile too reuses it
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
                check_radiometry(sample, src.invalid(sample), self._s.card, scale, offset,
                                 self._s.max_out_of_range, ", ".join(tile.band_uris))
            grid = TileGrid(src.height, src.width, tuple(src.transform)[:6], src.crs.to_wkt(),
                            pixel_area_m2(src.transform, src.crs, src.height, src.width),
                            size, stride)
        group = chip_rows_per_strip(src.width, stride)
        firsts = list(range(0, len(starts), group))
        return [StripTask(tile, grid, i, len(firsts), first, min(first + group, len(starts)))
                for i, first in enumerate(firsts)]

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
            with rasterio.Env(**GDAL_ENV):
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
        except Exception as exc:  # could not open it at all: every row not yet cut fails
            self.close_sources(tile.band_uris)  # a handle that failed is not reused
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
        if tile.band_uris not in cache:
            while len(cache) >= OPEN_TILES:
                self.close_sources(next(iter(cache)))
            stack = ExitStack()  # opened under the caller's rasterio.Env(**GDAL_ENV)
            try:
                cache[tile.band_uris] = (stack, _Sources(tile, self._s, stack))
            except BaseException:
                stack.close()
                raise
        return cache[tile.band_uris][1]

    def close_sources(self, uris: tuple[str, ...] | None = None) -> None:
        """Close the kept rasters of one tile (``uris``), or all of them."""
        cache = self.__dict__.get("_open", {})
        for key in [uris] if uris is not None else list(cache):
            entry = cache.pop(key, None)
            if entry is not None:
                entry[0].close()

    def finish_bundle(self):
        self.close_sources()

    def teardown(self):
        self.close_sources()

    def _with_retries(self, tile: TileRef, deadline: float, read: Callable[[], T]) -> T:
        """``read()``, retried on transient storage errors with backoff, jitter and a breaker."""
        bucket = bucket_of(tile.band_uris[0])
        attempt = 0
        while True:
            self._breaker.wait(bucket, deadline)
            try:
                result = read()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._breaker.failure(bucket)
                attempt += 1
                delay = min(8.0, 0.25 * 2 ** attempt) * random.uniform(0.5, 1.5)
                if time.monotonic() + delay > deadline:
                    raise TransientReadError(
                        f"{describe(exc)} (still failing after {attempt} attempt(s) over "
                        f"{self._s.read_budget_secs:.0f}s; bucket {bucket} "
                        f"{'paused' if self._breaker.is_open(bucket) else 'flaky'})") from exc
                self.retries.inc()
                time.sleep(delay)
                forget_cached_reads(tile.band_uris)
                continue
            self._breaker.success(bucket)
            return result


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
    reason = describe(exc)
    if not isinstance(exc, Refused):
        reason = f"cannot chip {', '.join(tile.band_uris)}: {reason}"
    return dead_letter(STAGE, reason, message_id=tile.message_id, tile_id=tile.tile_id,
                       payload=repr(tile))


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
            self.close_sources(tile.band_uris)
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
            self.close_sources(tile.band_uris)
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
            self.close_sources(tile.band_uris)
        self.tiles.inc()
        yield from tasks


class _ChipStripFn(_TileReader):
    """A strip task, keyed on its own, -> its chips and report.

    Keying each task apart is what spreads a tile over workers. With ``--max_chips_in_flight``
    a task that would run ahead of the model is parked in state and retried on a timer, so its
    thread (and the bundle, whose chips reach the model only when it commits) moves on.
    """

    TASK = ReadModifyWriteStateSpec("task", PickleCoder())
    RETRY = TimerSpec("retry", TimeDomain.REAL_TIME)

    def process(self, element: tuple[str, StripTask], parked=beam.DoFn.StateParam(TASK),
                retry=beam.DoFn.TimerParam(RETRY)) -> Iterator:
        _, task = element
        if self._may_start():
            yield from self._run(task)
        else:
            parked.write(task)
            retry.set(Timestamp.of(time.time() + PACE_RETRY_SECS))

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
            retry.set(Timestamp.of(time.time() + PACE_RETRY_SECS))

    def _may_start(self) -> bool:
        # Never wait here: the in-process runner has one worker thread, and this bundle's chips
        # reach the model only once it commits.
        limit = self._s.max_chips_in_flight
        return not limit or IN_FLIGHT.admits(limit, wait=0)

    def _run(self, task: StripTask) -> Iterator:
        for item in self.chip(task):
            if self._s.max_chips_in_flight and isinstance(item, ChipBlock):
                IN_FLIGHT.add(len(item))
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

    def __init__(self, settings: ChipSettings):
        super().__init__()
        self._settings = settings

    def expand(self, tiles) -> ChippedTiles:
        planned = tiles | "PlanStrips" >> beam.ParDo(_PlanStripsFn(self._settings)).with_outputs(
            DEAD_LETTER_TAG, main="tasks")
        chipped = (planned.tasks
                   | "ByTask" >> beam.Map(lambda t: (f"{t.tile.assignment_key}#{t.index}", t))
                   .with_output_types(KEYED)
                   | "ChipStrips" >> beam.ParDo(_ChipStripFn(self._settings)).with_outputs(
                       REPORTS_TAG, main="chips"))
        chips, reports = chipped.chips, chipped[REPORTS_TAG]
        manifests = (reports
                     | "ByTile" >> beam.Map(lambda r: (r.task.tile.assignment_key, r))
                     .with_output_types(KEYED)
                     | "MergeReports" >> beam.ParDo(_MergeReportsFn()))
        return ChippedTiles(chips, reports, manifests, planned[DEAD_LETTER_TAG])
