"""STAC out: a prediction or change COG -> its STAC Item (docs/stac.md).

Beside every prediction COG the stream writes a STAC Item (projection, classification and
raster extensions) so that STAC browsers, odc-stac and stackstac find the predictions without
BigQuery; ``tilestream stac`` gathers them into a static catalog. The STAC Items the stream
reads as announcements are ``transforms/stac_read.py``.

Pure functions; no Beam or raster library import at module level.
"""

from __future__ import annotations

import datetime as dt
import json
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

from transforms.geometry import footprint_bbox, footprint_geojson
from transforms.guards import EARLIEST
from transforms.records import NODATA_CLASS

STAC_VERSION = "1.1.0"
EXTENSIONS = {
    "proj": "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
    "classification": "https://stac-extensions.github.io/classification/v1.1.0/schema.json",
    "raster": "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
}
COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"


def item_uri(raster_uri: str) -> str:
    """The STAC Item's URI: the prediction COG's, ``.json`` for ``.tif``."""
    stem, _ = posixpath.splitext(raster_uri)
    return stem + ".json"


def grid_centre(transform: Sequence[float], height: int, width: int,
                crs: str) -> dict[str, float] | None:
    """``proj:centroid``: the grid's centre pixel in lon/lat, from the grid itself (the centroid
    of a footprint cut at ±180° taken in lon/lat would land on the far side of the world); None
    when the CRS cannot be transformed."""
    from rasterio.warp import transform as warp

    a, b, c, d, e, f = (float(v) for v in transform[:6])
    x, y = a * width / 2 + b * height / 2 + c, d * width / 2 + e * height / 2 + f
    try:
        (lon,), (lat,) = warp(crs, "EPSG:4326", [x], [y])
    except Exception:  # a local or unknown CRS: the item is still whole without it
        return None
    return {"lat": round(lat, 7), "lon": round((lon + 180.0) % 360.0 - 180.0, 7)}


def _time_text(value: object) -> str | None:
    """BigQuery-ish or RFC 3339 time (string or datetime) -> RFC 3339 with ``Z``."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        stamp = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    else:
        stamp = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        stamp = stamp if stamp.tzinfo else stamp.replace(tzinfo=dt.UTC)
    return stamp.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def classification_classes(classes: Sequence[Any]) -> list[dict[str, Any]]:
    """The card's classes as ``classification:classes`` (name, description, colour)."""
    return [{"value": c.id, "name": c.name, "description": c.name.replace("_", " "),
             "color_hint": c.colour.lstrip("#").upper()} for c in classes]


def acquisition_time(row: Mapping[str, Any]) -> dict[str, Any]:
    """The item's time properties: ``datetime``, the acquisition time, when the announcement or
    the granule name gave one. Without it the item does not pretend (the publish time is not
    when the scene was seen): ``datetime`` null and, as STAC then requires, the interval the
    acquisition lies in: from the earliest time the stream accepts to the publish time."""
    acquired = _time_text(row.get("acquired"))
    if acquired:
        return {"datetime": acquired}
    return {"datetime": None, "start_datetime": _time_text(EARLIEST),
            "end_datetime": _time_text(row["event_time"]),
            "tilestream:acquisition": "unknown"}


def prediction_item(row: Mapping[str, Any], *, transform: Sequence[float], crs_wkt: str,
                    classes: Sequence[Any], confidence_band: bool, href: str) -> dict[str, Any]:
    """The STAC Item of one prediction COG, from its ``tiles`` row and grid.

    ``row`` is the row the stream writes to BigQuery; ``classes`` the card's ``ClassInfo``s.
    """
    geometry = footprint_geojson(row["footprint"])
    attributes = {a["key"]: a["value"] for a in row.get("attributes") or ()}
    crs = str(row["crs"])
    projection: dict[str, Any] = {"proj:code": crs if crs.startswith("EPSG:") else None,
                                  "proj:shape": [int(row["height"]), int(row["width"])],
                                  "proj:transform": [float(v) for v in transform[:6]]}
    if projection["proj:code"] is None:
        projection["proj:wkt2"] = crs_wkt
    centroid = grid_centre(transform, int(row["height"]), int(row["width"]),
                           projection["proj:code"] or crs_wkt)
    if centroid is not None:
        projection["proj:centroid"] = centroid
    resolution = abs(float(transform[0]))
    raster_bands: list[dict[str, Any]] = [{
        "name": "class", "data_type": "uint8", "nodata": NODATA_CLASS,
        "spatial_resolution": resolution,
        "classification:classes": classification_classes(classes)}]
    if confidence_band:
        raster_bands.append({"name": "confidence_percent", "data_type": "uint8", "nodata": 255,
                             "unit": "percent", "spatial_resolution": resolution})
    source = attributes.get("stac_item")
    derived = ([{"rel": "derived_from", "href": source, "type": "application/geo+json",
                 "title": "source STAC item"}] if source and "://" in source else
               [{"rel": "derived_from", "href": uri, "type": "image/tiff",
                 "title": "source raster"} for uri in row.get("source_uris") or ()])
    properties: dict[str, Any] = {
        **acquisition_time(row),
        "created": _time_text(row.get("completed_at")),
        **projection,
        "tilestream:tile_id": row["tile_id"],
        "tilestream:tile_generation": row["tile_generation"],
        "tilestream:model_name": row["model_name"],
        "tilestream:model_version": row["model_version"],
        "tilestream:complete": bool(row["complete"]),
        "tilestream:chips_total": int(row["chips_total"]),
        "tilestream:chips_scored": int(row["chips_scored"]),
        "tilestream:chips_skipped": int(row["chips_skipped"]),
        "tilestream:chips_failed": int(row["chips_failed"]),
        "tilestream:source": row.get("source"),
        "tilestream:class_area_m2": {c["name"]: c["area_m2"] for c in row.get("classes") or ()},
    }
    if row.get("sensor"):
        properties["platform"] = row["sensor"]
    if attributes.get("stac_collection"):
        properties["tilestream:source_collection"] = attributes["stac_collection"]
    return {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": list(EXTENSIONS.values()),
        "id": f"{row['tile_id']}_{row['tile_generation']}",
        "geometry": geometry,
        "bbox": footprint_bbox(geometry),
        "properties": properties,
        "links": [{"rel": "self", "href": href, "type": "application/geo+json"}, *derived],
        "assets": {"prediction": {
            "href": row["raster_uri"], "type": COG_MEDIA_TYPE,
            "title": f"{row['model_name']}/{row['model_version']} class map",
            "roles": ["data"], "raster:bands": raster_bands}},
    }


