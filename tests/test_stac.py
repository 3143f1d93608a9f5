"""STAC in and out, band presets and the guiding CLI, without the emulators.

The STAC Items here are written by hand from the shapes the public catalogues publish (LP DAAC
CMR-STAC for HLS, Earth Search for Sentinel-2 L2A, USGS for Landsat Collection 2 Level-2), with
their assets moved to ``gs://`` so that the stream may read them.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import subprocess
import sys

import pytest
from apache_beam.io.gcp.pubsub import PubsubMessage

from model.card import load_card
from pipeline.ops import stac_catalog
from pipeline.options import DEFAULT_MODEL_URI
from tests.test_stages import parse_all
from transforms import announcements as ann
from transforms import presets, stac, stac_read
from transforms.guards import InputAllowList

BUCKET = "gs://tiles-in"


def _asset(href: str, key: str | None = None, common: str | None = None, **extra) -> dict:
    asset = {"href": href, **extra}
    if common:
        asset["eo:bands"] = [{"name": key or common, "common_name": common}]
    return asset


def hls_s30_item() -> dict:
    """LP DAAC's HLS S30 shape: B-keyed assets with eo:bands, plus browse and metadata."""
    gid = "HLS.S30.T17SLU.2024110T160001.v2.0"
    common = {"B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B05": None,
              "B08": "nir", "B8A": "nir08", "B11": "swir16", "B12": "swir22"}
    assets = {k: _asset(f"{BUCKET}/hls/{gid}/{gid}.{k}.tif", k, c) for k, c in common.items()}
    assets["Fmask"] = _asset(f"{BUCKET}/hls/{gid}/{gid}.Fmask.tif")
    assets["browse"] = {"href": f"https://data.example/{gid}.jpg", "type": "image/jpeg",
                        "roles": ["thumbnail"]}
    assets["metadata"] = {"href": f"https://cmr.example/{gid}.xml", "type": "application/xml"}
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": gid, "collection": "HLSS30_2.0",
        "stac_extensions": ["https://stac-extensions.github.io/eo/v1.0.0/schema.json"],
        "geometry": {"type": "Polygon", "coordinates": [[[-80, 35], [-79, 35], [-79, 36],
                                                         [-80, 36], [-80, 35]]]},
        "bbox": [-80, 35, -79, 36],
        "links": [{"rel": "self", "href": f"https://cmr.example/stac/HLSS30_2.0/items/{gid}"}],
        "properties": {"datetime": "2024-04-19T16:00:01.000Z", "eo:cloud_cover": 12},
        "assets": assets,
    }


def hls_l30_item() -> dict:
    """HLS L30 as LP DAAC publishes it, here without eo:bands: matched by asset key only."""
    item = hls_s30_item()
    gid = "HLS.L30.T17SLU.2024110T155000.v2.0"
    item.update(id=gid, collection="HLSL30_2.0")
    item["assets"] = {k: {"href": f"{BUCKET}/hls/{gid}/{gid}.{k}.tif"}
                      for k in ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B10", "B11",
                                "Fmask")}
    return item


def sentinel2_item() -> dict:
    """Earth Search's Sentinel-2 L2A: common-name keys, nir and nir08, a multi-band visual."""
    base = f"{BUCKET}/s2/17/S/LU/2024/4/S2B_17SLU_20240419_0_L2A"
    cog = {"type": "image/tiff; application=geotiff; profile=cloud-optimized",
           "roles": ["data", "reflectance"]}
    bands = {"coastal": "B01", "blue": "B02", "green": "B03", "red": "B04", "rededge1": "B05",
             "nir": "B08", "nir08": "B8A", "nir09": "B09", "swir16": "B11", "swir22": "B12"}
    assets = {k: _asset(f"{base}/{b}.tif", b, k, **cog) for k, b in bands.items()}
    assets["visual"] = {"href": f"{base}/TCI.tif", "type": cog["type"], "roles": ["visual"],
                        "eo:bands": [{"name": "B04", "common_name": "red"},
                                     {"name": "B03", "common_name": "green"},
                                     {"name": "B02", "common_name": "blue"}]}
    assets["scl"] = {"href": f"{base}/SCL.tif", "type": cog["type"], "roles": ["data"]}
    assets["thumbnail"] = {"href": f"{base}/thumbnail.jpg", "type": "image/jpeg",
                           "roles": ["thumbnail"]}
    return {
        "type": "Feature", "stac_version": "1.0.0", "id": "S2B_17SLU_20240419_0_L2A",
        "collection": "sentinel-2-l2a", "geometry": None, "links": [],
        "properties": {"datetime": "2024-04-19T16:07:21.024000Z", "platform": "sentinel-2b"},
        "assets": assets,
    }


