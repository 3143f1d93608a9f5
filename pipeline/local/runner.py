"""Local mode only: two scheduling costs of Beam's in-process runner, taken out.

Both were found on one 3,660² / 7,320² tile through the local stream (py-spy, then timestamps
and ``gc`` counts of what stayed alive); neither
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
2. **Serial steps fall behind.** A stateful step (and a GroupByKey) runs one bundle at a time
   from a queue of its own that the runner pops from the newest end, and each next bundle joins
   the back of the runner's single work queue. While strip reports and timers kept arriving,
   a strip's predictions reached assembly only after the whole tile was scored; with the
   oldest popped first, a 7,320² tile's strip step still got one turn per strip task (3-4 s)
   for the two bundles each task sends it, so pieces piled up and peak memory followed the
   tile. Now the oldest bundle goes first, straight to the front of the work queue once the
   step is free: paced 7,320² peaks at 0.91-0.94 GB, flat through the tile, against
   1.2-1.8 GB.
"""

from __future__ import annotations

import functools
import queue
import types
from collections.abc import Callable

_installed = False


class _WorkQueue(queue.Queue):
    """The runner's work queue, with a way in at the front for a serial step's next bundle."""

    def put_front(self, item) -> None:
        with self.not_full:
            self.queue.appendleft(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()


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


def executor_with_front_door(service_class: type) -> Callable:
    """``_ExecutorService.__init__`` whose workers take work from a :class:`_WorkQueue`."""

    def __init__(self, num_workers):
        self.queue = _WorkQueue()
        self.workers = [service_class._ExecutorServiceWorker(self.queue, i)
                        for i in range(num_workers)]
        self.shutdown_requested = False

    return __init__


def serial_in_order(self, new_work, completed_work) -> None:
    """``_SerialEvaluationState._update_currently_evaluating``, oldest bundle first and
    straight to the front of the runner's queue once the step is free."""
    with self._lock:
        if new_work:
            self.serial_queue.append(new_work)
        if completed_work:
            assert self.currently_evaluating == completed_work
            self.currently_evaluating = None
        if self.serial_queue and not self.currently_evaluating:
            next_work = self.serial_queue.popleft()
            self.currently_evaluating = next_work
            self.scheduled.add(next_work)
            service = self.executor_service
            if not service.shutdown_requested:
                front = getattr(service.queue, "put_front", service.queue.put)
                front(next_work)


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
    service = executor._ExecutorService
    service.__init__ = executor_with_front_door(service)
    executor._SerialEvaluationState._update_currently_evaluating = serial_in_order
    _installed = True
