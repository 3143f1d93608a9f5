"""Assembly's strip step (stateful per strip): wait for every chip that overlaps the strip,
blend, write the strip as a GeoTIFF piece beside the COG, report its class counts.

Its state is one strip's parts (transforms/blend.py) and the reports of the strip tasks that
overlap it (what to expect); it does not wait for the rest of the tile to be read. At the
timeout it writes what it has (missing chips are nodata); at a drain it writes nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import apache_beam as beam
from apache_beam.coders import PickleCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import (
    BagStateSpec,
    CombiningValueStateSpec,
    ReadModifyWriteStateSpec,
    on_timer,
)

from transforms import cog, timeouts
from transforms.blend import blend_parts, overlaps
from transforms.cards import STAGE, WithCards
from transforms.deadletter import dead_letter
from transforms.geometry import chip_starts, expected_in_strip, rows_touching, strip_bounds
from transforms.guards import describe
from transforms.records import StripPart, StripReport, StripResult, TileManifest


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


class _AssembleStripFn(WithCards):
    """One output strip: waits for the reports of the strip tasks whose chip rows overlap it
    (what to expect) and for every chip they emitted, blends, writes a piece. It does not wait
    for the rest of the tile to be read."""

    WALL_CLOCK, END_OF_INPUT = timeouts.timer_specs()
    REPORTS = BagStateSpec("reports", PickleCoder())
    PLAN = ReadModifyWriteStateSpec("plan", PickleCoder())  # once every report is in
    PIECES = BagStateSpec("pieces", PickleCoder())  # StripParts, one per block
    ARRIVED = CombiningValueStateSpec("arrived", VarIntCoder(), _Total())  # chips held

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.strips = Metrics.counter("tilestream", "strips_written")

    def process(self, element: tuple[str, StripReport | StripPart],
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
            arrived.add(item.chips)
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

    def _finish(self, key: str, manifest: TileManifest, held: list[StripPart], complete: bool):
        j = _strip(key)
        start, stop = strip_bounds(manifest.height, manifest.width, manifest.chip_size,
                                   manifest.stride)[j]
        own = sum(p.own for p in held)
        failed = sum(p.own_failed for p in held)
        expected_own = expected_pieces(manifest, j, own_only=True)
        result = StripResult(strip=j, counts=(0,) * self._card.num_classes,
                             scored=own - failed, failed=failed,
                             missing=expected_own - own, complete=complete)
        try:
            classes, confidence, counts = blend_parts(
                held, self._card.num_classes, stop - start, manifest.width,
                overlaps(manifest.chip_size, manifest.stride), self._confidence)
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


def _held(parts) -> list[StripPart]:
    return list(parts.read())


def _strip(key: str) -> int:
    return int(key.rsplit("#", 1)[1])


def expected_pieces(manifest: TileManifest, strip: int, own_only: bool = False) -> int:
    """Chips strip ``strip`` waits for: every chip expected back from the chip rows that
    overlap it (``own_only``: only those counted in it). Asked once per arriving part, so
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

def strip_count(manifest: TileManifest) -> int:
    return len(strip_bounds(manifest.height, manifest.width, manifest.chip_size,
                            manifest.stride))
