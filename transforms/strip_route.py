"""Assembly's first step, fused with scoring: each element to the strips or the tile it is for.

A block of predictions is blended here, where it was scored (transforms/blend.py), so that what
crosses the shuffle to a strip is the block's finished rows and the sums of the rows it shares
with the next block, not every chip's probabilities.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam

from transforms.blend import block_parts, failed_parts
from transforms.geometry import chip_starts, strip_bounds, strips_touched
from transforms.records import ChipBlock, PredictionBlock, StripReport, TileManifest

TILES_TAG = "tiles"


class _RouteFn(beam.DoFn):
    """Manifest -> the tile; report -> every strip it overlaps; a block of predictions (or of
    failed chips) -> one :class:`StripPart` for each strip it touches.

    ``confidence``: the raster has a confidence band, so finished rows carry it too.
    """

    def __init__(self, confidence: bool = True):
        self._confidence = confidence

    def process(self, item: TileManifest | StripReport | PredictionBlock | ChipBlock):
        if isinstance(item, TileManifest):  # one tile scored by one version: its own state
            yield beam.pvalue.TaggedOutput(TILES_TAG, (item.tile.assignment_key, item))
            return
        if isinstance(item, StripReport):  # what to expect, to each strip its rows overlap
            task, grid = item.task, item.task.grid
            bounds = strip_bounds(grid.height, grid.width, grid.chip_size, grid.stride)
            starts = chip_starts(grid.height, grid.chip_size, grid.stride)
            touched = {j for r in range(task.first_row, task.stop_row)
                       for j in strips_touched(starts[r],
                                               min(grid.chip_size, grid.height - starts[r]),
                                               bounds)}
            light = dataclasses.replace(item, band_counts=())  # drift is the tile's business
            for j in sorted(touched):
                yield f"{task.tile.assignment_key}#{j}", light
            return
        if isinstance(item, PredictionBlock):
            parts = block_parts(item.predictions, self._confidence) if item.predictions else []
        else:
            parts = failed_parts(item.chips)
        for part in parts:
            yield f"{item.tile.assignment_key}#{part.strip}", part
