"""Raster I/O of the chipper: a tile's files opened under their header guards, the card's bands
mapped onto them, strips and a radiometry preview read, and the open handles kept per bundle.

Opening goes through ``transforms/storage.py`` (GeoTIFF only, generations pinned); which pixels
are nodata is ``transforms/chip_cut.py``'s pure :func:`~transforms.chip_cut.invalid_mask`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack

import numpy as np

from model.card import CardError, ModelCard
from transforms import storage
from transforms.chip_cut import invalid_mask
from transforms.guards import InputAllowList, Refused
from transforms.records import TileRef

PREVIEW_PIXELS = 256  # long side of the decimated radiometry preview (overviews, small files)
PREVIEW_GRID = 3  # a big file without overviews: a 3 x 3 grid of windows, on block edges,
PREVIEW_WINDOW = 128  # of at most 128 x 128 pixels (147,456 sampled pixels in all)
OPEN_TILES = 4  # a strip reader keeps this many tiles' rasters open within a bundle


def check_header(uri: str, ds, max_pixels: int) -> None:
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


class TileRasters:
    """The open rasters of one tile and which band of which file feeds each card band."""

    def __init__(self, tile: TileRef, card: ModelCard, allow: InputAllowList | None,
                 max_tile_pixels: int, stack: ExitStack):
        if allow is not None:
            for uri in tile.band_uris:
                allow.check(uri, "band file")
        self.datasets = [stack.enter_context(storage.open_geotiff(uri)) for uri in tile.band_uris]
        for uri, ds in zip(tile.band_uris, self.datasets, strict=True):
            check_header(uri, ds, max_tile_pixels)
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
        return invalid_mask(values, self.nodata)


def opened(tile: TileRef) -> tuple:
    """What a kept raster handle is: these URIs at these generations."""
    return tile.band_uris, tile.band_generations


class RasterCache:
    """The open rasters of the last ``OPEN_TILES`` tiles, kept across their strip tasks within
    a bundle: GDAL's block cache belongs to an open dataset, and neighbouring tasks share a block
    row (the chips overlapping their boundary), which a fresh handle would decode again."""

    def __init__(self, size: int = OPEN_TILES):
        self._size = size
        self._open: dict[tuple, tuple[ExitStack, TileRasters]] = {}

    def get(self, tile: TileRef, open_: Callable[[ExitStack], TileRasters]) -> TileRasters:
        """The tile's kept rasters, or ``open_(stack)``'s, kept (the oldest closed for room).
        Open under the caller's ``rasterio.Env(**storage.GDAL_ENV)``."""
        key = opened(tile)
        if key not in self._open:
            while len(self._open) >= self._size:
                self._close(next(iter(self._open)))
            stack = ExitStack()
            try:
                self._open[key] = (stack, open_(stack))
            except BaseException:
                stack.close()
                raise
        return self._open[key][1]

    def close(self, tile: TileRef | None = None) -> None:
        """Close the kept rasters of one tile, or all of them."""
        for key in [opened(tile)] if tile is not None else list(self._open):
            self._close(key)

    def _close(self, key: tuple) -> None:
        entry = self._open.pop(key, None)
        if entry is not None:
            entry[0].close()

    def __len__(self) -> int:
        return len(self._open)
