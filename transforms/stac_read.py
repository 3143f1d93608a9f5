"""STAC in: a STAC Item announcement -> TileRef (docs/stac.md).

The people who feed TileStream publish HLS, Landsat and Sentinel-2 scenes as STAC Items. An
item's assets are matched to the model card's bands by ``eo:bands[].common_name`` (or STAC 1.1
``bands[].eo:common_name``), else by asset key through the stream's band aliases (the
``--band_preset``), so the public items work as published. Only ``gs://`` assets are accepted.
Read by ``transforms/announcements.py``; the Items the stream writes are ``transforms/stac.py``.

Pure functions; no Beam or raster library import at module level.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import posixpath
import re
from collections.abc import Mapping, Sequence

from transforms.presets import COMMON_NAMES, PRESETS
from transforms.records import TileRef

MAX_TILE_ID = 200
MAX_ASSETS = 500
MAX_HREF = 2048
_SAFE = re.compile(r"[^A-Za-z0-9_.\-]+")
_DATA_ROLES = {"data", "reflectance"}
_RASTER_SUFFIXES = (".tif", ".tiff")


class StacItemError(ValueError):
    """A STAC Item announcement the stream cannot score; the message says why, as a sentence."""


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
