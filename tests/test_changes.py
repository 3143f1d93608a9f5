"""Change between acquisitions: location keys, rules, ordering (pure), and the real stream on the
local stack comparing a location's acquisitions, also across a kill and restart.

The test tiles are crops of the Olinda sample on one grid: "dry" is the forested north-west
corner; "wet" is the same grid with its east half replaced by the sample's ocean pixels, where
the shipped student answers water (about half the tile: ~650 ha of 128 x 128 28.5 m pixels).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from transforms.change_rules import (
    Acquisition,
    ChangeRule,
    change_id,
    comparisons,
    evaluate,
    load_rules,
    pairs,
    remember,
)
from transforms.location import location_key

# --- location keys ------------------------------------------------------------------------------

SQUARE = "POLYGON((-35 -8, -34.9 -8, -34.9 -7.9, -35 -7.9, -35 -8))"


@pytest.mark.parametrize(("tile_id", "properties", "key"), [
    ("HLS.S30.T23LLF.2026010T130000.v2.0", None, "MGRS:23LLF"),
    ("HLS.L30.T25MBM.2026010T130000.v2.0", None, "MGRS:25MBM"),
    ("S2A_MSIL2A_20260110T130000_N0511_R081_T23LLF_20260110T160000", None, "MGRS:23LLF"),
    ("S2B_23LLF_20260110_0_L2A", None, "MGRS:23LLF"),
    ("LC08_L2SP_217065_20260110_20260115_02_T1", None, "WRS2:217/065"),
    ("scene-a", {"s2:mgrs_tile": "T23LLF"}, "MGRS:23LLF"),
    ("scene-b", {"landsat:wrs_path": "7", "landsat:wrs_row": "65"}, "WRS2:007/065"),
    ("olinda", None, "CELL:-8.0,-35.0"),
])
def test_location_key_is_the_grid_cell_of_the_product(tile_id, properties, key):
    assert location_key(tile_id, SQUARE, properties) == key


@pytest.mark.parametrize("properties", [
    {"landsat:wrs_path": "abc", "landsat:wrs_row": "065"},
    {"landsat:wrs_path": "-217", "landsat:wrs_row": "065"},
    {"landsat:wrs_path": "9" * 5000, "landsat:wrs_row": "065"},
    {"mgrs:utm_zone": "-5", "mgrs:latitude_band": "L", "mgrs:grid_square": "LF"},
    {"mgrs:utm_zone": "23", "mgrs:latitude_band": "L" * 5000, "mgrs:grid_square": "LF"},
    {"mgrs:utm_zone": "23", "mgrs:latitude_band": "L", "mgrs:grid_square": "L/../F"},
    {"s2:mgrs_tile": "T23LL" + "F" * 5000},
    {"s2:mgrs_tile": "\udcff23LLF"},
])
def test_a_hostile_grid_attribute_falls_back_to_the_footprint_cell(properties):
    """Announcement attributes reach the key: one that is not a grid name is ignored, never an
    exception (which would cost the tile its row) nor a key too long for a Pub/Sub attribute."""
    assert location_key("tile", SQUARE, properties) == location_key("tile", SQUARE)


def test_location_key_of_two_crops_of_one_place_is_the_same_and_a_cell_away_differs():
    nudged = "POLYGON((-34.99 -7.99, -34.91 -7.99, -34.91 -7.91, -34.99 -7.91, -34.99 -7.99))"
    far = "POLYGON((-34.8 -8, -34.7 -8, -34.7 -7.9, -34.8 -7.9, -34.8 -8))"
    assert location_key("a", SQUARE) == location_key("b", nudged)
    assert location_key("a", SQUARE) != location_key("a", far)
    assert location_key("a", None) == "CELL:unknown"


def test_a_footprint_cut_at_the_antimeridian_keys_to_its_own_cell_not_greenwich():
    cut = ("MULTIPOLYGON(((179.95 -17.1, 180 -17.1, 180 -17.05, 179.95 -17.05, 179.95 -17.1)),"
           "((-180 -17.1, -179.97 -17.1, -179.97 -17.05, -180 -17.05, -180 -17.1)))")
    assert location_key("fiji", cut) == "CELL:-17.1,179.9"


# --- rules and ordering, without Beam -----------------------------------------------------------

HA = 10_000.0


def acq(tile: str, day: int, water_ha: float, land_ha: float = 1000.0, model: str = "m/1",
        role: str = "live", generation: str = "1") -> Acquisition:
    return Acquisition(tile_id=tile, generation=generation, acquired=day * 86_400.0,
                       model=model, role=role, raster_uri=f"gs://b/{tile}.tif",
                       stac_uri=f"gs://b/{tile}.json", footprint=SQUARE,
                       areas=(("forest", land_ha * HA), ("water", water_ha * HA)))


WATER_GAIN = ChangeRule("water-gain", "water", "gain", 5.0, 10.0)
WATER_LOSS = ChangeRule("water-loss", "water", "loss", 5.0, 10.0)


def test_the_shipped_rules_are_water_gain_and_loss_and_forest_loss():
    rules = {r.name: r for r in load_rules(None)}
    assert rules["water-gain"] == WATER_GAIN and rules["water-loss"] == WATER_LOSS
    assert rules["forest-loss"].class_name == "forest"


@pytest.mark.parametrize(("spec", "why"), [
    ('{"rules": [{"name": "x", "class": "water", "direction": "up"}]}', "direction"),
    ('{"rules": [{"name": "x", "class": "water", "direction": "gain", "min_points": -1}]}',
     "min_points"),
    ('{"rules": [{"name": "x", "class": "water", "direction": "gain", "typo": 1}]}', "unknown"),
    ('{"rules": {}}', "rules"),
    ("{not json", "not JSON"),
])
def test_bad_rules_are_refused_with_the_reason(spec, why):
    with pytest.raises(ValueError, match=why):
        load_rules(spec)


def test_rules_load_from_a_file(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text('{"rules": [{"name": "burn", "class": "forest", "direction": "loss", '
                    '"min_points": 2, "min_hectares": 1}]}')
    assert load_rules(str(path)) == (ChangeRule("burn", "forest", "loss", 2.0, 1.0),)


def test_a_rule_fires_only_when_both_thresholds_are_met_in_its_direction():
    dry = acq("a", 1, water_ha=0)
    assert [f.rule.name for f in evaluate(dry, acq("b", 2, 100), [WATER_GAIN, WATER_LOSS])] == \
        ["water-gain"]
    assert evaluate(dry, acq("b", 2, 8), [WATER_GAIN]) == []  # 8 ha < 10 ha
    big = acq("big", 1, 0, land_ha=100_000)
    assert evaluate(big, acq("b", 2, 100, land_ha=100_000), [WATER_GAIN]) == []  # 0.1 point
    assert [f.rule.name for f in evaluate(acq("b", 2, 100), dry, [WATER_GAIN, WATER_LOSS])] == \
        ["water-loss"]
    assert evaluate(dry, acq("c", 2, 0), [WATER_GAIN, WATER_LOSS]) == []  # identical


def test_a_late_older_scene_is_compared_with_the_one_before_it_and_the_one_after_it():
    first, newest = acq("d10", 10, 0), acq("d30", 30, 100)
    history = remember(remember((), first, 8), newest, 8)
    late = acq("d20", 20, 100)
    assert [(b.tile_id, a.tile_id) for b, a in pairs(history, late)] == \
        [("d10", "d20"), ("d20", "d30")]
    assert [(b.tile_id, a.tile_id) for b, a in pairs(history, acq("d40", 40, 0))] == \
        [("d30", "d40")]


def test_only_the_same_model_version_is_compared():
    history = remember((), acq("d10", 10, 0, model="m/1"), 8)
    assert pairs(history, acq("d20", 20, 100, model="m/2")) == []  # a promotion: no previous


def test_history_keeps_the_last_n_per_version_and_a_new_generation_replaces_the_old():
    history: tuple[Acquisition, ...] = ()
    for day in range(1, 6):
        history = remember(history, acq(f"d{day}", day, 0), 3)
    history = remember(history, acq("other", 1, 0, model="m/2"), 3)
    assert [a.tile_id for a in history if a.model == "m/1"] == ["d3", "d4", "d5"]
    assert [a.tile_id for a in history if a.model == "m/2"] == ["other"]
    history = remember(history, acq("d5", 5, 50, generation="2"), 3)
    assert [(a.tile_id, a.generation) for a in history if a.model == "m/1"] == \
        [("d3", "1"), ("d4", "1"), ("d5", "2")]


def test_a_shadow_successor_is_not_an_answer_to_fire_about():
    history = remember((), acq("d30", 30, 100, role="shadow"), 8)
    assert pairs(history, acq("d20", 20, 0)) == []


def test_a_shadow_arrival_or_a_replay_compares_nothing_and_canary_compares():
    history = remember((), acq("d10", 10, 0), 8)
    assert comparisons(history, acq("d20", 20, 100, role="shadow")) == []
    assert comparisons(history, acq("d10", 10, 0)) == []  # the same tile version again
    assert [(b.tile_id, a.tile_id) for b, a in comparisons(history, acq("d20", 20, 100,
                                                                          role="canary"))] == \
        [("d10", "d20")]
    shadowed = remember(history, acq("d15", 15, 100, role="shadow"), 8)  # a baseline
    assert [(b.tile_id, a.tile_id) for b, a in comparisons(shadowed, acq("d20", 20, 100))] == \
        [("d15", "d20")]


def test_change_ids_are_stable_and_distinct_per_pair_and_rule():
    a, b = acq("a", 1, 0), acq("b", 2, 100)
    assert change_id("L", a, b, "water-gain") == change_id("L", a, b, "water-gain")
    assert len({change_id("L", a, b, "water-gain"), change_id("L", b, a, "water-gain"),
                change_id("L", a, b, "water-loss")}) == 3


def test_the_change_logic_imports_without_beam():
    """The rules, the ordering and the rows stay testable, and usable by tools, without a
    pipeline runtime."""
    code = "import sys, transforms.change_rules; sys.exit('apache_beam' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- the change raster, from two prediction rasters on disk ----------------------------------

NAMES = ("developed", "agriculture", "herbaceous", "shrubland", "forest", "water", "sediment")
COLOURS = tuple((i * 30, 100, 200 - i * 20) for i in range(len(NAMES)))


def prediction(path: Path, classes: np.ndarray, x0: float = 288776.25) -> str:
    from rasterio.transform import from_origin

    with rasterio.open(path, "w", driver="GTiff", width=classes.shape[1],
                       height=classes.shape[0], count=1, dtype="uint8", nodata=255,
                       crs="EPSG:31985", transform=from_origin(x0, 9120760.75, 28.5, 28.5)) as d:
        d.write(classes, 1)
    return str(path)


def on_disk(tile: str, path: str, day: int) -> Acquisition:
    return Acquisition(tile_id=tile, generation="1", acquired=day * 86_400.0, model="m/1",
                       role="live", raster_uri=path, stac_uri=None,
                       footprint="POLYGON((-34.97 -8.03, -34.94 -8.03, -34.94 -8.0, "
                                 "-34.97 -8.0, -34.97 -8.03))", areas=())


def test_the_change_raster_codes_from_and_to_per_pixel_and_its_item_validates(tmp_path):
    from pipeline.ops import stac_catalog
    from transforms.change_raster import write_change_raster

    forest = np.full((40, 50), 4, np.uint8)
    flooded = forest.copy()
    flooded[:, 25:] = 5
    flooded[0, 0] = 255  # no prediction after: no change either
    before = on_disk("a", prediction(tmp_path / "a.tif", forest), 10)
    after = on_disk("b", prediction(tmp_path / "b.tif", flooded), 20)
    uri, item_uri = write_change_raster(before, after, NAMES, COLOURS, str(tmp_path))
    assert uri == str(tmp_path / "b.change-from-a-1.tif")
    with rasterio.open(uri) as change:
        assert change.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        codes = change.read(1)
    assert codes[0, 0] == 255
    assert (codes[1:, :25] == 4 * 7 + 4).all() and (codes[:, 25:] == 4 * 7 + 5).all()
    import json

    item = json.loads(Path(item_uri).read_text())
    stac_catalog.validate(item)
    pairs_found = {c["name"]: c for c in
                   item["assets"]["change"]["raster:bands"][0]["classification:classes"]}
    assert set(pairs_found) == {"forest-to-forest", "forest-to-water"}
    assert item["properties"]["start_datetime"] < item["properties"]["end_datetime"]

    elsewhere = on_disk("c", prediction(tmp_path / "c.tif", flooded, x0=290000.0), 20)
    assert write_change_raster(before, elsewhere, NAMES, COLOURS, str(tmp_path)) is None


# --- the stream on the local stack --------------------------------------------------------------

SIZE = 128


def grid_tiles(work: Path) -> dict[str, Path]:
    """``dry`` and ``wet`` on one grid (see the module docstring); ``dry2`` is ``dry`` again."""
    from pipeline.ops.check import SAMPLE_TILE

    with rasterio.open(SAMPLE_TILE) as s:
        raw = s.read()
        profile = s.profile | {"width": SIZE, "height": SIZE,
                               "transform": s.window_transform(
                                   rasterio.windows.Window(0, 0, SIZE, SIZE))}
    dry = raw[:, :SIZE, :SIZE]
    wet = dry.copy()
    wet[:, :, SIZE // 2:] = raw[:, 352 - SIZE:, 349 - SIZE // 2:]
    out = {}
    for name, data in (("dry", dry), ("wet", wet)):
        out[name] = work / f"{name}.tif"
        with rasterio.open(out[name], "w", **profile) as d:
            d.write(np.ascontiguousarray(data))
    return out


class Scenario:
    def __init__(self, stack, topic: str, files: dict[str, Path], prefix: str):
        from pipeline.ops import announce

        self.stack, self.topic, self.announce = stack, topic, announce
        self.store, self.publisher = stack.storage(), stack.publisher()
        self.uris = {name: announce.upload(self.store, str(path), stack.bucket,
                                           f"incoming/{prefix}/{name}.tif")[0]
                     for name, path in files.items()}

    def publish(self, tile_id: str, which: str, day: int) -> None:
        data, attributes = self.announce.json_announcement(
            tile_id, f"2026-01-{day:02d}T13:00:00Z", uri=self.uris[which])
        self.announce.publish(self.publisher, self.topic, data, attributes)


def granule(square: str, day: int) -> str:
    return f"HLS.S30.T{square}.2026{day:03d}T130000.v2.0"


@pytest.mark.stack
@pytest.mark.slow
def test_changes_between_acquisitions_on_the_stream_and_after_a_kill_and_restart(
        stack, model_uri, tmp_path):
    from pipeline.ops import stac_catalog
    from tests.streams import fresh_input, query, start_stream, stop_stream, wait_until

    topic, subscription, dataset = fresh_input(stack, "changes")
    files = grid_tiles(tmp_path)
    s = Scenario(stack, topic, files, dataset)
    args = (f"--subscription={subscription}", f"--bq_dataset={stack.project}:{dataset}",
            f"--output_prefix={stack.output_prefix}/{dataset}", "--window_secs=1",
            "--tile_timeout_secs=120")
    log = tmp_path / "stream.log"

    def answered(*tile_ids: str) -> bool:
        rows = query(stack, f"SELECT DISTINCT tile_id FROM `{dataset}.tiles` WHERE complete")
        return set(tile_ids) <= {r["tile_id"] for r in rows}

    def changes() -> list[dict]:
        return query(stack, f"SELECT * FROM `{dataset}.changes`")

    # A: gains water, its second acquisition after a restart; B: the same pixels twice;
    # C: dry day 10, wet day 30, then wet day 20 arriving last (compared with day 10).
    a1, a2 = granule("25MBM", 10), granule("25MBM", 20)
    b1, b2 = granule("25MBN", 10), granule("25MBN", 20)
    c10, c30, c20 = granule("25MBP", 10), granule("25MBP", 30), granule("25MBP", 20)
    child = start_stream(stack, model_uri, log, *args)
    try:
        for tile_id, which, day in ((a1, "dry", 10), (b1, "dry", 10), (c10, "dry", 10)):
            s.publish(tile_id, which, day)
        assert wait_until(lambda: answered(a1, b1, c10), 400, child), log.read_text()[-3000:]
        s.publish(c30, "wet", 30)
        s.publish(b2, "dry", 20)
        assert wait_until(lambda: answered(c30, b2), 300, child), log.read_text()[-3000:]
        s.publish(c20, "wet", 20)
        assert wait_until(lambda: answered(c20) and len(changes()) >= 2, 300, child), \
            log.read_text()[-3000:]
        time.sleep(3)  # chip rows land by load job, after the tile row
    finally:
        child.kill()  # SIGKILL: the keyed state is gone with the process
        child.wait(timeout=60)
    # Water came in where forest was: both the water-gain and the forest-loss rule fire, for
    # day 10 -> 30 and for the late day 20 against day 10 (not against day 30, the newest).
    first = changes()
    assert sorted((r["before_tile_id"], r["after_tile_id"], r["rule"]) for r in first) == \
        sorted((before, after, rule) for before, after in ((c10, c30), (c10, c20))
               for rule in ("water-gain", "forest-loss")), first

    child = start_stream(stack, model_uri, log, *args)
    try:
        s.publish(a2, "wet", 20)
        assert wait_until(lambda: any(r["after_tile_id"] == a2 for r in changes()), 400,
                          child), log.read_text()[-3000:]
        time.sleep(3)
    finally:
        assert stop_stream(child) == 0, log.read_text()[-3000:]

    rows = changes()
    assert not [r for r in rows if "25MBN" in r["after_tile_id"]]  # identical: no change
    assert {r["rule"] for r in rows if r["after_tile_id"] == a2} == {"water-gain", "forest-loss"}
    [a] = [r for r in rows if r["after_tile_id"] == a2 and r["rule"] == "water-gain"]
    assert (a["before_tile_id"], a["rule"], a["location_key"]) == (a1, "water-gain", "MGRS:25MBM")
    assert a["delta_points"] >= 5 and a["delta_hectares"] >= 10
    water = {c["name"]: c for c in a["classes"]}["water"]
    assert water["before_area_m2"] < water["after_area_m2"]
    tiles = {r["tile_id"]: r for r in query(
        stack, f"SELECT tile_id, raster_uri, stac_uri, location_key, acquired "
               f"FROM `{dataset}.tiles`")}
    assert tiles[a2]["location_key"] == "MGRS:25MBM"
    assert (a["before_raster_uri"], a["after_raster_uri"]) == (tiles[a1]["raster_uri"],
                                                               tiles[a2]["raster_uri"])
    assert a["after_stac_uri"] == tiles[a2]["stac_uri"]
    assert a["before_acquired"] == tiles[a1]["acquired"]

    # The change COG: a valid COG on the tiles' grid, from dry to water where the ocean went in.
    bucket = stack.storage().bucket(stack.bucket)
    local = tmp_path / "change.tif"
    bucket.blob(a["change_raster_uri"].split("/", 3)[3]).download_to_filename(str(local))
    prediction = tmp_path / "after.tif"
    bucket.blob(a["after_raster_uri"].split("/", 3)[3]).download_to_filename(str(prediction))
    with rasterio.open(local) as change, rasterio.open(prediction) as after:
        assert change.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert (change.crs, change.transform, change.shape) == (after.crs, after.transform,
                                                                after.shape)
        codes, classes = change.read(1), after.read(1)
    k = 7
    assert ((codes % k) == classes).all()  # "to" is the after prediction, pixel for pixel
    assert np.count_nonzero((codes % k == 5) & (codes // k != 5)) > SIZE * SIZE // 4
    import json

    item = json.loads(bucket.blob(a["change_stac_uri"].split("/", 3)[3]).download_as_bytes())
    stac_catalog.validate(item)
    assert item["assets"]["change"]["href"] == a["change_raster_uri"]


@pytest.mark.stack
@pytest.mark.slow
def test_changed_events_follow_the_changes_rows_on_the_results_topic(stack, model_uri, tmp_path):
    """A location gaining water publishes one ``changed`` event per ``changes`` row, each equal
    to its row and never before that row is queryable; its second answer says changed="true",
    its first and both answers of an unchanged location changed="false"."""
    import datetime as dt

    import jsonschema

    from tests.streams import fresh_input, query, start_stream, stop_stream, wait_until
    from tests.test_results import SCHEMA, Inbox, results_subscription

    topic, subscription, dataset = fresh_input(stack, "changed")
    results_topic, results_sub = results_subscription(stack, "changed")
    inbox = Inbox(stack, results_sub)
    s = Scenario(stack, topic, grid_tiles(tmp_path), dataset)
    log = tmp_path / "stream.log"
    wet1, wet2 = granule("25MCM", 10), granule("25MCM", 20)
    same1, same2 = granule("25MCN", 10), granule("25MCN", 20)
    queryable_at_arrival: dict[str, bool] = {}

    def pull() -> list[dict]:
        seen = len(inbox.messages)
        for message in inbox.pull()[seen:]:
            if message["data"]["outcome"] == "changed":  # at once: was its row there already?
                ident = message["data"]["change_id"]
                queryable_at_arrival[ident] = bool(query(
                    stack, f"SELECT change_id FROM `{dataset}.changes` "
                           f"WHERE change_id = '{ident}'"))
        return inbox.messages

    def answered(*tile_ids: str) -> bool:
        pull()
        return set(tile_ids) <= {m["data"]["tile_id"] for m in inbox.of("answered")}

    def changes() -> list[dict]:
        return query(stack, f"SELECT * EXCEPT (footprint) FROM `{dataset}.changes`")

    child = start_stream(stack, model_uri, log, f"--subscription={subscription}",
                         f"--bq_dataset={stack.project}:{dataset}",
                         f"--output_prefix={stack.output_prefix}/{dataset}", "--window_secs=1",
                         "--tile_timeout_secs=120", f"--results_topic={results_topic}")
    try:
        s.publish(wet1, "dry", 10)
        s.publish(same1, "dry", 10)
        assert wait_until(lambda: answered(wet1, same1), 400, child), log.read_text()[-3000:]
        s.publish(wet2, "wet", 20)
        s.publish(same2, "dry", 20)
        assert wait_until(lambda: answered(wet2, same2) and changes() and len(
            inbox.of("changed")) >= len(changes()), 400, child), log.read_text()[-3000:]
        time.sleep(6)  # anything more it would publish (it must not) has time to arrive
        pull()
    finally:
        assert stop_stream(child) == 0, log.read_text()[-3000:]

    rows = {r["change_id"]: r for r in changes()}
    assert {(r["after_tile_id"], r["rule"]) for r in rows.values()} == {
        (wet2, "water-gain"), (wet2, "forest-loss")}
    events = inbox.of("changed")
    assert sorted(m["data"]["change_id"] for m in events) == sorted(rows)  # one per row
    assert all(queryable_at_arrival[ident] for ident in rows), queryable_at_arrival

    def same(value, expected) -> bool:
        if isinstance(expected, dt.datetime):
            return dt.datetime.fromisoformat(value) == expected.astimezone(dt.UTC)
        if isinstance(expected, float):
            return value == pytest.approx(expected)
        if isinstance(expected, list):
            return len(value) == len(expected) and all(
                same(v, e) for v, e in zip(sorted(value, key=lambda c: c["name"]),
                                           sorted(expected, key=lambda c: c["name"]),
                                           strict=True))
        if isinstance(expected, dict):
            return set(value) == set(expected) and all(same(value[k], expected[k])
                                                      for k in expected)
        return value == expected

    for message in events:
        event, attributes = message["data"], message["attributes"]
        jsonschema.validate(event, SCHEMA)
        row = rows[event["change_id"]]
        body = {k: v for k, v in event.items() if k not in ("schema", "event_id", "outcome",
                                                             "footprint")}
        assert same(body, row), (body, row)
        assert event["footprint"].startswith("POLYGON")
        assert attributes["outcome"] == "changed" and attributes["location"] == "MGRS:25MCM"
        assert attributes["tile_id"] == wet2 and attributes["changed"] == "true"
        assert attributes["event_id"] == event["event_id"]

    answers = {m["data"]["tile_id"]: m for m in inbox.of("answered")}
    assert answers[wet2]["attributes"]["changed"] == "true"
    assert answers[wet2]["attributes"]["location"] == "MGRS:25MCM"
    assert answers[wet2]["data"]["changed"] is True
    for tile_id in (wet1, same1, same2):
        assert answers[tile_id]["attributes"]["changed"] == "false", tile_id
        assert answers[tile_id]["data"]["changed"] is False
    assert answers[same2]["attributes"]["location"] == "MGRS:25MCN"
    for message in inbox.messages:
        jsonschema.validate(message["data"], SCHEMA)


@pytest.mark.parametrize("flag", [
    "--change_rules=/nonexistent/rules.json",
    "--change_rules=NONUTF8",
    '--change_rules={"rules": [{"name": "x", "class": "lava", "direction": "gain", '
    '"min_points": 5, "min_hectares": 1}]}',
    '--change_rules={"rules": 3}',
    "--change_rules=HUGE",
    "--change_history=0",
    "--results_wait_secs=-1",
])
def test_bad_change_and_results_flags_are_refused_before_the_job_starts(flag, tmp_path):
    """Operator input reaches the graph only checked: each bad value is a ConfigError naming
    the flag's problem, never a traceback while the graph is built."""
    from pipeline import main

    (tmp_path / "bad.json").write_bytes(b"\xff\xfe{")
    (tmp_path / "huge.json").write_text('{"rules": []}' + " " * 70_000)
    flag = flag.replace("NONUTF8", str(tmp_path / "bad.json")).replace(
        "HUGE", str(tmp_path / "huge.json"))
    base = [f"--input_glob={tmp_path}/*.tif", "--bq_dataset=p:d",
            f"--output_prefix={tmp_path}/out", "--chip_rows_load_secs=0"]
    main.configure(base)  # the same job without the bad flag is accepted
    with pytest.raises(main.ConfigError, match=r"change|results"):
        main.configure([*base, flag])
