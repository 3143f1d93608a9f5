"""Local mode only: every change this process makes to Beam and Google clients for the stack.

Each is a :class:`transforms.process.Patch` (checked against the Beam version and the source it
replaces; ``tests/test_process.py`` is the tripwire). ``pipeline.main`` applies them only with
``--local`` and an in-process runner, which it refuses to combine with any other runner, so none
of this reaches a Dataflow worker (``tests/test_dataflow.py`` checks the launcher never imports
this module).

1. **The emulators' clients** (:func:`apply`). Beam 2.77 has no option for a BigQuery endpoint:
   ``BigQueryWrapper`` builds an apitools ``BigqueryV2`` client hard-wired to
   bigquery.googleapis.com plus a ``google.cloud.bigquery.Client`` that asks google-auth for
   credentials (a metadata-server probe or an interactive flow on a machine without them). Both
   are pointed at the emulator; Beam's GCS helpers are told "anonymous" up front instead of
   backing off ~15 s looking for credentials. Pub/Sub, GCS and GDAL honour environment
   variables, which this sets.
2. **Identities** (``pipeline/local/identity.py``): every anonymous request of this process
   carries the identity it acts as, for the recording proxies; GDAL sends the same header
   (``GDAL_HTTP_HEADERS``).
3. **The Pub/Sub reader** (:func:`pubsub_reader`): the in-process runner's Pub/Sub source reads
   through a client of ours (bounded pulls, large messages, the journal, the identity). Once
   the stream drains (:func:`pubsub_drain`) the source reads nothing more and its watermark
   moves past every step's end-of-input timer, as Dataflow's drain moves it to infinity: the
   event-time timers a drain fires fire here too (docs/operations.md, "What a drain does").
4. **The in-process runner's scheduling and metrics** (:func:`install_runner_fixes`). Three costs,
   found on one 3,660² / 7,320² tile through the local stream (py-spy, then timestamps and
   ``gc`` counts of what stayed alive), and one loss; none exists on Dataflow, whose workers
   fuse steps into stages, build a step's runner once per bundle processor, process a step's
   work in arrival order and report their own metrics.

   - *Spec inspection per bundle.* The runner starts every bundle of every stateful step by
     re-deriving the DoFn's state and timer specs (``userstate.get_dofn_specs``: an
     ``inspect.signature`` of every method), twice: 2 s of the last 4 of a 3,660² tile. The
     answer is memoised per DoFn class (the specs are the defaults of the class's methods); a
     DoFn that binds methods on the instance itself is inspected as before.
   - *Serial steps fall behind.* A stateful step (and a GroupByKey) runs one bundle at a time
     from a queue that the runner pops from the newest end, and each next bundle joins the back
     of the runner's single work queue, so a strip's predictions reached assembly only after the
     whole tile was scored. Now the oldest bundle goes first, straight to the front of the work
     queue once the step is free: paced 7,320² peaks at 0.91-0.94 GB, flat through the tile,
     against 1.2-1.8 GB.
   - *Steps started on nothing.* Every ParDo bundle commits a bundle per output, empty or not,
     and the runner starts each consumer on it: one 3,660² tile started ~25,000 bundles (the
     dead-letter and results branches the most), each unpickling its DoFn. Empty bundles no
     longer start a step (the watermark manager already leaves them out): 3.3 ms of CPU a chip
     in the stream's process instead of 5.6.
   - *Lost counters.* Each worker's state sampler caches a step's state, and with it the first
     bundle's metrics container, so later bundles counted into a container already committed:
     ``--metrics_file`` said 10 messages in for 12 (1 for 12 when the first pull held one). A
     container per worker and step, emptied as each bundle starts, keeps every bundle's counts
     (:func:`bundle_metrics`).
"""

from __future__ import annotations

import functools
import os
import queue
import threading
import types
from collections.abc import Callable
from typing import Any

from pipeline.local.identity import IDENTITY, authorization, current_identity
from pipeline.local.stack import LocalStack
from transforms.process import Patch

# --- the emulators' clients -------------------------------------------------------------------

class _EmulatorBigQueryModule:
    """Stands in for the ``google.cloud.bigquery`` module inside Beam's bigquery_tools: only
    ``Client`` differs (bound to the emulator); every other attribute is the real module's."""

    def __init__(self, client_factory):
        from google.cloud import bigquery

        self._module = bigquery
        self.Client = client_factory

    def __getattr__(self, name):
        return getattr(self._module, name)


