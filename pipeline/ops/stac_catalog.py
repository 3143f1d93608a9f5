"""``tilestream stac``: a static STAC catalog of the predictions, and offline STAC validation.

The stream writes one STAC Item beside every prediction COG (``stac_uri`` in the ``tiles`` row).
This command reads the ``tiles`` table, fetches those items and writes a self-contained static
catalog: ``catalog.json`` -> one collection per model version -> its items, with relative links,
so a STAC browser, QGIS, odc-stac or stackstac can be pointed at it.

Validation is offline: the STAC core and GeoJSON schemas come with pystac-core, the projection,
classification and raster extension schemas are bundled in ``pipeline/ops/schemas/`` (see its
README); any other ``$ref`` is an error, never a download.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import posixpath
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from transforms.geometry import bbox_union
from transforms.stac import STAC_VERSION, item_uri

SCHEMAS_DIR = Path(__file__).resolve().parent / "schemas"
CORE = "https://schemas.stacspec.org/v{version}/{kind}-spec/json-schema/{kind}.json"
TILES_COLUMNS = ("tile_id", "tile_generation", "model_name", "model_version", "raster_uri",
                 "stac_uri", "completed_at")


class StacValidationError(ValueError):
    """A STAC object that breaks its schemas; the message lists every violation."""


@functools.lru_cache(maxsize=1)
def _registry():
    from pystac.validation.local_validator import get_local_schema_cache
    from referencing import Registry, Resource

    schemas = dict(get_local_schema_cache())
    for path in SCHEMAS_DIR.glob("stac-*.json"):
        schema = json.loads(path.read_text())
        schemas[schema["$id"].rstrip("#")] = schema
    return Registry().with_resources(
        (uri, Resource.from_contents(schema)) for uri, schema in schemas.items())


def validation_errors(obj: Mapping[str, Any]) -> list[str]:
    """Every schema violation of a STAC Item, Collection or Catalog (core + its extensions)."""
    from jsonschema import Draft7Validator

    kind = {"Feature": "item", "Collection": "collection", "Catalog": "catalog"}.get(
        str(obj.get("type")))
    if kind is None:
        return [f"type {obj.get('type')!r} is not a STAC Item, Collection or Catalog"]
    registry = _registry()
    uris = [CORE.format(version=obj.get("stac_version"), kind=kind),
            *obj.get("stac_extensions", ())]
    errors = []
    for uri in uris:
        try:
            schema = registry.contents(uri)
        except Exception:
            errors.append(f"schema {uri} is not available offline (bundled: STAC "
                          f"{STAC_VERSION} core, projection, classification, raster)")
            continue
        try:
            for error in Draft7Validator(schema, registry=registry).iter_errors(obj):
                while error.context:  # a oneOf/anyOf: the deepest complaint says most
                    error = max(error.context, key=lambda e: (
                        len(e.absolute_path), e.validator not in ("const", "type")))
                where = "/".join(str(p) for p in error.absolute_path) or "(root)"
                errors.append(f"{uri}: {where}: {error.message[:200]}")
        except Exception as exc:  # an unresolvable $ref inside a bundled schema
            errors.append(f"{uri}: cannot be checked offline: {exc}")
    return errors


def validate(obj: Mapping[str, Any]) -> None:
    """Raise StacValidationError listing every violation, or return quietly."""
    errors = validation_errors(obj)
    if errors:
        raise StacValidationError(f"STAC {obj.get('type')} {obj.get('id')} is invalid: "
                                  + "; ".join(errors))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".") or "_"


def latest_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, version, tile version): the latest (a re-scored chip may repeat)."""
    best: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        key = (row["model_name"], row["model_version"], row["tile_id"], row["tile_generation"])
        if key not in best or str(row.get("completed_at")) > str(best[key].get("completed_at")):
            best[key] = dict(row)
    return [best[k] for k in sorted(best)]


def _extent(items: list[dict[str, Any]]) -> dict[str, Any]:
    box = bbox_union([i["bbox"] for i in items])  # across ±180° where the items are
    times = sorted(t for i in items for t in (i["properties"].get("datetime"),
                                              i["properties"].get("start_datetime"),
                                              i["properties"].get("end_datetime")) if t)
    return {"spatial": {"bbox": [box]},
            "temporal": {"interval": [[times[0], times[-1]]]}}


