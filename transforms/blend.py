"""Blending overlapping chip predictions into a class raster: pure numpy, no Beam, no I/O.

Where chips overlap (stride < chip size) their uint8 class probabilities are summed over valid
pixels and arg-maxed. The sums are integers, so any grouping of the chips gives the same raster.
That is what lets the blend happen where the chips are scored: a block holds every scored chip
of its strip task, so the rows that only its chips cover are final there and travel as a class
map (1 byte a pixel, compressed); only the rows it shares with the neighbouring task's chips
travel as sums (:func:`block_parts`). Assembly adds the sums and pastes the final rows
(:func:`blend_parts`). Measured on a 3,660² tile: 1/12 of the bytes that the chips' own
probabilities took across the shuffle (docs/performance.md).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

from transforms.geometry import chip_starts, own_strip, strip_bounds, strips_touched
from transforms.records import NODATA_CLASS, Chip, ChipPrediction, PackedRows, StripPart

NODATA_CONFIDENCE = 255
ZLIB_LEVEL = 1  # the class maps are runs: level 1 takes most of it, at a fraction of the CPU


def overlaps(size: int, stride: int) -> int:
    """The most chips that cover one pixel."""
    return math.ceil(size / stride) ** 2


def sums_dtype(most: int) -> type:
    """The narrowest type that holds a sum of ``most`` uint8 probabilities (and the weight):
    uint16 up to 257 overlaps (4 with chip 64 and stride 48)."""
    return np.uint16 if most <= 257 else np.uint32


def finish(sums: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes, confidence %) from the class sums ``(K, h, w)`` and the weight ``(h, w)``."""
    covered = weight > 0
    # Whole-array reductions: indexing sums with the mask would copy K x rows twice.
    classes = np.where(covered, sums.argmax(axis=0), NODATA_CLASS).astype(np.uint8)
    with np.errstate(divide="ignore", invalid="ignore"):
        percent = np.round(sums.max(axis=0).astype(np.float32) / weight.astype(np.float32)
                           / 255.0 * 100.0)
    confidence = np.where(covered, percent, NODATA_CONFIDENCE).astype(np.uint8)
    return classes, confidence


def pack(first: int, array: np.ndarray) -> PackedRows:
    array = np.ascontiguousarray(array)
    return PackedRows(first, array.shape, array.dtype.str, zlib.compress(array, ZLIB_LEVEL))


def unpack(rows: PackedRows) -> np.ndarray:
    return np.frombuffer(zlib.decompress(rows.data), np.dtype(rows.dtype)).reshape(rows.shape)


def counts_by_strip(chips: Iterable[Chip]) -> dict[int, list[int]]:
    """Strip -> [chips overlapping it, chips counted in it] for chips of one tile."""
    by_strip: dict[int, list[int]] = {}
    for chip in chips:
        bounds = strip_bounds(chip.tile_height, chip.tile_width, chip.size, chip.stride)
        own = own_strip(chip.row, bounds)
        for j in strips_touched(chip.row, chip.height, bounds):
            counts = by_strip.setdefault(j, [0, 0])
            counts[0] += 1
            counts[1] += j == own
    return by_strip


def failed_parts(chips: Sequence[Chip]) -> list[StripPart]:
    """Chips the model failed on: counted by every strip they overlap, no pixels."""
    return [StripPart(strip=j, chips=n, own=own, own_failed=own)
            for j, (n, own) in sorted(counts_by_strip(chips).items())]


def block_parts(predictions: Sequence[ChipPrediction], confidence: bool) -> list[StripPart]:
    """One block's scored chips -> one :class:`StripPart` per output strip they overlap.

    The block must hold every scored chip of its chip rows (the chipper cuts one block per
    strip task; inference splits off only the chips it failed on, which add nothing to a
    blend): then a row no chip row outside the block covers has all its sums here, and is
    final. Rows a chip row outside the block may cover travel as sums.
    """
    first = predictions[0].chip
    height, width, size, stride = first.tile_height, first.tile_width, first.size, first.stride
    starts = chip_starts(height, size, stride)
    k = predictions[0].probabilities.shape[0]
    top = min(p.chip.row for p in predictions)
    bottom = max(p.chip.row + p.chip.height for p in predictions)
    acc = np.zeros((k + 1, bottom - top, width), sums_dtype(overlaps(size, stride)))
    for p in predictions:
        chip = p.chip
        h, w = chip.height, chip.width
        valid = chip.valid[:h, :w]
        rows, cols = slice(chip.row - top, chip.row - top + h), slice(chip.col, chip.col + w)
        acc[:k, rows, cols] += np.where(valid, p.probabilities, np.uint8(0))
        acc[k, rows, cols] += valid
    kmin = min(p.chip.row // stride for p in predictions)
    kmax = max(p.chip.row // stride for p in predictions)
    # Rows no chip row before kmin or after kmax covers: every chip over them is here.
    lo = max(top, starts[kmin - 1] + size if kmin > 0 else 0)
    hi = min(bottom, starts[kmax + 1] if kmax + 1 < len(starts) else height)
    parts = []
    bounds = strip_bounds(height, width, size, stride)
    for j, (n, own) in sorted(counts_by_strip(p.chip for p in predictions).items()):
        start, end = bounds[j]
        a, b = max(start, top), min(end, bottom)
        fa, fb = max(a, lo), min(b, hi)
        final, sums = None, []
        if fa < fb:
            classes, percent = finish(acc[:k, fa - top : fb - top], acc[k, fa - top : fb - top])
            layers = (classes, percent) if confidence else (classes,)
            final = pack(fa - start, np.stack(layers))
            shared = [(a, fa), (fb, b)]
        else:
            shared = [(a, b)]
        sums = [pack(r0 - start, acc[:, r0 - top : r1 - top]) for r0, r1 in shared if r0 < r1]
        parts.append(StripPart(strip=j, chips=n, own=own, final=final, sums=tuple(sums)))
    return parts


def blend_parts(parts: Iterable[StripPart], num_classes: int, height: int, width: int,
                most: int = 1 << 16, confidence: bool = False,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classes, confidence %, valid pixels per class) of one strip of ``height`` rows from
    its parts. ``most``: the most chips that cover one pixel (sizes the sums)."""
    parts = list(parts)
    sums = np.zeros((num_classes + 1, height, width), sums_dtype(most))
    shared = np.zeros(height + 1, bool)  # rows some part sent as sums
    for part in parts:
        for rows in part.sums:
            values = unpack(rows)
            sums[:, rows.first : rows.first + values.shape[1]] += values
            shared[rows.first : rows.first + values.shape[1]] = True
    classes = np.full((height, width), NODATA_CLASS, np.uint8)
    percent = np.full((height, width), NODATA_CONFIDENCE, np.uint8)
    edges = np.flatnonzero(np.diff(np.concatenate([[False], shared])))
    for top, bottom in zip(edges[::2], edges[1::2], strict=True):  # only the shared rows
        classes[top:bottom], percent[top:bottom] = finish(sums[:num_classes, top:bottom],
                                                          sums[num_classes, top:bottom])
    del sums
    for part in parts:
        if part.final is None:
            continue
        values = unpack(part.final)
        rows = slice(part.final.first, part.final.first + values.shape[1])
        classes[rows] = values[0]
        if confidence:
            if values.shape[0] < 2:
                raise ValueError(f"strip {part.strip} arrived without its confidence band")
            percent[rows] = values[1]
    counts = np.bincount(classes[classes != NODATA_CLASS], minlength=num_classes)
    return classes, percent, counts