def landsat_c2_item() -> dict:
    """USGS Landsat C2 L2 (landsat-c2l2-sr): common-name keys, vnd.stac.geotiff media type."""
    gid = "LE07_L2SP_217065_20010715_20200917_02_T1"
    media = {"type": "image/vnd.stac.geotiff; cloud-optimized=true", "roles": ["data"]}
    bands = {"blue": "SR_B1", "green": "SR_B2", "red": "SR_B3", "nir08": "SR_B4",
             "swir16": "SR_B5", "swir22": "SR_B7"}
    assets = {k: _asset(f"{BUCKET}/landsat/{gid}/{gid}_{b}.TIF", b, k, **media)
              for k, b in bands.items()}
    assets["qa_pixel"] = {"href": f"{BUCKET}/landsat/{gid}/{gid}_QA_PIXEL.TIF", **media}
    return {
        "type": "Feature", "stac_version": "1.1.0", "id": f"{gid}_SR",
        "collection": "landsat-c2l2-sr", "geometry": None, "links": [],
        "properties": {"datetime": "2001-07-15T12:31:10.123Z", "platform": "LANDSAT_7"},
        "assets": assets,
    }


def stac11_bands_item() -> dict:
    """STAC 1.1 spelling: ``bands`` with ``eo:common_name`` on each asset."""
    item = landsat_c2_item()
    for asset in item["assets"].values():
        if "eo:bands" in asset:
            asset["bands"] = [{"name": b["name"], "eo:common_name": b["common_name"]}
                              for b in asset.pop("eo:bands")]
    return item


def message(payload: dict | bytes, attributes: dict | None = None) -> PubsubMessage:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return PubsubMessage(data, attributes or {}, message_id="m1",
                         publish_time=dt.datetime(2026, 11, 26, 12, tzinfo=dt.UTC))


def parse(messages, band_preset: str | None = None):
    """The stream's parse DoFn with the options' preset; (tiles, bands, dead letters)."""
    rule = ann.GranuleRule(*presets.resolve(band_preset, presets.DEFAULT_GRANULE_PATTERN,
                                            presets.DEFAULT_BAND_ALIASES))
    return parse_all(messages, rule, InputAllowList.parse(BUCKET))[:3]


# --- STAC in -----------------------------------------------------------------------------------

def test_hls_s30_item_is_a_tile_of_its_bands_in_card_order_with_provenance():
    [tile], _, letters = parse([message(hls_s30_item())])
    assert letters == []
    gid = "HLS.S30.T17SLU.2024110T160001.v2.0"
    assert [u.rsplit(".", 2)[-2] for u in tile.band_uris] == ["B02", "B03", "B04", "B8A",
                                                              "B11", "B12"]
    assert all(u.startswith(f"{BUCKET}/hls/{gid}/") for u in tile.band_uris)
    assert (tile.tile_id, tile.source, tile.acquired) == (gid, "stac", "2024-04-19T16:00:01Z")
    assert dict(tile.attributes) == {
        "stac_item": f"https://cmr.example/stac/HLSS30_2.0/items/{gid}",
        "stac_collection": "HLSS30_2.0"}


def test_hls_l30_item_keys_are_read_the_l30_way_whatever_the_stream_aliases():
    """L30's B05 is NIR and B11 thermal; the item id says L30, so the S30 aliases do not apply."""
    [tile], _, letters = parse([message(hls_l30_item())])
    assert letters == []
    assert [u.rsplit(".", 2)[-2] for u in tile.band_uris] == ["B02", "B03", "B04", "B05",
                                                              "B06", "B07"]


def test_an_item_of_no_known_product_names_the_preset_that_would_map_its_keys():
    item = hls_l30_item()
    item["id"] = "my-l30-scene"
    _, _, [letter] = parse([message(item)])
    assert "no asset for model bands ['nir', 'swir2']" in letter.reason
    assert "--band_preset hls-l30 would map them" in letter.reason
    [tile], _, _ = parse([message(item)], band_preset="hls-l30")
    assert tile.band_uris[3].endswith(".B05.tif")


