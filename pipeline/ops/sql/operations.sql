-- TileStream: the SQL an operator runs (SLOs; live vs candidate). Named blocks like
-- pipeline/ops/sql/queries.sql; replace {dataset} with `project.dataset` and bind the @parameters.
-- Every query reads each row_id once (a retried insert can land a row twice; the comparisons
-- once per role, as a blue-green release writes a shadow twin of each live row) and prunes on
-- the partitioning column (event_time / time).

-- name: slo_tiles
-- Tiles whose answer (transforms/sql/answered.sql: what users read, one per tile, never a
-- shadow's) landed in [@start, @end): count, fast (latency_s <= @latency_s), incomplete, good
-- (fast and complete), chips, latency quantiles and the newest completion.
WITH {answered since TIMESTAMP_SUB(@start, INTERVAL 2 DAY)},
tiles AS (
  SELECT * FROM tile_answers WHERE completed_at >= @start AND completed_at < @end
)
SELECT COUNT(*) AS tiles,
       COUNTIF(latency_s <= @latency_s) AS tiles_fast,
       COUNTIF(NOT complete OR chips_failed > 0) AS tiles_incomplete,
       COUNTIF(latency_s <= @latency_s AND complete AND chips_failed = 0) AS tiles_good,
       COALESCE(SUM(chips_scored), 0) AS chips_scored,
       APPROX_QUANTILES(latency_s, 100)[OFFSET(50)] AS latency_p50_s,
       APPROX_QUANTILES(latency_s, 100)[OFFSET(95)] AS latency_p95_s,
       APPROX_QUANTILES(latency_s, 100)[OFFSET(99)] AS latency_p99_s,
       MAX(completed_at) AS last_completed_at
FROM tiles;

-- name: slo_dead_letters
-- Dead letters written in [@start, @end), by stage.
SELECT stage, COUNT(*) AS letters
FROM `{dataset}.dead_letters`
WHERE time >= @start AND time < @end
GROUP BY stage
ORDER BY letters DESC;

-- name: compare_agreement
-- Live vs candidate on the same chips (shadow mode: both scored every tile) in the last @window_hours
-- hours: chips compared, share of chips with the same dominant class, pixel overlap (per chip,
-- sum over classes of min(live pixels, candidate pixels) / valid pixels: an upper bound of pixel
-- agreement computed from the rows; exact agreement needs the two prediction COGs), and each
-- model's mean confidence on those chips. A canary scores disjoint tiles, so it has no pairs.
WITH chips AS (
  SELECT *
  FROM `{dataset}.chips`
  WHERE event_time >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL @window_hours HOUR)
    AND model_name = @model_name
  QUALIFY ROW_NUMBER() OVER (PARTITION BY row_id, COALESCE(role, 'live')
                             ORDER BY scored_at) = 1
),
live AS (
  SELECT * FROM chips
  WHERE model_version = @live_version AND COALESCE(role, 'live') = 'live'
),
candidate AS (
  SELECT * FROM chips
  WHERE model_version = @candidate_version AND role IN ('shadow', 'canary')
),
pairs AS (
  SELECT l.row_id AS live_row, l.tile_id, l.dominant_class = c.dominant_class AS same_class,
         l.mean_confidence AS live_confidence, c.mean_confidence AS candidate_confidence,
         l.classes AS live_classes, c.classes AS candidate_classes
  FROM live AS l
  JOIN candidate AS c USING (tile_id, tile_generation, chip_index)
),
overlap AS (
  SELECT p.live_row, SUM(LEAST(lc.pixels, cc.pixels)) AS agree, SUM(lc.pixels) AS valid
  FROM pairs AS p
  CROSS JOIN UNNEST(p.live_classes) AS lc
  JOIN UNNEST(p.candidate_classes) AS cc ON lc.class_id = cc.class_id
  GROUP BY p.live_row
)
SELECT COUNT(DISTINCT p.tile_id) AS tiles,
       COUNT(*) AS chips,
       AVG(IF(p.same_class, 1.0, 0.0)) AS chip_agreement,
       SAFE_DIVIDE(SUM(o.agree), SUM(o.valid)) AS pixel_overlap,
       AVG(p.live_confidence) AS live_mean_confidence,
       AVG(p.candidate_confidence) AS candidate_mean_confidence
FROM pairs AS p
JOIN overlap AS o USING (live_row);

