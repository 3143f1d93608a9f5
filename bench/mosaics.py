"""The benchmarks' tiles: the real sample tile repeated to any size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin


def mosaic(path: Path, height: int, width: int | None = None) -> Path:
    """The Olinda sample tiled to ``height`` x ``width`` (real texture, any size, quick to
    write), 512-px deflate blocks."""
    from pipeline.ops.check import SAMPLE_TILE

    width = width or height
    with rasterio.open(SAMPLE_TILE) as src:
        base, crs = src.read(), src.crs
    band = np.tile(base, (1, -(-512 // base.shape[1]), -(-width // base.shape[2])))[:, :512, :width]
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=6,
                       dtype="uint8", crs=crs, transform=from_origin(300000, 9200000, 28.5, 28.5),
                       tiled=True, blockxsize=512, blockysize=512, compress="deflate") as dst:
        for row in range(0, height, 512):
            rows = min(512, height - row)
            dst.write(band[:, :rows], window=((row, row + rows), (0, width)))
    return path