def emulator_patches(stack: LocalStack) -> list[Patch]:
    """Beam's BigQuery clients bound to ``stack``; Beam's own credentials lookup skipped."""

    def apitools_client(original):
        def _bigquery_client(_pipeline_options=None):
            from apache_beam.internal.http_client import get_new_http
            from apache_beam.io.gcp.internal.clients import bigquery as bq_api

            return bq_api.BigqueryV2(url=f"{stack.bigquery_url}/bigquery/v2/",
                                     http=get_new_http(), get_credentials=False,
                                     credentials=None, response_encoding="utf8",
                                     additional_http_headers={"authorization": authorization()})

        _bigquery_client.__wrapped__ = original
        return _bigquery_client

    def client_module(_original):
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import bigquery

        return _EmulatorBigQueryModule(functools.partial(
            bigquery.Client, project=stack.project, credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=stack.bigquery_url)))

    def anonymous(original):
        def get_service_credentials(cls, pipeline_options):
            return None  # anonymous: the emulators need no credentials, the proxies an identity

        get_service_credentials.__wrapped__ = original
        return get_service_credentials

    def results_publisher(original):
        def publisher_client():
            return stack.publisher(identity=current_identity())

        publisher_client.__wrapped__ = original
        return publisher_client

    return [
        Patch("results-publisher", "transforms.results:publisher_client", "93de996dab254535",
              results_publisher, "the stream's result events go to the emulator, signed by "
              "this process's identity (its publisher commits from threads of its own)",
              required=True, package="tilestream", written_for=None),
        Patch("bigquery-apitools-client", "apache_beam.io.gcp.bigquery_tools:"
              "BigQueryWrapper._bigquery_client", "51177011e8870ba6", apitools_client,
              "Beam has no BigQuery endpoint option; table calls go to the emulator",
              required=True),
        Patch("bigquery-cloud-client", "apache_beam.io.gcp.bigquery_tools:gcp_bigquery",
              "e9d5e4bfe7fd4abb", client_module,
              "streaming inserts use google.cloud.bigquery.Client, bound to the emulator here",
              required=True, watch="apache_beam.io.gcp.bigquery_tools:BigQueryWrapper.__init__"),
        Patch("beam-credentials", "apache_beam.internal.gcp.auth:"
              "_Credentials.get_service_credentials", "6cfbe51f7d9bb251", anonymous,
              "without credentials Beam's helpers back off ~15 s before going anonymous"),
    ]


def apply(stack: LocalStack) -> None:
    """Point this process's Google clients, Beam's included, at ``stack``."""
    os.environ.update(stack.env())
    os.environ["GDAL_HTTP_HEADERS"] = f"Authorization: {authorization()}"
    IDENTITY.install()
    for patch in emulator_patches(stack):
        patch.install()


# --- the Pub/Sub reader -----------------------------------------------------------------------

def pubsub_reader(make_client: Callable[[], Any]) -> Patch:
    """The in-process runner's Pub/Sub source reads through ``make_client()`` (one per read
    transform): a SubscriberClient-like object whose ``pull`` the runner calls."""

    def client_state(original):
        def _get_subscriber_client_state_unlocked(cls, transform):
            from apache_beam.runners.direct import transform_evaluator as te

            state = cls._subscriber_client_cache.get(transform)
            if state is None:
                state = te._PubSubSubscriberClient(make_client())
                cls._subscriber_client_cache[transform] = state
            return state

        _get_subscriber_client_state_unlocked.__wrapped__ = original
        return _get_subscriber_client_state_unlocked

    return Patch("pubsub-reader", "apache_beam.runners.direct.transform_evaluator:"
                 "_PubSubReadEvaluator._get_subscriber_client_state_unlocked",
                 "ac65facba8e781cc", client_state,
                 "the journal, bounded pulls and large messages for the local stream's reads",
                 required=True)


def pubsub_drain(draining: Callable[[], bool]) -> Patch:
    """Once ``draining()``, the in-process runner's Pub/Sub source (which reads nothing more:
    the journal's pull answers empty) holds its watermark at the end of the global window
    instead of the wall clock, so the end-of-input timers of a drain fire.

    Not at infinity, as Dataflow's drain does: this runner has no watermark holds for timers, so
    every step's watermark would be past the global window before those timers' outputs
    arrive, and its GroupByKeys (Beam's streaming inserts reshuffle) drop such elements as late.
    At the window's end they are on time, as the holds keep them on Dataflow."""

    def finish(original):
        def finish_bundle(self):
            result = original(self)
            if draining():
                from apache_beam.transforms.window import GlobalWindow

                result.keyed_watermark_holds[None] = GlobalWindow().end
            return result

        finish_bundle.__wrapped__ = original
        return finish_bundle

    return Patch("pubsub-drain", "apache_beam.runners.direct.transform_evaluator:"
                 "_PubSubReadEvaluator.finish_bundle", "8f3f89b8ce538419", finish,
                 "a local stop drains as Dataflow does: input ends, the end-of-input timers "
                 "fire", required=True)


