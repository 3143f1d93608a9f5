"""Stage 3b (with ``--model_registry``): decide once which model version(s) score a tile.

Right after dedup, each tile becomes one element per assignment ``(version, role)`` from
``model.registry.assignments`` on the current channels snapshot: live alone, live and a shadow,
or the canary instead of live. The assignment is stamped on the ``TileRef`` (``model``, ``role``)
and travels with every chip, prediction and manifest, so a tile is scored by exactly one version
per role and never assembled from chips of two versions, even when the channels change mid-tile.

The snapshot comes from a :class:`model.serving.ChannelsFollower` shared by every DoFn instance
of the worker process, re-read at most every
``--channels_poll_secs`` as tiles pass. Why not a side input: on Beam's in-process runner a
global-window side input fed by ``PeriodicImpulse`` holds the main input until the side input's
window is complete, which in a stream is never; a per-process poll has the same bound (the poll
interval) on every runner and no extra graph. A version the follower refuses becomes an
``events`` row (disposition ``model``) and a log line; the stream keeps the snapshot it had.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import apache_beam as beam
from apache_beam.metrics import Metrics

from model.card import ModelCard
from model.serving import ChannelsFollower, Snapshot
from transforms.deadletter import DEAD_LETTER_TAG, dead_letter
from transforms.guards import describe
from transforms.records import DeadLetter, TileRef

STAGE = "inference"  # refusals are about the model the inference step would load
MODEL_EVENT = "model"


def model_event(reason: str) -> beam.pvalue.TaggedOutput:
    """A model load or refusal for the ``events`` table (no message: it is not about one)."""
    return beam.pvalue.TaggedOutput(DEAD_LETTER_TAG, DeadLetter(
        stage=STAGE, reason=reason[:2000], time=time.time(), disposition=MODEL_EVENT))


_FOLLOWERS: dict[str, ChannelsFollower] = {}
_FOLLOWERS_LOCK = threading.Lock()


def process_follower(registry_uri: str, running: ModelCard, start: Snapshot,
                     poll_secs: float) -> ChannelsFollower:
    """The one follower of this worker process for a registry.

    Process-wide rather than ``apache_beam.utils.shared.Shared``: Beam's in-process runner builds
    a new DoFn per bundle, and ``Shared`` frees an object once no DoFn holds it, which would
    restart the follower from the start-up snapshot at every bundle.
    """
    with _FOLLOWERS_LOCK:
        follower = _FOLLOWERS.get(registry_uri)
        if follower is None:
            follower = ChannelsFollower(registry_uri, running, start, poll_secs)
            _FOLLOWERS[registry_uri] = follower
        return follower


class _AssignFn(beam.DoFn):
    def __init__(self, registry_uri: str, running: ModelCard, start: Snapshot, poll_secs: float):
        self._args = (registry_uri, running, start, poll_secs)
        self.refused = Metrics.counter("tilestream", "model_refusals")
        self.switched = Metrics.counter("tilestream", "model_switches")
        self.by_role = {role: Metrics.counter("tilestream", f"tiles_{role}")
                        for role in ("live", "shadow", "canary")}

    def setup(self):
        self._follower = process_follower(*self._args)

    def process(self, tile: TileRef):
        follower = self._follower
        before = follower.snapshot.token
        try:
            refusals = follower.refresh()
        except Exception as exc:  # the follower must never cost a tile
            refusals = []
            yield model_event(f"reading the model channels failed: {describe(exc)}")
        for refusal in refusals:
            self.refused.inc()
            yield model_event(refusal.reason)
        snapshot = follower.snapshot
        if snapshot.token != before:
            self.switched.inc()
            yield model_event(f"channels now {snapshot.channels.state()} (validated); "
                              f"tiles from {tile.tile_id} on are routed by them")
        try:
            assigned = snapshot.assign(tile.tile_id)
        except Exception as exc:
            yield dead_letter(STAGE, f"no model could be assigned: {describe(exc)}",
                              message_id=tile.message_id, tile_id=tile.tile_id)
            return
        for model, role in assigned:
            self.by_role[role].inc()
            yield dataclasses.replace(tile, model=model, role=role)


class AssignModels(beam.PTransform):
    """TileRef -> one TileRef per (version, role) (main) + model events and dead letters."""

    def __init__(self, registry_uri: str, running: ModelCard, start: Snapshot,
                 poll_secs: float):
        super().__init__()
        self._fn = _AssignFn(registry_uri, running, start, poll_secs)

    def expand(self, tiles):
        return tiles | beam.ParDo(self._fn).with_outputs(DEAD_LETTER_TAG, main="tiles")
