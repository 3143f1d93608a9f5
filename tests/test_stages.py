"""Each stage on its own, with real rasters and Beam's in-process runner; no emulators needed."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import tracemalloc
from pathlib import Path
from typing import NamedTuple

import apache_beam as beam
import numpy as np
import pytest
import rasterio
import torch
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to
from rasterio.transform import from_origin

from model.card import ClassInfo, InputSpec, ModelCard
from model.inference import model_input, normalise_batch
from pipeline.ops import announce
from pipeline.ops.check import SAMPLE_TILE
from tests import tiles
from transforms import announcements as ann
from transforms import assemble, chips, inference, model_handlers, sinks
from transforms.chip_cut import invalid_mask
from transforms.geometry import own_strip, strip_bounds
from transforms.guards import InputAllowList, Refused
from transforms.records import (
    NODATA_CLASS,
    ChipBlock,
    ChipPrediction,
    PredictionBlock,
    TileManifest,
    TileRef,
    pack_mask,
)

BANDS = tiles.BANDS
RULE = ann.GranuleRule()


def test_card(chip_size=64, stride=48, classes=3) -> ModelCard:
    return ModelCard(
        name="unit", version="1", task="segmentation",
        input=InputSpec(bands=BANDS, chip_size=chip_size, stride=stride, mean=(80.0,) * 6,
                        std=(40.0,) * 6),
        classes=tuple(ClassInfo(i, f"c{i}", f"#{i * 40:02x}8000") for i in range(classes)),
        weights_file="model.pt", weights_sha256="0" * 64, parameters=1)


test_card.__test__ = False  # a factory, not a test


def runner_options() -> PipelineOptions:
    return PipelineOptions(["--runner=BundleBasedDirectRunner"])


def message(data: bytes, attributes: dict, message_id: str = "m1") -> PubsubMessage:
    return PubsubMessage(data, attributes, message_id=message_id,
                         publish_time=dt.datetime(2026, 11, 26, 12, tzinfo=dt.UTC))


ALLOW = InputAllowList.parse("gs://bkt")


def parse_all(messages: list[PubsubMessage], rule=RULE, allow=ALLOW):
    """Run the parse DoFn over messages; returns (tiles, bands, dead letters, set aside).
    Whatever each message becomes, it is booked in once (its ``messages`` entry row)."""
    fn = ann._ParseFn(BANDS, rule, allow)
    out: dict[str, list] = {"tiles": [], "bands": [], "dead_letters": [], "set_aside": [],
                            "entries": []}
    for msg in messages:
        for item in fn.process(msg):
            tag = item.tag if isinstance(item, beam.pvalue.TaggedOutput) else "tiles"
            value = item.value if isinstance(item, beam.pvalue.TaggedOutput) else item
            value = value.value if isinstance(value, beam.window.TimestampedValue) else value
            if tag == "dead_letters" and value.disposition != "dead_letter":
                tag = "set_aside"
            out[tag].append(value)
    assert [e["message_id"] for e in out["entries"]] == [m.message_id or "" for m in messages]
    return out["tiles"], out["bands"], out["dead_letters"], out["set_aside"]


def parse(messages: list[PubsubMessage]):
    """(tiles, bands, dead letters); filtered messages are checked by their own tests."""
    return parse_all(messages)[:3]


# --- parse ---------------------------------------------------------------------------------

def test_gcs_finalize_of_a_geotiff_is_one_tile_with_event_time():
    data, attrs = announce.gcs_notification("bkt", "in/scene_1.tif", 17, event_time=1.7e9)
    [tile], bands, letters = parse([message(data, attrs)])
    assert (tile.tile_id, tile.band_uris, tile.generation) == ("scene_1", ("gs://bkt/in/scene_1.tif",),
                                                              "17")
    assert tile.event_time == pytest.approx(1.7e9) and tile.source == "gcs"
    assert bands == letters == []


@pytest.mark.parametrize("event_type", ["OBJECT_DELETE", "OBJECT_METADATA_UPDATE",
                                        "OBJECT_ARCHIVE"])
def test_other_gcs_events_are_filtered_not_scored_nor_dead_lettered(event_type):
    data, attrs = announce.gcs_notification("bkt", "in/scene.tif", 1, event_type=event_type)
    tiles_, bands, letters, [event] = parse_all([message(data, attrs)])
    assert tiles_ == bands == letters == []
    assert (event.disposition, event.message_id) == ("filtered", "m1")
    assert event_type in event.reason


def test_hls_band_file_becomes_a_band_object_with_the_card_band_name():
    data, attrs = announce.gcs_notification("bkt", "hls/HLS.S30.T17SLU.2024110T160000.v2.0.B8A.tif",
                                            3)
    tiles_, [band], _ = parse([message(data, attrs)])
    assert tiles_ == []
    assert (band.granule_id, band.band) == ("HLS.S30.T17SLU.2024110T160000.v2.0", "nir")


def test_band_the_model_does_not_use_is_filtered():
    data, attrs = announce.gcs_notification("bkt", "hls/HLS.S30.T17SLU.2024110T160000.v2.0.B01.tif",
                                            3)
    tiles_, bands, letters, [event] = parse_all([message(data, attrs)])
    assert tiles_ == bands == letters == []
    assert event.disposition == "filtered" and event.reason == "band_not_used"


def test_json_announcement_with_band_map_orders_uris_like_the_card():
    band_map = {b: f"gs://bkt/x/{b}.tif" for b in reversed(BANDS)}
    data, attrs = announce.json_announcement("t1", "2024-04-19T16:00:00Z", bands=band_map,
                                             sensor="hls-s30", attributes={"aoi": "a1"})
    [tile], _, _ = parse([message(data, attrs)])
    assert tile.band_uris == tuple(f"gs://bkt/x/{b}.tif" for b in BANDS)
    assert (tile.acquired, tile.sensor, tile.attributes) == ("2024-04-19T16:00:00Z", "hls-s30",
                                                             (("aoi", "a1"),))


def test_same_announcement_twice_has_the_same_generation():
    data, attrs = announce.json_announcement("t1", "2024-04-19T16:00:00Z", uri="gs://bkt/t1.tif")
    first, _, _ = parse([message(data, attrs, "a")])
    second, _, _ = parse([message(data, attrs, "b")])
    assert first[0].key == second[0].key


@pytest.mark.parametrize(("payload", "reason"), [
    (b"not json at all", "neither a GCS notification"),
    (b"[1, 2]", "must be a JSON object"),
    (json.dumps({"schema": "other/v9", "tile_id": "x"}).encode(), "schema must be"),
    (json.dumps({"schema": ann.ANNOUNCEMENT_SCHEMA, "tile_id": "x",
                 "acquired": "yesterday", "uri": "gs://bkt/x.tif"}).encode(), "RFC 3339"),
    (json.dumps({"schema": ann.ANNOUNCEMENT_SCHEMA, "tile_id": "x",
                 "acquired": "2024-01-01T00:00:00Z"}).encode(), "exactly one of"),
    (json.dumps({"schema": ann.ANNOUNCEMENT_SCHEMA, "tile_id": "bad id!",
                 "acquired": "2024-01-01T00:00:00Z", "uri": "gs://bkt/x.tif"}).encode(), "tile_id"),
])
def test_malformed_messages_are_dead_lettered_with_the_reason(payload, reason):
    tiles_, bands, [letter] = parse([message(payload, {}, "bad-1")])
    assert tiles_ == bands == []
    assert letter.stage == "parse" and reason in letter.reason
    assert letter.message_id == "bad-1" and letter.payload


def test_notification_without_event_time_is_dead_lettered():
    data, attrs = announce.gcs_notification("bkt", "in/a.tif", 1)
    del attrs["eventTime"]
    _, _, [letter] = parse([message(data, attrs)])
    assert "eventTime" in letter.reason


# --- chips -----------------------------------------------------------------------------------

def chip_tile(path: Path, settings: chips.ChipSettings, tile: TileRef | None = None):
    tile = tile or TileRef("t", (str(path),), "1", 0.0, 0.0)
    fn = chips.ChipTileFn(settings)
    out = list(fn.process(tile))
    chips_ = list(chips.chips_in(out))
    assert all(isinstance(c, (chips.ChipBlock, beam.pvalue.TaggedOutput)) for c in out)
    tagged = [c for c in out if isinstance(c, beam.pvalue.TaggedOutput)]
    return chips_, tagged


def test_chips_are_normalised_padded_and_georeferenced(tmp_path):
    path = tiles.crop(tmp_path / "crop.tif", 0, 0, 100, 70)
    settings = chips.ChipSettings.from_card(test_card())
    out, tagged = chip_tile(path, settings)
    [manifest] = [t for t in tagged if t.tag == chips.MANIFESTS_TAG]
    assert manifest.value.chips_total == len(out) == 2 * 2
    with rasterio.open(path) as src:
        raw = src.read().astype(np.float32)
        crs, transform = src.crs, src.transform
    edge = next(c for c in out if c.row == 48 and c.col == 48)  # bottom-right: 52 x 22 in tile
    assert (edge.height, edge.width) == (52, 22)
    assert edge.valid[:52, :22].all() and not edge.valid[52:].any() and not edge.valid[:, 22:].any()
    # Chips travel raw (uint8, a quarter of float32) and are normalised in the inference step.
    assert edge.raw.dtype == np.uint8 and edge.crs == "EPSG:31985"
    batch = torch.from_numpy(model_input(edge.raw, edge.valid))[None]
    pixels = normalise_batch(batch, settings.card.input)[0].numpy()
    np.testing.assert_allclose(pixels[:, :52, :22], (raw[:, 48:, 48:] - 80.0) / 40.0)
    assert (pixels[:, 52:, :] == 0).all()
    assert rasterio.Affine(*edge.transform) * (0, 0) == pytest.approx(transform * (48, 48))
    lon, lat = (float(v) for v in edge.footprint_wkt[len("POLYGON(("):].split(",")[0].split())
    assert -35.0 < lon < -34.8 and -8.1 < lat < -7.9  # Olinda
    assert edge.pixel_area_m2 == pytest.approx(28.5**2, rel=1e-6) and crs.to_epsg() == 31985


def test_a_chip_travels_at_about_the_size_of_its_raw_pixels(tmp_path):
    """Between stages a Chip is what Beam encodes: raw uint8 plus a packed mask, not float32."""
    from apache_beam.coders import registry

    [chip, *_], _ = chip_tile(SAMPLE_TILE, chips.ChipSettings.from_card(test_card()))
    encoded = len(registry.get_coder(object).encode(chip))
    raw_bytes = 6 * 64 * 64
    assert raw_bytes < encoded < 1.2 * raw_bytes


def test_chips_under_the_valid_threshold_are_skipped_and_counted(tmp_path):
    path = tmp_path / "holes.tif"
    data = np.full((6, 128, 128), 50, np.uint8)
    data[:, :64, :64] = 0  # one chip entirely nodata
    data[:, 64:, :64][:, :, :60] = 0  # another 94% nodata
    with rasterio.open(path, "w", driver="GTiff", width=128, height=128, count=6, dtype="uint8",
                       nodata=0, crs="EPSG:32633", transform=from_origin(0, 0, 10, 10)) as d:
        d.write(data)
    settings = chips.ChipSettings.from_card(test_card(stride=64), min_valid_fraction=0.1)
    out, tagged = chip_tile(path, settings)
    [manifest] = [t for t in tagged if t.tag == chips.MANIFESTS_TAG]
    assert manifest.value.chips_total == 4 and manifest.value.chips_skipped == 2
    assert sorted((c.row, c.col) for c in out) == [(0, 64), (64, 64)]


def test_band_files_on_different_grids_are_dead_lettered(tmp_path):
    a = tiles.crop(tmp_path / "a.tif", 0, 0, 64, 64)
    b = tiles.crop(tmp_path / "b.tif", 1, 0, 64, 64)
    tile = TileRef("g", (str(a),) + (str(b),) * 5, "1", 0.0, 0.0)
    out, [letter] = chip_tile(a, chips.ChipSettings.from_card(test_card()), tile)
    assert out == [] and "another grid" in letter.value.reason


def test_raster_with_fewer_bands_than_the_card_is_dead_lettered(tmp_path):
    path = tmp_path / "three.tif"
    with rasterio.open(SAMPLE_TILE) as src:
        profile = src.profile | {"count": 3}
        data = src.read([1, 2, 3])
    with rasterio.open(path, "w", **profile) as d:
        d.write(data)
    out, [letter] = chip_tile(path, chips.ChipSettings.from_card(test_card()))
    assert out == [] and "card needs 6" in letter.value.reason


def test_a_huge_tile_is_read_a_chip_row_at_a_time(tmp_path):
    """10,000 x 10,000 x 6 bands would be 600 MB as uint8; memory must follow one strip."""
    path = tmp_path / "huge.tif"
    with rasterio.open(path, "w", driver="GTiff", width=10_000, height=10_000, count=6,
                       dtype="uint8", crs="EPSG:32633", transform=from_origin(0, 0, 10, 10),
                       tiled=True, blockxsize=512, blockysize=512, compress="deflate") as d:
        d.write(np.full((6, 512, 10_000), 90, np.uint8), window=((0, 512), (0, 10_000)))
    settings = chips.ChipSettings.from_card(test_card(stride=64))
    fn = chips.ChipTileFn(settings)
    tracemalloc.start()
    produced = fn.process(TileRef("huge", (str(path),), "1", 0.0, 0.0))
    block = next(produced)  # the first strip task: 3 chip rows of 157 chips
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert isinstance(block, chips.ChipBlock) and len(block) == 3 * 157
    assert {c.row for c in block.chips} == {0, 64, 128}
    # A strip of a tile this wide is 3 chip rows, not 8 (at most ~2 Mpx): the task reads
    # 6 x 192 x 10,000 bytes (11.5 MB) and its chips are windows of that read; the tile is 600 MB.
    assert peak < 40e6, f"peak {peak / 1e6:.0f} MB"


# --- inference -------------------------------------------------------------------------------

def test_prediction_counts_only_valid_pixels_and_crops_to_the_window(tmp_path):
    path = tiles.crop(tmp_path / "c.tif", 0, 0, 40, 30)
    [chip], _ = chip_tile(path, chips.ChipSettings.from_card(test_card(chip_size=64)))
    mask = chip.valid
    mask[:10, :] = False
    chip = dataclasses.replace(chip, valid_bits=pack_mask(mask))
    probs = np.zeros((3, 64, 64), np.uint8)
    probs[2] = 200
    probs[0, :, :15] = 250
    pred = inference.to_prediction(dataclasses.replace(chip, raw=None), probs, "m", "1")
    assert pred.class_map.shape == (40, 30)
    assert (pred.class_map[:10] == NODATA_CLASS).all()
    assert pred.class_counts == (30 * 15, 0, 30 * 15)
    assert pred.mean_confidence == pytest.approx((250 + 200) / 2 / 255)


def test_gpu_device_refuses_to_start_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for machines without it")
    handler = model_handlers.StudentModelHandler(
        dataclasses.replace(test_card(), uri="/nonexistent"), device="GPU")
    with pytest.raises(RuntimeError, match="--device=GPU but CUDA is not usable"):
        handler.load_model()


# --- assembly ----------------------------------------------------------------------------------

class Chipped(NamedTuple):
    """What the chipper told assembly about a tile: its manifest and strip reports."""

    manifest: TileManifest
    reports: tuple


def fake_predictions(path: Path, card: ModelCard, value_of) -> tuple:
    settings = chips.ChipSettings.from_card(card)
    out, tagged = chip_tile(path, settings)
    chipped = Chipped(next(t.value for t in tagged if t.tag == chips.MANIFESTS_TAG),
                      tuple(t.value for t in tagged if t.tag == chips.REPORTS_TAG))
    predictions = []
    for chip in out:
        probs = np.stack([np.full((chip.height, chip.width), value_of(chip, k), np.uint8)
                          for k in range(card.num_classes)])
        predictions.append(ChipPrediction(dataclasses.replace(chip, raw=None),
                                          probs.argmax(0).astype(np.uint8), probs, (0,) * 3,
                                          0.5, "m", "1", 0.0))
    return chipped, predictions


def run_assembly(card: ModelCard, out_dir: Path, chipped: Chipped, predictions, failed=(),
                 confidence: bool = False, time_out: bool = False):
    """Drive the three assembly steps by hand (route, strips, tile); (tile rows, letters)."""
    route = assemble._RouteFn(confidence)
    strips_fn = assemble._AssembleStripFn(card, str(out_dir), 60, True, confidence)
    tiles_fn = assemble._FinishTileFn(card, str(out_dir), 60, True, confidence)
    strips_fn.setup()
    tiles_fn.setup()
    to_strips, to_tile, letters, rows = [], [], [], []

    def sort(outputs, downstream):
        for out in outputs:
            if isinstance(out, beam.pvalue.TaggedOutput):
                (to_tile if out.tag == assemble.TILES_TAG else letters).append(out.value)
            else:
                downstream.append(out)

    tile = chipped.manifest.tile
    blocks = [PredictionBlock(tile, task, tuple(group))  # one block per strip task, as cut
              for task, group in by_task(chipped.manifest, predictions).items()]
    failed_blocks = [ChipBlock(tile, 0, tuple(failed))] if failed else []
    for item in (chipped.manifest, *chipped.reports, *blocks, *failed_blocks):
        sort(route.process(item), to_strips)
    states: dict[str, dict] = {}
    for key, item in to_strips:
        state = states.setdefault(key, {"reports": _State("bag"), "plan_state": _State(),
                                        "pieces": _State("bag"), "arrived": _State("sum")})
        sort(strips_fn.process((key, item), **state, wall=_State(), end=_State()), to_tile)
    if time_out:
        for key, state in states.items():
            sort(strips_fn._timed_out(key, **state), to_tile)
    tile_state = {"manifest_state": _State(), "results": _State("bag")}
    for kv in to_tile:
        sort(tiles_fn.process(kv, **tile_state, wall=_State(), end=_State()), rows)
    if time_out and tile_state["manifest_state"].read() is not None:
        sort(tiles_fn._timed_out(chipped.manifest.tile.key, **tile_state), rows)
    return rows, letters, tile_state


def by_task(manifest: TileManifest, predictions) -> dict[int, list]:
    """Predictions grouped as the chipper cuts blocks: one per strip task (its chip rows)."""
    bounds = strip_bounds(manifest.height, manifest.width, manifest.chip_size, manifest.stride)
    groups: dict[int, list] = {}
    for prediction in predictions:
        groups.setdefault(own_strip(prediction.chip.row, bounds), []).append(prediction)
    return groups


def class_counts(row: dict) -> list[int]:
    return [c["pixels"] for c in row["classes"]]


def test_overlapping_chips_are_blended_not_overwritten(tmp_path):
    path = tiles.crop(tmp_path / "c.tif", 0, 0, 64, 112)  # chips at cols 0 and 48: overlap 16
    card = test_card()

    # Chip 0 says class 0 weakly (0.6 vs 0.4), chip 1 says class 1 strongly (0.9 vs 0.1): in
    # the overlap the average (0.35 vs 0.65) must win for class 1, whoever was written last.
    def value_of(chip, k):
        table = {0: (153, 102, 0), 48: (25, 230, 0)}
        return table[chip.col][k]

    chipped, predictions = fake_predictions(path, card, value_of)
    for order in (predictions, predictions[::-1]):
        [row], letters, _ = run_assembly(card, tmp_path / "out", chipped, order)
        with rasterio.open(row["raster_uri"]) as r:
            classes = r.read(1)
        assert (classes[:, :48] == 0).all() and (classes[:, 48:] == 1).all()
        assert class_counts(row) == [64 * 48, 64 * 64, 0] and letters == []
        assert row["complete"] is True


def test_prediction_raster_matches_the_input_grid_with_colours_and_confidence(tmp_path):
    path = tiles.reprojected(tmp_path / "w.tif", "EPSG:4326")
    card = test_card()
    chipped, predictions = fake_predictions(path, card, lambda chip, k: 200 if k == 2 else 20)
    [row], _, _ = run_assembly(card, tmp_path / "out", chipped, predictions, confidence=True)
    with rasterio.open(path) as src, rasterio.open(row["raster_uri"]) as r:
        assert (r.crs, r.width, r.height) == (src.crs, src.width, src.height)
        assert r.transform.almost_equals(src.transform)
        assert r.count == 2 and r.nodata == 255
        assert r.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert r.colormap(1)[2][:3] == card.classes[2].rgb
        assert r.descriptions == ("class", "confidence_percent")
        valid = (src.read() != src.nodata).all(axis=0)
        classes, confidence = r.read(1), r.read(2)
    assert (classes[valid] == 2).all() and (classes[~valid] == 255).all()
    assert set(np.unique(confidence[valid])) == {round(200 / 255 * 100)}
    pieces = list(Path(row["raster_uri"]).parent.rglob("*.strips/*.tif"))
    assert pieces == [], "strip pieces are removed once stitched"


def test_missing_chips_leave_nodata_in_a_partial_raster(tmp_path):
    path = tiles.crop(tmp_path / "c.tif", 0, 0, 64, 112)
    card = test_card()
    chipped, predictions = fake_predictions(path, card, lambda chip, k: 200 if k == 1 else 10)
    [row], [letter], _ = run_assembly(card, tmp_path / "out", chipped, predictions[:1],
                                      time_out=True)
    with rasterio.open(row["raster_uri"]) as r:
        classes = r.read(1)
    assert (classes[:, :64] == 1).all() and (classes[:, 64:] == 255).all()
    assert class_counts(row) == [0, 64 * 64, 0]
    assert (row["complete"], row["chips_scored"], row["chips_failed"]) == (False, 1, 1)
    assert "1 of 2 chips scored" in letter.reason


def test_a_chip_the_model_failed_on_makes_the_tile_partial_not_stuck(tmp_path):
    path = tiles.crop(tmp_path / "c.tif", 0, 0, 64, 112)
    card = test_card()
    chipped, predictions = fake_predictions(path, card, lambda chip, k: 200 if k == 1 else 10)
    [row], [letter], _ = run_assembly(card, tmp_path / "out", chipped, predictions[:1],
                                      failed=[predictions[1].chip])
    assert (row["complete"], row["chips_scored"], row["chips_failed"]) == (False, 1, 1)
    assert "written as partial" in letter.reason


@pytest.mark.parametrize("size", [None, (3660, 3660), (600, 7320)])
def test_strip_assembly_is_pixel_identical_to_blending_the_whole_tile(tmp_path, size):
    """On the sample, on an HLS-sized mosaic and on one twice as wide (its strips are half as
    tall), with random overlapping probabilities."""
    from tests.reference_blend import blended

    if size is None:
        path = SAMPLE_TILE
    else:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
        from mosaics import mosaic

        path = mosaic(tmp_path / "mosaic.tif", *size)
    card = test_card(classes=4)
    rng = np.random.default_rng(5)
    chipped, predictions = fake_predictions(path, card, lambda chip, k: 0)
    predictions = [dataclasses.replace(p, probabilities=rng.integers(
        0, 256, p.probabilities.shape, dtype=np.uint8)) for p in predictions]
    rng.shuffle(predictions)
    [row], letters, _ = run_assembly(card, tmp_path / "out", chipped, predictions,
                                     confidence=True)
    classes, confidence = blended(chipped.manifest, predictions, card.num_classes)
    with rasterio.open(row["raster_uri"]) as r:
        assert np.array_equal(r.read(1), classes)
        assert np.array_equal(r.read(2), confidence)
    assert row["complete"] is True and letters == []
    assert class_counts(row) == np.bincount(classes[classes != 255], minlength=4).tolist()


# --- sinks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(sinks.SCHEMAS))
def test_schema_json_files_match_the_code(name):
    path = Path(__file__).resolve().parents[1] / "templates" / "bigquery" / f"{name}.json"
    assert json.loads(path.read_text()) == sinks.SCHEMAS[name]["fields"], (
        "regenerate with `tilestream schemas`")


def test_tables_in_a_dataset_accept_the_usual_spellings():
    assert sinks.BigQueryTables.in_dataset("ds", "proj").chips == "proj:ds.chips"
    assert sinks.BigQueryTables.in_dataset("proj.ds").tiles == "proj:ds.tiles"
    assert sinks.BigQueryTables.in_dataset("proj:ds").errors == "proj:ds.dead_letters"
    with pytest.raises(ValueError, match="give --project"):
        sinks.BigQueryTables.in_dataset("ds")
    for bad in ("p:d.x", "p:", ":d", "p:d:e"):
        with pytest.raises(ValueError, match="is not PROJECT:DATASET"):
            sinks.BigQueryTables.in_dataset(bad)


def test_streamed_rows_are_sized_as_the_insert_api_counts_them():
    """The sink's row-size check is the JSON payload (cheap), and still refuses huge rows."""
    from apache_beam.io.gcp.bigquery import BigQueryWriteFn

    fn = BigQueryWriteFn(batch_size=10, max_insert_payload_size=1000)
    row = ({"tile_id": "t", "classes": [{"name": "water", "pixels": 3}]}, "insert-id")
    assert fn._check_row_size(row) == (len(json.dumps(row)), None)
    size, error = fn._check_row_size(({"payload": "x" * 2000}, "id"))
    assert size > 2000 and "exceeds the maximum insert payload size" in error


