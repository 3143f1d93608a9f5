"""What a tile's pixel values say before it is scored: the range and distribution guards, and
the drift counts.

The planner runs both guards on a preview of the tile, before any strip is read.
``check_radiometry`` refuses a tile whose sampled values mostly fall outside the card's valid
range (uint16 reflectance x 10,000 for an 8-bit DN model). ``check_distribution`` refuses one
whose values lie inside that range but are not the quantity the model was trained on: the
median, over bands, of the PSI against the card's training deciles is above the card's
``refuse_median_band_psi`` (reflectance 0-1 for a DN model scores 8.1; the training scene 0.0,
the sample tile 0.3). The reason names the likely cause and the flag that fixes it. Moderate
drift still scores, and its tile row says ``drifted``. ``strip_band_counts`` bins each strip's
valid pixels against the card's drift reference while the strip is in memory, so a tile's
drift needs no second read.
"""

from __future__ import annotations

import numpy as np

from model.card import ModelCard
from transforms.guards import Refused


def check_radiometry(preview: np.ndarray, invalid: np.ndarray, card: ModelCard, scale: float,
                     offset: float, max_out_of_range: float, uri: str) -> None:
    """Refuse a tile whose (rescaled) values mostly lie outside the card's valid input range."""
    valid_range = card.input.valid_range
    if valid_range is None:
        return
    values = preview[:, ~invalid].astype(np.float64) * scale + offset
    if values.size == 0:
        return
    low, high = valid_range
    outside = float(((values < low) | (values > high)).mean())
    if outside > max_out_of_range:
        p1, p99 = np.percentile(values, [1, 99])
        raise Refused(
            f"{uri}: {outside:.0%} of sampled values lie outside the model's valid input range "
            f"[{low:g}, {high:g}] (observed min {values.min():g}, p1 {p1:g}, p99 {p99:g}, max "
            f"{values.max():g}, after scale {scale:g} and offset {offset:g}); rescale with "
            "--input_scale/--input_offset or the announcement attributes input_scale/input_offset")


def check_distribution(preview: np.ndarray, invalid: np.ndarray, card: ModelCard, reference,
                       scale: float, offset: float, uri: str) -> None:
    """Refuse a tile whose sampled values are distributed unlike anything the model was trained
    on (the card's ``drift_reference.refuse_median_band_psi``), naming the likely cause."""
    from model.drift import band_psis

    if reference is None or reference.refuse_median_band_psi is None:
        return
    values = preview[:, ~invalid].astype(np.float64) * scale + offset
    if values.shape[1] < 100:  # too few valid pixels to judge a distribution
        return
    psis = band_psis(reference, values * card.input.scale + card.input.offset)
    median = float(np.median(psis))
    if median <= reference.refuse_median_band_psi:
        return
    low, high = card.input.valid_range or (float(values.min()), float(values.max()))
    p99 = float(np.percentile(values, 99))
    if high > 10 and p99 <= 1.5:
        cause = (f"its values lie in 0-{p99:.2g} while the model reads {low:g}-{high:g}: "
                 f"reflectance 0-1 for a digital-number model? Rescale with "
                 f"--input_scale {high:g} (or the announcement attribute input_scale)")
    else:
        train = [b.edges[len(b.edges) // 2] for b in reference.bands]
        shift = float(np.median(np.median(values, axis=1) * card.input.scale
                                + card.input.offset - np.asarray(train)))
        cause = (f"its band medians sit {shift:+.3g} from the training data's (after the "
                 "card's scaling): another sensor calibration or processing level? Rescale "
                 "with --input_scale/--input_offset if it is a known conversion")
    raise Refused(
        f"{uri}: values unlike the model's training data (median band PSI {median:.2f} over "
        f"the card's limit {reference.refuse_median_band_psi:g}; per band "
        + ", ".join(f"{b.name} {p:.2f}" for b, p in zip(reference.bands, psis, strict=True))
        + f"): {cause}")


def strip_band_counts(reference, strip: np.ndarray, invalid: np.ndarray, card: ModelCard,
                      scale: float, offset: float) -> list[np.ndarray]:
    """Drift bins of one strip's valid pixels (after the input and card scaling): a pure
    function whose results add up over the strips of a tile, so drift needs no second read."""
    from model.drift import band_counts

    if strip.dtype.kind in "ui" and strip.dtype.itemsize <= 2:
        return _integer_band_counts(reference, strip, invalid, card, scale, offset)
    values = strip[:, ~invalid].astype(np.float64) * scale + offset
    return band_counts(reference, values * card.input.scale + card.input.offset)


def _integer_band_counts(reference, strip: np.ndarray, invalid: np.ndarray, card: ModelCard,
                         scale: float, offset: float) -> list[np.ndarray]:
    """:func:`strip_band_counts` for 8- and 16-bit rasters: count each distinct value once
    (a histogram of the raw values), then bin the values, not every pixel. Each value goes
    through the same float64 arithmetic as the general path, so the counts are identical."""
    unsigned = np.dtype(f"u{strip.dtype.itemsize}")
    codes = strip.view(unsigned)  # signed values by their bit patterns: bincount wants >= 0
    levels = 1 << (8 * strip.dtype.itemsize)
    values = np.arange(levels, dtype=unsigned).view(strip.dtype).astype(np.float64)
    values = (values * scale + offset) * card.input.scale + card.input.offset
    counts = []
    for band, column in zip(reference.bands, codes, strict=True):
        per_value = np.bincount(column.ravel(), minlength=levels)
        if invalid.any():
            per_value -= np.bincount(column[invalid], minlength=levels)
        edges = np.asarray(band.edges)
        bins = np.searchsorted(edges, values, side="left")
        counts.append(np.bincount(bins, weights=per_value, minlength=len(edges) + 1)
                      .round().astype(np.int64))
    return counts