def test_sentinel2_item_takes_narrow_nir_and_skips_the_visual_and_thumbnail():
    [tile], _, letters = parse([message(sentinel2_item())])
    assert letters == []
    assert [u.rsplit("/", 1)[1] for u in tile.band_uris] == ["B02.tif", "B03.tif", "B04.tif",
                                                             "B8A.tif", "B11.tif", "B12.tif"]
    assert tile.sensor == "sentinel-2b"
    assert dict(tile.attributes)["stac_item"] == "sentinel-2-l2a/S2B_17SLU_20240419_0_L2A"


@pytest.mark.parametrize("make", [landsat_c2_item, stac11_bands_item])
def test_landsat_c2_item_matches_by_common_name(make):
    [tile], _, letters = parse([message(make())])
    assert letters == []
    assert [u.rsplit("_", 1)[1] for u in tile.band_uris] == ["B1.TIF", "B2.TIF", "B3.TIF",
                                                             "B4.TIF", "B5.TIF", "B7.TIF"]
    assert tile.acquired == "2001-07-15T12:31:10.123000Z"


def test_one_multi_band_asset_in_card_order_is_one_tile_uri():
    item = landsat_c2_item()
    names = ["blue", "green", "red", "nir08", "swir16", "swir22"]
    item["assets"] = {"data": {"href": f"{BUCKET}/olinda.tif", "type": "image/tiff",
                               "eo:bands": [{"common_name": n} for n in names]}}
    [tile], _, _ = parse([message(item)])
    assert tile.band_uris == (f"{BUCKET}/olinda.tif",)


def test_relative_asset_hrefs_resolve_against_a_gs_self_link():
    item = sentinel2_item()
    item["links"] = [{"rel": "self", "href": f"{BUCKET}/catalog/s2/item.json"}]
    for asset in item["assets"].values():
        asset["href"] = "./" + asset["href"].rsplit("/", 1)[1]
    [tile], _, letters = parse([message(item)])
    assert letters == [] and tile.band_uris[0] == f"{BUCKET}/catalog/s2/B02.tif"


def test_a_relative_href_cannot_leave_the_items_bucket():
    item = sentinel2_item()
    item["links"] = [{"rel": "self", "href": f"{BUCKET}/catalog/item.json"}]
    item["assets"]["red"]["href"] = "../../other-bucket/B04.tif"
    _, _, [letter] = parse([message(item)])
    assert "relative href ../../other-bucket/B04.tif that leaves its item's bucket" in (
        letter.reason)