def test_chip_rows_are_assertable_through_beam(tmp_path):
    """chip_rows runs inside a pipeline: the row id is deterministic per model, tile and chip."""
    path = tiles.crop(tmp_path / "c.tif", 0, 0, 64, 64)
    card = test_card()
    _, predictions = fake_predictions(path, card, lambda chip, k: 100)
    names = tuple(c.name for c in card.classes)
    expected = sinks.row_id("m", "1", predictions[0].chip.tile.key, 0)
    block = PredictionBlock(predictions[0].chip.tile, 0, tuple(predictions))
    with beam.Pipeline(options=runner_options()) as p:
        ids = (p | beam.Create([block]) | beam.FlatMap(sinks.chip_rows, names)
               | beam.Map(lambda row: row["row_id"]))
        assert_that(ids, equal_to([expected]))


def test_rows_a_load_job_would_refuse_become_dead_letters_not_a_failed_load(tmp_path):
    """One bad row fails a whole BigQuery load job (and a stream retrying it): CheckRows lets
    the good rows through and gives each bad one a dead letter saying what is wrong."""
    from transforms.deadletter import CheckRows

    path = tiles.crop(tmp_path / "c.tif", 0, 0, 64, 64)
    card = test_card()
    _, [prediction] = fake_predictions(path, card, lambda chip, k: 100)
    good = sinks.chip_row(prediction, tuple(c.name for c in card.classes))
    bad = {"nan": {**good, "mean_confidence": float("nan")},
           "missing": {k: v for k, v in good.items() if k != "tile_id"},
           "type": {**good, "chip_index": "7"},
           "nested": {**good, "classes": [{**good["classes"][0], "pixels": None}]},
           "unknown": {**good, "extra": 1}}
    with beam.Pipeline(options=runner_options()) as p:
        checked = (p | beam.Create([good, *bad.values()])
                   | CheckRows("p:d.chips", sinks.CHIP_SCHEMA))
        assert_that(checked.rows | beam.Map(lambda r: r["row_id"]), equal_to([good["row_id"]]),
                    label="good")
        assert_that(checked.dead_letters | beam.Map(lambda d: d.reason.split(": ", 1)[1]),
                    equal_to(["mean_confidence is nan", "tile_id is required",
                              "chip_index must be INT64, not str",
                              "classes.pixels is required", "unknown column(s) ['extra']"]),
                    label="bad")


