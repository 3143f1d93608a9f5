"""Stage 6: chip predictions -> one prediction COG per tile on GCS plus one BigQuery tile row.

Strip-keyed, so that no state grows with a tile's chip count:

1. ``RouteToStrips`` cuts each prediction of a block into the rows of the output strips it
   overlaps (strip ``j`` is rows ``starts[j]..starts[j+1]`` of the chip grid) and keys each
   strip's pieces of the block, as one element, by tile version and strip; strip reports go to
   the strips they overlap (what to expect), the tile's manifest to the tile.
2. ``AssembleStrips`` (stateful per strip) blends a strip as soon as every chip overlapping it
   has been scored or has failed, writes it as a small GeoTIFF piece beside the COG, and reports
   its class counts. Its state is one strip's pieces.
3. ``FinishTiles`` (stateful per tile, small counters only) stitches the pieces into the COG with
   windowed reads (a VRT of the pieces -> COG), deletes them, and emits the tile row.

A strip or tile still incomplete at the timeout is written as partial (missing chips are nodata)
and reported in the dead letters. One still incomplete when a stream's input ends (a drain) is
not: a partial tile row would read as an answer, so the tile becomes one ``drained`` event with
every message it answers and its pieces are deleted; the other release of a blue-green pair
answers it, or its message published again.

The raster has exactly the input's CRS, transform and size: a
uint8 class map with the card's colour table and nodata 255, optionally a second band with
confidence in percent. Where chips overlap (stride < chip size) their class probabilities are
summed over valid pixels, then arg-maxed: the sums are integers, so the result does not depend
on the order pieces arrive in (pixel-identical to blending the whole tile at once).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Iterable
from typing import NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.coders import PickleCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import (
    BagStateSpec,
    CombiningValueStateSpec,
    ReadModifyWriteStateSpec,
    on_timer,
)

from model.card import ModelCard
from model.serving import CardBook
from transforms import cog, process, stac, timeouts
from transforms.deadletter import DEAD_LETTER_TAG, dead_letter, drained
from transforms.geometry import (
    chip_starts,
    expected_in_strip,
    footprint_wkt,
    own_strip,
    rows_touching,
    strip_bounds,
    strips_touched,
)
from transforms.guards import describe
from transforms.records import (
    KEYED,
    NODATA_CLASS,
    Chip,
    ChipBlock,
    ChipPrediction,
    PredictionBlock,
    StripPiece,
    StripReport,
    StripResult,
    TileManifest,
)
from transforms.sinks import tile_row

STAGE = "assemble"
NODATA_CONFIDENCE = 255

LOG = logging.getLogger("tilestream")


TILES_TAG = "tiles"


class _RouteFn(beam.DoFn):
    """Manifest -> the tile; report -> every strip it overlaps; a block of predictions (or of
    failed chips) -> each strip it touches, as one tuple of that strip's pieces."""

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
        by_strip: dict[int, list[StripPiece]] = {}
        scored = isinstance(item, PredictionBlock)
        for chip_or_prediction in (item.predictions if scored else item.chips):
            for piece in strip_pieces(chip_or_prediction):
                by_strip.setdefault(piece.strip, []).append(piece)
        for j, pieces in by_strip.items():
            yield f"{item.tile.assignment_key}#{j}", tuple(pieces)


def strip_pieces(item: ChipPrediction | Chip) -> Iterable[StripPiece]:
    """A chip's prediction cut into the rows of each strip it overlaps (a failed chip: pieces
    without pixels, so its strips still count it)."""
    chip = item.chip if isinstance(item, ChipPrediction) else item
    bounds = strip_bounds(chip.tile_height, chip.tile_width, chip.size, chip.stride)
    own = own_strip(chip.row, bounds)
    for j in strips_touched(chip.row, chip.height, bounds):
        start, end = bounds[j]
        top, bottom = max(start, chip.row), min(end, chip.row + chip.height)
        piece = StripPiece(strip=j, own=j == own, col=chip.col, offset=top - start,
                           chip_index=chip.index)
        if isinstance(item, ChipPrediction):
            rows = slice(top - chip.row, bottom - chip.row)
            piece = dataclasses.replace(
                piece, probabilities=np.ascontiguousarray(item.probabilities[:, rows]),
                valid=chip.valid[rows, : chip.width].copy())
        yield piece


