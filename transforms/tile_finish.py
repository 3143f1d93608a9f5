"""Assembly's tile step (stateful per tile, small counters only): once every strip is
written, stitch the pieces into the COG (a VRT of the pieces -> COG, windowed reads), delete
them, write the STAC Item, and emit the tile row.

A tile still incomplete at the timeout is written as partial and reported in the dead letters.
One still incomplete when the stream's input ends (a drain) is not: a partial tile row would
read as an answer, so the tile becomes one ``drained`` event with every message it answers and
its pieces are deleted.
"""

from __future__ import annotations

import logging
import time

import apache_beam as beam
import numpy as np
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import BagStateSpec, ReadModifyWriteStateSpec, on_timer

from transforms import cog, stac, timeouts
from transforms.cards import STAGE, WithCards
from transforms.deadletter import dead_letter, drained
from transforms.guards import describe
from transforms.records import StripResult, TileManifest
from transforms.strip_assembly import expected_pieces, strip_count
from transforms.tile_rows import drift_columns, tile_row_of

LOG = logging.getLogger("tilestream")


class _FinishTileFn(WithCards):
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
        if manifest is not None and len({r.strip for r in held}) >= strip_count(manifest):
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
            f"{strip_count(manifest)} strips written when this job's input ended; no tile row: "
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
        strips = strip_count(manifest)
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
            row = tile_row_of(manifest, scored, failed, complete, counts, uri, card)
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
