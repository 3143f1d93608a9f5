-- TileStream: the SQL a consumer runs. Each query is a named block; replace {dataset} with your
-- `project.dataset` (tilestream's loader does) and bind the @parameters.
-- Every query filters or groups on the partitioning column (event_time) or the clustering
-- columns (tile_id, model_version) where it can, so BigQuery prunes what it scans.

-- name: latest_prediction_per_chip
-- The newest prediction of every chip of every tile announced in the last @days days, per model.
-- A chip can have several rows: re-announced tiles (new generations) and model upgrades.
SELECT tile_id, chip_index, model_name, model_version, dominant_class, mean_confidence,
       valid_fraction, scored_at
FROM (
  SELECT *,
         ROW_NUMBER() OVER (PARTITION BY tile_id, chip_index, model_name
                            ORDER BY scored_at DESC) AS newest
  FROM `{dataset}.chips`
  WHERE event_time >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL @days DAY)
)
WHERE newest = 1
ORDER BY tile_id, chip_index;

-- name: class_area_per_tile_and_day
-- Area (km²) of each class per tile and day, from complete tiles' blended prediction rasters.
SELECT DATE(t.event_time) AS day, t.tile_id, t.model_version, c.name AS class_name,
       SUM(c.area_m2) / 1e6 AS area_km2
FROM `{dataset}.tiles` AS t
CROSS JOIN UNNEST(t.classes) AS c
WHERE t.complete
GROUP BY day, t.tile_id, t.model_version, class_name
ORDER BY day, t.tile_id, area_km2 DESC;

-- name: chips_intersecting_region
-- Chips whose footprint intersects a region given as WKT in EPSG:4326 (lon lat).
SELECT tile_id, chip_index, dominant_class, mean_confidence, ST_ASTEXT(footprint) AS footprint
FROM `{dataset}.chips`
WHERE ST_INTERSECTS(footprint, ST_GEOGFROMTEXT(@region_wkt))
ORDER BY tile_id, chip_index;

-- name: dead_letters_by_stage
-- What the stream could not use in the last @days days, by stage and reason.
SELECT stage, reason, COUNT(*) AS letters, MAX(time) AS last_seen
FROM `{dataset}.dead_letters`
WHERE time >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL @days DAY)
GROUP BY stage, reason
ORDER BY letters DESC;
