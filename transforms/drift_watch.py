"""Drift over time: Beam's own anomaly detection over the per-tile drift scores.

One tile over the PSI threshold is one odd tile (its row says ``drifted``); a change in what the
stream receives shows as tiles whose drift departs from the recent tiles'. Each tile row's
``drift_max_band_psi`` goes, keyed by the model version and role that scored it (each learns its
own baseline), through ``apache_beam.ml.anomaly``'s score-and-learn and threshold steps with a
``RobustZScore`` detector (median and MAD of the recent scores: a few drifted tiles do not move
the baseline). Those steps are applied here under fixed names (:class:`_DetectOutliers`):
``AnomalyDetection`` names its stateful step after a fresh uuid at every translation, which
no in-place update of the job could map.
An outlier among at least ``MIN_TILES`` earlier tiles of its key becomes an ``events`` row
(disposition ``drift``) and the ``drift_anomalies`` counter.
"""

from __future__ import annotations

import math
import time
import typing

import apache_beam as beam
from apache_beam.coders import VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.ml.anomaly.base import AnomalyResult
from apache_beam.ml.anomaly.detectors.robust_zscore import RobustZScore
from apache_beam.ml.anomaly.thresholds import FixedThreshold
from apache_beam.ml.anomaly.transforms import RunScoreAndLearn, RunThresholdCriterion
from apache_beam.transforms.combiners import CountCombineFn
from apache_beam.transforms.userstate import CombiningValueStateSpec

from transforms.records import DeadLetter

DRIFT_EVENT = "drift"
STAGE = "assemble"
OUTLIER = 1  # AnomalyPrediction.label of an outlier (Beam's default)


MIN_TILES = 10  # a baseline needs this many earlier tiles of the same version and role
KEYED_ROW = typing.Tuple[str, beam.Row]  # noqa: UP006 - Beam's type hints want typing.Tuple


def drift_score(row: dict) -> typing.Iterator[tuple[str, tuple[str, float]]]:
    """``(version/role, (tile_id, max band PSI))`` for a tile row that carries drift."""
    score = row.get("drift_max_band_psi")
    if score is None or not math.isfinite(score):
        return
    key = f"{row['model_name']}/{row['model_version']}/{row.get('role') or 'live'}"
    yield key, (str(row["tile_id"]), float(score))


class _CountFn(beam.DoFn):
    """Number each version's tiles, so an outlier is judged only against a real baseline."""

    SEEN = CombiningValueStateSpec("seen", VarIntCoder(), CountCombineFn())

    def process(self, element, seen=beam.DoFn.StateParam(SEEN)):
        key, (tile_id, score) = element
        count = seen.read()
        seen.add(1)
        yield key, beam.Row(max_psi=score, tile_id=tile_id, seen=count)


class _DriftEventFn(beam.DoFn):
    def __init__(self, threshold: float):
        self._threshold = threshold
        self.anomalies = Metrics.counter("tilestream", "drift_anomalies")

    def process(self, element: tuple[str, AnomalyResult]):
        key, result = element
        [prediction] = list(result.predictions)
        if prediction.label != OUTLIER or result.example.seen < MIN_TILES:
            return
        self.anomalies.inc()
        yield DeadLetter(
            stage=STAGE, disposition=DRIFT_EVENT, tile_id=result.example.tile_id,
            time=time.time(),
            reason=(f"drift change: tile {result.example.tile_id} has max band PSI "
                    f"{result.example.max_psi:.3f}, robust z-score {prediction.score:.1f} over "
                    f"{self._threshold:g} against recent tiles scored by {key}"))


class _DetectOutliers(beam.PTransform):
    """``AnomalyDetection(detector)`` for one online detector on keyed input, with step names
    that are the same at every translation (the update check compares them)."""

    def __init__(self, detector: RobustZScore, criterion: FixedThreshold):
        super().__init__()
        self._detector, self._criterion = detector, criterion

    def expand(self, keyed):
        return (keyed
                | "Add temp key" >> beam.Map(lambda e: (e[0], ("", e[1])))
                | "Reshuffle" >> beam.Reshuffle()
                | "ScoreAndLearn" >> RunScoreAndLearn(self._detector)
                | "Threshold" >> RunThresholdCriterion(self._criterion)
                | "Remove temp key" >> beam.Map(lambda e: (e[0], e[1][1])))


class FlagDriftChanges(beam.PTransform):
    """Tile rows -> ``drift`` events for tiles whose drift is an outlier among recent ones."""

    def __init__(self, threshold: float = 3.5):
        super().__init__()
        self._threshold = threshold

    def expand(self, rows):
        criterion = FixedThreshold(self._threshold)
        detector = RobustZScore(features=["max_psi"], threshold_criterion=criterion)
        return (rows
                | "DriftScores" >> beam.FlatMap(drift_score).with_output_types(
                    typing.Tuple[str, typing.Any])  # noqa: UP006 - Beam's type hints
                | "CountPerVersion" >> beam.ParDo(_CountFn()).with_output_types(KEYED_ROW)
                | "DetectDriftChange" >> _DetectOutliers(detector, criterion)
                | "DriftEvents" >> beam.ParDo(_DriftEventFn(self._threshold)))
