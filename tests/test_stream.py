"""End to end on the local stack: the real stream in a child process, real tiles, real outputs.

One stream scores a mixed batch of inputs: tiles of different CRSs and sizes, a duplicate
notification, a granule delivered as per-band files out of order, a late JSON announcement, and
several kinds of bad input. The assertions are on what a user sees: BigQuery rows, COGs on GCS,
dead letters, and the counters the job reports.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import rasterio

from model.card import load_card
from pipeline.ops import announce
from pipeline.ops.check import SAMPLE_TILE
from pipeline.ops.queries import run_query
from tests import tiles
from tests.streams import query as _query

pytestmark = [pytest.mark.stack, pytest.mark.slow]

MIN_VALID = 0.05
GRANULE = "HLS.S30.T25MBM.2001196T120000.v2.0"
BROKEN_GRANULE = "HLS.S30.T25MBN.2001196T120000.v2.0"


class Scenario:
    """Uploads and publishes every input, remembering what each should become."""

    def __init__(self, stack, workdir: Path):
        self.stack = stack
        self.workdir = workdir
        self.bucket = stack.bucket
        self.store = stack.storage()
        self.publisher = stack.publisher()
        self.published = 0
        self.files: dict[str, Path] = {}

    def upload(self, path: Path, name: str) -> tuple[str, int]:
        return announce.upload(self.store, str(path), self.bucket, name)

    def publish(self, data: bytes, attributes: dict) -> None:
        announce.publish(self.publisher, self.stack.topic_path, data, attributes)
        self.published += 1

    def notify(self, name: str, generation: int, event_type: str = "OBJECT_FINALIZE") -> None:
        self.publish(*announce.gcs_notification(self.bucket, name, generation,
                                                event_type=event_type))


@pytest.fixture(scope="module")
def run(stack, model_uri, tmp_path_factory):
    work = tmp_path_factory.mktemp("stream")
    s = Scenario(stack, work)
    # A: the real Olinda tile (EPSG:31985, 349x352), announced twice (at-least-once delivery).
    s.files["olinda"] = SAMPLE_TILE
    _, gen_a = s.upload(SAMPLE_TILE, "incoming/olinda.tif")
    # B: reprojected to geographic EPSG:4326, a different size, nodata corners; announced with
    #    JSON, attributes, and an event time an hour old (late data must still be scored).
    s.files["olinda-4326"] = tiles.reprojected(work / "olinda-4326.tif", "EPSG:4326")
    uri_b, _ = s.upload(s.files["olinda-4326"], "incoming/olinda-4326.tif")
    # C: a 130x100 crop delivered as six per-band files, notified in shuffled order.
    s.files[GRANULE] = tiles.crop(work / "crop.tif", 40, 60, 130, 100)
    band_files = tiles.per_band_files(work, GRANULE, s.files[GRANULE])
    band_objects = [(f"incoming/{p.name}", s.upload(p, f"incoming/{p.name}")[1])
                    for p in band_files.values()]
    random.Random(7).shuffle(band_objects)
    # D: two bands of a granule whose other bands never come.
    broken = tiles.per_band_files(work, BROKEN_GRANULE, s.files[GRANULE])
    broken_objects = [(f"incoming/{p.name}", s.upload(p, f"incoming/{p.name}")[1])
                      for p in list(broken.values())[:2]]

    stream_log = work / "stream.log"
    metrics_file = work / "metrics.json"
    with open(stream_log, "wb") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "pipeline.ops.cli", "run", "--local",
             f"--stack_dir={stack.run_dir}", f"--model_uri={model_uri}",
             f"--metrics_file={metrics_file}", f"--min_valid_fraction={MIN_VALID}",
             # long enough for granule C's six bands on a loaded machine; D still expires
             "--granule_timeout_secs=60", "--tile_timeout_secs=120",
             "--window_secs=2", "--max_batch_size=16"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        s.notify("incoming/olinda.tif", gen_a)
        s.notify("incoming/olinda.tif", gen_a)
        s.publish(*announce.json_announcement(
            "olinda-4326", "2001-07-15T12:30:00Z", uri=uri_b, sensor="landsat-7-etm+",
            attributes={"campaign": "e2e", "site": "olinda"}, event_time=time.time() - 3600))
        for name, generation in band_objects:
            s.notify(name, generation)
        for name, generation in broken_objects:
            s.notify(name, generation)
        # Bad or uninteresting input: each must be dead-lettered or filtered, never crash.
        s.publish(b"\x00 this is not json", {})
        s.publish(json.dumps({"schema": "tilestream.announcement/v1", "tile_id": "half",
                              "acquired": "2001-07-15T12:30:00Z",
                              "bands": {"red": uri_b}}).encode(), {})
        s.notify("incoming/missing.tif", 12345)  # the object does not exist
        s.notify("incoming/olinda.tif", gen_a, event_type="OBJECT_DELETE")
        s.notify("incoming/notes.txt", 1)

        deadline = time.monotonic() + 240
        tiles_done = letters = []
        while time.monotonic() < deadline and child.poll() is None:
            time.sleep(3)
            tiles_done = _query(stack, f"SELECT tile_id FROM `{stack.dataset}.tiles`")
            letters = _query(stack, f"SELECT stage FROM `{stack.dataset}.dead_letters`")
            if len(tiles_done) >= 3 and len(letters) >= 4:
                break
        time.sleep(3)  # let the last chip rows' inserts land
    finally:
        child.send_signal(signal.SIGTERM)
        code = child.wait(timeout=60)
    log_text = stream_log.read_text(errors="replace")
    assert code == 0, f"stream exited {code}:\n{log_text[-4000:]}"
    assert len(tiles_done) >= 3, f"tiles seen: {tiles_done}\n{log_text[-4000:]}"
    return {
        "scenario": s,
        "card": load_card(model_uri),
        "metrics": json.loads(metrics_file.read_text()),
        "log": log_text,
        "generation_a": gen_a,
    }


def chip_rows(stack, tile_id: str) -> list[dict]:
    return _query(stack, f"SELECT row_id, chip_index, row_off, col_off, height, width, "
                         f"valid_fraction, source, sensor, acquired, attributes, source_uris "
                         f"FROM `{stack.dataset}.chips` WHERE tile_id = '{tile_id}'")


def tile_rows(stack, tile_id: str) -> list[dict]:
    return _query(stack, f"SELECT tile_id, complete, chips_total, chips_scored, chips_skipped, "
                         f"chips_failed, width, height, raster_uri, source, source_uris "
                         f"FROM `{stack.dataset}.tiles` WHERE tile_id = '{tile_id}'")


@pytest.mark.parametrize("tile_id", ["olinda", "olinda-4326", GRANULE])
def test_chip_rows_match_the_raster_grid(stack, run, tile_id):
    card = run["card"]
    total, kept = tiles.expected_chips(run["scenario"].files[tile_id], card.input.chip_size,
                                       card.input.stride, MIN_VALID)
    rows = chip_rows(stack, tile_id)
    assert len(rows) == kept
    assert len({r["chip_index"] for r in rows}) == kept, "a chip was scored twice"
    assert len({r["row_id"] for r in rows}) == kept
    [tile] = tile_rows(stack, tile_id)
    assert tile["complete"] is True
    assert (tile["chips_total"], tile["chips_scored"], tile["chips_failed"]) == (total, kept, 0)
    assert tile["chips_skipped"] == total - kept


@pytest.mark.parametrize("tile_id", ["olinda", "olinda-4326", GRANULE])
def test_one_prediction_cog_per_tile_on_the_input_grid(stack, run, tile_id, tmp_path):
    [tile] = tile_rows(stack, tile_id)
    bucket, _, name = tile["raster_uri"][len("gs://"):].partition("/")
    local = tmp_path / "prediction.tif"
    stack.storage().bucket(bucket).blob(name).download_to_filename(str(local))
    card = run["card"]
    with rasterio.open(run["scenario"].files[tile_id]) as src, rasterio.open(local) as out:
        assert out.crs == src.crs
        assert out.transform.almost_equals(src.transform)
        assert (out.width, out.height) == (src.width, src.height) == (tile["width"],
                                                                       tile["height"])
        assert out.dtypes[0] == "uint8" and out.nodata == 255
        assert out.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert out.colormap(1)[card.num_classes - 1][:3] == card.classes[-1].rgb
        classes = out.read(1)
        input_valid = (src.read() != src.nodata).all(axis=0) if src.nodata is not None \
            else np.ones(classes.shape, bool)
    assert set(np.unique(classes[input_valid])) <= set(range(card.num_classes))
    if tile_id == "olinda-4326":  # nodata corners of the warped tile stay nodata
        assert (classes[~input_valid] == 255).mean() > 0.95


def test_duplicate_notification_is_scored_once(stack, run):
    assert len(tile_rows(stack, "olinda")) == 1


def test_per_band_granule_arriving_out_of_order_is_scored_in_card_band_order(stack, run):
    [tile] = tile_rows(stack, GRANULE)
    assert tile["source"] == "granule"
    tokens = [uri.rsplit(".", 2)[-2] for uri in tile["source_uris"]]
    assert tokens == list(tiles.HLS_TOKENS)


def test_json_announcement_carries_acquisition_sensor_and_attributes(stack, run):
    rows = chip_rows(stack, "olinda-4326")
    assert rows, "the late announcement was dropped"
    row = rows[0]
    assert row["source"] == "announcement" and row["sensor"] == "landsat-7-etm+"
    assert row["acquired"].isoformat() == "2001-07-15T12:30:00+00:00"
    assert {a["key"]: a["value"] for a in row["attributes"]} == {"campaign": "e2e",
                                                                  "site": "olinda"}


def test_bad_input_is_dead_lettered_with_a_reason(stack, run):
    letters = _query(stack, f"SELECT stage, reason, message_id, source_message_ids, tile_id, "
                            f"payload FROM `{stack.dataset}.dead_letters`")
    by_stage: dict[str, list[dict]] = {}
    for letter in letters:
        by_stage.setdefault(letter["stage"], []).append(letter)
    reasons = {stage: " | ".join(x["reason"] for x in rows) for stage, rows in by_stage.items()}
    assert len(by_stage["parse"]) == 2
    assert "nor a JSON announcement" in reasons["parse"]
    assert "bands lacks" in reasons["parse"] and "'blue'" in reasons["parse"]
    [missing] = by_stage["chips"]
    assert missing["tile_id"] == "missing" and "incoming/missing.tif" in missing["reason"]
    [granule] = by_stage["granules"]  # one letter, carrying both band messages
    assert len(set(granule["source_message_ids"])) == 2
    assert granule["tile_id"] == BROKEN_GRANULE and "missing bands" in granule["reason"]
    assert all(x["message_id"] for x in letters)
    files = [b for b in stack.storage().list_blobs(stack.bucket,
                                                   prefix="output/dead_letters/")
             if b.name.endswith(".jsonl")]
    lines = [json.loads(line) for b in files for line in b.download_as_text().splitlines()]
    assert {x["stage"] for x in lines} <= {"parse", "chips", "granules"}
    assert lines, "no dead-letter JSON lines on GCS"


def test_counts_add_up(stack, run):
    """in = scored + filtered + dead-lettered, checked on what the stream wrote.

    (The job's Beam counters are not used: Beam's in-process runner under-reports counters in
    streaming mode; on Dataflow they are exact and in Cloud Monitoring.)
    """
    letters = _query(stack, f"SELECT stage, tile_id, payload, source_message_ids "
                            f"FROM `{stack.dataset}.dead_letters`")
    tiles_out = _query(stack, f"SELECT tile_id, chips_total, chips_scored, chips_skipped, "
                              f"chips_failed FROM `{stack.dataset}.tiles`")
    chips_out = _query(stack, f"SELECT tile_id, COUNT(*) AS n FROM `{stack.dataset}.chips` "
                              "GROUP BY tile_id")
    # Messages: 3 tile notifications/announcements (one a duplicate), 6 + 2 band files, 1
    # missing object, 2 unparseable, 2 to filter = 16; each kind lands in exactly one place.
    assert run["scenario"].published == 16
    scored = {t["tile_id"] for t in tiles_out}
    assert scored == {"olinda", "olinda-4326", GRANULE}
    assert sorted(x["stage"] for x in letters) == ["chips", "granules", "parse", "parse"]
    expired = [x for x in letters if x["stage"] == "granules"]
    assert all(x["payload"].count("incoming/") == 2 for x in expired)  # both bands named
    assert not any("notes" in (x["payload"] or "") for x in letters)  # filtered, not an error
    # Filtered and duplicate messages leave a queryable trace, one event per message.
    events = _query(stack, f"SELECT disposition, stage, reason, source_message_ids "
                           f"FROM `{stack.dataset}.events`")
    assert sorted((e["disposition"], e["reason"].split()[0]) for e in events) == [
        ("duplicate", "tile"), ("filtered", "event_type"), ("filtered", "not_a_raster")]
    # Every message is in exactly one place: 3 tiles (one of them 6 band messages), 2 events
    # plus 1 duplicate, 5 messages dead-lettered (2 parse, 1 missing object, 2 broken-granule
    # bands, these in one letter that names both).
    scored_ids = _query(stack, f"SELECT m FROM `{stack.dataset}.tiles`, "
                               "UNNEST(source_message_ids) AS m")
    assert len(scored_ids) == 2 + 6
    booked = [m["m"] for m in scored_ids] + [m for row in events + letters
                                              for m in row["source_message_ids"]]
    assert len(booked) == len(set(booked)) == run["scenario"].published
    # Chips: every chip of every tile is scored, skipped or failed; scored ones have a row.
    rows_per_tile = {c["tile_id"]: c["n"] for c in chips_out}
    for tile in tiles_out:
        assert tile["chips_total"] == (tile["chips_scored"] + tile["chips_skipped"]
                                       + tile["chips_failed"])
        assert rows_per_tile[tile["tile_id"]] == tile["chips_scored"]


def test_consumer_queries_answer_from_the_stream_outputs(stack, run):
    dataset = f"{stack.project}.{stack.dataset}"
    bq = stack.bigquery()
    latest = run_query(bq, "latest_prediction_per_chip", dataset, days=1,
                       include_drifted=True)
    keys = [(r["tile_id"], r["chip_index"]) for r in latest]
    assert len(keys) == len(set(keys)) == _query(
        stack, f"SELECT COUNT(*) AS n FROM `{stack.dataset}.chips`")[0]["n"]
    areas = [r for r in run_query(bq, "class_area_per_tile_and_day", dataset,
                                  include_drifted=True) if r["tile_id"] == "olinda"]
    assert {r["class_name"] for r in areas} <= {c.name for c in run["card"].classes}
    # Every valid pixel of the Olinda tile is in exactly one class: 349 x 352 px of 28.5 m.
    assert sum(r["area_km2"] for r in areas) == pytest.approx(349 * 352 * 28.5**2 / 1e6,
                                                              rel=1e-3)
    # A point in Olinda's old town: inside the full tile (both CRSs), outside the crop.
    inside = run_query(bq, "chips_intersecting_region", dataset,
                       region_wkt="POINT(-34.8553 -8.0089)", include_drifted=True)
    assert {r["tile_id"] for r in inside} == {"olinda", "olinda-4326"}
    by_stage: dict[str, int] = {}
    for r in run_query(bq, "dead_letters_by_stage", dataset, days=1):
        by_stage[r["stage"]] = by_stage.get(r["stage"], 0) + r["letters"]
    assert by_stage == {"parse": 2, "chips": 1, "granules": 1}
    # The model flagged the real tile as out of distribution: by default the answers leave it
    # out, and say so in the query's comment; asked for, it is there.
    drifted = {r["tile_id"] for r in _query(stack, f"SELECT tile_id FROM `{stack.dataset}.tiles` "
                                                   "WHERE drifted")}
    assert "olinda" in drifted
    default_areas = {r["tile_id"] for r in run_query(bq, "class_area_per_tile_and_day", dataset)}
    default_chips = {r["tile_id"] for r in run_query(bq, "latest_prediction_per_chip", dataset,
                                                      days=1)}
    assert not drifted & (default_areas | default_chips)
    ready = run_query(bq, "tiles_ready", dataset, days=1, include_drifted=True)
    assert {r["tile_id"] for r in ready} == {t["tile_id"] for t in _query(
        stack, f"SELECT tile_id FROM `{stack.dataset}.tiles`")}


def test_backfill_over_a_glob_scores_the_same_tiles_bounded(stack, model_uri, tmp_path):
    dataset = f"backfill_{uuid.uuid4().hex[:6]}"
    stack.bigquery().create_dataset(dataset)
    tiles.crop(tmp_path / "a.tif", 0, 0, 100, 120)
    tiles.reprojected(tmp_path / "b.tif", "EPSG:3857")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.ops.cli", "run", "--local", f"--stack_dir={stack.run_dir}",
         f"--model_uri={model_uri}", f"--input_glob={tmp_path}/*.tif",
         f"--bq_dataset={stack.project}:{dataset}",
         f"--output_prefix={stack.output_prefix}/{dataset}"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _query(stack, f"SELECT tile_id, source, complete FROM `{dataset}.tiles` "
                         "ORDER BY tile_id")
    assert [(r["tile_id"], r["source"], r["complete"]) for r in rows] == [
        ("a", "file", True), ("b", "file", True)]


def test_a_backfill_on_two_worker_processes_writes_what_one_writes(stack, model_uri, tmp_path):
    """The local backfill runs on the FnApiRunner with one SDK worker process per core; its
    rows and prediction pixels are the ones a single worker writes."""
    tiles.crop(tmp_path / "a.tif", 0, 0, 100, 120)
    tiles.crop(tmp_path / "b.tif", 100, 60, 140, 90)
    tiles.reprojected(tmp_path / "c.tif", "EPSG:3857")

    def backfill(workers: int) -> str:
        dataset = f"workers{workers}_{uuid.uuid4().hex[:6]}"
        stack.bigquery().create_dataset(dataset)
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.ops.cli", "run", "--local",
             f"--stack_dir={stack.run_dir}", f"--model_uri={model_uri}",
             f"--input_glob={tmp_path}/*.tif", f"--direct_num_workers={workers}",
             f"--bq_dataset={stack.project}:{dataset}",
             f"--output_prefix={stack.output_prefix}/{dataset}"],
            capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return dataset

    def chips(dataset: str) -> list[tuple]:
        return sorted((r["tile_id"], r["chip_index"], r["dominant_class"],
                       round(r["mean_confidence"], 6), r["row_id"]) for r in _query(
            stack, f"SELECT tile_id, chip_index, dominant_class, mean_confidence, row_id "
                   f"FROM `{dataset}.chips`"))

    def pixels(dataset: str) -> dict[str, np.ndarray]:
        found = {}
        for row in _query(stack, f"SELECT tile_id, raster_uri FROM `{dataset}.tiles`"):
            bucket, _, name = row["raster_uri"][len("gs://"):].partition("/")
            local = tmp_path / f"{dataset}-{row['tile_id']}.tif"
            stack.storage().bucket(bucket).blob(name).download_to_filename(str(local))
            with rasterio.open(local) as src:
                found[row["tile_id"]] = src.read()
        return found

    one, two = backfill(1), backfill(2)
    assert chips(one) == chips(two) and len(chips(one)) > 0
    single, double = pixels(one), pixels(two)
    assert set(single) == set(double) == {"a", "b", "c"}
    for tile_id, values in single.items():
        assert np.array_equal(values, double[tile_id]), tile_id