def test_status_without_a_stack_says_so(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeline.ops.cli", "status", "--local",
                           f"--stack_dir={tmp_path}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no local stack recorded" in done.stderr


def _without_datetime(item):
    item["properties"]["datetime"] = None
    return item


def _http_asset(item):
    item["assets"]["red"]["href"] = "https://landsatlook.example/red.TIF"
    return item


def _local_asset(item):
    item["assets"]["red"]["href"] = "/etc/hostname"
    return item


def _only_thumbnails(item):
    item["assets"] = {"thumbnail": {"href": f"{BUCKET}/t.jpg", "type": "image/jpeg",
                                    "roles": ["thumbnail"]}}
    return item


def _year_1900(item):
    item["properties"]["datetime"] = "1900-01-01T00:00:00Z"
    return item


def _dot_id(item):
    item["id"] = ".."
    return item


@pytest.mark.parametrize(("spoil", "reason"), [
    (_without_datetime, "has no datetime (nor start_datetime)"),
    (_http_asset, "asset 'red' of STAC item LE07_L2SP_217065_20010715_20200917_02_T1_SR is at "
                  "https://landsatlook.example/red.TIF, not a gs:// object"),
    (_local_asset, "is at /etc/hostname, not a gs:// object"),
    (_only_thumbnails, "has no asset for model bands ['blue', 'green', 'red', 'nir', 'swir1', "
                       "'swir2']"),
    (_year_1900, "datetime outside 1970-2100"),
    (_dot_id, "has no usable characters for a tile id"),
])
def test_bad_items_are_dead_lettered_with_a_readable_reason(spoil, reason):
    tiles_, _, [letter] = parse([message(spoil(landsat_c2_item()))])
    assert tiles_ == [] and letter.stage == "parse"
    assert reason in letter.reason


@pytest.mark.parametrize(("raw", "safe"), [
    ("../../etc/x", ".._.._etc_x"),
    ("S2B 17SLU/2024:04", "S2B_17SLU_2024_04"),
    ("a" * 300, None),
])
def test_item_ids_become_path_safe_tile_ids(raw, safe):
    tile_id = stac_read.safe_tile_id(raw)
    assert "/" not in tile_id and len(tile_id) <= stac_read.MAX_TILE_ID
    if safe is not None:
        assert tile_id == safe
    else:
        assert tile_id != stac_read.safe_tile_id("a" * 299)  # long ids keep a hash of the whole


def test_a_geojson_feature_without_stac_version_is_not_taken_for_an_item():
    feature = {"type": "Feature", "geometry": None, "properties": {}}
    _, _, [letter] = parse([message(feature)])
    assert "schema must be" in letter.reason


# --- presets -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "acquired"), [
    ("HLS.S30.T17SLU.2024110T160000.v2.0", "2024-04-19T16:00:00Z"),
    ("HLS.L30.T17SLU.2024110T155000.v2.0", "2024-04-19T15:50:00Z"),
    ("LE07_L2SP_217065_20010715_20200917_02_T1", "2001-07-15T00:00:00Z"),
    ("LC08_L2SP_014035_20240419_20240425_02_T1", "2024-04-19T00:00:00Z"),
    ("T17SLU_20240419T160001", "2024-04-19T16:00:01Z"),
    # no known product: the stamp is read wherever the name carries one
    ("field.2000100T150000.v1.B01.tif", "2000-04-09T15:00:00Z"),
    ("scene_20000409T150000_B02.tif", "2000-04-09T15:00:00Z"),
    ("olinda", None),
    ("HLS.S30.T17SLU.2024999T160000.v2.0", None),  # day 999 is no date
])
def test_granule_names_give_the_acquisition_time(name, acquired):
    assert presets.acquired_from_name(name) == acquired


def test_landsat_band_file_under_the_default_aliases_is_reported_at_once_with_a_hint():
    from pipeline.ops import announce

    name = "in/LE07_L2SP_217065_20010715_20200917_02_T1_SR_B1.TIF"
    tiles_, bands, [letter] = parse([message(*announce.gcs_notification("tiles-in", name, 1))])
    assert (tiles_, bands) == ([], [])
    assert "band token B1" in letter.reason
    assert "--band_preset landsat7-c2 maps B1 to blue" in letter.reason
    _, [band], letters = parse([message(*announce.gcs_notification("tiles-in", name, 1))],
                               band_preset="landsat7-c2")
    assert letters == []
    assert (band.granule_id, band.band) == ("LE07_L2SP_217065_20010715_20200917_02_T1", "blue")


def test_a_band_file_of_another_product_is_not_read_as_a_whole_tile():
    from pipeline.ops import announce

    name = "s2/T17SLU_20240419T160001_B8A_20m.tif"  # the default pattern does not match it
    _, _, [letter] = parse([message(*announce.gcs_notification("tiles-in", name, 1))])
    assert "is a sentinel2-l2a band file (band token B8A)" in letter.reason
    assert "--band_preset sentinel2-l2a reads it as a band of its granule" in letter.reason
    _, [band], _ = parse([message(*announce.gcs_notification("tiles-in", name, 1))],
                         "sentinel2-l2a")
    assert (band.granule_id, band.band) == ("T17SLU_20240419T160001", "nir")


def test_unused_bands_of_the_right_product_are_filtered_without_a_word():
    from pipeline.ops import announce

    for name in ("HLS.S30.T17SLU.2024110T160000.v2.0.B05.tif",
                 "LE07_L2SP_217065_20010715_20200917_02_T1_ST_B6.TIF"):
        preset = "landsat7-c2" if name.startswith("LE07") else None
        notification = announce.gcs_notification("tiles-in", name, 1)
        assert parse([message(notification[0], notification[1])], preset) == ([], [], [])


