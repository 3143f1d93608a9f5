"""The whole-tile blend as the stream did it before strip-keyed assembly: the test oracle.

Strip-keyed assembly must give pixel-identical rasters; this is the previous algorithm kept as
the reference (it holds every prediction of a tile, which is why the stream no longer uses it).
"""

from __future__ import annotations

from itertools import groupby

import numpy as np

from transforms.geometry import chip_starts
from transforms.records import NODATA_CLASS


def blended(manifest, predictions, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(classes (H, W) uint8, confidence percent (H, W) uint8) of the whole tile."""
    size, width, height = manifest.chip_size, manifest.width, manifest.height
    by_row = {row: list(group) for row, group in
              groupby(sorted(predictions, key=lambda p: p.chip.row), key=lambda p: p.chip.row)}
    starts = chip_starts(height, size, manifest.stride)
    classes = np.full((height, width), NODATA_CLASS, np.uint8)
    confidence = np.full((height, width), 255, np.uint8)
    acc = np.zeros((num_classes, size, width), np.float32)
    weight = np.zeros((size, width), np.float32)
    for i, row in enumerate(starts):
        for pred in by_row.get(row, ()):
            chip = pred.chip
            h, w = chip.height, chip.width
            valid = chip.valid[:h, :w]
            acc[:, :h, chip.col : chip.col + w] += pred.probabilities * valid
            weight[:h, chip.col : chip.col + w] += valid
        end = starts[i + 1] if i + 1 < len(starts) else height
        done = min(end, height) - row
        a, wt = acc[:, :done], weight[:done]
        covered = wt > 0
        block = np.full(wt.shape, NODATA_CLASS, np.uint8)
        block[covered] = a[:, covered].argmax(axis=0)
        conf = np.full(wt.shape, 255, np.uint8)
        conf[covered] = np.round(a[:, covered].max(axis=0) / wt[covered] / 255.0 * 100.0)
        classes[row : row + done], confidence[row : row + done] = block, conf
        acc = np.concatenate([acc[:, done:], np.zeros((num_classes, done, width), np.float32)], 1)
        weight = np.concatenate([weight[done:], np.zeros((done, width), np.float32)], 0)
    return classes, confidence
