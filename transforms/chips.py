"""Stage 4: TileRef -> strip tasks -> ChipBlocks, read with rasterio windows a strip at a time.

A planner opens each tile once and cuts it into strip tasks (``transforms/geometry.py``: runs of
whole chip rows, about 512 pixel rows and at most ~2 Mpx); each task is keyed on its own, so a
runner spreads one tile's tasks over its workers. A task reads its rows in one window, so memory
follows a strip, never the whole tile, emits its chips as one block (the runner's per-element
cost is paid per strip, not per chip) and reports what it found; the tile's manifest is the
merge of its reports. Edge chips are padded (padding is invalid and ignored downstream). Chips
whose valid-pixel fraction is under the threshold are skipped and counted in the tile's
manifest, never lost.

Before a pixel is read, a tile must pass its guards: URIs in the input allow-list, GeoTIFF only
(``transforms/storage.py``), a header within ``--max_tile_pixels``, no complex bands, and a sample
(overviews, or a grid of single-block windows) whose values mostly lie in the card's valid range
(``transforms/radiometry.py``). Reads go through ``transforms/storage.py``'s retries and circuit
breaker; any other exception about a tile is that tile's dead letter.

This module is the stage's Beam shape only: the DoFns route what the reader
(``transforms/chip_reader.py``) returns, the pure cut is ``transforms/chip_cut.py``, raster I/O
``transforms/rasters.py``, and the stream's paced chipper lives with pacing
(``transforms/pacing.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.transforms.userstate import BagStateSpec

from transforms import pacing, storage
from transforms.chip_cut import merge_reports
from transforms.chip_reader import REPORTS_TAG, ChipSettings, TileReader
from transforms.deadletter import DEAD_LETTER_TAG, dead_letter, superseded
from transforms.guards import Refused, describe
from transforms.records import KEYED, Chip, ChipBlock, StripReport, StripTask, TileManifest, TileRef

STAGE = "chips"
MANIFESTS_TAG = "manifests"


def chips_in(outputs: Iterable) -> Iterator[Chip]:
    """The chips among a chipper's outputs, out of their blocks."""
    for item in outputs:
        if isinstance(item, ChipBlock):
            yield from item.chips


def _refusal(tile: TileRef, exc: Exception) -> beam.pvalue.TaggedOutput:
    """A tile that is not chipped: superseded (its object was replaced first: set aside), or
    refused or unreadable (a dead letter), booked against every message the tile answers."""
    if isinstance(exc, storage.Superseded):
        return superseded(STAGE, str(exc), tile=tile)
    reason = describe(exc)
    if not isinstance(exc, Refused):
        reason = f"cannot chip {', '.join(tile.band_uris)}: {reason}"
    return dead_letter(STAGE, reason, tile=tile, payload=repr(tile))


class ChipTileFn(TileReader):
    """One tile -> its chips, strip reports and manifest, in one call: plan, every strip task,
    merge (what `tilestream check` and the benchmarks run; the stream spreads the tasks)."""

    def process(self, tile: TileRef) -> Iterator:
        try:
            tasks = self.plan(tile)
        except Exception as exc:  # the stage boundary: one tile, one letter
            self.close_sources(tile)
            yield _refusal(tile, exc)
            return
        reports = []
        try:
            for task in tasks:
                for item in self.chip(task):
                    if isinstance(item, beam.pvalue.TaggedOutput):
                        reports.append(item.value)
                    yield item
        finally:
            self.close_sources(tile)
        self.tiles.inc()
        yield beam.pvalue.TaggedOutput(MANIFESTS_TAG, merge_reports(reports))


class _PlanStripsFn(TileReader):
    def process(self, tile: TileRef) -> Iterator:
        try:
            tasks = self.plan(tile)
        except Exception as exc:  # the stage boundary: one tile, one letter
            yield _refusal(tile, exc)
            return
        finally:  # its strips are read by ChipStrips, maybe elsewhere
            self.close_sources(tile)
        self.tiles.inc()
        yield from tasks


class _ChipStripOnceFn(TileReader):
    """A strip task -> its chips and report, with no state: a backfill's chipper.

    A runner keeps a stateful step's keys apart, and Beam's portable runner goes further: it
    runs a stateful stage on one SDK worker only (``fn_runner._get_bundle_manager``), and the
    model's steps fuse into the chipper's stage. A bounded job never paces, so it needs no
    state, and its tasks are spread by a reshuffle instead of a key.
    """

    def process(self, task: StripTask) -> Iterator:
        yield from self.chip(task)


class _MergeReportsFn(beam.DoFn):
    """The reports of a tile's strip tasks -> its manifest, once all of them are in."""

    REPORTS = BagStateSpec("reports", PickleCoder())

    def process(self, element: tuple[str, StripReport],
                reports=beam.DoFn.StateParam(REPORTS)) -> Iterator[TileManifest]:
        _, report = element
        reports.add(report)
        held = list(reports.read())
        if len({r.task.index for r in held}) == report.task.count:
            reports.clear()
            yield merge_reports(held)


class ChippedTiles(NamedTuple):
    chips: beam.PCollection  # ChipBlock, one per strip task that cut any chip
    reports: beam.PCollection  # StripReport, one per strip task, as soon as it is read
    manifests: beam.PCollection  # TileManifest, once all strips of a tile are read
    dead_letters: beam.PCollection


class ChipTiles(beam.PTransform):
    """TileRef -> strip tasks -> (spread over workers) -> blocks of chips, plus one manifest
    per tile.

    The planner opens each tile once for its header and guards; its strip tasks are then keyed
    one by one, which shuffles them: on Dataflow a big tile is read by many workers, and its first
    chips are scored while later strips are still being read.
    """

    def __init__(self, settings: ChipSettings, streaming: bool = True):
        super().__init__()
        self._settings = settings
        self._streaming = streaming

    def expand(self, tiles) -> ChippedTiles:
        planned = tiles | "PlanStrips" >> beam.ParDo(_PlanStripsFn(self._settings)).with_outputs(
            DEAD_LETTER_TAG, main="tasks")
        if self._streaming:
            tasks = (planned.tasks
                     | "ByTask" >> beam.Map(lambda t: (f"{t.tile.assignment_key}#{t.index}", t))
                     .with_output_types(KEYED))
            fn: beam.DoFn = pacing.PacedChipStripFn(self._settings)
        else:  # a backfill: spread the tasks over workers, no state (see _ChipStripOnceFn)
            tasks = planned.tasks | "SpreadTasks" >> beam.Reshuffle()
            fn = _ChipStripOnceFn(self._settings)
        chipped = tasks | "ChipStrips" >> beam.ParDo(fn).with_outputs(REPORTS_TAG, main="chips")
        chips, reports = chipped.chips, chipped[REPORTS_TAG]
        if not self._streaming:  # else the stateful merge fuses into the chipper's stage
            reports = reports | "GatherReports" >> beam.Reshuffle()
        manifests = (reports
                     | "ByTile" >> beam.Map(lambda r: (r.task.tile.assignment_key, r))
                     .with_output_types(KEYED)
                     | "MergeReports" >> beam.ParDo(_MergeReportsFn()))
        return ChippedTiles(chips, reports, manifests, planned[DEAD_LETTER_TAG])

