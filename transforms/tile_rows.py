"""The tile row: its shape from what assembly counted and wrote, and its drift columns."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from model.card import ModelCard
from transforms.geometry import footprint_wkt
from transforms.records import TileManifest
from transforms.sinks import tile_row


def tile_row_of(manifest: TileManifest, scored: int, failed: int, complete: bool,
                counts: np.ndarray, uri: str, card: ModelCard) -> dict:
    """The tile's BigQuery row from what assembly counted and wrote."""
    import rasterio
    from affine import Affine

    transform, crs = Affine(*manifest.transform), rasterio.crs.CRS.from_wkt(manifest.crs_wkt)
    return tile_row(
        manifest,
        complete=complete,
        chips_scored=scored,
        chips_failed=manifest.chips_failed + failed,
        class_counts=counts,
        class_names=tuple(c.name for c in card.classes),
        pixel_area_m2=manifest.pixel_area_m2,
        footprint_wkt=footprint_wkt(transform, crs, 0, 0, manifest.height, manifest.width,
                                    points_per_edge=16),
        raster_uri=uri,
        model_name=card.name,
        model_version=card.version,
        completed_at=time.time(),
    )


def drift_columns(running: ModelCard, card: ModelCard, manifest: TileManifest,
                  class_counts: np.ndarray) -> dict:
    """The tile row's drift columns: bands from the chipper's counts, which it binned by the
    running card's reference, so they are judged against that one; classes from the raster,
    against the predictions of the version that scored it (``card``) on its training pixels."""
    from model.drift import reference_from_card, tile_drift

    reference, own = reference_from_card(running), reference_from_card(card)
    if own is not None and reference is not None:
        reference = dataclasses.replace(reference, classes=own.classes)
    if reference is None or not manifest.band_counts or not sum(manifest.band_counts[0]):
        return {"drift_band_psi": [], "drift_class_psi": None, "drift_max_band_psi": None,
                "drifted": None}
    drift = tile_drift(reference, [np.asarray(c) for c in manifest.band_counts],
                       [int(n) for n in class_counts])
    return {"drift_band_psi": [{"band": b, "psi": v} for b, v in drift.band_psi.items()],
            "drift_class_psi": drift.class_psi, "drift_max_band_psi": drift.max_band_psi,
            "drifted": drift.drifted}
