"""One timeout helper for every stateful step (granules, dedup, tile assembly).

Streaming uses processing-time timers ("N seconds after the first piece arrived"). A bounded
backfill must not wait hours for wall-clock timers, so there the same timer is an event-time timer
at the end of the global window: it fires once all input has been read.

A stream arms that end-of-input timer too: a stream's watermark passes the end of the global
window only when its input ends, which for Pub/Sub is a drain (Dataflow documents that a drain
advances the watermark to infinity; event-time timers fire as it passes them). Its callback is
each step's drain path; it also clears the wall-clock timer, whose watermark hold would otherwise
keep the drain waiting for the timeout (docs/operations.md, "What a drain does").
"""

from __future__ import annotations

import time

from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import TimerSpec
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp


def timer_specs() -> tuple[TimerSpec, TimerSpec]:
    """A (wall-clock, end-of-input) pair; each DoFn needs its own, Beam binds one callback each."""
    return (TimerSpec("wall_clock", TimeDomain.REAL_TIME),
            TimerSpec("end_of_input", TimeDomain.WATERMARK))


def arm(wall_clock_timer, end_of_input_timer, streaming: bool, after_secs: float) -> None:
    """Set the step's timeout ``after_secs`` from now (streaming) and its end-of-input timer
    (the timeout of a backfill, the drain path of a stream)."""
    if streaming:
        wall_clock_timer.set(Timestamp.of(time.time() + after_secs))
    end_of_input_timer.set(GlobalWindow().max_timestamp())
