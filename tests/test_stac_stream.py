"""STAC in and out and the band presets, end to end on the local stack.

One stream (a child process, ``--band_preset landsat7-c2``) on its own topic, subscription,
dataset and output prefix scores: a STAC Item announcing the real Olinda tile, HLS S30, HLS L30
and Sentinel-2 L2A-shaped STAC Items whose per-band assets are objects on the stack, and a
Landsat 7 Collection 2 granule delivered as per-band files; bad items and a band file of another
product are dead-lettered. Then ``tilestream stac`` builds a catalog from the tiles table and
``tilestream status`` reports on the stream.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import rasterio

from pipeline.ops import announce, stac_catalog
from pipeline.ops.check import SAMPLE_TILE
from tests import tiles
from tests.streams import query as _query
from tests.test_stac import hls_l30_item, hls_s30_item, landsat_c2_item, sentinel2_item

pytestmark = [pytest.mark.stack, pytest.mark.slow]

MIN_VALID = 0.05
LANDSAT = "LE07_L2SP_217065_20010715_20200917_02_T1"
LANDSAT_TOKENS = ("SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B7")
HLS = "HLS.S30.T25MBM.2001196T123000.v2.0"
HLS_L30 = "HLS.L30.T25MBM.2001196T121500.v2.0"
S2 = "S2B_25MBM_20010715_0_L2A"


def landsat_band_files(directory: Path, src: Path) -> list[Path]:
    """The tile as Landsat C2 L2 per-band files (``{id}_SR_B1.TIF`` ...), plus a thermal band."""
    paths = []
    with rasterio.open(src) as s:
        profile = s.profile | {"count": 1}
        for index, token in enumerate(LANDSAT_TOKENS, start=1):
            path = directory / f"{LANDSAT}_{token}.TIF"
            with rasterio.open(path, "w", **profile) as d:
                d.write(s.read(index), 1)
            paths.append(path)
        thermal = directory / f"{LANDSAT}_ST_B6.TIF"
        with rasterio.open(thermal, "w", **profile) as d:
            d.write(s.read(1), 1)
    return [*paths, thermal]


def tilestream(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.ops.cli", *args], capture_output=True,
                          text=True, timeout=180)


@pytest.fixture(scope="module")
def run(stack, model_uri, tmp_path_factory):
    work = tmp_path_factory.mktemp("stac")
    name = f"stac_{uuid.uuid4().hex[:6]}"
    topic = f"projects/{stack.project}/topics/{name}"
    subscription = f"projects/{stack.project}/subscriptions/{name}"
    stack.publisher().create_topic(name=topic)
    stack.subscriber().create_subscription(name=subscription, topic=topic,
                                           ack_deadline_seconds=10)
    stack.bigquery().create_dataset(name)
    store, publisher, bucket = stack.storage(), stack.publisher(), stack.bucket

    def upload(path: Path, object_name: str) -> tuple[str, int]:
        return announce.upload(store, str(path), bucket, object_name)

    def publish(data: bytes, attributes: dict | None = None) -> None:
        announce.publish(publisher, topic, data, attributes or {})

    # A: a STAC Item announcing the real Olinda tile as one multi-band asset.
    olinda_uri, _ = upload(SAMPLE_TILE, f"stac/{name}/in/olinda.tif")
    olinda = landsat_c2_item()
    olinda.update(id="olinda STAC/1", collection="landsat-c2l2-sr")
    olinda["links"] = [{"rel": "self", "href": f"gs://{bucket}/stac/{name}/items/olinda.json"}]
    olinda["properties"]["datetime"] = "2001-07-15T12:30:00Z"
    olinda["assets"] = {"data": {
        "href": olinda_uri, "type": "image/tiff; application=geotiff", "roles": ["data"],
        "eo:bands": [{"common_name": c} for c in ("blue", "green", "red", "nir08", "swir16",
                                                  "swir22")]}}
    # B: an HLS S30-shaped item whose per-band assets are objects on the stack.
    crop = tiles.crop(work / "crop.tif", 40, 60, 130, 100)
    hls_files = tiles.per_band_files(work, HLS, crop)
    hls = hls_s30_item()
    hls["id"] = HLS
    for token, path in zip(tiles.HLS_TOKENS, hls_files.values(), strict=True):
        hls["assets"][token]["href"] = upload(path, f"stac/{name}/hls/{path.name}")[0]
    for key in ("B01", "B05", "B08", "Fmask"):
        del hls["assets"][key]
    band_uris = {band: hls["assets"][token]["href"]
                 for band, token in zip(tiles.BANDS, tiles.HLS_TOKENS, strict=True)}
    # The same band objects behind a Sentinel-2 L2A (Earth Search) and an HLS L30 item, with
    # decoys where the wrong band would be taken: broad NIR (S2), thermal B10/B11 (L30).
    s2 = sentinel2_item()
    s2["id"] = S2
    s2_keys = {"blue": "blue", "green": "green", "red": "red", "nir": "nir08",
               "swir1": "swir16", "swir2": "swir22"}
    s2["assets"] = {k: v for k, v in s2["assets"].items()
                    if k in (*s2_keys.values(), "nir", "visual", "thumbnail")}
    for band, key in s2_keys.items():
        s2["assets"][key]["href"] = band_uris[band]
    s2["assets"]["nir"]["href"] = band_uris["red"]
    l30 = hls_l30_item()
    l30["id"] = HLS_L30
    l30_keys = dict(zip(tiles.BANDS, ("B02", "B03", "B04", "B05", "B06", "B07"), strict=True))
    l30["assets"] = {key: {"href": band_uris[band]} for band, key in l30_keys.items()}
    l30["assets"] |= {"B10": {"href": band_uris["blue"]}, "B11": {"href": band_uris["blue"]}}
    # C: a Landsat 7 C2 granule as per-band files (and its thermal band, which is not used).
    landsat_crop = tiles.crop(work / "landsat.tif", 100, 100, 120, 140)
    landsat_objects = [upload(p, f"stac/{name}/landsat/{p.name}")
                       for p in landsat_band_files(work, landsat_crop)]
    # D: bad input, each to be dead-lettered with its reason.
    no_datetime = landsat_c2_item()
    no_datetime["id"] = "no-datetime"
    no_datetime["properties"]["datetime"] = None
    outside = landsat_c2_item()
    outside["id"] = "outside"
    outside["assets"]["red"]["href"] = "https://landsatlook.example/red.TIF"
    unmatched = landsat_c2_item()
    unmatched["id"] = "unmatched"
    unmatched["assets"] = {"thumbnail": {"href": f"gs://{bucket}/t.jpg", "type": "image/jpeg",
                                         "roles": ["thumbnail"]}}
    hls_band_uri, hls_band_generation = upload(hls_files["blue"],
                                               f"stac/{name}/mixed/{HLS}.B02.tif")

    log_path, metrics = work / "stream.log", work / "metrics.json"
    prefix = f"{stack.output_prefix}/{name}"
    with open(log_path, "wb") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "pipeline.ops.cli", "run", "--local",
             f"--stack_dir={stack.run_dir}", f"--model_uri={model_uri}",
             f"--subscription={subscription}", f"--bq_dataset={stack.project}:{name}",
             f"--output_prefix={prefix}", f"--metrics_file={metrics}",
             f"--min_valid_fraction={MIN_VALID}", "--band_preset=landsat7-c2",
             "--granule_timeout_secs=120", "--tile_timeout_secs=120", "--window_secs=2",
             "--max_batch_size=16"],
            stdout=log, stderr=subprocess.STDOUT)
    status_running = None
    try:
        (work / "olinda.json").write_text(json.dumps(olinda))
        announced = tilestream("announce", "--local", f"--stack_dir={stack.run_dir}",
                               f"--topic={topic}", f"--stac={work / 'olinda.json'}")
        assert announced.returncode == 0, announced.stderr
        for item in (hls, s2, l30):
            publish(json.dumps(item).encode())
        for object_uri, generation in landsat_objects:
            publish(*announce.gcs_notification(bucket, object_uri.split("/", 3)[3], generation))
        for bad in (no_datetime, outside, unmatched):
            publish(json.dumps(bad).encode())
        publish(*announce.gcs_notification(bucket, hls_band_uri.split("/", 3)[3],
                                           hls_band_generation))
        deadline = time.monotonic() + 300
        done = letters = []
        while time.monotonic() < deadline and child.poll() is None:
            time.sleep(3)
            done = _query(stack, f"SELECT tile_id FROM `{name}.tiles`")
            letters = _query(stack, f"SELECT stage FROM `{name}.dead_letters`")
            if len(done) >= 5 and len(letters) >= 4:
                break
        time.sleep(3)  # the last chip rows' inserts
        status_running = tilestream("status", "--local", f"--stack_dir={stack.run_dir}",
                                    f"--bq_dataset={stack.project}:{name}",
                                    f"--subscription={subscription}")
    finally:
        child.send_signal(signal.SIGTERM)
        code = child.wait(timeout=60)
    log_text = log_path.read_text(errors="replace")
    assert code == 0, f"stream exited {code}:\n{log_text[-4000:]}"
    assert len(done) >= 5, f"tiles: {done}\n{log_text[-4000:]}"
    return {"name": name, "prefix": prefix, "work": work, "topic": topic, "bands": band_uris,
            "subscription": subscription, "olinda_item": olinda, "crop": crop,
            "landsat_crop": landsat_crop, "status_running": status_running, "log": log_text}


def tile_row(stack, run, tile_id: str) -> dict:
    columns = ("tile_id, source, complete, chips_total, chips_scored, chips_failed, acquired, "
               "attributes, raster_uri, stac_uri, source_uris, model_name")
    [row] = _query(stack, f"SELECT {columns} FROM `{run['name']}.tiles` "
                          f"WHERE tile_id = '{tile_id}'")
    return row


def download_json(stack, uri: str) -> dict:
    bucket, _, name = uri[len("gs://"):].partition("/")
    return json.loads(stack.storage().bucket(bucket).blob(name).download_as_text())


def test_stac_item_of_the_real_tile_is_scored_into_rows_a_cog_and_a_valid_item(stack, run,
                                                                              tmp_path):
    row = tile_row(stack, run, "olinda_STAC_1")  # the item id, made path-safe
    assert (row["source"], row["complete"], row["chips_failed"]) == ("stac", True, 0)
    assert row["acquired"].isoformat() == "2001-07-15T12:30:00+00:00"
    attributes = {a["key"]: a["value"] for a in row["attributes"]}
    assert attributes["stac_item"] == run["olinda_item"]["links"][0]["href"]
    chips = _query(stack, f"SELECT COUNT(*) AS n FROM `{run['name']}.chips` "
                          "WHERE tile_id = 'olinda_STAC_1'")
    assert chips[0]["n"] == row["chips_scored"] > 0
    bucket, _, cog = row["raster_uri"][len("gs://"):].partition("/")
    stack.storage().bucket(bucket).blob(cog).download_to_filename(str(tmp_path / "p.tif"))
    with rasterio.open(SAMPLE_TILE) as src, rasterio.open(tmp_path / "p.tif") as out:
        assert (out.crs, out.width, out.height) == (src.crs, src.width, src.height)
    assert row["stac_uri"] == row["raster_uri"][: -len(".tif")] + ".json"
    item = download_json(stack, row["stac_uri"])
    assert stac_catalog.validation_errors(item) == []
    props = item["properties"]
    assert props["datetime"] == "2001-07-15T12:30:00Z"
    assert (props["proj:code"], props["proj:shape"]) == ("EPSG:31985", [352, 349])
    assert props["tilestream:chips_scored"] == row["chips_scored"]
    assert props["tilestream:model_name"] == row["model_name"]
    assert item["assets"]["prediction"]["href"] == row["raster_uri"]
    west, south, east, north = item["bbox"]
    assert west < -34.855 < east and south < -8.009 < north  # Olinda's old town is inside
    derived = [link["href"] for link in item["links"] if link["rel"] == "derived_from"]
    assert derived == [run["olinda_item"]["links"][0]["href"]]


def test_hls_shaped_item_with_per_band_assets_is_scored_in_card_band_order(stack, run):
    row = tile_row(stack, run, HLS)
    assert row["source"] == "stac" and row["complete"] is True
    assert [u.rsplit(".", 2)[-2] for u in row["source_uris"]] == list(tiles.HLS_TOKENS)
    total, kept = tiles.expected_chips(run["crop"], 64, 48, MIN_VALID)
    assert (row["chips_total"], row["chips_scored"]) == (total, kept)


@pytest.mark.parametrize("tile_id", [S2, HLS_L30])
def test_sentinel2_and_hls_l30_shaped_items_take_the_right_bands(stack, run, tile_id):
    """Narrow NIR over broad (S2), and L30's own keys, not its thermal B10/B11."""
    row = tile_row(stack, run, tile_id)
    assert (row["source"], row["complete"]) == ("stac", True)
    assert row["source_uris"] == [run["bands"][b] for b in tiles.BANDS]
    _, kept = tiles.expected_chips(run["crop"], 64, 48, MIN_VALID)
    assert row["chips_scored"] == kept


