"""One meaning of "answered" (transforms/sql/answered.sql), read alike by every reader.

One set of emulator rows of every kind -- live, shadow, canary, a tile a chip row short, events,
dead letters, a re-uploaded tile (two generations), the cut-over overlap of two releases with a
model change in it, rows of a release that recorded neither release nor role -- is given to each
reader: `tilestream stats`, tiles_ready, the class-area, region and per-chip queries, the SLO
tiles, the release handover and the local drain's check. Each must give every message the same
verdict.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pytest

from pipeline.local import journal
from pipeline.ops import release, slo, stats
from pipeline.ops.queries import run_query
from tests.streams import empty_dataset
from transforms.sinks import SCHEMAS, BigQueryTables

pytestmark = pytest.mark.stack

NOW = dt.datetime.now(dt.UTC)
BLUE, GREEN = "0.2.0", "0.3.0"
NAMES = ("developed", "forest", "water")
REGION = "POLYGON((-1 -1, 1 -1, 1 1, -1 1, -1 -1))"
CHIPS = 4
FOREST_M2 = 25_000.0  # per chip


@dataclass(frozen=True)
class Answer:
    """One tile row and its chip rows, written for ``messages`` by ``rel`` as ``role``."""

    tile: str
    generation: str
    messages: tuple[str, ...]
    rel: str | None = BLUE
    role: str | None = "live"
    version: str = "1"
    chips_in: int = CHIPS
    event_age_min: float = 5.0  # how long before NOW the tile version was announced
    written_s: float = 2.0  # seconds after the announcement the tile row was written
    forest_chips: int = CHIPS  # chips whose pixels are forest, the rest water

    def rows(self) -> list[tuple[str, dict]]:
        event = NOW - dt.timedelta(minutes=self.event_age_min)
        done = event + dt.timedelta(seconds=self.written_s)
        row_id = f"{self.tile}@{self.generation}/{self.version}"
        common = {"tile_id": self.tile, "tile_generation": self.generation, "crs": "EPSG:4326",
                  "footprint": "POINT(0 0)", "event_time": event.isoformat(),
                  "published": event.isoformat(), "source": "gcs", "source_uris": [],
                  "attributes": [], "source_message_ids": list(self.messages),
                  "model_name": "landcover-student", "model_version": self.version,
                  "role": self.role, "release": self.rel}
        forest = [self._classes(FOREST_M2 if i < self.forest_chips else 0.0)
                  for i in range(CHIPS)]
        tile = common | {
            "row_id": row_id, "complete": True, "chips_total": CHIPS, "chips_scored": CHIPS,
            "chips_skipped": 0, "chips_failed": 0, "width": 20, "height": 20,
            "classes": self._classes(sum(c[1]["area_m2"] for c in forest)),
            "raster_uri": f"gs://b/{row_id}.tif", "completed_at": done.isoformat(),
            "latency_s": self.written_s}
        chips = [common | {
            "row_id": f"{row_id}/{i}", "chip_index": i, "row_off": 0, "col_off": 0,
            "height": 10, "width": 10, "valid_fraction": 1.0, "classes": forest[i],
            "dominant_class": "forest" if forest[i][1]["area_m2"] else "water",
            "mean_confidence": 0.8, "chipped_at": done.isoformat(), "scored_at": done.isoformat(),
            "latency_s": self.written_s} for i in range(self.chips_in)]
        return [("tiles", tile)] + [("chips", c) for c in chips]

    @staticmethod
    def _classes(forest_m2: float) -> list[dict]:
        water = 0.0 if forest_m2 else FOREST_M2
        return [{"class_id": i, "name": n, "pixels": int(a / 900), "area_m2": a}
                for i, (n, a) in enumerate(zip(NAMES, (0.0, forest_m2, water), strict=True))]


ANSWERS = [
    Answer("t-live", "1", ("m-live",)),
    Answer("t-shadow", "1", ("m-shadow",), rel=GREEN, role="shadow"),  # green on trial only
    Answer("t-canary", "1", ("m-canary",), role="canary"),
    Answer("t-partial", "1", ("m-partial",), chips_in=CHIPS - 1),  # a chip row short
    # A re-uploaded tile: the second generation is the answer, the first is superseded.
    Answer("t-twice", "1", ("m-twice-1",), event_age_min=9.0),
    Answer("t-twice", "2", ("m-twice-2",), event_age_min=4.0, forest_chips=2),
    # The cut-over overlap, with a model change in it: blue (v1) and green (v2) both live.
    Answer("t-overlap", "1", ("m-overlap",), written_s=2.0),
    Answer("t-overlap", "1", ("m-overlap",), rel=GREEN, version="2", written_s=3.0,
           forest_chips=1),
    Answer("t-overlap", "1", ("m-overlap",), rel=GREEN, role="shadow", version="2"),
    Answer("t-legacy", "1", ("m-legacy",), rel=None, role=None),  # written before both existed
    # A newer generation still a chip row short: the older one stays the answer for now.
    Answer("t-newer", "1", ("m-newer-1",), event_age_min=8.0),
    Answer("t-newer", "2", ("m-newer-2",), event_age_min=3.0, chips_in=1),
]
EVENTS = [{"disposition": "filtered", "stage": "parse", "reason": "not a tile",
           "message_id": "m-filtered", "source_message_ids": [], "tile_id": "",
           "time": NOW.isoformat(), "release": BLUE}]
LETTERS = [{"stage": "parse", "reason": "not JSON", "message_id": "m-dead",
            "source_message_ids": [], "tile_id": "", "time": NOW.isoformat(), "release": BLUE}]

# What consumers read, per message: the one verdict every reader must give.
EXPECTED = {
    "m-live": "answered", "m-shadow": None, "m-canary": "answered", "m-partial": None,
    "m-twice-1": "superseded", "m-twice-2": "answered", "m-overlap": "answered",
    "m-legacy": "answered", "m-newer-1": "answered", "m-newer-2": None,
    "m-filtered": "filtered", "m-dead": "dead_letter",
}
# The tile version of each message that a tile row carries.
VERSION_OF = {m: (a.tile, a.generation) for a in ANSWERS for m in a.messages}
TILE_ANSWERS = {"t-live": "1", "t-canary": "1", "t-twice": "2", "t-overlap": "1",
                "t-legacy": "1", "t-newer": "1"}  # tile -> the generation that answers it


def by_tile_versions(versions: set[tuple[str, str]]) -> dict[str, str | None]:
    """A reader of tile versions' verdict per message: its version is there (answered), another
    generation of its tile is (superseded: what a consumer reads instead), or neither."""
    tiles = {tile for tile, _ in versions}
    verdicts = {}
    for message in EXPECTED:
        version = VERSION_OF.get(message)
        if version is None:  # an event or a dead letter: no tile reader sees it
            continue
        verdicts[message] = ("answered" if version in versions else
                             "superseded" if version[0] in tiles and
                             version[1] < TILE_ANSWERS.get(version[0], "") else None)
    return verdicts


def of_tiles(expected: dict[str, str | None]) -> dict[str, str | None]:
    return {m: v if v in ("answered", "superseded") else None
            for m, v in expected.items() if m in VERSION_OF}


@pytest.fixture(scope="module")
def dataset(stack):
    bq = stack.bigquery()
    name = empty_dataset(stack, "answered")
    entered = (NOW - dt.timedelta(minutes=10)).isoformat()
    rows = [row for a in ANSWERS for row in a.rows()]
    rows += [rows[0]]  # a retried insert: read once
    rows += [("events", e) for e in EVENTS] + [("dead_letters", letter) for letter in LETTERS]
    rows += [("messages", {"message_id": m, "published": entered, "delivered": entered,
                           "received_at": entered, "kind": "notification", "release": GREEN})
             for m in EXPECTED]  # green took in every message, as blue did
    for table in SCHEMAS:
        batch = [row for t, row in rows if t == table]
        if batch:
            assert bq.insert_rows_json(f"{stack.project}.{name}.{table}", batch) == []
    return name


def full(stack, dataset: str) -> str:
    return f"{stack.project}.{dataset}"


def test_stats_books_each_message_as_consumers_read_it(stack, dataset):
    """`tilestream stats`: a shadow's row alone is not scored, a message a newer generation
    replaced is superseded."""
    report = stats.books(stack.bigquery(), full(stack, dataset), 1)
    entries = stats.outcomes(stack.bigquery(), full(stack, dataset),
                             NOW - dt.timedelta(hours=1), set(SCHEMAS))
    words = {"scored": "answered"}
    verdicts = {m: ({words.get(k, k) for k in entries[m]["kinds"]} or {None})
                for m in EXPECTED}
    assert verdicts == {m: {v} for m, v in EXPECTED.items()}
    counted = report["messages"]
    verdicts = list(EXPECTED.values())
    assert (counted["in"], counted["scored"], counted["superseded"], counted["pending"]) == (
        len(EXPECTED), verdicts.count("answered"), 1, verdicts.count(None)) == (12, 6, 1, 3)
    assert report["conflicts"] == []


def test_tiles_ready_gives_one_answer_per_tile(stack, dataset):
    ready = run_query(stack.bigquery(), "tiles_ready", full(stack, dataset), days=1)
    tiles = [r["tile_id"] for r in ready]
    assert sorted(tiles) == sorted(TILE_ANSWERS)  # each tile once
    assert by_tile_versions({(r["tile_id"], r["tile_generation"]) for r in ready}) == of_tiles(
        EXPECTED)
    overlap = next(r for r in ready if r["tile_id"] == "t-overlap")
    assert (overlap["release"], overlap["model_version"]) == (BLUE, "1")  # the first written


def test_class_area_counts_a_reuploaded_tile_once(stack, dataset):
    """Issue 26: a re-uploaded tile's area is its newest generation's, not the sum of both."""
    rows = run_query(stack.bigquery(), "class_area_per_tile_and_day", full(stack, dataset))
    forest = {}
    for r in rows:
        if r["class_name"] == "forest":
            forest[r["tile_id"]] = forest.get(r["tile_id"], 0.0) + r["area_km2"]
    assert forest["t-twice"] == pytest.approx(2 * FOREST_M2 / 1e6)  # generation 2: 2 chips
    assert forest["t-overlap"] == pytest.approx(CHIPS * FOREST_M2 / 1e6)  # blue's v1 alone
    assert by_tile_versions({(r["tile_id"], r["tile_generation"]) for r in rows}) == of_tiles(
        EXPECTED)
    assert len({(r["day"], r["tile_id"], r["class_name"]) for r in rows}) == len(rows)


def test_region_rows_name_their_generation_and_model(stack, dataset):
    rows = run_query(stack.bigquery(), "chips_intersecting_region", full(stack, dataset),
                     region_wkt=REGION)
    assert {(r["tile_id"], r["tile_generation"], r["model_version"]) for r in rows} == {
        (tile, generation, "1") for tile, generation in TILE_ANSWERS.items()}
    assert by_tile_versions({(r["tile_id"], r["tile_generation"]) for r in rows}) == of_tiles(
        EXPECTED)
    assert len(rows) == CHIPS * len(TILE_ANSWERS)  # every chip of every answer, once


def test_latest_prediction_per_chip_is_the_answers(stack, dataset):
    rows = run_query(stack.bigquery(), "latest_prediction_per_chip", full(stack, dataset),
                     days=1)
    assert by_tile_versions({(r["tile_id"], r["tile_generation"]) for r in rows}) == of_tiles(
        EXPECTED)
    assert len(rows) == CHIPS * len(TILE_ANSWERS)


def test_slo_counts_the_answers(stack, dataset):
    report = slo.compute(stack.bigquery(), full(stack, dataset), dt.timedelta(hours=1),
                         end=NOW + dt.timedelta(minutes=1))
    assert report.slis["tiles"] == len(TILE_ANSWERS)
    assert report.slis["chips_scored"] == CHIPS * len(TILE_ANSWERS)


def test_the_handover_reads_the_same_answers(stack, dataset):
    state = release.handover(stack.bigquery(), full(stack, dataset), BLUE, GREEN,
                             NOW - dt.timedelta(minutes=30), NOW - dt.timedelta(seconds=1))
    unanswered = sorted(m for m, v in EXPECTED.items() if v is None)
    assert state.pending == unanswered
    assert (state.messages, state.by_green) == (len(EXPECTED), 0)  # overlap: blue wrote first


def test_the_drain_waits_for_whole_rows_of_any_role(stack, dataset):
    """A job's drain waits for what the job finished: a shadow's whole row is finished (green
    on trial drains too) though not an answer; a row a chip row short is neither."""
    tables = BigQueryTables.in_dataset(f"{stack.project}:{dataset}")
    done, stale = journal.finished(stack, tables, sorted(EXPECTED))
    assert done == {m for m, v in EXPECTED.items() if v is not None} | {"m-shadow"}
    assert sorted(stale) == ["t-newer@2/1", "t-partial@1/1"]


def test_a_reuploaded_sample_tile_is_one_answer_in_a_running_stream(stack, model_uri, tmp_path):
    """Issue 26 on the real stream: the sample tile uploaded, scored, uploaded again (a new
    generation), scored again. Consumers read one answer, the newest generation's: the class
    area of one scoring, not the sum of both; the first message is booked superseded."""
    from google.api_core.exceptions import NotFound

    from pipeline.ops import announce
    from pipeline.ops.check import SAMPLE_TILE
    from tests.streams import fresh_input, start_stream, stop_stream, wait_until

    topic, subscription, name = fresh_input(stack, "reupload")
    dataset = full(stack, name)
    bq, store, publisher = stack.bigquery(), stack.storage(), stack.publisher()
    child = start_stream(stack, model_uri, tmp_path / "stream.log",
                         f"--subscription={subscription}", f"--bq_dataset={stack.project}:{name}",
                         f"--output_prefix={stack.output_prefix}/{name}", "--window_secs=1")

    def ready() -> dict[str, str]:
        try:
            return {r["tile_id"]: r["tile_generation"] for r in run_query(
                bq, "tiles_ready", dataset, days=1, include_drifted=True)}
        except NotFound:  # the stream creates its tables as it starts
            return {}

    def forest_km2() -> float:
        return sum(r["area_km2"] for r in run_query(
            bq, "class_area_per_tile_and_day", dataset, include_drifted=True)
            if r["tile_id"] == "L7_ETMs" and r["class_name"] == "forest")

    ids, areas = [], []
    try:
        for _ in range(2):
            _, generation = announce.upload(store, str(SAMPLE_TILE), stack.bucket,
                                            "incoming/reupload/L7_ETMs.tif")
            ids.append(announce.publish(publisher, topic, *announce.gcs_notification(
                stack.bucket, "incoming/reupload/L7_ETMs.tif", generation)))
            scored = wait_until(lambda g=str(generation): ready().get("L7_ETMs") == g, 240,
                                child, every_s=2)
            assert scored, (tmp_path / "stream.log").read_text(errors="replace")[-3000:]
            areas.append(forest_km2())
    finally:
        stop_stream(child)
    tile_rows = [dict(r) for r in bq.query(
        f"SELECT tile_generation FROM `{dataset}.tiles`").result()]
    assert len({r["tile_generation"] for r in tile_rows}) == 2  # both generations were scored
    assert areas[0] > 0 and areas[1] == pytest.approx(areas[0])  # one answer: not doubled
    kinds = {m: e["kinds"] for m, e in stats.outcomes(
        bq, dataset, NOW - dt.timedelta(hours=1), set(SCHEMAS)).items()}
    assert kinds == {ids[0]: {"superseded"}, ids[1]: {"scored"}}
    print(f"forest km² of the sample after the first scoring {areas[0]:.2f}, after the "
          f"re-upload {areas[1]:.2f}")
