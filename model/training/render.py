"""Pictures of rasters and class maps, shared by the stream's quicklook and the model report."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model.card import ClassInfo


def stretch(bands: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``(C, H, W)`` -> uint8 with a per-band 2-98 percentile stretch; invalid pixels black."""
    out = np.zeros(bands.shape, np.uint8)
    for i, band in enumerate(bands.astype(np.float32)):
        values = band[valid]
        if values.size == 0:
            continue
        lo, hi = np.percentile(values, [2, 98])
        out[i] = np.clip((band - lo) / max(hi - lo, 1e-6) * 255.0, 0, 255).astype(np.uint8)
    out[:, ~valid] = 0
    return out


def colourise(class_map: np.ndarray, classes: Sequence[ClassInfo]) -> np.ndarray:
    """``(H, W)`` class ids -> ``(3, H, W)`` uint8 in the card's colours; other values black."""
    palette = np.zeros((256, 3), np.uint8)
    for c in classes:
        palette[c.id] = c.rgb
    return np.moveaxis(palette[class_map.astype(np.uint8)], -1, 0)
