"""Change between acquisitions: each new answer of a location against the previous acquisition
of that location by the same model version (docs/changes.md).

The pure part (rules, which acquisitions are compared, the ``changes`` row) is
``transforms/change_rules.py``, the change raster ``transforms/change_raster.py``;
:class:`DetectChanges` here is the stream's step: keyed state per location key
(``transforms/location.py``) holding the last N acquisitions, a cache of the ``tiles`` table that
is seeded from it the first time a job sees a location, so a restart, a drain and a new job
compare with what the stream answered before.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from transforms.change_raster import write_change_raster
from transforms.change_rules import (
    Acquisition,
    ChangeRule,
    acquisition_of,
    change_row,
    check_rules,
    comparisons,
    evaluate,
    remember,
)
from transforms.deadletter import DEAD_LETTER_TAG, dead_letter
from transforms.guards import describe
from transforms.records import KEYED

STAGE = "changes"
CHANGES_TAG = "changes"
DEFAULT_HISTORY = 8  # acquisitions remembered per location and model version
# How far back a job looks in the tiles table when it first sees a location.
SEED_LOOKBACK_DAYS = 400
LOG = logging.getLogger("tilestream")


def seed_sql(tiles_table: str) -> str:
    """The acquisitions of one location the tiles table holds, one row per tile version and
    model version (a retried insert lands a row twice; the first written is kept, as
    answered.sql keeps it), newest first. Complete rows only: a partial row is no answer."""
    project, rest = tiles_table.split(":", 1)
    return (
        "SELECT tile_id, tile_generation, acquired, model_name, model_version, role, complete, "
        "raster_uri, stac_uri, ST_ASTEXT(footprint) AS footprint, classes "
        f"FROM `{project}.{rest}` "
        "WHERE location_key = @location AND complete AND acquired IS NOT NULL "
        f"AND event_time >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL {SEED_LOOKBACK_DAYS} DAY) "
        "QUALIFY ROW_NUMBER() OVER (PARTITION BY tile_id, tile_generation, model_name, "
        "model_version, IFNULL(role, 'live') ORDER BY completed_at) = 1 "
        "ORDER BY acquired DESC LIMIT @limit")


def read_seed(tiles_table: str, location: str, limit: int) -> list[dict]:
    """Rows of :func:`seed_sql`, through Beam's BigQuery client (the stream's own endpoint)."""
    from apache_beam.io.gcp import bigquery_tools
    from google.cloud import bigquery

    config = bigquery.QueryJobConfig(query_parameters=[
        bigquery.ScalarQueryParameter("location", "STRING", location),
        bigquery.ScalarQueryParameter("limit", "INT64", limit)])
    client = bigquery_tools.BigQueryWrapper().gcp_bq_client
    project = tiles_table.split(":", 1)[0]
    return [dict(r) for r in client.query(seed_sql(tiles_table), job_config=config,
                                          project=project).result()]


def comparable_key(row: Mapping[str, Any]) -> bool:
    key = row.get("location_key")
    return bool(key) and not str(key).endswith(":unknown")


class _DetectFn(beam.DoFn):
    """Per location: remember, compare, fire. State is the last N acquisitions per model
    version, a cache of the tiles table, seeded from it at the first element a job sees."""

    HISTORY = ReadModifyWriteStateSpec("history", PickleCoder())  # None until seeded

    def __init__(self, rules: tuple[ChangeRule, ...], tiles_table: str | None, limit: int,
                 class_names: tuple[str, ...], colours: tuple[tuple[int, int, int], ...]):
        self._rules, self._table, self._limit = rules, tiles_table, limit
        self._names, self._colours = class_names, colours
        self._scratch: str | None = None
        self.fired = Metrics.counter("tilestream", "changes_fired")
        self.seeded = Metrics.counter("tilestream", "change_locations_seeded")

    def setup(self):
        self._scratch = tempfile.mkdtemp(prefix="tilestream-changes-")

    def teardown(self):
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def process(self, element: tuple[str, dict], history=beam.DoFn.StateParam(HISTORY)):
        location, row = element
        new = acquisition_of(row)
        if new is None:  # partial, or no acquisition time: nothing to remember or compare
            yield {**row, "changed": False}
            return
        known = history.read()
        if known is None:
            known = self._seed(location, new)
            if known is None:  # unreadable table: fail closed, nothing fires, retried next time
                yield {**row, "changed": False}
                yield dead_letter(STAGE, f"location {location}: the tiles table could not be "
                                         "read to seed its history; tile not compared",
                                  tile_id=row["tile_id"])
                return
        pending = comparisons(known, new)
        history.write(remember(known, new, self._limit))
        changed = False
        for before, after in pending:
            fired = evaluate(before, after, self._rules)
            if not fired:
                continue
            raster = None
            try:
                raster = write_change_raster(before, after, self._names, self._colours,
                                             self._scratch)
            except Exception as exc:  # the change row still goes out, without its raster
                yield dead_letter(STAGE, f"change raster {before.tile_id} -> {after.tile_id} "
                                         f"could not be written: {describe(exc)}",
                                  tile_id=after.tile_id)
            now = time.time()
            for firing in fired:
                self.fired.inc()
                changed |= after is new
                LOG.info("change at %s: %s, %s -> %s (%+.1f points, %+.1f ha)", location,
                         firing.rule.name, before.tile_id, after.tile_id, firing.delta_points,
                         firing.delta_hectares)
                yield beam.pvalue.TaggedOutput(CHANGES_TAG, change_row(
                    location, before, after, firing, raster, now))
        yield {**row, "changed": changed}

    def _seed(self, location: str, new: Acquisition) -> tuple[Acquisition, ...] | None:
        if not self._table:
            return ()
        try:
            rows = read_seed(self._table, location, self._limit * 4)
        except Exception as exc:
            LOG.warning("seeding change history of %s failed: %s", location, describe(exc))
            return None
        self.seeded.inc()
        known: tuple[Acquisition, ...] = ()
        for seen in reversed(rows):  # oldest first
            a = acquisition_of(seen)
            if a is not None and a.version != new.version:
                known = remember(known, a, self._limit)
        return known


class DetectedChanges(NamedTuple):
    answers: beam.PCollection  # every tile row, with location_key and changed
    changes: beam.PCollection  # rows of the changes table
    dead_letters: beam.PCollection


class DetectChanges(beam.PTransform):
    """Tile rows -> the same rows annotated with ``changed``, the ``changes`` rows the rules
    fire, and dead letters. ``tiles_table`` (``project:dataset.tiles``) seeds a location's
    history the first time a job sees it; None keeps history in state only."""

    def __init__(self, rules: tuple[ChangeRule, ...], tiles_table: str | None,
                 class_names: Sequence[str], colours: Sequence[tuple[int, int, int]],
                 history: int = DEFAULT_HISTORY):
        super().__init__()
        if history < 1:
            raise ValueError("--change_history must be at least 1")
        check_rules(rules, class_names)
        self._fn = _DetectFn(tuple(rules), tiles_table, history, tuple(class_names),
                             tuple(tuple(c) for c in colours))

    def expand(self, rows) -> DetectedChanges:
        split = rows | "ByLocation" >> beam.Partition(
            lambda row, _: 0 if comparable_key(row) else 1, 2)
        unplaced = split[1] | "NoLocation" >> beam.Map(lambda row: {**row, "changed": False})
        detected = (split[0]
                    | "LocationKeys" >> beam.Map(lambda row: (row["location_key"], row))
                    .with_output_types(KEYED)
                    | "Compare" >> beam.ParDo(self._fn).with_outputs(
                        CHANGES_TAG, DEAD_LETTER_TAG, main="answers"))
        answers = (detected.answers, unplaced) | "Answers" >> beam.Flatten()
        return DetectedChanges(answers, detected[CHANGES_TAG], detected[DEAD_LETTER_TAG])
