"""STAC in and out: a STAC Item announcement -> TileRef; a prediction COG -> its STAC Item.

In: the people who feed TileStream publish HLS, Landsat and Sentinel-2 scenes as STAC Items. An
item's assets are matched to the model card's bands by ``eo:bands[].common_name`` (or STAC 1.1
``bands[].eo:common_name``), else by asset key through the stream's band aliases (the
``--band_preset``), so the public items work as published. Only ``gs://`` assets are accepted.

Out: beside every prediction COG the stream writes a STAC Item (projection, classification and
raster extensions) so that STAC browsers, odc-stac and stackstac find the predictions without
BigQuery; ``tilestream stac`` gathers them into a static catalog.

Pure functions; no Beam or raster library import at module level.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import posixpath
import re
from collections.abc import Mapping, Sequence
from typing import Any

from transforms.geometry import footprint_bbox, footprint_geojson
from transforms.guards import EARLIEST
from transforms.presets import COMMON_NAMES, PRESETS
from transforms.records import NODATA_CLASS, TileRef

STAC_VERSION = "1.1.0"
EXTENSIONS = {
    "proj": "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
    "classification": "https://stac-extensions.github.io/classification/v1.1.0/schema.json",
    "raster": "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
}
COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
MAX_TILE_ID = 200
MAX_ASSETS = 500
MAX_HREF = 2048
_SAFE = re.compile(r"[^A-Za-z0-9_.\-]+")
_DATA_ROLES = {"data", "reflectance"}
_RASTER_SUFFIXES = (".tif", ".tiff")


class StacItemError(ValueError):
    """A STAC Item announcement the stream cannot score; the message says why, as a sentence."""


# --- in ----------------------------------------------------------------------------------------

def is_stac_item(payload: object) -> bool:
    """A GeoJSON Feature with ``stac_version``: what STAC APIs and catalogues publish."""
    return (isinstance(payload, Mapping) and payload.get("type") == "Feature"
            and "stac_version" in payload)


def safe_tile_id(raw: object) -> str:
    """A STAC ``id`` made safe for output paths: ``[A-Za-z0-9_.-]``, no dot-only id, bounded.

    Other characters become ``_``; an id longer than the bound keeps its head and gains a hash of
    the whole, so two long ids never collide.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise StacItemError(f"STAC item id must be a non-empty string, got {str(raw)[:80]!r}")
    safe = _SAFE.sub("_", raw.strip()).strip("_")
    if len(safe) > MAX_TILE_ID:
        digest = hashlib.sha1(raw.encode()).hexdigest()[:12]
        safe = f"{safe[: MAX_TILE_ID - 13]}_{digest}"
    if not safe or set(safe) <= {"."}:
        raise StacItemError(f"STAC item id {raw[:80]!r} has no usable characters for a tile id")
    return safe


def _time(value: object, what: str, item_id: str) -> float:
    if not isinstance(value, str) or len(value) > 64:
        raise StacItemError(f"STAC item {item_id} has no usable {what} (got {str(value)[:40]!r})")
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise StacItemError(f"STAC item {item_id} has a {what} that is not an RFC 3339 time: "
                            f"{value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    if not 1970 <= parsed.astimezone(dt.UTC).year <= 2100:
        raise StacItemError(f"STAC item {item_id} has a {what} outside 1970-2100: {value!r}")
    return parsed.timestamp()


def rfc3339(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat().replace("+00:00", "Z")


def _common_names(asset: Mapping) -> list[str]:
    """Band common names of an asset (STAC 1.0 ``eo:bands``, STAC 1.1 ``bands``)."""
    if isinstance(asset.get("eo:common_name"), str):
        return [asset["eo:common_name"]]
    for key, field in (("eo:bands", "common_name"), ("bands", "eo:common_name")):
        listed = asset.get(key)
        if isinstance(listed, list) and listed:
            return [str(b.get(field) or "") if isinstance(b, Mapping) else "" for b in listed]
    return []


def _card_band(common_name: str, bands: Sequence[str]) -> tuple[str, int] | None:
    """(card band, preference rank) of a common name; a lower rank wins."""
    name = common_name.lower()
    for band in bands:
        preferred = COMMON_NAMES.get(band, (band,))
        if name in preferred:
            return band, preferred.index(name)
        if name == band.lower():
            return band, len(preferred)
    return None


def _is_raster(asset: Mapping) -> bool:
    roles = asset.get("roles")
    if isinstance(roles, list) and roles and not _DATA_ROLES & {str(r) for r in roles}:
        return False
    media = str(asset.get("type") or "")
    if media:
        return "image/tiff" in media or "geotiff" in media
    return str(asset.get("href", "")).split("?")[0].lower().endswith(_RASTER_SUFFIXES)


def _self_href(item: Mapping) -> str | None:
    links = item.get("links")
    for link in links if isinstance(links, list) else ():
        if isinstance(link, Mapping) and link.get("rel") == "self" and isinstance(
                link.get("href"), str):
            return link["href"]
    return None


def _gs_href(key: str, href: object, item_id: str, base: str | None) -> str:
    if not isinstance(href, str) or not href or len(href) > MAX_HREF or re.search(r"\s", href):
        raise StacItemError(f"asset '{key}' of STAC item {item_id} has no usable href")
    if "://" not in href and not href.startswith("/") and base and base.startswith("gs://"):
        bucket = base[5:].split("/", 1)[0]
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(base[5:]), href))
        if resolved.split("/", 1)[0] != bucket or "/" not in resolved:
            raise StacItemError(f"asset '{key}' of STAC item {item_id} has a relative href "
                                f"{href[:200]} that leaves its item's bucket gs://{bucket}")
        href = "gs://" + resolved
    if not href.startswith("gs://") or len(href) <= 5 or href[5] == "/":
        raise StacItemError(f"asset '{key}' of STAC item {item_id} is at {href[:200]}, not a gs:// "
                            "object; TileStream reads only gs:// objects in its input buckets")
    return href