-- name: compare_class_area
-- Per class: area (km²) by live and by the candidate on the same tile versions in the last @window_hours
-- hours, the delta and the delta relative to live.
WITH tiles AS (
  SELECT *
  FROM `{dataset}.tiles`
  WHERE event_time >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL @window_hours HOUR)
    AND model_name = @model_name AND complete
  QUALIFY ROW_NUMBER() OVER (PARTITION BY row_id, COALESCE(role, 'live')
                             ORDER BY completed_at) = 1
),
live AS (
  SELECT t.tile_id, t.tile_generation, c.name AS class_name, c.area_m2
  FROM tiles AS t CROSS JOIN UNNEST(t.classes) AS c
  WHERE t.model_version = @live_version AND COALESCE(t.role, 'live') = 'live'
),
candidate AS (
  SELECT t.tile_id, t.tile_generation, c.name AS class_name, c.area_m2
  FROM tiles AS t CROSS JOIN UNNEST(t.classes) AS c
  WHERE t.model_version = @candidate_version AND t.role IN ('shadow', 'canary')
)
SELECT class_name,
       SUM(l.area_m2) / 1e6 AS live_km2,
       SUM(c.area_m2) / 1e6 AS candidate_km2,
       (SUM(c.area_m2) - SUM(l.area_m2)) / 1e6 AS delta_km2,
       SAFE_DIVIDE(SUM(c.area_m2) - SUM(l.area_m2), SUM(l.area_m2)) AS delta_ratio
FROM live AS l
JOIN candidate AS c USING (tile_id, tile_generation, class_name)
GROUP BY class_name
ORDER BY ABS(SUM(c.area_m2) - SUM(l.area_m2)) DESC;

-- name: compare_versions
-- Per model version and role in the last @window_hours hours: tiles, mean chip confidence, failed-chip
-- ratio, dead letters of the inference and assembly stages on those tiles (matched by tile_id,
-- as dead letters carry no model version) per tile, and latency p50/p95. Works for shadow and
-- canary alike.
WITH tiles AS (
  SELECT *
  FROM `{dataset}.tiles`
  WHERE event_time >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL @window_hours HOUR)
    AND model_name = @model_name
  QUALIFY ROW_NUMBER() OVER (PARTITION BY row_id, COALESCE(role, 'live')
                             ORDER BY completed_at) = 1
),
chips AS (
  SELECT model_version, COALESCE(role, 'live') AS role, AVG(mean_confidence) AS confidence
  FROM (
    SELECT *
    FROM `{dataset}.chips`
    WHERE event_time >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL @window_hours HOUR)
      AND model_name = @model_name
    QUALIFY ROW_NUMBER() OVER (PARTITION BY row_id, COALESCE(role, 'live')
                             ORDER BY scored_at) = 1
  )
  GROUP BY model_version, role
),
letters AS (
  SELECT tile_id, COUNT(*) AS letters
  FROM `{dataset}.dead_letters`
  WHERE time >= TIMESTAMP_SUB(CURRENT_TIMESTAMP(), INTERVAL @window_hours HOUR)
    AND stage IN ('inference', 'assemble')
  GROUP BY tile_id
),
per_version AS (
  SELECT t.model_version, COALESCE(t.role, 'live') AS role, COUNT(*) AS tiles,
         SUM(COALESCE(d.letters, 0)) AS dead_letters,
         SAFE_DIVIDE(SUM(t.chips_failed), SUM(t.chips_total)) AS chip_failure_ratio,
         APPROX_QUANTILES(t.latency_s, 100)[OFFSET(50)] AS latency_p50_s,
         APPROX_QUANTILES(t.latency_s, 100)[OFFSET(95)] AS latency_p95_s
  FROM tiles AS t
  LEFT JOIN letters AS d USING (tile_id)
  GROUP BY t.model_version, role
)
SELECT v.model_version, v.role, v.tiles, c.confidence AS mean_confidence,
       v.chip_failure_ratio, v.dead_letters, SAFE_DIVIDE(v.dead_letters, v.tiles)
         AS dead_letter_rate, v.latency_p50_s, v.latency_p95_s
FROM per_version AS v
LEFT JOIN chips AS c USING (model_version, role)
ORDER BY v.model_version, v.role;

