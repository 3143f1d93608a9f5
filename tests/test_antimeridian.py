"""Footprints right everywhere on Earth: tiles across ±180° and over the North Pole.

Tiles are the real sample's pixels placed on the grids where it matters: UTM zone 60 over Fiji
and zone 1 over the Aleutians, both across the antimeridian, and UPS North (EPSG:32661) above
84° N, across ±180° and on the pole itself. Their footprints are checked with the libraries that
know the rules (``antimeridian`` and shapely for RFC 7946; spherely, S2 as BigQuery reads a
GEOGRAPHY, for the area), not only with schema validators, which accept a globe-wide bbox.
"""

from __future__ import annotations

import json
from pathlib import Path

import antimeridian
import pytest
import rasterio
import shapely
import spherely
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely.geometry import Point, box, shape

from model.card import load_card
from pipeline.ops import stac_catalog
from pipeline.options import DEFAULT_MODEL_URI
from tests import tiles
from tests.test_stac import output_item, tile_row
from transforms import geometry as g
from transforms import stac

# name: (CRS, centre lon, centre lat, a point on the other side of the world)
PLACES = {
    "fiji": ("EPSG:32760", 180.0, -17.0, (0.0, -17.0)),
    "aleutians": ("EPSG:32601", 180.0, 52.0, (0.0, 52.0)),
    "ups-across": ("EPSG:32661", 180.0, 87.0, (0.0, 87.0)),
    "north-pole": ("EPSG:32661", 0.0, 90.0, (0.0, 0.0)),
}
CROSSING = ("fiji", "aleutians", "ups-across")


def tile_area_m2(path: Path) -> float:
    with rasterio.open(path) as s:
        return s.width * s.height * s.res[0] * s.res[1]