def match_assets(item: Mapping, bands: Sequence[str], aliases: Mapping[str, str],
                 item_id: str) -> dict[str, str] | str:
    """Card band -> asset key for single-band assets, or the key of one multi-band asset.

    Common names win over keys; among several assets for one band the preferred common name wins
    (``nir08`` over ``nir``). Keys go through the aliases of the product the item id names, else
    the stream's.
    """
    assets = item.get("assets")
    if not isinstance(assets, Mapping) or not assets:
        raise StacItemError(f"STAC item {item_id} has no assets")
    if len(assets) > MAX_ASSETS:
        raise StacItemError(f"STAC item {item_id} has {len(assets)} assets, more than "
                            f"{MAX_ASSETS}")
    # An item whose id names its product (HLS.L30..., LC08_...) keys its assets that product's
    # way: HLS L30's B05 is NIR whatever the stream's aliases say for S30.
    products = [p for p in PRESETS.values() if re.search(p.product, item_id)]
    if len(products) == 1:
        aliases = products[0].aliases
    chosen: dict[str, tuple[int, str]] = {}
    multi: str | None = None
    for key, asset in assets.items():
        if not isinstance(asset, Mapping) or not _is_raster(asset):
            continue
        names = _common_names(asset)
        if len(names) > 1:
            mapped = [(_card_band(n, bands) or ("", 0))[0] for n in names]
            if mapped[: len(bands)] == list(bands) and multi is None:
                multi = str(key)
            continue
        found = _card_band(names[0], bands) if names else None
        if found is None:  # by key: the stream's aliases (preset), then common-name keys
            by_alias = aliases.get(str(key).upper())
            if by_alias in bands:
                found = (by_alias, 10)
            else:
                by_name = _card_band(str(key), bands)
                found = (by_name[0], 20 + by_name[1]) if by_name else None
        if found and (found[0] not in chosen or found[1] < chosen[found[0]][0]):
            chosen[found[0]] = (found[1], str(key))
    if all(b in chosen for b in bands):
        return {b: chosen[b][1] for b in bands}
    if multi is not None:
        return multi
    missing = [b for b in bands if b not in chosen]
    raise StacItemError(
        f"STAC item {item_id} has no asset for model bands {missing} (assets: "
        f"{', '.join(sorted(map(str, assets))[:30])}); assets are matched by eo:bands "
        f"common_name or by key through the band aliases{_preset_hint(assets, missing)}")


def _preset_hint(assets: Mapping, missing: Sequence[str]) -> str:
    keys = {str(k).upper() for k in assets}
    fits = [p.name for p in PRESETS.values()
            if all(any(p.aliases.get(k) == band for k in keys) for band in missing)]
    return f"; --band_preset {' or '.join(fits)} would map them" if fits else ""


def item_tile(item: Mapping, bands: Sequence[str], aliases: Mapping[str, str], published: float,
              message_id: str, event_time_attr: str | None = None) -> TileRef:
    """Validate a STAC Item and build its TileRef: band URIs in card order, provenance kept."""
    tile_id = item_id = safe_tile_id(item.get("id"))
    properties = item.get("properties")
    if not isinstance(properties, Mapping):
        raise StacItemError(f"STAC item {item_id} has no properties object")
    when = properties.get("datetime") or properties.get("start_datetime")
    if when is None:
        raise StacItemError(f"STAC item {item_id} has no datetime (nor start_datetime): the "
                            "acquisition time is required")
    acquired = rfc3339(_time(when, "datetime", item_id))
    self_href = _self_href(item)
    matched = match_assets(item, bands, aliases, item_id)
    assets = item["assets"]
    keys = [matched] if isinstance(matched, str) else [matched[b] for b in bands]
    uris = tuple(_gs_href(k, assets[k].get("href"), item_id, self_href) for k in keys)
    collection = item.get("collection")
    collection = str(collection)[:200] if isinstance(collection, str) and collection else None
    provenance = self_href if self_href and len(self_href) <= MAX_HREF else (
        f"{collection}/{item.get('id')}" if collection else str(item.get("id")))
    attributes = {"stac_item": provenance[:MAX_HREF]}
    if collection:
        attributes["stac_collection"] = collection
    event_time = _time(event_time_attr, "eventTime", item_id) if event_time_attr else published
    platform = properties.get("platform") or properties.get("constellation")
    generation = hashlib.sha1(json.dumps(
        [tile_id, acquired, uris, str(properties.get("updated", ""))]).encode()).hexdigest()[:16]
    return TileRef(
        tile_id=tile_id,
        band_uris=uris,
        generation=generation,
        event_time=event_time,
        published=published,
        message_id=message_id,
        source="stac",
        acquired=acquired,
        sensor=str(platform)[:100] if isinstance(platform, str) else None,
        attributes=tuple(sorted(attributes.items())),
    )


# --- out ---------------------------------------------------------------------------------------

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