def build_catalog(rows: Iterable[Mapping[str, Any]], read_json) -> tuple[dict[str, dict], list]:
    """(relative path -> STAC object, skipped rows with why) for a static catalog.

    ``read_json(uri)`` returns the item JSON the stream wrote beside a COG.
    """
    files: dict[str, dict] = {}
    skipped: list[dict[str, str]] = []
    collections: dict[str, list[dict[str, Any]]] = {}
    for row in latest_rows(rows):
        uri = row.get("stac_uri") or item_uri(row["raster_uri"])
        try:
            item = dict(read_json(uri))
        except Exception as exc:
            skipped.append({"tile_id": row["tile_id"], "uri": uri, "reason": str(exc)[:300]})
            continue
        errors = validation_errors(item)
        if errors:  # e.g. written by another version: left out, said why
            skipped.append({"tile_id": row["tile_id"], "uri": uri,
                            "reason": "invalid STAC Item: " + "; ".join(errors)[:300]})
            continue
        collection = _safe(f"{row['model_name']}-{row['model_version']}")
        item["collection"] = collection
        item["links"] = [link for link in item.get("links", ())
                         if link.get("rel") not in ("self", "root", "parent", "collection")]
        item["links"] += [{"rel": "root", "href": "../../catalog.json",
                           "type": "application/json"},
                          {"rel": "parent", "href": "../collection.json",
                           "type": "application/json"},
                          {"rel": "collection", "href": "../collection.json",
                           "type": "application/json"}]
        collections.setdefault(collection, []).append(item)
        files[f"{collection}/items/{_safe(item['id'])}.json"] = item
    children = []
    for collection, items in sorted(collections.items()):
        model = items[0]["properties"]
        files[f"{collection}/collection.json"] = {
            "type": "Collection", "stac_version": STAC_VERSION, "id": collection,
            "title": f"{model['tilestream:model_name']} {model['tilestream:model_version']} "
                     "predictions",
            "description": f"Class maps scored by TileStream with model "
                           f"{model['tilestream:model_name']}/{model['tilestream:model_version']}"
                           f": one prediction COG per tile version.",
            "license": "other",
            "extent": _extent(items),
            "links": [{"rel": "root", "href": "../catalog.json", "type": "application/json"},
                      {"rel": "parent", "href": "../catalog.json", "type": "application/json"},
                      *({"rel": "item", "href": f"./items/{_safe(i['id'])}.json",
                         "type": "application/geo+json"} for i in items)],
        }
        children.append({"rel": "child", "href": f"./{collection}/collection.json",
                         "type": "application/json", "title": collection})
    files["catalog.json"] = {
        "type": "Catalog", "stac_version": STAC_VERSION, "id": "tilestream",
        "description": f"TileStream predictions, written {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M}"
                       " UTC from the tiles table.",
        "links": [{"rel": "root", "href": "./catalog.json", "type": "application/json"},
                  *children],
    }
    for path, obj in files.items():
        if "/items/" not in path:  # items were checked above
            validate(obj)
    return files, skipped


def write_catalog(files: Mapping[str, dict], out: str, storage_client=None) -> list[str]:
    """Write the catalog under a local directory or a ``gs://`` prefix; returns what it wrote."""
    written = []
    for path, obj in sorted(files.items()):
        text = json.dumps(obj, indent=1) + "\n"
        if out.startswith("gs://"):
            bucket, _, prefix = out[len("gs://"):].partition("/")
            name = posixpath.join(prefix.strip("/"), path) if prefix.strip("/") else path
            storage_client.bucket(bucket).blob(name).upload_from_string(
                text, content_type="application/json")
            written.append(f"gs://{bucket}/{name}")
        else:
            target = Path(out, path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            written.append(str(target))
    return written


def json_reader(storage_client):
    """``read_json(uri)`` for gs:// URIs (through the given client) and local paths."""
    def read_json(uri: str) -> dict[str, Any]:
        if uri.startswith("gs://"):
            bucket, _, name = uri[len("gs://"):].partition("/")
            return json.loads(storage_client.bucket(bucket).blob(name).download_as_text())
        with open(uri) as f:
            return json.load(f)
    return read_json


def tiles_rows(bigquery_client, dataset: str) -> list[dict[str, Any]]:
    """The ``tiles`` rows a catalog needs, from ``project.dataset`` (or ``project:dataset``)."""
    from google.api_core.exceptions import NotFound

    table = dataset.replace(":", ".") + ".tiles"
    sql = f"SELECT {', '.join(TILES_COLUMNS)} FROM `{table}`"
    try:
        return [dict(r) for r in bigquery_client.query(sql).result()]
    except NotFound:  # no tile scored yet: an empty catalog
        return []


def run(out: str, bigquery_client, storage_client, dataset: str) -> dict[str, Any]:
    """Read the tiles table, write the catalog; a summary for the command line."""
    files, skipped = build_catalog(tiles_rows(bigquery_client, dataset),
                                   json_reader(storage_client))
    written = write_catalog(files, out.rstrip("/") if out.startswith("gs://") else
                            os.path.abspath(out), storage_client)
    return {"catalog": next(w for w in written if w.endswith("catalog.json")),
            "collections": sorted({p.split("/")[0] for p in files if p.count("/") == 2}),
            "items": sum(1 for p in files if "/items/" in p), "skipped": skipped}
