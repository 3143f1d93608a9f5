-- TileStream: what "answered" means, defined once (docs/operations.md, "What 'answered' means").
-- Not queries of their own: each named block is a common table expression, and the query loader
-- (pipeline/ops/queries.py) writes those a query names (and those they read) in place of
-- `{answered since EXPR}` in its WITH clause, EXPR being the earliest event time (announcements)
-- and write time (events, dead letters) the query looks at.
-- `python -m pipeline.ops.queries NAME PROJECT.DATASET` prints a query so composed.
-- Rows of older releases lack what newer ones record: a NULL role is live (written before roles
-- existed), a NULL release is the release that did not record one.
--
-- answered_tiles: every tile row once per writer (a row_id carries neither release nor role, and
--   a retried insert lands a row twice), with `read_role` (its role, NULL read as live),
--   `generation_time` (the latest event time of its tile version: a newer generation of a tile
--   is a later announcement) and `whole` (every chip row it promises is in `chips`: chip rows
--   arrive by load job, after the tile row).
-- tile_answers: THE answer of each tile id, as consumers read: of the whole rows with role live
--   or canary (never shadow, nor a role this definition does not know) of the tile's newest
--   generation, the first written (then by release, then row id). In a blue-green cut-over both
--   jobs answer live for a while, and a model change in that window gives one tile version two
--   answers: consumers still see one.
-- message_outcomes: per message id, each outcome the rows give it (`written_in` names the
--   table): `answered` (a tile version that is its tile's answer), `superseded` (its tile has an
--   answer of a newer generation), an `events` disposition, or `dead_letter`. `drained` (the
--   job's input ended before the message was complete) finishes it for that job's books but
--   answers nobody: readers that ask "answered" leave it out. `release` is who
--   wrote it (for a tile, the answer's release). A message with none is not answered (yet).

-- name: answered_tiles
SELECT t.*, IFNULL(t.role, 'live') AS read_role,
       MAX(t.event_time) OVER (PARTITION BY t.tile_id, t.tile_generation) AS generation_time,
       IFNULL(c.rows_in, 0) >= t.chips_scored AS whole
FROM (
  SELECT *
  FROM `{dataset}.tiles`
  WHERE event_time >= {since}
  QUALIFY ROW_NUMBER() OVER (PARTITION BY row_id, IFNULL(release, ''), IFNULL(role, 'live')
                             ORDER BY completed_at) = 1
) AS t
LEFT JOIN (
  SELECT tile_id, tile_generation, model_name, model_version,
         IFNULL(role, 'live') AS read_role, IFNULL(release, '') AS writer,
         COUNT(DISTINCT row_id) AS rows_in
  FROM `{dataset}.chips`
  WHERE event_time >= {since}
  GROUP BY tile_id, tile_generation, model_name, model_version, read_role, writer
) AS c
  ON c.tile_id = t.tile_id AND c.tile_generation = t.tile_generation
 AND c.model_name = t.model_name AND c.model_version = t.model_version
 AND c.read_role = IFNULL(t.role, 'live') AND c.writer = IFNULL(t.release, '')

-- name: tile_answers
SELECT *
FROM answered_tiles
WHERE whole AND read_role IN ('live', 'canary')
QUALIFY ROW_NUMBER() OVER (PARTITION BY tile_id ORDER BY generation_time DESC,
                           tile_generation DESC, completed_at, release, row_id) = 1

-- name: message_outcomes
SELECT m AS message_id,
       IF(t.tile_generation = a.tile_generation, 'answered', 'superseded') AS outcome,
       'tiles' AS written_in, a.release
FROM answered_tiles AS t
CROSS JOIN UNNEST(t.source_message_ids) AS m
JOIN tile_answers AS a ON a.tile_id = t.tile_id
WHERE t.tile_generation = a.tile_generation OR t.generation_time < a.generation_time
UNION ALL
SELECT m AS message_id, disposition AS outcome, 'events' AS written_in, release
FROM `{dataset}.events`, UNNEST(ARRAY_CONCAT(source_message_ids, [message_id])) AS m
WHERE time >= {since}
  AND disposition IN ('filtered', 'duplicate', 'superseded', 'replayed', 'drained')
UNION ALL
SELECT m AS message_id, 'dead_letter' AS outcome, 'dead_letters' AS written_in, release
FROM `{dataset}.dead_letters`, UNNEST(ARRAY_CONCAT(source_message_ids, [message_id])) AS m
WHERE time >= {since}