# --- the in-process runner's scheduling ---------------------------------------------------------

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


def executor_with_front_door(original):
    """``_ExecutorService.__init__`` whose workers take work from a :class:`_WorkQueue`."""
    from apache_beam.runners.direct import executor

    def __init__(self, num_workers):
        self.queue = _WorkQueue()
        self.workers = [executor._ExecutorService._ExecutorServiceWorker(self.queue, i)
                        for i in range(num_workers)]
        self.shutdown_requested = False

    __init__.__wrapped__ = original
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


def bundle_metrics(original):
    """``executor.MetricsContainer``: one container per worker thread and step, emptied as
    each bundle starts. The runner makes a container per bundle, but each worker's state sampler
    caches the step's first state, and with it the first bundle's container, so every later
    bundle's counters land in a container already committed and are lost (a stream that read 12
    messages reported 10)."""
    held = threading.local()

    def container(step_name):
        by_step = held.__dict__.setdefault("by_step", {})
        found = by_step.get(step_name)
        if found is None:
            found = by_step[step_name] = original(step_name)
        else:
            found.reset()
        return found

    container.__wrapped__ = original
    return container


def consumers_of_elements(original):
    """``_ExecutorServiceParallelExecutor.schedule_consumers`` for bundles that hold elements.
    Every ParDo bundle commits a bundle per output, empty or not, and the runner schedules each
    consumer on it: a stream with its dead-letter and results branches started ~25,000 bundles
    for one 3,660² tile, all but ~160 of them on an empty bundle, each unpickling its DoFn. The
    watermark manager already leaves empty bundles out of its pending work ("they do not impact
    watermarks and should not trigger downstream execution", its own comment); timers reach a
    step by a path of their own."""

    def schedule_consumers(self, committed_bundle) -> None:
        if committed_bundle.has_elements():
            original(self, committed_bundle)

    schedule_consumers.__wrapped__ = original
    return schedule_consumers


def _in_order(original):
    serial_in_order.__wrapped__ = original
    return serial_in_order


RUNNER_FIXES = (
    Patch("memoised-dofn-specs", "apache_beam.transforms.userstate:get_dofn_specs",
          "eeb36145d3115aa0", memoised, "2 s of spec inspection per 3,660² tile"),
    # imported by name there, so patched there too
    Patch("memoised-dofn-specs-evaluator",
          "apache_beam.runners.direct.transform_evaluator:get_dofn_specs",
          "eeb36145d3115aa0", memoised, "2 s of spec inspection per 3,660² tile"),
    Patch("work-queue-front-door", "apache_beam.runners.direct.executor:"
          "_ExecutorService.__init__", "d830ab76bdad2adb", executor_with_front_door,
          "serial steps' next bundles go to the front of the work queue"),
    Patch("serial-steps-in-order", "apache_beam.runners.direct.executor:"
          "_SerialEvaluationState._update_currently_evaluating", "ee2071ff91b08184", _in_order,
          "serial steps run their bundles oldest first"),
    Patch("consumers-of-elements", "apache_beam.runners.direct.executor:"
          "_ExecutorServiceParallelExecutor.schedule_consumers", "5c15aecb5546afe6",
          consumers_of_elements, "no step is started on an empty bundle"),
    Patch("bundle-metrics", "apache_beam.runners.direct.executor:MetricsContainer",
          "0e12e5cc461d2f5d", bundle_metrics,
          "counters of every bundle reach the job's metrics, not only each worker's first",
          required=True, watch="apache_beam.runners.direct.executor:TransformExecutor.call"),
)


def install_runner_fixes() -> None:
    """Take the scheduling costs out of the in-process runner, and make its metrics whole, in
    this process."""
    for patch in RUNNER_FIXES:
        patch.install()


def all_patches(stack: LocalStack) -> list[Patch]:
    """Every local patch (for the tripwire test)."""
    return [IDENTITY, *emulator_patches(stack), pubsub_reader(lambda: None),
            pubsub_drain(lambda: False), *RUNNER_FIXES]
