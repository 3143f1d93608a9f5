"""Beam's anomaly detection over per-tile drift scores flags a change, not ordinary tiles."""

from __future__ import annotations

import apache_beam as beam
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.drift_watch import FlagDriftChanges


def rows(scores: list[float]) -> list[dict]:
    return [{"tile_id": f"t{i:02d}", "model_name": "landcover-student", "model_version": "1",
             "role": "live", "drift_max_band_psi": s} for i, s in enumerate(scores)]


def test_a_tile_whose_drift_departs_from_recent_tiles_is_an_event():
    # Olinda-like tiles hover around the shipped card's 0.7; tile 30 is shifted (PSI 2.0).
    ordinary = [0.70 + 0.04 * ((i * 7) % 5 - 2) / 2 for i in range(40)]
    scores = [*ordinary[:30], 2.0, *ordinary[30:]]
    with TestPipeline() as p:
        events = (p | beam.Create(rows(scores), reshuffle=False) | FlagDriftChanges()
                  | beam.Map(lambda e: (e.disposition, e.tile_id, "robust z-score" in e.reason)))
        assert_that(events, equal_to([("drift", "t30", True)]))


def test_rows_without_drift_columns_are_left_alone():
    with TestPipeline() as p:
        events = p | beam.Create(rows([None] * 5), reshuffle=False) | FlagDriftChanges()
        assert_that(events, equal_to([]))
