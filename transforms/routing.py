"""Stage 3b (with ``--model_registry``): decide once which model version(s) score a tile.

Right after dedup, each tile becomes one element per assignment ``(version, role)`` from
``model.registry.assignments`` on the current channels snapshot: live alone, live and a shadow,
or the canary instead of live. The assignment is stamped on the ``TileRef`` (``model``, ``role``)
and travels with every chip, prediction and manifest, so a tile is scored by exactly one version
per role and never assembled from chips of two versions, even when the channels change mid-tile.

The snapshot comes from a :class:`model.serving.ChannelsFollower` shared by every DoFn instance
of the worker process, whose one daemon thread re-reads the channels every
``--channels_poll_secs`` and fetches and validates what they name; ``process`` only reads the
current snapshot and the follower's news, so a slow registry never stalls a tile. Why not a
side input: on Beam's in-process runner a global-window side input fed by ``PeriodicImpulse``
holds the main input until the side input's window is complete, which in a stream is never; a
per-process poll has the same bound (the poll interval) on every runner and no extra graph. A
version the follower refuses becomes an ``events`` row (disposition ``model``) and a log line;
the stream keeps the snapshot it had. Each piece of news is taken by one DoFn of the process
(all share the job's ``--release``), so each event is written once.

The same channels say whether this job's ``--release`` may answer
(``model.channels.release_role``): only the live release and, after a cut-over, the retiring
one; any other (green on trial, an aborted green, a release the document does not name) has
every assignment ``shadow``, so its rows stay out of the shipped queries. A change of that role
is a ``model`` event (``release R now live``), which ``tilestream release cutover --wait`` waits
for before the old job is drained.
"""

from __future__ import annotations

import dataclasses
import time

import apache_beam as beam
from apache_beam.metrics import Metrics

from model.card import ModelCard
from model.channels import release_role
from model.serving import ChannelsFollower, Snapshot
from transforms import process
from transforms.deadletter import DEAD_LETTER_TAG, dead_letter
from transforms.guards import describe
from transforms.records import DeadLetter, TileRef

STAGE = "inference"  # refusals are about the model the inference step would load
MODEL_EVENT = "model"


def model_event(reason: str) -> beam.pvalue.TaggedOutput:
    """A model load or refusal for the ``events`` table (no message: it is not about one)."""
    return beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, DeadLetter(
        stage=STAGE, reason=reason[:2000], time=time.time(), disposition=MODEL_EVENT))


def process_follower(registry_uri: str, running: ModelCard, start: Snapshot,
                     poll_secs: float) -> ChannelsFollower:
    """The one follower of this worker process for a registry.

    Process-wide (``transforms/process.py``) rather than ``apache_beam.utils.shared.Shared``:
    Beam's in-process runner builds a new DoFn per bundle, and ``Shared`` frees an object once
    no DoFn holds it, which would restart the follower from the start-up snapshot at every
    bundle.
    """
    return process.shared("channels-follower", registry_uri, lambda: ChannelsFollower(
        registry_uri, running, start, process.model_cache(), poll_secs))


def release_event(release: str, role: str) -> str:
    return (f"release {release} now live" if role == "live" else
            f"release {release} now shadow (green on trial, aborted or not the live release): "
            "its rows are role=shadow")


class _AssignFn(beam.DoFn):
    def __init__(self, registry_uri: str, running: ModelCard, start: Snapshot, poll_secs: float,
                 release: str):
        self._args = (registry_uri, running, start, poll_secs)
        self._release = release
        self.refused = Metrics.counter("tilestream", "model_refusals")
        self.switched = Metrics.counter("tilestream", "model_switches")
        self.by_role = {role: Metrics.counter("tilestream", f"tiles_{role}")
                        for role in ("live", "shadow", "canary")}

    def setup(self):
        self._follower = process_follower(*self._args)
        self._follower.start_background()

    def process(self, tile: TileRef):
        update = self._follower.take()  # no I/O and no wait: the follower's thread fetches
        for refusal in update.refusals:
            if not refusal.transient:
                self.refused.inc()
            yield model_event(refusal.reason)
        for switch in update.switches:
            before, after = switch.before.channels, switch.after.channels
            if after.state() != before.state():
                self.switched.inc()
                yield model_event(f"channels now {after.state()} (validated); "
                                  f"tiles from {tile.tile_id} on are routed by them")
            role = release_role(after, self._release)
            if role != release_role(before, self._release):
                yield model_event(release_event(self._release, role))
        snapshot = update.snapshot
        role = release_role(snapshot.channels, self._release)
        try:
            assigned = snapshot.assign(tile.tile_id)
        except Exception as exc:
            yield dead_letter(STAGE, f"no model could be assigned: {describe(exc)}",
                              tile=tile)
            return
        for model, model_role in assigned:
            answer = "shadow" if role == "shadow" else model_role
            self.by_role[answer].inc()
            yield dataclasses.replace(tile, model=model, role=answer)


class AssignModels(beam.PTransform):
    """TileRef -> one TileRef per (version, role) (main) + model events and dead letters."""

    def __init__(self, registry_uri: str, running: ModelCard, start: Snapshot,
                 poll_secs: float, release: str):
        super().__init__()
        self._fn = _AssignFn(registry_uri, running, start, poll_secs, release)

    def expand(self, tiles):
        return tiles | beam.ParDo(self._fn).with_outputs(DEAD_LETTER_TAG, main="tiles")
