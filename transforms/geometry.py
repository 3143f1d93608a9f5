"""The chip grid and its strips, as pure functions: the one tiling rule of the stream.

Chips start at ``0, stride, 2*stride, ...`` until one reaches the far edge (edge chips are
padded). A *strip* is a run of whole chip rows, about ``STRIP_ROWS`` pixel rows tall and at most
about ``STRIP_PIXELS`` pixels: the chipper reads strip ``j`` as one task, and assembly blends and
writes output strip ``j`` from the chips that overlap it, so a strip task reports exactly on its
output strip's rows. Everything here is a function of the grid ``(height, width, size, stride)``
(cached, so that asking once per arriving piece costs nothing), plus chip footprints in EPSG:4326.

No Beam and no I/O: the chipper (``transforms/chips.py``), assembly (``transforms/assemble.py``)
and their tests share these answers.
"""

from __future__ import annotations

import functools
import math

import numpy as np

STRIP_ROWS = 512  # a strip is whole chip rows, about this many pixel rows tall
STRIP_PIXELS = 2_000_000  # ... and at most about this many pixels: 512 rows of an HLS tile


def chip_starts(length: int, size: int, stride: int) -> list[int]:
    """Offsets along one axis so that chips of ``size`` every ``stride`` cover ``length``."""
    if length <= size:
        return [0]
    return [i * stride for i in range(math.ceil((length - size) / stride) + 1)]


def chip_rows_per_strip(width: int, stride: int) -> int:
    """Chip rows in one strip: about ``STRIP_ROWS`` pixel rows, fewer for a tile wider than an
    HLS tile, so that what a strip holds (its read, its block of chips, its blend) is the same
    however wide the tile is."""
    return max(1, min(STRIP_ROWS // stride, STRIP_PIXELS // (stride * width)))


@functools.lru_cache(maxsize=256)
def strip_chip_rows(height: int, width: int, size: int, stride: int) -> tuple[tuple[int, int],
                                                                               ...]:
    """``(first, stop)`` chip-row numbers of each strip: what each strip task reads."""
    rows = len(chip_starts(height, size, stride))
    group = chip_rows_per_strip(width, stride)
    return tuple((first, min(first + group, rows)) for first in range(0, rows, group))


@functools.lru_cache(maxsize=256)
def strip_bounds(height: int, width: int, size: int, stride: int) -> tuple[tuple[int, int], ...]:
    """Pixel rows ``(start, end)`` of each output strip; strips partition the tile's rows.

    Boundaries sit on chip-row starts, so each chip has one own strip (where its first row
    falls) and overlaps at most the next ones.
    """
    starts = chip_starts(height, size, stride)
    firsts = [starts[first] for first, _ in strip_chip_rows(height, width, size, stride)]
    return tuple((start, firsts[j + 1] if j + 1 < len(firsts) else height)
                 for j, start in enumerate(firsts))


def strips_touched(chip_row: int, chip_height: int,
                   bounds: tuple[tuple[int, int], ...]) -> list[int]:
    """Strips that pixel rows ``chip_row .. chip_row + chip_height`` of a chip overlap."""
    return [j for j, (start, end) in enumerate(bounds)
            if start < chip_row + chip_height and end > chip_row]


def own_strip(chip_row: int, bounds: tuple[tuple[int, int], ...]) -> int:
    """The strip a chip is counted in: where its first row falls."""
    return next(j for j, (start, end) in enumerate(bounds) if start <= chip_row < end)


@functools.lru_cache(maxsize=1024)
def rows_touching(height: int, width: int, size: int, stride: int,
                  strip: int) -> frozenset[int]:
    """Chip-row numbers whose chips overlap strip ``strip``: the strip tasks it waits for."""
    bounds = strip_bounds(height, width, size, stride)
    return frozenset(r for r, row in enumerate(chip_starts(height, size, stride))
                     if strip in strips_touched(row, min(size, height - row), bounds))


@functools.lru_cache(maxsize=1024)
def expected_in_strip(height: int, width: int, size: int, stride: int,
                      per_row: tuple[int, ...], strip: int, own_only: bool = False) -> int:
    """Chips strip ``strip`` waits for, given the chips emitted from each chip row
    (``per_row``): from every chip row overlapping it, or (``own_only``) only those counted in
    it. Summed over all strips, the ``own_only`` counts are every chip exactly once."""
    bounds = strip_bounds(height, width, size, stride)
    total = 0
    for r, row in enumerate(chip_starts(height, size, stride)):
        if own_only:
            hit = own_strip(row, bounds) == strip
        else:
            hit = strip in strips_touched(row, min(size, height - row), bounds)
        total += per_row[r] if hit else 0
    return total


def footprint_wkt(transform, crs, row: int, col: int, height: int, width: int,
                  points_per_edge: int = 4) -> str:
    """EPSG:4326 polygon (lon/lat, counter-clockwise) of a pixel window, edges densified."""
    return strip_footprints(transform, crs, [(row, height)], [col], [width], points_per_edge)[0][0]


def strip_footprints(transform, crs, rows: list[tuple[int, int]], cols: list[int],
                     widths: list[int], points_per_edge: int = 4) -> list[list[str]]:
    """:func:`footprint_wkt` of every chip window of a strip, one list per chip row of ``rows``
    (each ``(first pixel row, height)``), with one reprojection call for them all.

    Each outline walks the window counter-clockwise in map space: left edge down, bottom edge
    right, right edge up, top edge left (rows grow downwards).
    """
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


def footprint_geojson(footprint_wkt: str) -> dict:
    """A footprint (WKT, EPSG:4326) as a GeoJSON geometry (RFC 7946)."""
    from shapely import wkt
    from shapely.geometry import mapping

    geometry = mapping(wkt.loads(footprint_wkt))
    return {"type": geometry["type"], "coordinates": _lists(geometry["coordinates"])}


def footprint_bbox(geojson: dict) -> list[float]:
    """``[west, south, east, north]`` of a GeoJSON footprint."""
    from shapely.geometry import shape

    return [float(v) for v in shape(geojson).bounds]


def _lists(value):
    """Shapely's nested tuples as JSON's nested lists."""
    return [_lists(v) for v in value] if isinstance(value, (tuple, list)) else float(value)
