"""The local stream's pacing: the chipper waits while too many chips are cut but not scored.

Beam's in-process runner has no back-pressure: a fast chipper would cut a whole tile while the
model scores its first batches, and memory would follow the tile. With ``--max_chips_in_flight``
a strip task waits (parked in state, not blocking its thread) until the model has caught up.
Dataflow paces bundles itself, so the default there is no limit and nothing here counts.
"""

from __future__ import annotations

import threading
import time

from transforms import process

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
