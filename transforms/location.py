"""Where a tile is, as a key that stays the same across revisits (docs/changes.md).

Change detection compares a location's acquisitions, so every tile row carries one key for the
place it covers, computed once (``transforms.sinks.tile_row``):

- ``MGRS:<zone><band><square>`` for HLS (S30 and L30) and Sentinel-2: the granule's MGRS tile,
  from its name (``HLS.S30.T23LLF...``, ``S2A_MSIL2A_..._T23LLF_...``, ``S2B_23LLF_...``) or its
  STAC properties (``mgrs:*`` or ``s2:mgrs_tile``);
- ``WRS2:<path>/<row>`` for Landsat Collection scenes (``LC08_L2SP_217065_...``) or their STAC
  properties (``landsat:wrs_path``/``landsat:wrs_row``);
- otherwise ``CELL:<lat>,<lon>``: the centroid of the footprint snapped to a 0.1 degree grid
  (about 11 km), so two crops of the same place by an announcement without a grid name share a
  key while tiles a grid cell apart do not.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

# An MGRS 100 km square: UTM zone, latitude band (no I, O), column letter (no I, O), row letter
# (A-V, no I, O); with an optional leading T, between separators, as the products write it.
_MGRS = re.compile(r"(?:^|[._])T?(\d{2}[C-HJ-NP-X][A-HJ-NP-Z][A-HJ-NP-V])(?=[._]|$)")
_MGRS_NAME = re.compile(r"\d{2}[C-HJ-NP-X][A-HJ-NP-Z][A-HJ-NP-V]")
# Landsat Collection 1/2 product ids: LXSS_LLLL_PPPRRR_YYYYMMDD_...
_WRS2 = re.compile(r"^L[CEOTM]0\d_[A-Z0-9]{4}_(\d{3})(\d{3})_\d{8}")
# The fallback grid: degrees per cell.
CELL_DEGREES = 0.1


def location_key(tile_id: str, footprint_wkt: str | None,
                 properties: Mapping[str, object] | None = None) -> str:
    """The key of the place ``tile_id`` covers (see the module docstring for the forms).

    ``properties`` come from the announcement (message attributes, STAC properties): a value
    that is not a well-formed grid name is ignored, never an error, so a hostile attribute can
    at worst fall back to the footprint's cell, not fail the tile's row."""
    props = properties or {}
    mgrs = _mgrs_of_properties(props)
    if mgrs:
        return f"MGRS:{mgrs}"
    path = _number(props.get("landsat:wrs_path"), 1, 251)
    row = _number(props.get("landsat:wrs_row"), 1, 248)
    if path is not None and row is not None:
        return f"WRS2:{path:03d}/{row:03d}"
    found = _WRS2.match(tile_id)
    if found:
        return f"WRS2:{found.group(1)}/{found.group(2)}"
    found = _MGRS.search(tile_id)
    if found:
        return f"MGRS:{found.group(1)}"
    return cell_key(footprint_wkt)


def _number(value: object, low: int, high: int) -> int | None:
    """A small whole number in [low, high] written as at most 3 digits, else None."""
    text = str(value) if isinstance(value, int | str) and not isinstance(value, bool) else ""
    return int(text) if re.fullmatch(r"\d{1,3}", text) and low <= int(text) <= high else None


def _mgrs_of_properties(props: Mapping[str, object]) -> str | None:
    tile = props.get("s2:mgrs_tile") or props.get("mgrs:tile")
    found = re.fullmatch(r"T?(\d{2}[C-HJ-NP-X][A-HJ-NP-Z][A-HJ-NP-V])", str(tile or ""))
    if found:
        return found.group(1)
    zone = _number(props.get("mgrs:utm_zone"), 1, 60)
    name = f"{zone or 0:02d}{props.get('mgrs:latitude_band')}{props.get('mgrs:grid_square')}"
    return name if zone is not None and _MGRS_NAME.fullmatch(name) else None


def cell_key(footprint_wkt: str | None) -> str:
    """``CELL:<lat>,<lon>`` of the footprint's centroid on the :data:`CELL_DEGREES` grid;
    ``CELL:unknown`` without a readable footprint (such tiles are never compared)."""
    if not footprint_wkt:
        return "CELL:unknown"
    try:
        from shapely import ops, wkt

        shape = wkt.loads(footprint_wkt)
        west, _, east, _ = shape.bounds
        if east - west > 180:  # cut at the antimeridian: one side moved by 360 degrees first
            shape = ops.transform(lambda x, y: (x % 360.0, y), shape)
        centroid = shape.centroid
        lon, lat = centroid.x, centroid.y
    except Exception:
        return "CELL:unknown"
    if not (math.isfinite(lon) and math.isfinite(lat)):
        return "CELL:unknown"
    lon = (lon + 180.0) % 360.0 - 180.0

    def snap(v: float) -> str:
        return f"{math.floor(v / CELL_DEGREES) * CELL_DEGREES:.1f}"

    return f"CELL:{snap(lat)},{snap(lon)}"
