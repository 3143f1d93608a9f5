"""Data and prediction drift of one tile against the training data, as pure functions.

The card's ``drift_reference`` holds, per band, the training pixels' decile edges and the share
of training pixels in each bin, and the class shares of the model's own predictions on the
training pixels (and of the labels, for reading). A tile is compared with it by the Population
Stability Index over the same bins::

    PSI = sum_i (a_i - e_i) * ln(a_i / e_i)

with ``e_i`` the reference share and ``a_i`` the tile's share of valid pixels in bin ``i``; both
are floored at ``EPSILON`` so an empty bin costs a bounded amount instead of infinity. Band bins
are the reference deciles (10 bins, open at both ends; fewer where tied values merge edges); class
bins are the card's classes. Values are compared after the card's ``scale``/``offset``, the same
quantity the card's mean/std describe. Rule of thumb (and the default threshold): PSI < 0.1 is
no shift, 0.1-0.25 a moderate one, above 0.25 a significant one, so a tile is flagged as drifted
when any band's PSI or the class PSI exceeds 0.25.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.card import CardError, ModelCard

EPSILON = 1e-4
PSI_THRESHOLD = 0.25
# A tile whose median band PSI is over this is refused before it is scored: its values are not
# the training data's shifted a little, they are another quantity (reflectance 0-1 for a DN
# model, a miscalibrated sensor). Chosen from the training scene and shipped examples, each card
# keeps the number it was given and the evidence beside it (docs/model.md, "Radiometry guard").
REFUSE_MEDIAN_BAND_PSI = 4.0
QUANTILES = 10
MAX_EDGES = 256
CLASS_SOURCE = "model predictions on the training pixels"


@dataclass(frozen=True)
class BandReference:
    name: str
    edges: tuple[float, ...]  # ascending inner edges; bin i holds edges[i-1] < x <= edges[i]
    fractions: tuple[float, ...]  # len(edges) + 1 shares summing to 1


@dataclass(frozen=True)
class DriftReference:
    """The training distribution a tile is compared with (the card's ``drift_reference``)."""

    bands: tuple[BandReference, ...]
    classes: tuple[float, ...]  # share of each class id among predictions on training pixels
    labels: tuple[float, ...] | None = None  # share of each class among the training labels
    pixels: int = 0
    source: str = ""
    # the radiometry guard: refuse a tile whose median band PSI exceeds this (None: no guard)
    refuse_median_band_psi: float | None = None
    refuse_evidence: dict[str, Any] | None = None  # median band PSI of the cases it rests on

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": f"per-band deciles of valid training pixels; PSI with epsilon {EPSILON}",
            "source": self.source,
            "pixels": self.pixels,
            "bands": {b.name: {"edges": [round(e, 6) for e in b.edges],
                               "fractions": [round(f, 6) for f in b.fractions]}
                      for b in self.bands},
            "classes": {"source": CLASS_SOURCE,
                        "fractions": [round(f, 6) for f in self.classes]},
            **({"labels": {"fractions": [round(f, 6) for f in self.labels]}}
               if self.labels is not None else {}),
            **({"refuse_median_band_psi": self.refuse_median_band_psi,
                "refuse_evidence": self.refuse_evidence}
               if self.refuse_median_band_psi is not None else {}),
        }


def _shares(values: object, count: int | None, where: str) -> tuple[float, ...]:
    if not isinstance(values, list) or not values or len(values) > MAX_EDGES + 1:
        raise CardError(f"{where}: expected a non-empty list of shares")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
               and 0 <= v <= 1 for v in values):
        raise CardError(f"{where}: shares must be numbers in [0, 1]")
    if count is not None and len(values) != count:
        raise CardError(f"{where}: expected {count} shares, got {len(values)}")
    if abs(sum(values) - 1.0) > 1e-3:
        raise CardError(f"{where}: shares sum to {sum(values):.4f}, not 1")
    return tuple(float(v) for v in values)


def reference_from_card(card: ModelCard) -> DriftReference | None:
    """The card's reference, checked against its bands and classes; None when it has none."""
    data = card.drift_reference
    if not data:
        return None
    where = f"{card.model_id} drift_reference"
    bands = data.get("bands")
    if not isinstance(bands, dict) or [b for b in bands] != list(card.input.bands):
        raise CardError(f"{where}: needs one entry per card band, in order "
                        f"{list(card.input.bands)}")
    parsed = []
    for name, spec in bands.items():
        edges = spec.get("edges") if isinstance(spec, dict) else None
        if (not isinstance(edges, list) or len(edges) > MAX_EDGES
                or not all(isinstance(e, int | float) and not isinstance(e, bool)
                           and math.isfinite(e) for e in edges)
                or any(b <= a for a, b in itertools.pairwise(edges))):
            raise CardError(f"{where}.bands.{name}: edges must be up to {MAX_EDGES} finite, "
                            "strictly ascending numbers")
        fractions = _shares(spec.get("fractions"), len(edges) + 1, f"{where}.bands.{name}")
        parsed.append(BandReference(name, tuple(float(e) for e in edges), fractions))
    classes = data.get("classes")
    if not isinstance(classes, dict):
        raise CardError(f"{where}: classes must be an object with fractions")
    class_shares = _shares(classes.get("fractions"), card.num_classes, f"{where}.classes")
    labels = data.get("labels")
    label_shares = (_shares(labels.get("fractions"), card.num_classes, f"{where}.labels")
                    if isinstance(labels, dict) else None)
    pixels = data.get("pixels", 0)
    refuse = data.get("refuse_median_band_psi")
    if refuse is not None and (isinstance(refuse, bool) or not isinstance(refuse, int | float)
                               or not math.isfinite(refuse) or refuse <= 0):
        raise CardError(f"{where}.refuse_median_band_psi must be a positive number")
    evidence = data.get("refuse_evidence")
    return DriftReference(tuple(parsed), class_shares, label_shares,
                          int(pixels) if isinstance(pixels, int) else 0,
                          str(data.get("source", ""))[:500],
                          float(refuse) if refuse is not None else None,
                          evidence if isinstance(evidence, dict) else None)