def test_a_preset_is_overridden_by_explicit_aliases():
    pattern, aliases = presets.resolve("landsat8-c2", presets.DEFAULT_GRANULE_PATTERN,
                                       "B8=nir")
    assert pattern == presets.PRESETS["landsat8-c2"].granule_pattern
    assert aliases["B8"] == "nir" and aliases["B2"] == "blue"
    with pytest.raises(presets.PresetError, match="choose one of"):
        presets.resolve("landsat9", presets.DEFAULT_GRANULE_PATTERN, "")


# --- STAC out ----------------------------------------------------------------------------------

def tile_row(**changes) -> dict:
    """A ``tiles`` row as the stream writes it (shape of transforms.sinks.tile_row)."""
    row = {
        "tile_id": "olinda", "tile_generation": "17", "complete": True, "chips_total": 49,
        "chips_scored": 47, "chips_skipped": 2, "chips_failed": 0, "width": 349, "height": 352,
        "crs": "EPSG:31985",
        "footprint": "POLYGON((-34.91 -7.98, -34.91 -8.07, -34.82 -8.07, -34.82 -7.98, "
                     "-34.91 -7.98))",
        "classes": [{"class_id": 0, "name": "developed", "pixels": 10, "area_m2": 8122.5}],
        "raster_uri": "gs://out/predictions/landcover-student/1/olinda/17.tif",
        "acquired": "2001-07-15T12:30:00Z", "event_time": "2026-11-29T09:00:00.000000+00:00",
        "published": "2026-11-29T09:00:00.000000+00:00", "source": "stac",
        "source_uris": ["gs://in/olinda.tif"], "sensor": "landsat-7",
        "attributes": [{"key": "stac_item", "value": "gs://in/items/olinda.json"}],
        "model_name": "landcover-student", "model_version": "1",
        "completed_at": "2026-11-29T09:00:04.500000+00:00",
    }
    return row | changes


TRANSFORM = (28.5, 0.0, 288776.3, 0.0, -28.5, 9120761.3)


def output_item(row: dict | None = None, confidence: bool = False) -> dict:
    card = load_card(DEFAULT_MODEL_URI, verify_weights=False)
    row = row or tile_row()
    return stac.prediction_item(row, transform=TRANSFORM, crs_wkt="LOCAL_CS[\"x\"]",
                                classes=card.classes, confidence_band=confidence,
                                href=stac.item_uri(row["raster_uri"]))


@pytest.mark.parametrize("confidence", [False, True])
def test_prediction_item_is_valid_stac_with_projection_classification_and_raster(confidence):
    item = output_item(confidence=confidence)
    assert stac_catalog.validation_errors(item) == []
    props = item["properties"]
    assert props["datetime"] == "2001-07-15T12:30:00Z"
    assert (props["proj:code"], props["proj:shape"]) == ("EPSG:31985", [352, 349])
    assert props["proj:transform"] == list(TRANSFORM)
    assert (props["tilestream:chips_scored"], props["tilestream:chips_skipped"]) == (47, 2)
    asset = item["assets"]["prediction"]
    assert asset["href"].endswith("/olinda/17.tif")
    [classes, *confidence_band] = asset["raster:bands"]
    assert len(confidence_band) == int(confidence)
    assert [c["name"] for c in classes["classification:classes"]][:2] == ["developed",
                                                                          "agriculture"]
    assert classes["classification:classes"][0]["color_hint"] == "D7191C"
    links = {link["rel"]: link["href"] for link in item["links"]}
    assert links == {"self": "gs://out/predictions/landcover-student/1/olinda/17.json",
                     "derived_from": "gs://in/items/olinda.json"}
    assert item["bbox"] == [-34.91, -8.07, -34.82, -7.98]


def test_an_item_without_crs_code_carries_wkt2_and_without_acquired_says_it_is_unknown():
    """No acquisition time: not the publish time as datetime, but datetime null and the
    interval STAC then requires, ending at the publish time."""
    item = output_item(tile_row(crs="LOCAL_CS[\"x\"]", acquired=None, attributes=[]))
    assert stac_catalog.validation_errors(item) == []
    assert item["properties"]["proj:code"] is None
    assert item["properties"]["proj:wkt2"] == "LOCAL_CS[\"x\"]"
    props = item["properties"]
    assert props["datetime"] is None and props["tilestream:acquisition"] == "unknown"
    assert (props["start_datetime"], props["end_datetime"]) == ("1970-01-01T00:00:00Z",
                                                                "2026-11-29T09:00:00Z")
    assert [link["href"] for link in item["links"] if link["rel"] == "derived_from"] == [
        "gs://in/olinda.tif"]


