-- TileStream: the SQL a consumer runs. Each query is a named block; tilestream's loader writes
-- your `project.dataset` for {dataset} and the definition of "answered" for `{answered since ...}`
-- (`python -m pipeline.ops.queries NAME PROJECT.DATASET` prints a query so composed); bind the
-- @parameters.
-- Every query filters or groups on the partitioning column (event_time) or the clustering
-- columns (tile_id, model_version) where it can, so BigQuery prunes what it scans.
-- Every query reads the one definition of "answered" (transforms/sql/answered.sql; the loader
-- writes it where a query says `{answered since ...}`; docs/operations.md, "What 'answered'
-- means"): the answer of a tile is, of its newest generation, the first whole row (every chip row
-- in) written live or canary. A re-announced tile (a new generation), a replay, the cut-over
-- overlap of a blue-green release or a model change in it give one answer per tile, never two;
-- rows of a shadow candidate are a comparison, never an answer. Rows are written at least once
-- (a retried insert can land a row twice): each is read once.
-- Answers the model itself flagged as untrustworthy (a tile row with `drifted`: its bands' values
-- were unlike the training data's, docs/operations.md §8) are left out unless the caller asks
-- for them: bind @include_drifted to TRUE. A chip counts as drifted when its tile's answer says
-- so.

-- name: latest_prediction_per_chip
-- Every chip of every tile announced in the last @days days, as its tile's answer scored it (one
-- row per chip: the newest generation, the model that answered it; drifted tiles' chips only with
-- @include_drifted).
WITH {answered since TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL @days DAY)}
SELECT c.tile_id, c.tile_generation, c.chip_index, c.model_name, c.model_version,
       c.dominant_class, c.mean_confidence, c.valid_fraction, c.scored_at
FROM `{dataset}.chips` AS c
JOIN tile_answers AS a
  ON c.tile_id = a.tile_id AND c.tile_generation = a.tile_generation
 AND c.model_name = a.model_name AND c.model_version = a.model_version
 AND IFNULL(c.role, 'live') = a.read_role AND IFNULL(c.release, '') = IFNULL(a.release, '')
WHERE c.event_time >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL @days DAY)
  AND (@include_drifted OR NOT IFNULL(a.drifted, FALSE))
QUALIFY ROW_NUMBER() OVER (PARTITION BY c.tile_id, c.chip_index ORDER BY c.scored_at) = 1
ORDER BY tile_id, chip_index;

-- name: class_area_per_tile_and_day
-- Area (km²) of each class per tile and day of acquisition, from each tile's answer (its newest
-- generation, the model that answered it: a re-uploaded tile counts once) and its blended
-- prediction raster (drifted tiles only with @include_drifted). day is NULL where the
-- acquisition time is unknown (a bare bucket notification): the upload day is not the scene's.
WITH {answered since TIMESTAMP '1970-01-01 00:00:00+00'}
SELECT DATE(t.acquired) AS day, t.tile_id, t.tile_generation, t.model_version,
       c.name AS class_name, SUM(c.area_m2) / 1e6 AS area_km2
FROM tile_answers AS t
CROSS JOIN UNNEST(t.classes) AS c
WHERE t.complete AND (@include_drifted OR NOT IFNULL(t.drifted, FALSE))
GROUP BY day, t.tile_id, t.tile_generation, t.model_version, class_name
ORDER BY day, t.tile_id, area_km2 DESC;

-- name: chips_intersecting_region
-- Chips of tiles' answers whose footprint intersects a region given as WKT in EPSG:4326 (lon lat),
-- with the tile generation and model version that answered (drifted tiles' chips only with
-- @include_drifted). Footprints across ±180° are stored cut there (a MULTIPOLYGON, docs/stac.md):
-- a tile in the Pacific is found from either side of the meridian, never from the far side of
-- the world. Give a region that crosses ±180° cut the same way.
WITH {answered since TIMESTAMP '1970-01-01 00:00:00+00'}
SELECT c.tile_id, c.tile_generation, c.chip_index, c.model_name, c.model_version,
       c.dominant_class, c.mean_confidence, ST_ASTEXT(c.footprint) AS footprint
FROM `{dataset}.chips` AS c
JOIN tile_answers AS a
  ON c.tile_id = a.tile_id AND c.tile_generation = a.tile_generation
 AND c.model_name = a.model_name AND c.model_version = a.model_version
 AND IFNULL(c.role, 'live') = a.read_role AND IFNULL(c.release, '') = IFNULL(a.release, '')
WHERE ST_INTERSECTS(c.footprint, ST_GEOGFROMTEXT(@region_wkt))
  AND (@include_drifted OR NOT IFNULL(a.drifted, FALSE))
QUALIFY ROW_NUMBER() OVER (PARTITION BY c.row_id ORDER BY c.scored_at) = 1
ORDER BY tile_id, chip_index;

-- name: dead_letters_by_stage
-- What the stream could not use in the last @days days, by stage and reason; a letter written
-- twice (dead letters are at-least-once too) counts once.
SELECT stage, reason, COUNT(*) AS letters, MAX(time) AS last_seen
FROM (
  SELECT *
  FROM `{dataset}.dead_letters`
  WHERE time >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL @days DAY)
  QUALIFY ROW_NUMBER() OVER (PARTITION BY stage, reason, message_id, tile_id
                             ORDER BY time) = 1
)
GROUP BY stage, reason
ORDER BY letters DESC;

-- name: tiles_ready
-- Tiles announced in the last @days days whose answer is complete in SQL: the tile row is in and
-- so is every one of its chip rows (chip rows arrive by load job, up to --chip_rows_load_secs
-- after the tile row). One row per tile: its answer (newest generation, first whole live or
-- canary row). A consumer that reacts to tiles reacts to these, never to the tile row alone.
-- Drifted tiles only with @include_drifted; `drifted` is in the answer either way.
WITH {answered since TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL @days DAY)}
SELECT tile_id, tile_generation, model_name, model_version, complete, chips_scored, raster_uri,
       completed_at, drifted, release, read_role AS role
FROM tile_answers
WHERE @include_drifted OR NOT IFNULL(drifted, FALSE)
ORDER BY completed_at;
