"""Stage 4: TileRef -> Chips, read with rasterio windows one chip row at a time.

Memory follows a strip of ``chip_size`` rows across the tile, never the whole tile. The chip grid
covers every pixel: starts are ``0, stride, 2*stride, ...`` until a chip reaches the far edge, and
edge chips are padded (padding is invalid and ignored downstream). Chips whose valid-pixel
fraction is under the threshold are skipped and counted in the tile's manifest, never lost.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from model.card import CardError, ModelCard
from model.inference import normalise
from transforms.deadletter import DEAD_LETTER_TAG, dead_letter
from transforms.records import Chip, TileManifest, TileRef

STAGE = "chips"
MANIFESTS_TAG = "manifests"
# GDAL settings for reading COGs from object storage without listing their directory.
GDAL_ENV = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff",
}


def chip_starts(length: int, size: int, stride: int) -> list[int]:
    """Offsets along one axis so that chips of ``size`` every ``stride`` cover ``length``."""
    if length <= size:
        return [0]
    return [i * stride for i in range(math.ceil((length - size) / stride) + 1)]


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

    @classmethod
    def from_card(cls, card: ModelCard, chip_size: int = 0, stride: int = 0,
                  min_valid_fraction: float = 0.0) -> ChipSettings:
        size = chip_size or card.input.chip_size
        step = stride or (card.input.stride if not chip_size else size)
        if not 0 < step <= size:
            raise ValueError(f"stride must be in 1..chip_size ({size}), got {step}")
        if not 0.0 <= min_valid_fraction <= 1.0:
            raise ValueError(f"min_valid_fraction must be in [0, 1], got {min_valid_fraction}")
        return cls(card, size, step, min_valid_fraction)


class _Sources:
    """The open rasters of one tile and which band of which file feeds each card band."""

    def __init__(self, tile: TileRef, card: ModelCard, stack: ExitStack):
        import rasterio

        self.datasets = [stack.enter_context(rasterio.open(uri)) for uri in tile.band_uris]
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
        return np.stack([self.datasets[d].read(b, window=window) for d, b in self.band_map])


class ChipTileFn(beam.DoFn):
    """One tile -> its chips and manifest (also run directly by `tilestream check`, bench)."""

    def __init__(self, settings: ChipSettings):
        self._s = settings
        self.tiles = Metrics.counter("tilestream", "tiles_chipped")
        self.total = Metrics.counter("tilestream", "chips_total")
        self.skipped = Metrics.counter("tilestream", "chips_skipped")
        self.failed = Metrics.counter("tilestream", "chips_failed")
        self.strip_ms = Metrics.distribution("tilestream", "chip_strip_read_ms")

    def process(self, tile: TileRef) -> Iterator:
        import rasterio

        try:
            with rasterio.Env(**GDAL_ENV), ExitStack() as stack:
                sources = _Sources(tile, self._s.card, stack)
                yield from self._chip(tile, sources)
        except (OSError, CardError, ValueError, rasterio.errors.RasterioError) as exc:
            yield dead_letter(STAGE, f"cannot chip {', '.join(tile.band_uris)}: {exc}",
                              message_id=tile.message_id, tile_id=tile.tile_id,
                              payload=repr(tile))

    def _chip(self, tile: TileRef, src: _Sources) -> Iterator:
        from rasterio.windows import transform as window_transform

        size, stride = self._s.chip_size, self._s.stride
        rows = chip_starts(src.height, size, stride)
        cols = chip_starts(src.width, size, stride)
        area = pixel_area_m2(src.transform, src.crs, src.height, src.width)
        crs_wkt = src.crs.to_wkt()
        skipped = failed = 0
        for row_number, row in enumerate(rows):
            height = min(size, src.height - row)
            started = time.perf_counter()
            try:
                strip = src.read_strip(row, height)
            except Exception as exc:  # a corrupt block fails its strip, not the tile
                failed += len(cols)
                yield dead_letter(STAGE, f"read of rows {row}..{row + height} failed: {exc}",
                                  message_id=tile.message_id, tile_id=tile.tile_id)
                continue
            self.strip_ms.update(int((time.perf_counter() - started) * 1000))
            invalid_strip = np.zeros(strip.shape[1:], bool)
            for band, values in enumerate(src.nodata):
                for value in values:
                    invalid_strip |= strip[band] == value
            if np.issubdtype(strip.dtype, np.floating):
                invalid_strip |= ~np.isfinite(strip).all(axis=0)
            for col_number, col in enumerate(cols):
                index = row_number * len(cols) + col_number
                width = min(size, src.width - col)
                valid = np.zeros((size, size), bool)
                valid[:height, :width] = ~invalid_strip[:, col : col + width]
                fraction = float(valid.sum()) / (height * width)
                if fraction < self._s.min_valid_fraction or fraction == 0.0:
                    skipped += 1
                    continue
                raw = np.zeros((strip.shape[0], size, size), np.float32)
                raw[:, :height, :width] = strip[:, :, col : col + width]
                pixels = normalise(raw, valid, self._s.card.input)
                chip_tf = window_transform(((row, row + size), (col, col + size)), src.transform)
                yield Chip(
                    tile=tile,
                    index=index,
                    row=row,
                    col=col,
                    height=height,
                    width=width,
                    transform=tuple(chip_tf)[:6],
                    crs_wkt=crs_wkt,
                    footprint_wkt=footprint_wkt(src.transform, src.crs, row, col, height, width),
                    pixel_area_m2=area,
                    valid_fraction=fraction,
                    valid=valid,
                    chipped_at=time.time(),
                    pixels=pixels,
                )
        total = len(rows) * len(cols)
        self.tiles.inc()
        self.total.inc(total)
        self.skipped.inc(skipped)
        self.failed.inc(failed)
        yield beam.pvalue.TaggedOutput(
            MANIFESTS_TAG,
            TileManifest(
                tile=tile,
                height=src.height,
                width=src.width,
                transform=tuple(src.transform)[:6],
                crs_wkt=crs_wkt,
                pixel_area_m2=area,
                chip_size=size,
                stride=stride,
                chips_total=total,
                chips_skipped=skipped,
                chips_failed=failed,
                chipped_at=time.time(),
            ),
        )


class ChipTiles(beam.PTransform):
    """TileRef -> Chip (main), TileManifest (``manifests``), dead letters."""

    def __init__(self, settings: ChipSettings):
        super().__init__()
        self._settings = settings

    def expand(self, tiles):
        return tiles | beam.ParDo(ChipTileFn(self._settings)).with_outputs(
            MANIFESTS_TAG, DEAD_LETTER_TAG, main="chips"
        )
