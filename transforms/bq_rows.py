"""Row builders: records -> the BigQuery rows of the ``chips`` and ``tiles`` tables.

Rows carry a deterministic ``row_id`` (model, tile version, chip) so a chip scored twice after a
retry is recognisable; Beam's own insertIds make the streaming insert itself retry-safe.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib

from transforms.location import location_key
from transforms.records import ChipPrediction, PredictionBlock, TileManifest, TileRef


def bq_timestamp(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="microseconds")


def row_id(*parts: object) -> str:
    return hashlib.sha1("|".join(str(p) for p in parts).encode()).hexdigest()


@functools.lru_cache(maxsize=64)
def crs_label(crs_wkt: str) -> str:
    """``EPSG:nnnn`` when the CRS has a code, else its WKT (cached: every chip row asks)."""
    from rasterio.crs import CRS

    crs = CRS.from_wkt(crs_wkt)
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs_wkt


def class_records(counts, names, pixel_area_m2: float) -> list[dict]:
    return [
        {"class_id": i, "name": name, "pixels": int(n), "area_m2": float(n) * pixel_area_m2}
        for i, (name, n) in enumerate(zip(names, counts, strict=True))
    ]


def provenance(tile: TileRef, model_name: str, model_version: str, role: str = "live") -> dict:
    return {
        "acquired": tile.acquired,
        "event_time": bq_timestamp(tile.event_time),
        "published": bq_timestamp(tile.published),
        "source": tile.source,
        "source_uris": list(tile.band_uris),
        "message_id": tile.message_id or None,
        "source_message_ids": list(tile.message_ids),
        "sensor": tile.sensor,
        "attributes": [{"key": k, "value": v} for k, v in tile.attributes],
        "model_name": model_name,
        "model_version": model_version,
        "role": role,
    }


def chip_rows(block: PredictionBlock, class_names: tuple[str, ...]) -> list[dict]:
    """One BigQuery row per chip of a block: blocks become rows only here, at the sink."""
    return [chip_row(pred, class_names) for pred in block.predictions]


def chip_row(pred: ChipPrediction, class_names: tuple[str, ...]) -> dict:
    chip = pred.chip
    counts = pred.class_counts
    dominant = max(range(len(counts)), key=counts.__getitem__)
    return {
        "row_id": row_id(pred.model_name, pred.model_version, chip.tile.key, chip.index),
        "tile_id": chip.tile.tile_id,
        "tile_generation": chip.tile.generation,
        "chip_index": chip.index,
        "row_off": chip.row,
        "col_off": chip.col,
        "height": chip.height,
        "width": chip.width,
        "crs": chip.crs,
        "footprint": chip.footprint_wkt,
        "valid_fraction": chip.valid_fraction,
        "classes": class_records(counts, class_names, chip.pixel_area_m2),
        "dominant_class": class_names[dominant],
        "mean_confidence": pred.mean_confidence,
        **provenance(chip.tile, pred.model_name, pred.model_version, chip.tile.role or "live"),
        "chipped_at": bq_timestamp(chip.chipped_at),
        "scored_at": bq_timestamp(pred.scored_at),
        "latency_s": pred.scored_at - chip.tile.published,
    }


def tile_row(
    manifest: TileManifest,
    *,
    complete: bool,
    chips_scored: int,
    chips_failed: int,
    class_counts,
    class_names: tuple[str, ...],
    pixel_area_m2: float,
    footprint_wkt: str,
    raster_uri: str,
    model_name: str,
    model_version: str,
    completed_at: float,
) -> dict:
    tile = manifest.tile
    return {
        "row_id": row_id(model_name, model_version, tile.key),
        "tile_id": tile.tile_id,
        "tile_generation": tile.generation,
        "complete": complete,
        "chips_total": manifest.chips_total,
        "chips_scored": chips_scored,
        "chips_skipped": manifest.chips_skipped,
        "chips_failed": chips_failed,
        "width": manifest.width,
        "height": manifest.height,
        "crs": crs_label(manifest.crs_wkt),
        "footprint": footprint_wkt,
        "classes": class_records(class_counts, class_names, pixel_area_m2),
        "raster_uri": raster_uri,
        "location_key": location_key(tile.tile_id, footprint_wkt, dict(tile.attributes)),
        **provenance(tile, model_name, model_version, tile.role or "live"),
        "completed_at": bq_timestamp(completed_at),
        "latency_s": completed_at - tile.published,
    }
