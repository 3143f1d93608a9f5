"""What the map draws, read from BigQuery by polling (the stream has no results topic to
subscribe to yet): each recent tile once, with its outcome.

Outcomes, one meaning each, in this order of precedence:
``changed`` (a row of the ``changes`` table names the tile; none while that table does not exist),
``drifted`` (the answer's own ``drifted`` flag), ``answered`` (the tile's one answer,
``tile_answers`` of transforms/sql/answered.sql), ``refused`` (a dead letter names the tile and
it has no answer; drawn where a tile row gives its footprint, otherwise listed without one).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from google.api_core.exceptions import NotFound

from pipeline.ops.queries import missing_table, run_sql

OUTCOMES = ("answered", "refused", "drifted", "changed")
# Map footprints are simplified to ~30 m (a Landsat pixel; planar, in degrees) and carry at most
# this many vertices a ring and 5 decimals (~1 m): a tile footprint is a densified, reprojected
# rectangle, and 1,000 of them stay a small, fast GeoJSON document.
SIMPLIFY_DEG = 0.0003
MAX_VERTICES = 32
DECIMALS = 5

ANSWERS_SQL = """
WITH {answered since @since}
SELECT a.tile_id, a.tile_generation, a.model_name, a.model_version, a.release, a.acquired,
       a.completed_at, a.drifted, a.drift_max_band_psi, a.drift_class_psi,
       a.latency_s, a.raster_uri, a.stac_uri, a.chips_scored,
       ST_ASTEXT(a.footprint) AS footprint
FROM tile_answers AS a
"""
# Class areas apart, unnested: the BigQuery emulator cannot select a repeated record out of the
# answer's window functions (BigQuery can; one shape of query serves both).
CLASSES_SQL = """
WITH {answered since @since}
SELECT a.tile_id, c.class_id, c.name, c.area_m2
FROM tile_answers AS a
CROSS JOIN UNNEST(a.classes) AS c
"""
REFUSED_SQL = """
SELECT d.tile_id, d.stage, d.reason, d.time, ST_ASTEXT(t.footprint) AS footprint
FROM `{dataset}.dead_letters` AS d
LEFT JOIN (SELECT tile_id, ANY_VALUE(footprint) AS footprint FROM `{dataset}.tiles`
           WHERE event_time >= @since GROUP BY tile_id) AS t ON t.tile_id = d.tile_id
WHERE d.time >= @since AND d.tile_id IS NOT NULL
QUALIFY ROW_NUMBER() OVER (PARTITION BY d.tile_id ORDER BY d.time DESC) = 1
"""
# The tile that shows a change is the newer acquisition, `after_tile_id` (transforms/bq_schemas.py).
CHANGES_SQL = "SELECT DISTINCT after_tile_id FROM `{dataset}.changes`"


@dataclass
class MapTile:
    """One tile as the page draws it: its outcome, footprint (GeoJSON or None) and popup row."""

    tile_id: str
    outcome: str
    footprint: dict | None
    row: dict[str, Any] = field(default_factory=dict)

    def feature(self) -> dict:
        return {"type": "Feature", "id": self.tile_id, "geometry": self.footprint,
                "properties": {"tile_id": self.tile_id, "outcome": self.outcome, **self.row}}


def simplify(geometry: dict | None) -> dict | None:
    """A footprint with rounded coordinates and at most :data:`MAX_VERTICES` per ring (evenly
    kept, first and last kept): what a browser draws 1,000 of without stalling."""
    if not geometry or "coordinates" not in geometry:
        return None

    def ring(points: list) -> list:
        step = max(1, -(-len(points) // MAX_VERTICES))
        kept = points[::step]
        if kept[-1] != points[-1]:
            kept.append(points[-1])
        return [[round(x, DECIMALS), round(y, DECIMALS)] for x, y, *_ in kept]

    if geometry["type"] == "Polygon":
        return {"type": "Polygon", "coordinates": [ring(r) for r in geometry["coordinates"]]}
    if geometry["type"] == "MultiPolygon":
        return {"type": "MultiPolygon",
                "coordinates": [[ring(r) for r in poly] for poly in geometry["coordinates"]]}
    return None


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, float):
        return round(value, 4)
    return value


def _geojson(wkt: str | None) -> dict | None:
    """WKT (BigQuery's ``ST_ASTEXT``; the emulator's ``ST_ASGEOJSON`` took 18 s for 1,000
    densified footprints, ``ST_ASTEXT`` 1 s) -> simplified GeoJSON."""
    if not wkt:
        return None
    import shapely
    from shapely.geometry import mapping, shape

    from transforms.geometry import footprint_geojson

    cut = shape(footprint_geojson(wkt))  # the one rule for ±180° and the poles (RFC 7946)
    return simplify(json.loads(json.dumps(mapping(
        shapely.simplify(cut, SIMPLIFY_DEG, preserve_topology=True)))))


def changed_tiles(client, dataset: str) -> set[str]:
    """Tile ids the ``changes`` table names as the newer acquisition of a change; none while no
    stream has created that table."""
    try:
        rows = run_sql(client, CHANGES_SQL, dataset)
    except NotFound as exc:
        if missing_table(exc) is None:
            raise
        return set()
    return {row["after_tile_id"] for row in rows}


def recent_tiles(client, dataset: str, hours: float) -> list[MapTile]:
    """Every tile of the last ``hours`` with its one outcome (module docstring), newest first."""
    since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours)
    try:
        answers = run_sql(client, ANSWERS_SQL, dataset, since=since)
        areas = run_sql(client, CLASSES_SQL, dataset, since=since)
        refused = run_sql(client, REFUSED_SQL, dataset, since=since)
    except NotFound as exc:
        if missing_table(exc) is None:
            raise
        return []  # no stream has written yet
    changed = changed_tiles(client, dataset)
    classes: dict[str, list[dict]] = {}
    for area in sorted(areas, key=lambda a: a["class_id"]):
        classes.setdefault(area["tile_id"], []).append(
            {"name": area["name"], "class_id": area["class_id"],
             "area_km2": round(area["area_m2"] / 1e6, 3)})
    tiles: dict[str, MapTile] = {}
    for row in sorted(answers, key=lambda r: r["completed_at"], reverse=True):
        outcome = ("changed" if row["tile_id"] in changed
                   else "drifted" if row["drifted"] else "answered")
        popup = {k: _json_value(v) for k, v in row.items() if k != "footprint"}
        popup["classes"] = classes.get(row["tile_id"], [])
        tiles[row["tile_id"]] = MapTile(row["tile_id"], outcome, _geojson(row["footprint"]),
                                        popup)
    for row in refused:
        if row["tile_id"] not in tiles:
            tiles[row["tile_id"]] = MapTile(
                row["tile_id"], "refused", _geojson(row["footprint"]),
                {"stage": row["stage"], "reason": row["reason"],
                 "time": _json_value(row["time"])})
    return list(tiles.values())


def feature_collection(tiles: list[MapTile]) -> dict:
    """What ``/api/tiles`` answers: drawable tiles as GeoJSON features, the rest (refused before
    any footprint was known) listed apart, and the count per outcome."""
    counts = dict.fromkeys(OUTCOMES, 0)
    for tile in tiles:
        counts[tile.outcome] += 1
    return {"type": "FeatureCollection",
            "features": [t.feature() for t in tiles if t.footprint],
            "unplaced": [asdict(t) for t in tiles if not t.footprint],
            "counts": counts}