def test_landsat_granule_with_its_preset_is_scored_with_the_acquisition_date(stack, run):
    row = tile_row(stack, run, LANDSAT)
    assert (row["source"], row["complete"]) == ("granule", True)
    assert row["acquired"].isoformat() == "2001-07-15T00:00:00+00:00"
    assert [u.split(f"{LANDSAT}_")[1] for u in row["source_uris"]] == [
        f"{t}.TIF" for t in LANDSAT_TOKENS]
    total, kept = tiles.expected_chips(run["landsat_crop"], 64, 48, MIN_VALID)
    assert (row["chips_total"], row["chips_scored"]) == (total, kept)
    chips = _query(stack, f"SELECT acquired FROM `{run['name']}.chips` "
                          f"WHERE tile_id = '{LANDSAT}'")
    assert len(chips) == kept and {c["acquired"].date().isoformat() for c in chips} == {
        "2001-07-15"}
    item = download_json(stack, row["stac_uri"])
    assert stac_catalog.validation_errors(item) == []
    assert item["properties"]["datetime"] == "2001-07-15T00:00:00Z"


def test_bad_items_and_a_foreign_band_file_are_dead_lettered_with_reasons(stack, run):
    letters = _query(stack, f"SELECT stage, reason FROM `{run['name']}.dead_letters`")
    reasons = sorted(x["reason"] for x in letters)
    assert {x["stage"] for x in letters} == {"parse"}, reasons
    assert len(reasons) == 4, reasons
    text = " | ".join(reasons)
    assert "STAC item no-datetime has no datetime (nor start_datetime)" in text
    assert ("asset 'red' of STAC item outside is at https://landsatlook.example/red.TIF, not a "
            "gs:// object") in text
    assert "STAC item unmatched has no asset for model bands" in text
    assert (f"band file {HLS}.B02.tif is a hls-s30 band file (band token B02) that the "
            "stream's granule pattern does not match") in text
    assert "--band_preset hls-s30 reads it as a band of its granule" in text
    assert "ST_B6" not in text  # a band the product has and the model does not use: filtered


