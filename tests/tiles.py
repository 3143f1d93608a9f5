"""Test tiles built from the real Olinda Landsat-7 sample: crops, reprojections, per-band files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import rasterio
from rasterio.warp import Resampling, calculate_default_transform, reproject
from rasterio.windows import Window

from pipeline.ops.check import SAMPLE_TILE

BANDS = ("blue", "green", "red", "nir", "swir1", "swir2")
# HLS S30 tokens of those bands (the stream's default --band_aliases).
HLS_TOKENS = ("B02", "B03", "B04", "B8A", "B11", "B12")


def crop(out: Path, row: int, col: int, height: int, width: int, src: Path = SAMPLE_TILE,
         **profile_updates) -> Path:
    with rasterio.open(src) as s:
        window = Window(col, row, width, height)
        data = s.read(window=window)
        profile = s.profile | {"width": width, "height": height,
                               "transform": s.window_transform(window)} | profile_updates
    with rasterio.open(out, "w", **profile) as d:
        d.write(data)
    return out


def reprojected(out: Path, dst_crs: str, src: Path = SAMPLE_TILE, nodata: int = 0) -> Path:
    """The tile warped to another CRS; the rotated footprint leaves nodata corners."""
    with rasterio.open(src) as s:
        transform, width, height = calculate_default_transform(s.crs, dst_crs, s.width,
                                                               s.height, *s.bounds)
        profile = s.profile | {"crs": dst_crs, "transform": transform, "width": width,
                               "height": height, "nodata": nodata}
        with rasterio.open(out, "w", **profile) as d:
            for band in range(1, s.count + 1):
                reproject(rasterio.band(s, band), rasterio.band(d, band),
                          resampling=Resampling.nearest, dst_nodata=nodata)
    return out


def per_band_files(directory: Path, granule: str, src: Path) -> dict[str, Path]:
    """One single-band GeoTIFF per band, HLS-style names: ``{granule}.{B02..B12}.tif``."""
    files = {}
    with rasterio.open(src) as s:
        profile = s.profile | {"count": 1}
        for index, (band, token) in enumerate(zip(BANDS, HLS_TOKENS, strict=True), start=1):
            path = directory / f"{granule}.{token}.tif"
            with rasterio.open(path, "w", **profile) as d:
                d.write(s.read(index), 1)
            files[band] = path
    return files


def starts(length: int, size: int, stride: int) -> list[int]:
    """Chip offsets, written independently of transforms.chips for the tests' expectations."""
    offsets = [0]
    while offsets[-1] + size < length:
        offsets.append(offsets[-1] + stride)
    return offsets


def expected_chips(path: Path, size: int, stride: int, min_valid: float) -> tuple[int, int]:
    """(total, kept) chips of a raster: kept = valid fraction >= min_valid and > 0."""
    with rasterio.open(path) as s:
        data = s.read()
        nodata = s.nodata
    valid = np.ones(data.shape[1:], bool) if nodata is None else (data != nodata).all(axis=0)
    rows, cols = starts(data.shape[1], size, stride), starts(data.shape[2], size, stride)
    kept = 0
    for r in rows:
        for c in cols:
            window = valid[r : r + size, c : c + size]
            fraction = window.mean()
            if fraction > 0 and fraction >= min_valid:
                kept += 1
    assert len(rows) == math.ceil(max(data.shape[1] - size, 0) / stride) + 1
    return len(rows) * len(cols), kept


def placed(out: Path, crs: str, lon: float, lat: float, src: Path = SAMPLE_TILE) -> Path:
    """The tile's pixels on another grid, centred on ``(lon, lat)``: a UTM zone 60 or zone 1
    tile across ±180°, a UPS tile on the North Pole."""
    from affine import Affine
    from rasterio.warp import transform as warp

    with rasterio.open(src) as s:
        data, res = s.read(), s.res[0]
        (x,), (y,) = warp("EPSG:4326", crs, [lon], [lat])
        transform = Affine(res, 0.0, x - s.width * res / 2, 0.0, -res, y + s.height * res / 2)
        profile = s.profile | {"crs": crs, "transform": transform}
    with rasterio.open(out, "w", **profile) as d:
        d.write(data)
    return out