def write_prediction_item(row: Mapping[str, Any], manifest: Any, card: Any,
                          confidence_band: bool) -> tuple[str | None, str | None]:
    """Write the item beside the COG; returns (its URI, None) or (None, why it failed).

    A failed item write must not lose the tile: the caller still writes the row.
    """
    from apache_beam.io.filesystems import FileSystems

    uri = item_uri(row["raster_uri"])
    try:
        item = prediction_item(row, transform=manifest.transform, crs_wkt=manifest.crs_wkt,
                               classes=card.classes, confidence_band=confidence_band, href=uri)
        with FileSystems.create(uri, mime_type="application/geo+json") as out:
            out.write(json.dumps(item, indent=1).encode())
    except Exception as exc:  # storage errors must not kill the stream
        return None, f"writing the STAC item {uri} failed: {exc}"
    return uri, None


def change_item(*, before: Mapping[str, Any], after: Mapping[str, Any], href: str,
                raster_uri: str, transform: Sequence[float], crs: str, shape: tuple[int, int],
                class_names: Sequence[str], codes: Sequence[tuple[int, int, int]],
                ) -> dict[str, Any]:
    """The STAC Item of a change COG (``transforms/changes.py``): the after tile's footprint,
    the interval between the two acquisitions, and a ``classification:classes`` entry per
    from/to pair present (``value = from * K + to``), with its pixel count."""
    geometry = footprint_geojson(after["footprint"])
    k = len(class_names)
    epsg = crs if crs.startswith("EPSG:") else None
    projection: dict[str, Any] = {"proj:code": epsg, "proj:shape": [int(shape[0]),
                                                                     int(shape[1])],
                                  "proj:transform": [float(v) for v in transform[:6]]}
    if epsg is None:
        projection["proj:wkt2"] = crs
    classes = [{"value": f * k + t, "name": f"{class_names[f]}-to-{class_names[t]}",
                "description": f"{class_names[f]} before, {class_names[t]} after ({n} pixels)"}
               for f, t, n in codes]
    properties: dict[str, Any] = {
        "datetime": None, "start_datetime": before["acquired"], "end_datetime": after["acquired"],
        **projection,
        "tilestream:model": after["model"],
        "tilestream:before_tile_id": before["tile_id"],
        "tilestream:before_generation": before["generation"],
        "tilestream:after_tile_id": after["tile_id"],
        "tilestream:after_generation": after["generation"],
        "tilestream:change_encoding": f"from_class * {k} + to_class",
    }
    links = [{"rel": "self", "href": href, "type": "application/geo+json"}]
    links += [{"rel": "derived_from", "href": side["stac_uri"] or side["raster_uri"],
               "type": "application/geo+json" if side["stac_uri"] else COG_MEDIA_TYPE,
               "title": f"{which} prediction"}
              for which, side in (("before", before), ("after", after))]
    return {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": list(EXTENSIONS.values()),
        "id": f"{after['tile_id']}_{after['generation']}_change_from_{before['tile_id']}_"
              f"{before['generation']}",
        "geometry": geometry,
        "bbox": footprint_bbox(geometry),
        "properties": properties,
        "links": links,
        "assets": {"change": {
            "href": raster_uri, "type": COG_MEDIA_TYPE,
            "title": f"{after['model']} class change, from/to per pixel",
            "roles": ["data"], "raster:bands": [{
                "name": "change", "data_type": "uint8", "nodata": NODATA_CLASS,
                "spatial_resolution": abs(float(transform[0])),
                "classification:classes": classes}]}},
    }