def test_static_catalog_from_the_tiles_table_is_valid_and_points_at_the_cogs(stack, run,
                                                                           tmp_path):
    done = tilestream("stac", "--local", f"--stack_dir={stack.run_dir}",
                      f"--bq_dataset={stack.project}.{run['name']}", f"--out={tmp_path}/cat")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["collections"] == ["landcover-student-1"] and summary["items"] == 5
    assert summary["skipped"] == []
    root = tmp_path / "cat"
    catalog = json.loads((root / "catalog.json").read_text())
    [child] = [link["href"] for link in catalog["links"] if link["rel"] == "child"]
    collection_path = (root / child).resolve()
    collection = json.loads(collection_path.read_text())
    items = [json.loads((collection_path.parent / link["href"]).read_text())
             for link in collection["links"] if link["rel"] == "item"]
    for obj in (catalog, collection, *items):
        assert stac_catalog.validation_errors(obj) == []
    rows = _query(stack, f"SELECT raster_uri FROM `{run['name']}.tiles`")
    assert sorted(i["assets"]["prediction"]["href"] for i in items) == sorted(
        r["raster_uri"] for r in rows)
    assert collection["extent"]["temporal"]["interval"][0][0].startswith("2001-07-15")
    on_gcs = tilestream("stac", "--local", f"--stack_dir={stack.run_dir}",
                        f"--bq_dataset={stack.project}.{run['name']}",
                        f"--out={run['prefix']}/catalog")
    assert on_gcs.returncode == 0, on_gcs.stderr[-3000:]
    assert json.loads(on_gcs.stdout)["catalog"] == f"{run['prefix']}/catalog/catalog.json"
    written = {b.name for b in stack.storage().list_blobs(
        stack.bucket, prefix=f"output/{run['name']}/catalog/")}
    assert len(written) == 1 + 1 + 5  # catalog, collection, items