def test_card_nodata_counts_as_invalid_even_when_the_raster_declares_none(tmp_path):
    path = tmp_path / "fill.tif"
    data = np.full((6, 64, 64), 90, np.uint8)
    data[:, :, :16] = 0  # Landsat Level-1 fill, undeclared in the file
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=6, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(0, 0, 30, 30)) as d:
        d.write(data)
    card = dataclasses.replace(test_card(), input=dataclasses.replace(test_card().input,
                                                                        nodata=0.0))
    [chip], _ = chip_tile(path, chips.ChipSettings.from_card(card))
    assert chip.valid_fraction == pytest.approx(48 / 64)
    assert not chip.valid[:, :16].any() and chip.valid[:, 16:].all()


@pytest.mark.parametrize("dtype, nodata", [
    ("uint8", [{0}] * 3), ("uint8", [{255}] * 3), ("uint8", [{7}] * 3), ("uint8", [{0.0}] * 3),
    ("uint8", [{0}, {0}, {5}]), ("uint8", [{0, 255}] * 3), ("int16", [{-32768}] * 3),
    ("int16", [{-9999}] * 3), ("uint16", [{65535}] * 3), ("float32", [{0.0}] * 3),
])
def test_a_pixel_is_invalid_where_any_band_holds_its_nodata(dtype, nodata):
    """The shortcut for one shared nodata at the type's floor or ceiling marks the same pixels
    as the band-by-band definition."""
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype) if dtype != "float32" else None
    values = (rng.integers(info.min, info.max, (3, 40, 50), endpoint=True).astype(dtype)
              if info else rng.normal(size=(3, 40, 50)).astype(dtype))
    for band, band_nodata in enumerate(nodata):
        for value in band_nodata:
            values[band, rng.integers(0, 40, 30), rng.integers(0, 50, 30)] = value
    expected = np.zeros((40, 50), bool)
    for band, band_nodata in enumerate(nodata):
        for value in band_nodata:
            expected |= values[band] == value
    got = invalid_mask(values, nodata)
    assert expected.any() and np.array_equal(got, expected)