-- name: compare_releases
-- Blue-green: the live release (@blue) against the green one (@green, whose rows are all
-- role = 'shadow') since @since (the later of the trial's start and the window
-- the operator asked for: rows from before the trial are not the trial's), one row per release: messages it took in,
-- tiles it answered, dead letters (a letter written twice counts once) per message, latency
-- p50/p95, and, on chips both scored (same row_id: same model version, tile version and chip),
-- how many and the share whose dominant class agrees. Blue is read as it answers (its own
-- shadow candidates left out); green as a whole.
WITH messages AS (
  SELECT release, COUNT(DISTINCT message_id) AS messages
  FROM `{dataset}.messages`
  WHERE received_at >= @since
    AND release IN (@blue, @green)
  GROUP BY release
),
tiles AS (
  SELECT release, COUNT(DISTINCT CONCAT(tile_id, '@', tile_generation)) AS tiles,
         APPROX_QUANTILES(latency_s, 100)[OFFSET(50)] AS latency_p50_s,
         APPROX_QUANTILES(latency_s, 100)[OFFSET(95)] AS latency_p95_s
  FROM `{dataset}.tiles`
  WHERE event_time >= @since
    AND ((release = @blue AND COALESCE(role, 'live') != 'shadow')
         OR (release = @green AND role = 'shadow'))
  GROUP BY release
),
letters AS (
  SELECT release, COUNT(DISTINCT CONCAT(stage, '|', reason, '|', IFNULL(message_id, ''), '|',
                                        IFNULL(tile_id, ''))) AS dead_letters
  FROM `{dataset}.dead_letters`
  WHERE time >= @since
    AND release IN (@blue, @green)
  GROUP BY release
),
chips AS (
  SELECT row_id, release, dominant_class
  FROM `{dataset}.chips`
  WHERE event_time >= @since
    AND ((release = @blue AND COALESCE(role, 'live') != 'shadow')
         OR (release = @green AND role = 'shadow'))
  QUALIFY ROW_NUMBER() OVER (PARTITION BY row_id, release ORDER BY scored_at) = 1
),
pairs AS (
  SELECT COUNT(*) AS chips_compared,
         AVG(IF(b.dominant_class = g.dominant_class, 1.0, 0.0)) AS chip_agreement
  FROM chips AS b
  JOIN chips AS g USING (row_id)
  WHERE b.release = @blue AND g.release = @green
)
SELECT r AS release, IF(r = @green, 'green', 'blue') AS side,
       IFNULL(m.messages, 0) AS messages, IFNULL(t.tiles, 0) AS tiles,
       IFNULL(l.dead_letters, 0) AS dead_letters,
       SAFE_DIVIDE(IFNULL(l.dead_letters, 0), m.messages) AS dead_letter_rate,
       t.latency_p50_s, t.latency_p95_s, p.chips_compared, p.chip_agreement
FROM UNNEST([@blue, @green]) AS r
CROSS JOIN pairs AS p
LEFT JOIN messages AS m ON m.release = r
LEFT JOIN tiles AS t ON t.release = r
LEFT JOIN letters AS l ON l.release = r
ORDER BY side;

-- name: release_handover
-- Blue-green cut-over: may the old job (@blue) be drained? One row per message the green release
-- (@green) took in from @since (its trial began) until @until (by then every worker of green
-- answers live: its first `now live` event plus its channels poll), and every message green
-- answered as shadow at any time of the trial, with who answers it as users read it
-- (transforms/sql/answered.sql): 'blue' (its tile's answer, or a newer generation's that
-- supersedes it, is a row of @blue -- or of an older release that recorded none; or one of
-- @blue's events or dead letters), 'green' (the answer is a row of @green) or NULL: nobody yet.
-- Green's rows before the cut-over are shadow, never an answer; its events and dead letters then
-- are a shadow's books too, so only blue's count here. Drain blue when no row is NULL.
-- Announcements with an event time more than @days days before the trial are not looked at (the
-- partition bound).
WITH {answered since TIMESTAMP_SUB(@since, INTERVAL @days DAY)},
intake AS (
  SELECT message_id
  FROM `{dataset}.messages`
  WHERE received_at >= @since AND received_at < @until AND release = @green
  UNION DISTINCT
  -- and whatever green answered as shadow later still (a worker that read the cut-over late,
  -- say after failed reads of channels.json): the time bound alone would miss those
  SELECT m AS message_id
  FROM answered_tiles, UNNEST(source_message_ids) AS m
  WHERE completed_at >= @since AND release = @green AND read_role = 'shadow'
),
answers AS (
  SELECT message_id, release
  FROM message_outcomes
  WHERE written_in = 'tiles' OR (release = @blue AND outcome != 'drained')
)
SELECT i.message_id,
       CASE WHEN LOGICAL_OR(a.message_id IS NOT NULL AND IFNULL(a.release, '') != @green)
            THEN 'blue'
            WHEN LOGICAL_OR(a.release = @green) THEN 'green' END AS answered_by
FROM intake AS i
LEFT JOIN answers AS a ON a.message_id = i.message_id
GROUP BY i.message_id
ORDER BY i.message_id;