def test_status_reports_the_running_stream_its_last_tile_and_dead_letters(stack, run):
    done = run["status_running"]
    assert done.returncode == 0, done.stderr[-2000:]
    status = json.loads(done.stdout)
    assert status["stream_running"] is True and all(status["stack"].values())
    assert status["last_tile"]["tile_id"] in {"olinda_STAC_1", HLS, HLS_L30, S2, LANDSAT}
    assert status["dead_letters_last_1h"] == {"parse": 4}
    # what consumers read, by the one definition of "answered", beside what each job writes
    assert status["tiles_answered_last_1h"] >= 1
    assert {r["role"] for r in status["writing_last_1h"]} == {"live"}


def test_status_counts_the_backlog_of_a_stopped_stream_and_leaves_it_there(stack, run):
    # A subscription of its own: the stopped stream's last pull may still hold the other's.
    waiting = f"{run['subscription']}-waiting"
    stack.subscriber().create_subscription(name=waiting, topic=run["topic"],
                                           ack_deadline_seconds=10)
    for i in range(3):
        announce.publish(stack.publisher(), run["topic"], f"waiting {i}".encode(), {})
    common = ("status", "--local", f"--stack_dir={stack.run_dir}",
              f"--bq_dataset={stack.project}:{run['name']}", f"--subscription={waiting}")
    first, second = tilestream(*common), tilestream(*common)
    for done in (first, second):
        assert done.returncode == 0, done.stderr[-2000:]
        status = json.loads(done.stdout)
        assert status["stream_running"] is False
        assert status["backlog"] == 3  # the first peek handed every message back


def test_catalog_of_a_dataset_without_tiles_is_empty_not_an_error(stack, tmp_path):
    empty = f"empty_{uuid.uuid4().hex[:6]}"
    stack.bigquery().create_dataset(empty)
    done = tilestream("stac", "--local", f"--stack_dir={stack.run_dir}",
                      f"--bq_dataset={stack.project}.{empty}", f"--out={tmp_path}/cat")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["items"] == 0
    catalog = json.loads((tmp_path / "cat" / "catalog.json").read_text())
    assert stac_catalog.validation_errors(catalog) == []