def test_the_validator_finds_broken_items_and_never_downloads_a_schema():
    item = output_item()
    broken = copy.deepcopy(item)
    del broken["properties"]["datetime"]
    broken["properties"]["proj:shape"] = "352x349"
    broken["assets"]["prediction"]["raster:bands"][0]["classification:classes"][0]["value"] = "0"
    errors = " | ".join(stac_catalog.validation_errors(broken))
    assert "'datetime' is a required property" in errors
    assert "properties/proj:shape: '352x349' is not of type 'array'" in errors
    assert "classification:classes/0/value: '0' is not of type 'integer'" in errors
    unknown = dict(item, stac_extensions=["https://stac-extensions.github.io/sat/v1.0.0/schema.json"])
    assert stac_catalog.validation_errors(unknown) == [
        "schema https://stac-extensions.github.io/sat/v1.0.0/schema.json is not available "
        "offline (bundled: STAC 1.1.0 core, projection, classification, raster)"]


def test_static_catalog_has_one_collection_per_model_version_with_relative_links():
    rows = [tile_row(), tile_row(completed_at="2026-11-29T08:00:00+00:00"),  # an older repeat
            tile_row(tile_id="recife", raster_uri="gs://out/p/recife/3.tif", tile_generation="3"),
            tile_row(model_version="2", raster_uri="gs://out/p2/olinda/17.tif"),
            tile_row(tile_id="lost", raster_uri="gs://out/p/lost/1.tif"),
            tile_row(tile_id="broken", raster_uri="gs://out/p/broken/1.tif")]
    items = {stac.item_uri(r["raster_uri"]): output_item(r) for r in rows[:4] + rows[5:]}
    del items["gs://out/p/broken/1.json"]["properties"]["datetime"]

    def read_json(uri):
        if uri not in items:
            raise FileNotFoundError(f"No such object: {uri}")
        return items[uri]

    files, skipped = stac_catalog.build_catalog(rows, read_json)
    assert sorted(files) == [
        "catalog.json", "landcover-student-1/collection.json",
        "landcover-student-1/items/olinda_17.json", "landcover-student-1/items/recife_3.json",
        "landcover-student-2/collection.json", "landcover-student-2/items/olinda_17.json"]
    assert [s["tile_id"] for s in skipped] == ["broken", "lost"]
    assert "'datetime' is a required property" in skipped[0]["reason"]
    assert skipped[1]["reason"] == "No such object: gs://out/p/lost/1.json"
    collection = files["landcover-student-1/collection.json"]
    assert [link["href"] for link in collection["links"] if link["rel"] == "item"] == [
        "./items/olinda_17.json", "./items/recife_3.json"]
    assert collection["extent"]["temporal"]["interval"] == [["2001-07-15T12:30:00Z"] * 2]
    item = files["landcover-student-1/items/olinda_17.json"]
    assert {link["rel"] for link in item["links"]} == {"root", "parent", "collection",
                                                       "derived_from"}
    assert item["collection"] == "landcover-student-1"


# --- the CLI -----------------------------------------------------------------------------------

def test_run_help_lists_defaults_presets_and_the_card_without_importing_beam_or_torch():
    code = ("import sys, contextlib, io\nfrom pipeline.ops import cli\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n    cli.main(['run', '--help'])\n"
            "print(out.getvalue())\n"
            "print('HEAVY', sorted(m for m in ('apache_beam', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "HEAVY []" in out
    assert "--band_preset {hls-l30,hls-s30,landsat7-c2,landsat8-c2,sentinel2-l2a}" in out
    assert "(default: 0.05)" in out and "(default: 32)" in out
    assert "bands, in order: blue, green, red, nir, swir1, swir2" in out
    assert "classes: 0=developed, 1=agriculture" in out


def test_announce_refuses_a_file_that_is_not_a_stac_item(tmp_path):
    feature = tmp_path / "feature.json"
    feature.write_text(json.dumps({"type": "Feature", "geometry": None, "properties": {}}))
    done = subprocess.run([sys.executable, "-m", "pipeline.ops.cli", "announce",
                           "--topic=projects/p/topics/t", f"--stac={feature}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "is not a STAC Item (a Feature with stac_version)" in done.stderr
