"""Local mode only: two scheduling costs of Beam's in-process runner, taken out.

Both were found with py-spy on one 3,660² / 7,320² tile through the local stream; neither
exists on Dataflow, whose workers build a step's runner once per bundle processor and process
a step's work in arrival order. ``pipeline.main`` installs this only with ``--local`` and an
in-process runner; nothing here runs on a Dataflow worker.

1. **Spec inspection per bundle.** The runner starts every bundle of every stateful step by
   re-deriving the DoFn's state and timer specs (``userstate.get_dofn_specs``: an
   ``inspect.signature`` of every method), once to see whether it is stateful and again to
   build its runner: 2 s of the last 4 of a 3,660² tile. The answer is memoised per DoFn
   class: the specs are the defaults of the class's methods (``StateParam``/``TimerParam``),
   the same for every instance; a DoFn that binds methods on the instance itself is inspected
   as before.
2. **Last in, first out.** A stateful step (and a GroupByKey) runs one bundle at a time from a
   queue that the runner pops from its newest end. While new bundles keep arriving (strip
   reports, timers), the oldest wait: a strip's predictions reached assembly only once the
   whole tile had been scored, so every strip of the tile was held at once and peak memory
   followed the tile. The queue is made first in, first out.
"""

from __future__ import annotations

import collections
import functools
import types
from collections.abc import Callable

_installed = False


class _FifoQueue(collections.deque):
    """A deque whose ``pop`` takes the oldest item: the runner's serial queue, in order."""

    def pop(self):
        return self.popleft()


def memoised(inspect: Callable) -> Callable:
    """``userstate.get_dofn_specs`` answering once per DoFn class."""
    by_class: dict[type, tuple[frozenset, frozenset]] = {}

    @functools.wraps(inspect)
    def get_dofn_specs(dofn):
        if any(isinstance(v, types.MethodType) for v in getattr(dofn, "__dict__", {}).values()):
            return inspect(dofn)  # methods bound on the instance: not the class's to answer
        cls = type(dofn)
        if cls not in by_class:
            states, timers = inspect(dofn)
            by_class[cls] = (frozenset(states), frozenset(timers))
        states, timers = by_class[cls]
        return set(states), set(timers)  # callers may change theirs

    return get_dofn_specs


def first_in_first_out(init: Callable) -> Callable:
    """``_SerialEvaluationState.__init__`` whose work queue hands out its oldest item."""

    @functools.wraps(init)
    def fifo_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.serial_queue = _FifoQueue(self.serial_queue)

    return fifo_init


def install() -> None:
    """Patch the in-process runner in this process (idempotent)."""
    global _installed
    if _installed:
        return
    from apache_beam.runners.direct import executor, transform_evaluator
    from apache_beam.transforms import userstate

    specs = memoised(userstate.get_dofn_specs)
    userstate.get_dofn_specs = specs  # is_stateful_dofn and validators look it up here
    transform_evaluator.get_dofn_specs = specs  # imported by name there
    serial = executor._SerialEvaluationState
    serial.__init__ = first_in_first_out(serial.__init__)
    _installed = True