def reference_from_pixels(values: np.ndarray, band_names: Sequence[str],
                          predicted: np.ndarray, num_classes: int,
                          labels: np.ndarray | None = None, source: str = "") -> DriftReference:
    """Build a reference from valid training pixels.

    ``values``: (C, N) band values after the card's scale/offset; ``predicted`` (and ``labels``):
    (N,) class ids of the same pixels.
    """
    bands = []
    for name, column in zip(band_names, values.astype(np.float64), strict=True):
        inner = np.quantile(column, np.arange(1, QUANTILES) / QUANTILES)
        edges = np.unique(inner)
        counts = np.bincount(np.searchsorted(edges, column, side="left"),
                             minlength=len(edges) + 1)
        bands.append(BandReference(name, tuple(edges.tolist()),
                                   tuple((counts / counts.sum()).tolist())))
    return DriftReference(
        bands=tuple(bands),
        classes=class_shares(np.bincount(predicted, minlength=num_classes)),
        labels=class_shares(np.bincount(labels, minlength=num_classes))
        if labels is not None else None,
        pixels=int(values.shape[1]),
        source=source,
    )


def band_psis(reference: DriftReference, values: np.ndarray) -> list[float]:
    """PSI of each band of ``values`` ((C, N), after the card's scale/offset)."""
    return [psi(b.fractions, c) for b, c in zip(reference.bands,
                                                 band_counts(reference, values), strict=True)]


def class_shares(counts: Sequence[int] | np.ndarray) -> tuple[float, ...]:
    counts = np.asarray(counts, np.float64)
    total = counts.sum()
    return tuple((counts / total).tolist()) if total else tuple(0.0 for _ in counts)


def band_counts(reference: DriftReference, values: np.ndarray) -> list[np.ndarray]:
    """Per band, how many of a tile's valid pixels fall in each reference bin.

    ``values``: (C, N) valid pixels after scale/offset. Counts add up over strips, so a chipper
    can accumulate them while it reads, without a second pass over the tile.
    """
    return [np.bincount(np.searchsorted(np.asarray(b.edges), column, side="left"),
                        minlength=len(b.edges) + 1)
            for b, column in zip(reference.bands, values, strict=True)]


def psi(expected: Sequence[float], actual_counts: Sequence[float] | np.ndarray) -> float:
    """Population Stability Index of observed counts against expected shares (see module doc)."""
    counts = np.asarray(actual_counts, np.float64)
    if counts.sum() <= 0:
        return float("nan")
    a = np.maximum(counts / counts.sum(), EPSILON)
    e = np.maximum(np.asarray(expected, np.float64), EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass(frozen=True)
class TileDrift:
    """A tile's divergence from the training data, and whether it crosses the threshold."""

    band_psi: dict[str, float]
    class_psi: float | None
    threshold: float
    pixels: int

    @property
    def max_band_psi(self) -> float:
        return max(self.band_psi.values()) if self.band_psi else float("nan")

    @property
    def drifted_bands(self) -> list[str]:
        return [b for b, v in self.band_psi.items() if v > self.threshold]

    @property
    def drifted(self) -> bool:
        return bool(self.drifted_bands) or (self.class_psi is not None
                                            and self.class_psi > self.threshold)

    def to_dict(self) -> dict[str, Any]:
        return {"band_psi": {k: round(v, 4) for k, v in self.band_psi.items()},
                "class_psi": None if self.class_psi is None else round(self.class_psi, 4),
                "max_band_psi": round(self.max_band_psi, 4), "drifted": self.drifted,
                "drifted_bands": self.drifted_bands, "threshold": self.threshold,
                "pixels": self.pixels}


def tile_drift(reference: DriftReference, counts_per_band: Sequence[np.ndarray],
               class_counts: Sequence[int] | None = None,
               threshold: float = PSI_THRESHOLD) -> TileDrift:
    """PSI per band (from :func:`band_counts`) and of the predicted classes, and the flag."""
    band_psi = {b.name: psi(b.fractions, c)
                for b, c in zip(reference.bands, counts_per_band, strict=True)}
    class_psi = (psi(reference.classes, class_counts)
                 if class_counts is not None and sum(class_counts) > 0 else None)
    pixels = int(np.asarray(counts_per_band[0]).sum()) if counts_per_band else 0
    return TileDrift(band_psi, class_psi, threshold, pixels)


def raster_drift(path: str, card: ModelCard, class_counts: Sequence[int] | None = None,
                 threshold: float = PSI_THRESHOLD) -> TileDrift:
    """Drift of a raster file against the card, with valid pixels chosen as the stream does."""
    import rasterio

    from model.inference import valid_mask

    reference = reference_from_card(card)
    if reference is None:
        raise CardError(f"{card.model_id} has no drift_reference in its card")
    with rasterio.open(path) as src:
        idx = card.band_indices(list(src.descriptions))
        raw = src.read([i + 1 for i in idx]).astype(np.float64)
        ok = valid_mask(raw, card.input.nodata)
        if src.nodata is not None:
            ok &= (raw != src.nodata).all(axis=0)
    values = raw[:, ok] * card.input.scale + card.input.offset
    return tile_drift(reference, band_counts(reference, values), class_counts, threshold)