def blend(pieces: Iterable[StripPiece], num_classes: int, height: int, width: int,
          overlaps: int = 1 << 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(classes, confidence %, valid pixels per class) of one strip from its pieces.

    ``overlaps``: the most chips that cover one pixel. Sums are exact integers in the
    narrowest type that holds them (uint16 up to 257 overlaps: 4 with chip 64 and stride 48),
    so a strip's accumulator is half of float32's, with the same result as summing in float32.
    """
    acc = np.zeros((num_classes, height, width), np.uint16 if overlaps <= 257 else np.uint32)
    weight = np.zeros((height, width), np.uint16 if overlaps < 1 << 16 else np.uint32)
    for piece in pieces:
        if piece.probabilities is None:  # a chip the model failed on: counted, no pixels
            continue
        h, w = piece.valid.shape
        rows, cols = slice(piece.offset, piece.offset + h), slice(piece.col, piece.col + w)
        acc[:, rows, cols] += np.where(piece.valid, piece.probabilities, np.uint8(0))
        weight[rows, cols] += piece.valid
    covered = weight > 0
    # Whole-strip reductions: indexing acc with the mask would copy K x strip twice.
    classes = np.where(covered, acc.argmax(axis=0), NODATA_CLASS).astype(np.uint8)
    with np.errstate(divide="ignore", invalid="ignore"):
        percent = np.round(acc.max(axis=0).astype(np.float32) / weight.astype(np.float32)
                           / 255.0 * 100.0)
    confidence = np.where(covered, percent, NODATA_CONFIDENCE).astype(np.uint8)
    counts = np.bincount(classes[covered], minlength=num_classes)
    return classes, confidence, counts


class _WithCards(beam.DoFn):
    """A DoFn that needs the card of the version each tile was assigned (with a registry)."""

    def __init__(self, card: ModelCard, output_prefix: str, timeout_secs: float,
                 streaming: bool, confidence_band: bool, registry_uri: str | None = None):
        self._card = card
        self._registry_uri = registry_uri
        self._cards: CardBook | None = None
        self._prefix = output_prefix
        self._timeout = timeout_secs
        self._streaming = streaming
        self._confidence = confidence_band
        self._scratch: str | None = None

    def setup(self):
        self._scratch = cog.scratch_dir()
        self._cards = CardBook(self._card, self._registry_uri, process.model_cache())

    def teardown(self):
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def card_of(self, manifest: TileManifest) -> ModelCard:
        """The card of the version this tile was assigned (the stream's own without a registry)."""
        if not manifest.tile.model or self._cards is None:
            return self._card
        return self._cards.get(manifest.tile.model)


class _Total(beam.CombineFn):
    """A running int sum with an int accumulator (what a VarIntCoder state can hold)."""

    def create_accumulator(self) -> int:
        return 0

    def add_input(self, total: int, n: int) -> int:
        return total + n

    def merge_accumulators(self, totals: Iterable[int]) -> int:
        return sum(totals)

    def extract_output(self, total: int) -> int:
        return total


class _AssembleStripFn(_WithCards):
    """One output strip: waits for the reports of the strip tasks whose chip rows overlap it
    (what to expect) and for every chip they emitted, blends, writes a piece. It does not wait
    for the rest of the tile to be read."""

    WALL_CLOCK, END_OF_INPUT = timeouts.timer_specs()
    REPORTS = BagStateSpec("reports", PickleCoder())
    PLAN = ReadModifyWriteStateSpec("plan", PickleCoder())  # once every report is in
    PIECES = BagStateSpec("pieces", PickleCoder())  # tuples of pieces, one per block
    ARRIVED = CombiningValueStateSpec("arrived", VarIntCoder(), _Total())  # pieces held

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.strips = Metrics.counter("tilestream", "strips_written")

    def process(self, element: tuple[str, StripReport | tuple[StripPiece, ...]],
                reports=beam.DoFn.StateParam(REPORTS), plan_state=beam.DoFn.StateParam(PLAN),
                pieces=beam.DoFn.StateParam(PIECES), arrived=beam.DoFn.StateParam(ARRIVED),
                wall=beam.DoFn.TimerParam(WALL_CLOCK), end=beam.DoFn.TimerParam(END_OF_INPUT)):
        key, item = element
        plan = plan_state.read()
        if plan is None and arrived.read() == 0 and not list(reports.read()):  # the first
            timeouts.arm(wall, end, self._streaming, self._timeout)
        if isinstance(item, StripReport):
            reports.add(item)
            plan = strip_plan(list(reports.read()), _strip(key))
            if plan is not None:
                plan_state.write(plan)
        else:
            pieces.add(item)
            arrived.add(len(item))
        if plan is not None and arrived.read() >= expected_pieces(plan, _strip(key)):
            yield from self._finish(key, plan, _held(pieces), complete=True)
            for state in (reports, plan_state, pieces, arrived):
                state.clear()
            wall.clear()
            end.clear()

    @on_timer(WALL_CLOCK)
    def on_wall_clock(self, key=beam.DoFn.KeyParam, reports=beam.DoFn.StateParam(REPORTS),
                      plan_state=beam.DoFn.StateParam(PLAN),
                      pieces=beam.DoFn.StateParam(PIECES),
                      arrived=beam.DoFn.StateParam(ARRIVED)):
        yield from self._timed_out(key, reports, plan_state, pieces, arrived)

    @on_timer(END_OF_INPUT)
    def on_end_of_input(self, key=beam.DoFn.KeyParam, reports=beam.DoFn.StateParam(REPORTS),
                        plan_state=beam.DoFn.StateParam(PLAN),
                        pieces=beam.DoFn.StateParam(PIECES),
                        arrived=beam.DoFn.StateParam(ARRIVED),
                        wall=beam.DoFn.TimerParam(WALL_CLOCK)):
        if not self._streaming:  # a backfill's input is all read: the timeout
            yield from self._timed_out(key, reports, plan_state, pieces, arrived)
            return
        # A drain: no partial piece, no result that would let the tile finish as partial; the
        # tile's own drain path books its messages.
        for state in (reports, plan_state, pieces, arrived):
            state.clear()
        wall.clear()  # its watermark hold would keep the drain waiting for the timeout

    def _timed_out(self, key, reports, plan_state, pieces, arrived):
        known, held = list(reports.read()), _held(pieces)
        for state in (reports, plan_state, pieces, arrived):
            state.clear()
        if known:  # without any report, the tile's own timeout reports the loss
            yield from self._finish(key, strip_plan(known, _strip(key), partial=True), held,
                                    complete=False)

    def _finish(self, key: str, manifest: TileManifest, held: list[StripPiece], complete: bool):
        j = _strip(key)
        start, stop = strip_bounds(manifest.height, manifest.width, manifest.chip_size,
                                   manifest.stride)[j]
        own = [p for p in held if p.own]
        failed = sum(p.probabilities is None for p in own)
        expected_own = expected_pieces(manifest, j, own_only=True)
        result = StripResult(strip=j, counts=(0,) * self._card.num_classes,
                             scored=len(own) - failed, failed=failed,
                             missing=expected_own - len(own), complete=complete)
        try:
            classes, confidence, counts = blend(
                held, self._card.num_classes, stop - start, manifest.width,
                overlaps=math.ceil(manifest.chip_size / manifest.stride) ** 2)
            uri = cog.piece_uri(cog.raster_uri(self._prefix, self.card_of(manifest), manifest), j)
            cog.write_piece(manifest, j, classes, confidence if self._confidence else None, uri,
                            self._scratch)
            result = dataclasses.replace(result, counts=tuple(int(n) for n in counts),
                                         written=True)
        except Exception as exc:  # the tile reports the strip as missing; nothing stops
            yield dead_letter(STAGE, f"strip {j} of {manifest.tile.key} could not be written: "
                                     f"{describe(exc)}", tile=manifest.tile)
        self.strips.inc()
        yield manifest.tile.assignment_key, result


def _held(pieces) -> list[StripPiece]:
    return [piece for group in pieces.read() for piece in group]


def _strip(key: str) -> int:
    return int(key.rsplit("#", 1)[1])


def expected_pieces(manifest: TileManifest, strip: int, own_only: bool = False) -> int:
    """Pieces strip ``strip`` waits for: every chip expected back from the chip rows that
    overlap it (``own_only``: only those counted in it). Asked once per arriving piece, so
    the answer is cached per grid."""
    return expected_in_strip(manifest.height, manifest.width, manifest.chip_size,
                             manifest.stride, manifest.expected_per_row, strip, own_only)


def strip_plan(reports: list[StripReport], strip: int,
               partial: bool = False) -> TileManifest | None:
    """What strip ``strip`` needs of its tile, from the reports of the tasks overlapping it:
    None until all of them are in (``partial``: from whatever is in)."""
    grid = reports[0].task.grid
    per_row = [0] * len(chip_starts(grid.height, grid.chip_size, grid.stride))
    covered = set()
    for report in reports:
        for k, n in enumerate(report.expected):
            per_row[report.task.first_row + k] = n
            covered.add(report.task.first_row + k)
    if not partial and not rows_touching(grid.height, grid.width, grid.chip_size, grid.stride,
                                          strip) <= covered:
        return None
    return TileManifest(tile=reports[0].task.tile, grid=grid, chips_total=0, chips_skipped=0,
                        chips_failed=0, chipped_at=0.0, expected_per_row=tuple(per_row))


class _FinishTileFn(_WithCards):
    """Per tile, small counters only: once every strip is written, stitch the COG, emit the row."""

    WALL_CLOCK, END_OF_INPUT = timeouts.timer_specs()
    MANIFEST = ReadModifyWriteStateSpec("manifest", PickleCoder())
    RESULTS = BagStateSpec("results", PickleCoder())  # one small record per strip

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.written = Metrics.counter("tilestream", "tiles_written")
        self.partial = Metrics.counter("tilestream", "tiles_partial")
        self.drifted = Metrics.counter("tilestream", "tiles_drifted")
        self.write_ms = Metrics.distribution("tilestream", "tile_write_ms")

    def process(self, element: tuple[str, TileManifest | StripResult],
                manifest_state=beam.DoFn.StateParam(MANIFEST),
                results=beam.DoFn.StateParam(RESULTS), wall=beam.DoFn.TimerParam(WALL_CLOCK),
                end=beam.DoFn.TimerParam(END_OF_INPUT)):
        _, item = element
        manifest, held = manifest_state.read(), list(results.read())
        if manifest is None and not held:
            # A little after the strips' own timeout, so partial strips are in by then.
            timeouts.arm(wall, end, self._streaming, self._timeout * 1.2 + 5)
        if isinstance(item, TileManifest):
            manifest = item
            manifest_state.write(item)
        else:
            held.append(item)
            results.add(item)
        if manifest is not None and len({r.strip for r in held}) >= _strip_count(manifest):
            yield from self._finish(manifest, held, complete=True)
            manifest_state.clear()
            results.clear()
            wall.clear()
            end.clear()

    @on_timer(WALL_CLOCK)
    def on_wall_clock(self, key=beam.DoFn.KeyParam,
                      manifest_state=beam.DoFn.StateParam(MANIFEST),
                      results=beam.DoFn.StateParam(RESULTS)):
        yield from self._timed_out(key, manifest_state, results)

    @on_timer(END_OF_INPUT)
    def on_end_of_input(self, key=beam.DoFn.KeyParam,
                        manifest_state=beam.DoFn.StateParam(MANIFEST),
                        results=beam.DoFn.StateParam(RESULTS),
                        wall=beam.DoFn.TimerParam(WALL_CLOCK)):
        if not self._streaming:  # a backfill's input is all read: the timeout
            yield from self._timed_out(key, manifest_state, results)
            return
        manifest, held = manifest_state.read(), list(results.read())
        manifest_state.clear()
        results.clear()
        wall.clear()  # its watermark hold would keep the drain waiting for the timeout
        yield from self._drained(key, manifest, held)

    def _drained(self, key: str, manifest: TileManifest | None, held: list[StripResult]):
        """A tile the stream's input ended on: no tile row (a partial one would read as the
        tile's answer), its written pieces deleted, one ``drained`` event for its messages."""
        written = sorted(r.strip for r in held if r.written)
        if manifest is None:
            yield drained(STAGE, f"tile {key} drained before complete: {len(held)} strips "
                                 "assembled, its manifest not yet in", tile_id=key)
            return
        if written:
            try:
                uri = cog.raster_uri(self._prefix, self.card_of(manifest), manifest)
                cog.remove_pieces(uri, written)
            except Exception as exc:  # leftovers cost storage, not correctness
                logging.getLogger(__name__).warning("pieces of drained tile %s not deleted: %s",
                                                    key, describe(exc))
        yield drained(
            STAGE,
            f"tile {manifest.tile.key} drained before complete: {len(written)} of "
            f"{_strip_count(manifest)} strips written when this job's input ended; no tile row: "
            "the job that reads its message next answers it", tile=manifest.tile)

    def _timed_out(self, key, manifest_state, results):
        manifest, held = manifest_state.read(), list(results.read())
        manifest_state.clear()
        results.clear()
        if manifest is None:
            if held:
                yield dead_letter(STAGE, f"{len(held)} strips of {key} were assembled but the "
                                         "tile's manifest never arrived", tile_id=key)
            return
        yield from self._finish(manifest, held, complete=False)

    def _finish(self, manifest: TileManifest, held: list[StripResult], complete: bool):
        started = time.perf_counter()
        by_strip = {r.strip: r for r in held}
        strips = _strip_count(manifest)
        missing_strips = [j for j in range(strips) if j not in by_strip]
        scored = sum(r.scored for r in by_strip.values())
        failed = (sum(r.failed + r.missing for r in by_strip.values())
                  + sum(expected_pieces(manifest, j, own_only=True) for j in missing_strips))
        complete = (complete and failed == 0 and manifest.chips_failed == 0
                    and all(r.complete and r.written for r in by_strip.values()))
        if failed or missing_strips or not all(r.complete for r in by_strip.values()):
            yield dead_letter(
                STAGE,
                f"tile {manifest.tile.key} incomplete: {scored} of {manifest.chips_expected} "
                f"chips scored, {failed} failed or never arrived, "
                f"{strips - len(missing_strips)} of {strips} strips written; written as partial",
                tile=manifest.tile)
        uri = "(no path)"
        try:
            card = self.card_of(manifest)
            uri = cog.raster_uri(self._prefix, card, manifest)
            written = sorted(j for j, r in by_strip.items() if r.written)
            cog.stitch(manifest, card, uri, written, self._confidence, self._scratch)
            cog.remove_pieces(uri, written)
            counts = np.sum([r.counts for r in by_strip.values()] or
                            [[0] * card.num_classes], axis=0)
            row = self._tile_row(manifest, scored, failed, complete, counts, uri, card)
            row.update(drift_columns(self._card, card, manifest, counts))
            if row["drifted"]:
                self.drifted.inc()
            # STAC out: the prediction's STAC Item beside the COG (transforms/stac.py).
            row["stac_uri"], problem = stac.write_prediction_item(row, manifest, card,
                                                                  self._confidence)
        except Exception as exc:  # one tile's fault must not kill the stream
            yield dead_letter(STAGE, f"writing {uri} failed: {describe(exc)}",
                              tile=manifest.tile)
            return
        self.write_ms.update(int((time.perf_counter() - started) * 1000))
        (self.written if complete else self.partial).inc()
        # One line per tile answered: what a user watching the stream's log wants to see.
        LOG.info("tile %s answered%s: %d chips scored, %.1f s after publish, %s",
                 manifest.tile.key, "" if complete else " (partial)", scored,
                 row["latency_s"], uri)
        if problem:
            yield dead_letter(STAGE, problem, tile=manifest.tile)
        if manifest.failures:  # beside the row, so a restart never sees one without the other
            yield dead_letter("chips", manifest.failures[:2000],
                              tile=manifest.tile)
        yield row

    def _tile_row(self, manifest: TileManifest, scored: int, failed: int, complete: bool,
                  counts: np.ndarray, uri: str, card: ModelCard) -> dict:
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


def _strip_count(manifest: TileManifest) -> int:
    return len(strip_bounds(manifest.height, manifest.width, manifest.chip_size,
                            manifest.stride))


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
        self._strips = _AssembleStripFn(*args)
        self._tiles = _FinishTileFn(*args)

    def expand(self, pcolls) -> AssembledTiles:
        manifests, reports, predictions, failed = pcolls
        # Inputs arrive in the global window (ScoreChips leaves its batch windows).
        routed = ((manifests, reports, predictions, failed)
                  | "Merge" >> beam.Flatten()
                  | "RouteToStrips" >> beam.ParDo(_RouteFn()).with_outputs(TILES_TAG,
                                                                           main="strips"))
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