@pytest.fixture(scope="module")
def placed(tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("antimeridian")
    return {name: tiles.placed(work / f"{name}.tif", crs, lon, lat)
            for name, (crs, lon, lat, _) in PLACES.items()}


def item_of(path: Path) -> dict:
    """The STAC Item the stream writes for a tile of this grid."""
    with rasterio.open(path) as s:
        row = tile_row(footprint=footprint_of(path), crs=s.crs.to_string(), width=s.width,
                       height=s.height)
        transform = tuple(s.transform)[:6]
    return stac.prediction_item(row, transform=transform, crs_wkt="", confidence_band=False,
                                classes=load_card(DEFAULT_MODEL_URI, verify_weights=False).classes,
                                href=stac.item_uri(row["raster_uri"]))


def footprint_of(path: Path) -> str:
    with rasterio.open(path) as s:
        return g.footprint_wkt(s.transform, s.crs, 0, 0, s.height, s.width)


def centre_lonlat(path: Path) -> tuple[float, float]:
    from rasterio.warp import transform as warp

    with rasterio.open(path) as s:
        x, y = s.transform * (s.width / 3, s.height / 3)  # off-centre: never on a cut
        (lon,), (lat,) = warp(s.crs, "EPSG:4326", [x], [y])
    return lon, lat


def small_box(lon: float, lat: float, half: float = 0.01) -> str:
    """WKT of a small region around a point, kept inside [-180, 180] x [-90, 90]."""
    return box(max(lon - half, -180), max(lat - half, -90), min(lon + half, 180),
               min(lat + half, 90)).wkt


@pytest.mark.parametrize("name", list(PLACES))
def test_stac_item_footprint_is_cut_as_rfc7946_says(placed, name):
    """The item's geometry is what the ``antimeridian`` library makes of it (nothing left to
    fix), its bbox is the library's (west > east across ±180°), every part stays on its side,
    the tile's centre is inside and the far side of the world is not."""
    item = item_of(placed[name])
    assert stac_catalog.validation_errors(item) == []
    geometry, bbox = item["geometry"], item["bbox"]
    ours = shape(geometry)
    assert ours.is_valid
    fixed = shape(antimeridian.fix_geojson(geometry, fix_winding=True))
    assert ours.symmetric_difference(fixed).area < 1e-9 * ours.area
    assert bbox == pytest.approx(antimeridian.bbox(geometry))
    parts = list(getattr(ours, "geoms", [ours]))
    assert all(-180 <= x <= 180 and -90 <= y <= 90
               for part in parts for x, y in part.exterior.coords)
    if name in CROSSING:
        assert geometry["type"] == "MultiPolygon" and len(parts) == 2
        assert bbox[0] > bbox[2] and bbox[0] > 179 and bbox[2] < -179  # §5.2
        assert all(part.bounds[2] - part.bounds[0] < 1 for part in parts)
    else:  # around the pole: one polygon closed over it along ±180°
        assert geometry["type"] == "Polygon"
        assert bbox[0] == -180 and bbox[2] == 180 and bbox[3] == 90
    lon, lat = centre_lonlat(placed[name])
    assert ours.contains(Point(lon, lat))
    assert not ours.intersects(Point(*PLACES[name][3]))
    centre = item["properties"]["proj:centroid"]  # on the tile, not the globe's middle
    _, want_lon, want_lat, _ = PLACES[name]
    assert centre["lat"] == pytest.approx(want_lat, abs=1e-6)
    if name != "north-pole":
        assert -180 <= centre["lon"] <= 180
        assert (centre["lon"] - want_lon + 180) % 360 - 180 == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("name", list(PLACES))
def test_footprint_reads_as_the_small_real_area_on_the_sphere_as_bigquery_does(placed, name):
    """S2 (spherely; BigQuery's GEOGRAPHY is S2, geodesic edges, the smaller side of a ring)
    reads the WKT the stream writes as the tile's own ~100 km², holding its centre and not the
    other side of the world; so does a planar reader (the bqemulator's DuckDB)."""
    wkt, area = footprint_of(placed[name]), tile_area_m2(placed[name])
    on_sphere = spherely.from_wkt(wkt)
    assert spherely.area(on_sphere) == pytest.approx(area, rel=0.02)
    lon, lat = centre_lonlat(placed[name])
    assert spherely.intersects(on_sphere, spherely.from_wkt(small_box(lon, lat)))
    far = small_box(*PLACES[name][3])
    assert not spherely.intersects(on_sphere, spherely.from_wkt(far))
    planar = shapely.from_wkt(wkt)
    assert planar.is_valid and not planar.intersects(shapely.from_wkt(far))
    assert planar.intersects(shapely.from_wkt(small_box(lon, lat)))


def test_chip_footprints_across_the_antimeridian_are_cut_and_cover_the_tile(placed):
    """Every chip of the Fiji tile is its own small area for a planar reader: the chips on the
    cut are MultiPolygons, none spans the world, and together they are the tile."""
    with rasterio.open(placed["fiji"]) as s:
        starts = tiles.starts(s.height, 64, 64)
        cols = tiles.starts(s.width, 64, 64)
        rows = [(r, min(64, s.height - r)) for r in starts]
        widths = [min(64, s.width - c) for c in cols]
        outlines = g.strip_footprints(s.transform, s.crs, rows, cols, widths)
    chips = [shapely.from_wkt(w) for row in outlines for w in row]
    cut = [c for c in chips if c.geom_type == "MultiPolygon"]
    assert len(cut) == len(rows)  # one column of chips lies across ±180°
    assert all(c.is_valid and c.area < 1e-3 for c in chips)  # each about 1.8 km x 1.8 km
    tile = shapely.from_wkt(footprint_of(placed["fiji"]))
    union = shapely.union_all(chips)
    assert union.symmetric_difference(tile).area < 0.01 * tile.area


def test_an_uncut_ring_across_the_antimeridian_is_cut_by_every_reader():
    """Rows written before the rule hold the ring uncut: footprint_geojson gives them the same
    geometry as the cut WKT the stream writes now."""
    uncut = "POLYGON((179.9 -17.1, -179.9 -17.1, -179.9 -16.9, 179.9 -16.9, 179.9 -17.1))"
    geometry = g.footprint_geojson(uncut)
    assert geometry["type"] == "MultiPolygon"
    assert g.footprint_bbox(geometry) == pytest.approx([179.9, -17.1, -179.9, -16.9], abs=1e-3)
    assert shape(geometry).area == pytest.approx(0.2 * 0.2)
    plain = g.footprint_geojson("POLYGON((10 0, 11 0, 11 1, 10 1, 10 0))")
    assert plain == {"type": "Polygon",
                     "coordinates": [[[10.0, 0.0], [11.0, 0.0], [11.0, 1.0], [10.0, 1.0],
                                      [10.0, 0.0]]]}
    assert g.footprint_bbox(plain) == [10.0, 0.0, 11.0, 1.0]
    with pytest.raises(ValueError, match="not a POLYGON or MULTIPOLYGON"):
        g.footprint_geojson("POINT(1 2)")


@settings(max_examples=40, deadline=None)
@given(place=st.one_of(
    st.tuples(st.sampled_from(["EPSG:32660", "EPSG:32760", "EPSG:32601", "EPSG:32701"]),
              st.floats(179.9, 180.1), st.floats(0.5, 83.5)),
    st.tuples(st.sampled_from(["EPSG:32661", "EPSG:32761"]), st.floats(-180, 180),
              st.floats(84.5, 90.0))))
def test_footprints_anywhere_near_the_antimeridian_or_a_pole_are_the_tile(place):
    """Tiles of 10 km placed anywhere across ±180° in UTM zones 60 and 1, north and south, and
    anywhere around both poles in UPS: read planar (GeoJSON, DuckDB) and on the sphere (S2, as
    BigQuery), each footprint is the tile's own area and holds the tile's centre."""
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.warp import transform as warp

    crs, lon, lat = place
    lon, lat = (lon + 180) % 360 - 180, -lat if crs.startswith("EPSG:327") else lat
    (x,), (y,) = warp("EPSG:4326", crs, [lon], [lat])
    transform = Affine(28.5, 0.0, x - 175 * 28.5, 0.0, -28.5, y + 175 * 28.5)
    wkt = g.footprint_wkt(transform, CRS.from_string(crs), 0, 0, 350, 350)
    px, py = transform * (117, 117)  # off-centre: never exactly on a cut
    (cx,), (cy,) = warp(crs, "EPSG:4326", [px], [py])
    near = small_box(cx, cy, 1e-4)
    planar = shapely.from_wkt(wkt)
    assert planar.is_valid and planar.intersects(shapely.from_wkt(near))
    for part in getattr(planar, "geoms", [planar]):  # no part reads as a band round the globe
        w, s, e, n = part.bounds
        assert e - w < 180 or (e - w == 360 and (n == 90 or s == -90))
    geometry = g.footprint_geojson(wkt)
    assert shape(geometry).intersects(shapely.from_wkt(near))
    west, bottom, east, top = g.footprint_bbox(geometry)
    assert bottom <= cy <= top
    assert (west <= cx <= east) if west <= east else (cx >= west or cx <= east)
    on_sphere = spherely.from_wkt(wkt)
    assert spherely.area(on_sphere) == pytest.approx((350 * 28.5) ** 2, rel=0.02)
    assert spherely.intersects(on_sphere, spherely.from_wkt(near))


@pytest.mark.parametrize(("boxes", "union"), [
    ([[10, 0, 20, 1], [30, -1, 40, 2]], [10, -1, 40, 2]),
    ([[179, 0, -179, 1], [170, 0, 175, 1]], [170, 0, -179, 1]),
    ([[170, 0, 175, 1], [-175, 0, -170, 1]], [170, 0, -170, 1]),  # nearer across ±180°
    ([[-170, 0, 170, 1]], [-170, 0, 170, 1]),
    ([[-180, 85, 180, 90], [179, 0, -179, 1]], [-180, 0, 180, 90]),  # a pole: all longitudes
])
def test_bbox_union_takes_the_short_way_round(boxes, union):
    assert g.bbox_union(boxes) == union


def test_catalog_extent_of_tiles_near_the_antimeridian_crosses_it(placed, tmp_path):
    """A collection of tiles on both sides of ±180° gets one bbox with west > east that holds
    every item's bbox, not a band around the globe."""
    places = {"fiji": placed["fiji"], "aleutians": placed["aleutians"],
              "viti-levu": tiles.placed(tmp_path / "w.tif", "EPSG:32760", 178.0, -17.5),
              "samoa": tiles.placed(tmp_path / "e.tif", "EPSG:32602", -172.0, -13.8)}
    rows = [tile_row(tile_id=name, footprint=footprint_of(path),
                     raster_uri=f"gs://out/p/{name}/1.tif")
            for name, path in places.items()]
    items = {row["raster_uri"][:-4] + ".json": output_item(row) for row in rows}
    files, skipped = stac_catalog.build_catalog(rows, items.__getitem__)
    assert skipped == []
    [extent] = files["landcover-student-1/collection.json"]["extent"]["spatial"]["bbox"]
    west, south, east, north = extent
    assert 177 < west < 178 and -172 < east < -171 and west > east
    for item in items.values():
        b = item["bbox"]
        assert south <= b[1] and b[3] <= north
        assert all(x >= west or x <= east for x in (b[0], b[2]))


# --- through the stream, on the local stack ----------------------------------------------------

@pytest.fixture(scope="module")
def streamed(stack, model_uri, placed, tmp_path_factory):
    """The Fiji and North Pole tiles scored by the real stream on the local stack."""
    from pipeline.ops import announce
    from tests.streams import fresh_input, query, start_stream, stop_stream, wait_until

    work = tmp_path_factory.mktemp("antimeridian-stream")
    topic, subscription, dataset = fresh_input(stack, "antimeridian")
    names = {tile: f"incoming/antimeridian/{dataset}/{tile}.tif" for tile in ("fiji", "north-pole")}
    for tile, name in names.items():
        _, generation = announce.upload(stack.storage(), str(placed[tile]), stack.bucket, name)
        announce.publish(stack.publisher(), topic,
                         *announce.gcs_notification(stack.bucket, name, generation))
    log = work / "stream.log"
    child = start_stream(stack, model_uri, log, f"--subscription={subscription}",
                         f"--bq_dataset={stack.project}:{dataset}",
                         f"--output_prefix={stack.output_prefix}/{dataset}",
                         "--min_valid_fraction=0.05", "--window_secs=1", "--max_batch_size=8")

    def whole() -> bool:
        rows = query(stack, f"SELECT tile_id, chips_scored, (SELECT COUNT(DISTINCT row_id) FROM "
                            f"`{dataset}.chips` AS c WHERE c.tile_id = t.tile_id) AS chips "
                            f"FROM `{dataset}.tiles` AS t")
        return len(rows) == 2 and all(0 < r["chips_scored"] <= r["chips"] for r in rows)

    try:
        done = wait_until(whole, 300, child)
    finally:
        stop_stream(child)
    assert done, log.read_text(errors="replace")[-3000:]
    return dataset


def region(stack, dataset: str, wkt: str) -> set[tuple[str, int]]:
    """(tile, chip) the shipped region query answers for a region."""
    from pipeline.ops.queries import run_query

    return {(r["tile_id"], r["chip_index"]) for r in run_query(
        stack.bigquery(), "chips_intersecting_region", f"{stack.project}.{dataset}",
        region_wkt=wkt, include_drifted=True)}


@pytest.mark.stack
@pytest.mark.slow
def test_the_stream_writes_cut_footprints_and_the_region_query_finds_chips_only_near(
        stack, streamed, placed, tmp_path):
    """End to end: the Fiji tile's row, chips and STAC Item are cut at ±180°; the shipped region
    query on the emulator (planar, DuckDB) finds its chips from either side of the antimeridian
    and never from the other side of the world; the pole tile's chips are found at the pole;
    ``tilestream stac`` keeps the cut in the catalog."""
    from tests.streams import query

    dataset = streamed
    rows = {r["tile_id"]: r for r in query(
        stack, f"SELECT tile_id, ST_ASTEXT(footprint) AS footprint, stac_uri, chips_scored "
               f"FROM `{dataset}.tiles`")}
    assert set(rows) == {"fiji", "north-pole"}
    fiji = shapely.from_wkt(rows["fiji"]["footprint"])
    assert fiji.geom_type == "MultiPolygon" and fiji.bounds[2] - fiji.bounds[0] == 360
    bucket, _, name = rows["fiji"]["stac_uri"][len("gs://"):].partition("/")
    item = json.loads(stack.storage().bucket(bucket).blob(name).download_as_text())
    assert stac_catalog.validation_errors(item) == []
    assert item["geometry"]["type"] == "MultiPolygon"
    assert item["bbox"][0] > item["bbox"][2]
    assert item["bbox"] == pytest.approx(antimeridian.bbox(item["geometry"]))

    east = region(stack, dataset, small_box(179.99, -17.0, 0.02))
    west = region(stack, dataset, small_box(-179.99, -17.0, 0.02))
    assert east and west and {t for t, _ in east | west} == {"fiji"}
    assert east & west  # the chips on the cut are found from both sides
    assert len(east | west) < rows["fiji"]["chips_scored"]  # near the cut only
    far = region(stack, dataset, box(-10, -17.1, 10, -16.9).wkt)  # same latitudes, lon 0
    assert far == set()
    # `tilestream stac` over these rows: the Fiji item keeps its cut; the collection, holding
    # the pole, spans every longitude.
    from tests.streams import cli

    done = cli(stack, "stac", f"--bq_dataset={stack.project}.{dataset}",
               f"--out={tmp_path / 'catalog'}")
    assert done.returncode == 0, done.stderr[-2000:]
    [collection] = (tmp_path / "catalog").glob("*/collection.json")
    [extent] = json.loads(collection.read_text())["extent"]["spatial"]["bbox"]
    assert extent[0] == -180 and extent[2] == 180 and extent[3] == 90
    assert extent[1] == pytest.approx(item["bbox"][1])
    [fiji_item] = [json.loads(p.read_text()) for p in (tmp_path / "catalog").glob("*/items/*")
                   if json.loads(p.read_text())["properties"]["tilestream:tile_id"] == "fiji"]
    assert fiji_item["geometry"] == item["geometry"] and fiji_item["bbox"] == item["bbox"]
    pole = region(stack, dataset, small_box(45.0, 89.995, 0.004))
    assert pole and {t for t, _ in pole} == {"north-pole"}
    assert region(stack, dataset, box(-10, 85, 10, 89.9).wkt) == set()