class _State:
    """Just enough of Beam's runtime state/timer API to drive a stateful DoFn by hand."""

    def __init__(self, kind="value"):
        self.values, self.kind = [], kind

    def read(self):
        if self.kind == "sum":
            return sum(self.values)
        if self.kind == "bag":
            return list(self.values)
        return self.values[-1] if self.values else None

    def add(self, value):
        self.values.append(value)

    write = add

    def clear(self):
        self.values = []

    def set(self, _timestamp):
        pass


def test_a_timed_out_tile_is_written_partial_and_its_state_starts_over(tmp_path):
    path = tiles.crop(tmp_path / "c.tif", 0, 0, 64, 112)
    card = test_card()
    chipped, predictions = fake_predictions(path, card, lambda chip, k: 200 if k == 1 else 10)
    [row], [letter], tile_state = run_assembly(card, tmp_path / "out", chipped,
                                               predictions[:1], time_out=True)
    assert "1 of 2 chips scored" in letter.reason
    assert (row["complete"], row["chips_scored"], row["chips_failed"]) == (False, 1, 1)
    assert all(s.read() in (None, 0, []) for s in tile_state.values())
    # The same tile version delivered again later completes on its own counts.
    [again], letters, _ = run_assembly(card, tmp_path / "out", chipped, predictions)
    assert (again["complete"], again["chips_scored"]) == (True, 2) and letters == []


@pytest.mark.parametrize("uri", ["gs://bkt/incoming/%2e%2e/other/x.tif",
                                 "gs://bkt/incoming/%2E%2E%2Fother%2Fx.tif",
                                 "gs://bkt/incoming/a%20b.tif"])
def test_the_input_allow_list_refuses_percent_encoded_names(uri):
    """GDAL sends an object name to the server as it is given: a percent-encoded '..' or '/'
    would be decoded there and read outside the allowed prefix."""
    with pytest.raises(Refused, match="contains '%'"):
        ALLOW.check(uri)
    assert ALLOW.check("gs://bkt/incoming/a-b.tif") == "gs://bkt/incoming/a-b.tif"
