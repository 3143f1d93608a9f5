"""The local stream's pacing: the chipper waits while too many chips are cut but not scored.

Beam's in-process runner has no back-pressure: a fast chipper would cut a whole tile while the
model scores its first batches, and memory would follow the tile. With ``--max_chips_in_flight``
a strip task waits (parked in state, not blocking its thread) until the model has caught up.
Dataflow paces bundles itself, so the default there is no limit and nothing here counts.
The stream's chipper DoFn, which parks and retries its strip tasks, is here with the count it
reads (:class:`PacedChipStripFn`; the bounded job's chipper never paces, ``transforms/chips.py``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp

from transforms import process
from transforms.chip_reader import TileReader
from transforms.records import ChipBlock, StripTask

PACE_RETRY_SECS = 0.1  # a parked strip task is retried this often
PACE_STALL_SECS = 10.0  # no chip back from the model for this long: start anyway


class InFlight:
    """Chips cut but not yet back from the model, in this process."""

    def __init__(self):
        self._count = 0
        self._returned_at = time.monotonic()
        self._changed = threading.Condition()

    def add(self, n: int) -> None:
        with self._changed:
            if self._count == 0:
                self._returned_at = time.monotonic()
            self._count += n

    def done(self, n: int = 1) -> None:
        with self._changed:
            self._count = max(0, self._count - n)
            self._returned_at = time.monotonic()
            self._changed.notify_all()

    def admits(self, limit: int, wait: float) -> bool:
        """Whether a task may start: under ``limit`` (waiting up to ``wait`` seconds for it),
        or nothing has come back for ``PACE_STALL_SECS`` (a lost count must never stop the
        chipper for good: it is pacing, not accounting)."""
        with self._changed:
            return self._changed.wait_for(
                lambda: (self._count < limit
                         or time.monotonic() - self._returned_at > PACE_STALL_SECS), wait)


def in_flight() -> InFlight:
    """This process's count (the chipper adds, the inference step takes away)."""
    return process.shared("in-flight", "", InFlight)


class PacedChipStripFn(TileReader):
    """A strip task, keyed on its own, -> its chips and report.

    Keying each task apart is what spreads a tile over workers. With ``--max_chips_in_flight``
    a task that would run ahead of the model is parked in state and retried on a timer, so its
    thread (and the bundle, whose chips reach the model only when it commits) moves on.
    """

    TASK = ReadModifyWriteStateSpec("task", PickleCoder())
    RETRY = TimerSpec("retry", TimeDomain.REAL_TIME)
    # A drain (the input's watermark passes the end of the global window) chips a parked task
    # at once: the job finishes what it read, unpaced (docs/operations.md, "What a drain does").
    END_OF_INPUT = TimerSpec("end_of_input", TimeDomain.WATERMARK)

    def process(self, element: tuple[str, StripTask], parked=beam.DoFn.StateParam(TASK),
                retry=beam.DoFn.TimerParam(RETRY),
                end=beam.DoFn.TimerParam(END_OF_INPUT)) -> Iterator:
        _, task = element
        if self._may_start():
            yield from self._run(task)
        else:
            parked.write(task)
            retry.set(Timestamp.of(time.time() + PACE_RETRY_SECS))
            end.set(GlobalWindow().max_timestamp())

    @on_timer(END_OF_INPUT)
    def on_end_of_input(self, parked=beam.DoFn.StateParam(TASK),
                        retry=beam.DoFn.TimerParam(RETRY)) -> Iterator:
        task = parked.read()
        parked.clear()
        retry.clear()
        if task is not None:
            yield from self._run(task)

    @on_timer(RETRY)
    def on_retry(self, parked=beam.DoFn.StateParam(TASK),
                 retry=beam.DoFn.TimerParam(RETRY)) -> Iterator:
        task = parked.read()
        if task is None:
            return
        if self._may_start():
            parked.clear()
            yield from self._run(task)
        else:
            retry.set(Timestamp.of(time.time() + PACE_RETRY_SECS))

    def _may_start(self) -> bool:
        # Never wait here: the in-process runner has one worker thread, and this bundle's chips
        # reach the model only once it commits.
        limit = self._s.max_chips_in_flight
        return not limit or in_flight().admits(limit, wait=0)

    def _run(self, task: StripTask) -> Iterator:
        for item in self.chip(task):
            if self._s.max_chips_in_flight and isinstance(item, ChipBlock):
                in_flight().add(len(item))
            yield item
