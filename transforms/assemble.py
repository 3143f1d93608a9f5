"""Stage 6: chip predictions -> one prediction COG per tile on GCS plus one BigQuery tile row.

Strip-keyed, so that no state grows with a tile's chip count:

1. ``RouteToStrips`` (transforms/strip_route.py, fused with scoring) blends each block of
   predictions where it was scored (transforms/blend.py) and keys what it gives each output
   strip it overlaps (strip ``j`` is rows ``starts[j]..starts[j+1]`` of the chip grid) by tile
   version and strip: the rows only its chips cover as a class map, the rows it shares with the
   next block as integer sums. Strip reports go to the strips they overlap (what to expect),
   the tile's manifest to the tile.
2. ``AssembleStrips`` (transforms/strip_assembly.py, stateful per strip) adds a strip's parts as
   soon as every chip overlapping it has been scored or has failed, writes it as a small GeoTIFF
   piece beside the COG, and reports its class counts. Its state is one strip's parts.
3. ``FinishTiles`` (transforms/tile_finish.py, stateful per tile, small counters only) stitches
   the pieces into the COG, deletes them, and emits the tile row (transforms/tile_rows.py).

A strip or tile still incomplete at the timeout is written as partial (missing chips are nodata)
and reported in the dead letters. One still incomplete when a stream's input ends (a drain) is
not: a partial tile row would read as an answer, so the tile becomes one ``drained`` event with
every message it answers and its pieces are deleted; the other release of a blue-green pair
answers it, or its message published again.

The raster has exactly the input's CRS, transform and size: a
uint8 class map with the card's colour table and nodata 255, optionally a second band with
confidence in percent. Where chips overlap (stride < chip size) their class probabilities are
summed over valid pixels, then arg-maxed: the sums are integers, so the result does not depend
on how the chips are grouped or the order they arrive in (pixel-identical to blending the whole
tile at once).
"""

from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam

from model.card import ModelCard
from transforms.deadletter import DEAD_LETTER_TAG
from transforms.records import KEYED
from transforms.strip_assembly import _AssembleStripFn
from transforms.strip_route import TILES_TAG, _RouteFn
from transforms.tile_finish import _FinishTileFn
from transforms.tile_rows import drift_columns

__all__ = ["TILES_TAG", "AssembleTiles", "AssembledTiles", "_AssembleStripFn", "_FinishTileFn",
           "_RouteFn", "drift_columns"]


class AssembledTiles(NamedTuple):
    tiles: beam.PCollection  # tile rows
    dead_letters: beam.PCollection


class AssembleTiles(beam.PTransform):
    """(manifests, strip reports, predictions, failed chips) -> tile rows + dead letters, strip
    by strip."""

    def __init__(self, card: ModelCard, output_prefix: str, timeout_secs: float,
                 streaming: bool, confidence_band: bool = False,
                 registry_uri: str | None = None):
        super().__init__()
        args = (card, output_prefix, timeout_secs, streaming, confidence_band, registry_uri)
        self._confidence = confidence_band
        self._strips = _AssembleStripFn(*args)
        self._tiles = _FinishTileFn(*args)

    def expand(self, pcolls) -> AssembledTiles:
        manifests, reports, predictions, failed = pcolls
        # Inputs arrive in the global window (ScoreChips leaves its batch windows).
        routed = ((manifests, reports, predictions, failed)
                  | "Merge" >> beam.Flatten()
                  | "RouteToStrips" >> beam.ParDo(_RouteFn(self._confidence)).with_outputs(
                      TILES_TAG, main="strips"))
        strips = (routed.strips
                  | "StripKeys" >> beam.Map(lambda kv: kv).with_output_types(KEYED)
                  | "AssembleStrips" >> beam.ParDo(self._strips).with_outputs(
                      DEAD_LETTER_TAG, main="results"))
        tiles = ((routed[TILES_TAG], strips.results)
                 | "ToTiles" >> beam.Flatten()
                 | "TileKeys" >> beam.Map(lambda kv: kv).with_output_types(KEYED)
                 | "FinishTiles" >> beam.ParDo(self._tiles).with_outputs(DEAD_LETTER_TAG,
                                                                         main="tiles"))
        letters = ((strips[DEAD_LETTER_TAG], tiles[DEAD_LETTER_TAG])
                   | "AssemblyLetters" >> beam.Flatten())
        return AssembledTiles(tiles.tiles, letters)
