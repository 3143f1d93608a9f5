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

-- name: latest_prediction_per_chip
-- The newest prediction of every chip of every tile announced in the last @days days, per model.
-- A chip can have several rows: re-announced tiles (new generations) and model upgrades.
SELECT tile_id, chip_index, model_name, model_version, dominant_class, mean_confidence,
       valid_fraction, scored_at
FROM (
  SELECT *
  FROM `{dataset}.chips`
  WHERE event_time >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL @days DAY)
    AND IFNULL(role, 'live') != 'shadow'
  QUALIFY ROW_NUMBER() OVER (PARTITION BY row_id ORDER BY scored_at) = 1
)
WHERE TRUE  -- BigQuery wants a WHERE beside QUALIFY
QUALIFY ROW_NUMBER() OVER (PARTITION BY tile_id, chip_index, model_name
                           ORDER BY scored_at DESC) = 1
ORDER BY tile_id, chip_index;

-- name: class_area_per_tile_and_day
-- Area (km²) of each class per tile and day, from complete tiles' blended prediction rasters.
SELECT DATE(t.event_time) AS day, t.tile_id, t.model_version, c.name AS class_name,
       SUM(c.area_m2) / 1e6 AS area_km2
FROM (
  SELECT *
  FROM `{dataset}.tiles`
  WHERE complete AND IFNULL(role, 'live') != 'shadow'
  QUALIFY ROW_NUMBER() OVER (PARTITION BY row_id ORDER BY completed_at) = 1
) AS t
CROSS JOIN UNNEST(t.classes) AS c
GROUP BY day, t.tile_id, t.model_version, class_name
ORDER BY day, t.tile_id, area_km2 DESC;

-- name: chips_intersecting_region
-- Chips whose footprint intersects a region given as WKT in EPSG:4326 (lon lat).
SELECT tile_id, chip_index, dominant_class, mean_confidence, ST_ASTEXT(footprint) AS footprint
FROM (
  SELECT *
  FROM `{dataset}.chips`
  WHERE ST_INTERSECTS(footprint, ST_GEOGFROMTEXT(@region_wkt))
    AND IFNULL(role, 'live') != 'shadow'
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
