"""Service level indicators the stream emits as Beam metrics, one update per tile row.

Dataflow exports user counters to Cloud Monitoring (``dataflow.googleapis.com/job/user_counter``,
label ``metric_name``), which is what the burn-rate alerts in ``templates/terraform/monitoring.tf``
divide: slow tiles over all tiles, dead letters over messages. The same SLIs are computed from the
BigQuery rows by ``tilestream slo`` (``pipeline/ops/slo.py``), so the two can be checked against
each other.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

NAMESPACE = "tilestream"
# Names Cloud Monitoring sees; the alert policies and the dashboard refer to them by name.
TILES_TOTAL = "slo_tiles_total"
TILES_SLOW = "slo_tiles_slow"
TILES_INCOMPLETE = "slo_tiles_incomplete"
TILE_LATENCY_MS = "tile_latency_ms"


class CountTileSlis(beam.DoFn):
    """Count each tile row as fast or slow, complete or not; record its latency distribution."""

    def __init__(self, latency_slo_s: float):
        self._threshold = latency_slo_s
        self.total = Metrics.counter(NAMESPACE, TILES_TOTAL)
        self.slow = Metrics.counter(NAMESPACE, TILES_SLOW)
        self.incomplete = Metrics.counter(NAMESPACE, TILES_INCOMPLETE)
        self.latency = Metrics.distribution(NAMESPACE, TILE_LATENCY_MS)

    def process(self, row: dict):
        if row.get("role") == "shadow":  # a comparison nobody reads: not part of the service
            return []
        latency = float(row.get("latency_s") or 0.0)
        self.total.inc()
        self.latency.update(max(0, int(latency * 1000)))
        if latency > self._threshold:
            self.slow.inc()
        if not row.get("complete", True) or row.get("chips_failed", 0):
            self.incomplete.inc()
        return []
