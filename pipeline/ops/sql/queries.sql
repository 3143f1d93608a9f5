-- TileStream: the SQL a consumer runs. Each query is a named block; replace {dataset} with your
-- `project.dataset` (tilestream's loader does) and bind the @parameters.
-- Every query filters or groups on the partitioning column (event_time) or the clustering
-- columns (tile_id, model_version) where it can, so BigQuery prunes what it scans.
-- Rows are written at least once: a streaming insert retried after a stall, or a replay, can
-- leave a row twice. Every query first keeps one row per `row_id` (QUALIFY), so none counts a
-- chip or a tile twice.
-- Rows of a shadow candidate (role = 'shadow', see docs/operations.md) are a comparison, not an
-- answer: every query leaves them out (`IFNULL(role, 'live') != 'shadow'`; NULL is an older row,
-- read as live). Canary rows are answers and stay in.
-- Answers the model itself flagged as untrustworthy (a tile row with `drifted`: its bands' values
-- were unlike the training data's, docs/operations.md §8) are left out unless the caller asks
-- for them: bind @include_drifted to TRUE. A chip counts as drifted when its tile row says so.

-- name: latest_prediction_per_chip
-- The newest prediction of every chip of every tile announced in the last @days days, per model
-- (drifted tiles' chips only with @include_drifted). A chip can have several rows: re-announced
-- tiles (new generations) and model upgrades.
SELECT tile_id, chip_index, model_name, model_version, dominant_class, mean_confidence,
       valid_fraction, scored_at
FROM (
  SELECT *
  FROM `{dataset}.chips` AS c
  WHERE event_time >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL @days DAY)
    AND IFNULL(role, 'live') != 'shadow'
    AND (@include_drifted OR NOT EXISTS (
      SELECT 1 FROM `{dataset}.tiles` AS t
      WHERE t.drifted AND t.tile_id = c.tile_id AND t.tile_generation = c.tile_generation
        AND t.model_version = c.model_version))
  QUALIFY ROW_NUMBER() OVER (PARTITION BY row_id ORDER BY scored_at) = 1
)
WHERE TRUE  -- BigQuery wants a WHERE beside QUALIFY
QUALIFY ROW_NUMBER() OVER (PARTITION BY tile_id, chip_index, model_name
                           ORDER BY scored_at DESC) = 1
ORDER BY tile_id, chip_index;

-- name: class_area_per_tile_and_day
-- Area (km²) of each class per tile and day of acquisition, from complete tiles' blended
-- prediction rasters (drifted tiles only with @include_drifted). day is NULL where the
-- acquisition time is unknown (a bare bucket notification): the upload day is not the scene's.
SELECT DATE(t.acquired) AS day, t.tile_id, t.model_version, c.name AS class_name,
       SUM(c.area_m2) / 1e6 AS area_km2
FROM (
  SELECT *
  FROM `{dataset}.tiles`
  WHERE complete AND IFNULL(role, 'live') != 'shadow'
    AND (@include_drifted OR NOT IFNULL(drifted, FALSE))
  QUALIFY ROW_NUMBER() OVER (PARTITION BY row_id ORDER BY completed_at) = 1
) AS t
CROSS JOIN UNNEST(t.classes) AS c
GROUP BY day, t.tile_id, t.model_version, class_name
ORDER BY day, t.tile_id, area_km2 DESC;

-- name: chips_intersecting_region
-- Chips whose footprint intersects a region given as WKT in EPSG:4326 (lon lat) (drifted tiles'
-- chips only with @include_drifted).
SELECT tile_id, chip_index, dominant_class, mean_confidence, ST_ASTEXT(footprint) AS footprint
FROM (
  SELECT *
  FROM `{dataset}.chips` AS c
  WHERE ST_INTERSECTS(footprint, ST_GEOGFROMTEXT(@region_wkt))
    AND IFNULL(role, 'live') != 'shadow'
    AND (@include_drifted OR NOT EXISTS (
      SELECT 1 FROM `{dataset}.tiles` AS t
      WHERE t.drifted AND t.tile_id = c.tile_id AND t.tile_generation = c.tile_generation
        AND t.model_version = c.model_version))
  QUALIFY ROW_NUMBER() OVER (PARTITION BY row_id ORDER BY scored_at) = 1
)
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
-- after the tile row). A consumer that reacts to tiles reacts to these, never to the tile row
-- alone. Drifted tiles only with @include_drifted; `drifted` is in the answer either way.
WITH tiles AS (
  SELECT *
  FROM `{dataset}.tiles`
  WHERE event_time >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL @days DAY)
    AND IFNULL(role, 'live') != 'shadow'
    AND (@include_drifted OR NOT IFNULL(drifted, FALSE))
  QUALIFY ROW_NUMBER() OVER (PARTITION BY row_id ORDER BY completed_at) = 1
),
chips AS (
  SELECT tile_id, tile_generation, model_name, model_version, IFNULL(role, 'live') AS role,
         COUNT(DISTINCT row_id) AS rows_in
  FROM `{dataset}.chips`
  WHERE event_time >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL @days DAY)
  GROUP BY tile_id, tile_generation, model_name, model_version, role
)
SELECT t.tile_id, t.tile_generation, t.model_name, t.model_version, t.complete, t.chips_scored,
       t.raster_uri, t.completed_at, t.drifted
FROM tiles AS t
LEFT JOIN chips AS c
  ON c.tile_id = t.tile_id AND c.tile_generation = t.tile_generation
 AND c.model_name = t.model_name AND c.model_version = t.model_version
 AND c.role = IFNULL(t.role, 'live')
WHERE IFNULL(c.rows_in, 0) >= t.chips_scored
ORDER BY t.completed_at;
