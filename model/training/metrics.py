"""Segmentation scores from a confusion matrix, counted on valid held-out pixels only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def confusion(pred: np.ndarray, labels: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """(K, K) counts, rows = reference class, columns = predicted class."""
    idx = labels[mask].astype(np.int64) * k + pred[mask].astype(np.int64)
    return np.bincount(idx, minlength=k * k).reshape(k, k)


def scores(matrix: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Per-class IoU, mIoU and pixel accuracy.

    mIoU averages the classes present in the reference; a class absent from it has no IoU (None)
    rather than a 0 or 1 that would say more than the data can.
    """
    tp = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    union = support + matrix.sum(axis=0) - tp
    per_class = {
        name: (round(float(tp[i] / union[i]), 4) if support[i] else None)
        for i, name in enumerate(names)
    }
    present = [v for v in per_class.values() if v is not None]
    return {
        "miou": round(float(np.mean(present)), 4) if present else None,
        "pixel_accuracy": round(float(tp.sum() / max(matrix.sum(), 1)), 4),
        "per_class_iou": per_class,
        "support": {name: int(support[i]) for i, name in enumerate(names)},
    }
