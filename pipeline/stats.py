"""``tilestream stats``: the stream's books for a window, read from BigQuery (emulator or real).

Every message in ends in exactly one place: a tile row (``source_message_ids``), the ``events``
table (filtered, duplicate) or the ``dead_letters`` table. A message can appear in two (a tile
scored with some strips unreadable is both a tile row and a dead letter); it is counted once, in
the first of scored, dead letter, filtered, duplicate. Per tile, chips total = scored + skipped +
failed. Counters exist too (Beam metrics, exact on Dataflow), but these numbers are what a user
can query and reconcile.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

DISPOSITIONS = ("scored", "dead_letter", "filtered", "duplicate")


def _tables(bq, dataset: str) -> set[str]:
    return {t.table_id for t in bq.list_tables(dataset)}


def _rows(bq, sql: str, since: dt.datetime) -> list[dict[str, Any]]:
    from google.cloud import bigquery

    config = bigquery.QueryJobConfig(
        query_parameters=[bigquery.ScalarQueryParameter("since", "TIMESTAMP", since)])
    return [dict(row) for row in bq.query(sql, job_config=config).result()]


def books(bq, dataset: str, hours: float = 24.0) -> dict[str, Any]:
    """The books of ``dataset`` (``project.dataset``) over the last ``hours``."""
    since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours)
    present = _tables(bq, dataset)
    parts = []
    if "tiles" in present:
        parts.append(f"SELECT m AS id, 1 AS rank FROM `{dataset}.tiles`, "
                     "UNNEST(source_message_ids) AS m WHERE completed_at >= @since")
    if "dead_letters" in present:
        parts.append(f"SELECT message_id AS id, 2 AS rank FROM `{dataset}.dead_letters` "
                     "WHERE time >= @since AND message_id IS NOT NULL AND message_id != ''")
    if "events" in present:
        parts.append(f"SELECT message_id AS id, CASE disposition WHEN 'filtered' THEN 3 ELSE 4 "
                     f"END AS rank FROM `{dataset}.events` WHERE time >= @since "
                     "AND message_id IS NOT NULL AND message_id != ''")
    messages = dict.fromkeys(DISPOSITIONS, 0)
    if parts:
        sql = ("WITH ids AS (" + " UNION ALL ".join(parts) + "), first AS (SELECT id, "
               "MIN(rank) AS rank FROM ids GROUP BY id) SELECT rank, COUNT(*) AS n FROM first "
               "GROUP BY rank")
        for row in _rows(bq, sql, since):
            messages[DISPOSITIONS[row["rank"] - 1]] = row["n"]
    report: dict[str, Any] = {
        "window_hours": hours,
        "messages": {"in": sum(messages.values()), **messages},
        "tiles": {}, "chips": {}, "filtered_by_reason": {}, "duplicates_by_stage": {},
        "dead_letters_by_stage_and_reason": [], "model_events": [],
    }
    if "tiles" in present:
        [tiles] = _rows(bq, (
            "SELECT COUNT(*) AS rows, COUNT(DISTINCT row_id) AS tiles, "
            "COUNTIF(NOT complete) AS partial, "
            "COUNTIF(chips_total != chips_scored + chips_skipped + chips_failed) AS unbalanced, "
            "IFNULL(SUM(chips_total), 0) AS chips_total, "
            "IFNULL(SUM(chips_scored), 0) AS chips_scored, "
            "IFNULL(SUM(chips_skipped), 0) AS chips_skipped, "
            "IFNULL(SUM(chips_failed), 0) AS chips_failed "
            f"FROM (SELECT * FROM `{dataset}.tiles` WHERE completed_at >= @since "
            "QUALIFY ROW_NUMBER() OVER (PARTITION BY row_id ORDER BY completed_at) = 1)"), since)
        report["tiles"] = tiles
    if "chips" in present:
        [chips] = _rows(bq, ("SELECT COUNT(*) AS rows, COUNT(DISTINCT row_id) AS distinct_rows "
                             f"FROM `{dataset}.chips` WHERE scored_at >= @since"), since)
        report["chips"] = chips
    if "events" in present:
        for row in _rows(bq, (f"SELECT disposition, stage, reason, COUNT(*) AS n FROM "
                              f"`{dataset}.events` WHERE time >= @since "
                              "GROUP BY disposition, stage, reason ORDER BY n DESC"), since):
            if row["disposition"] in ("model", "drift"):  # model changes, drift changes
                report["model_events"].append({"reason": row["reason"][:200], "n": row["n"]})
                continue
            bucket = ("filtered_by_reason" if row["disposition"] == "filtered"
                      else "duplicates_by_stage")
            key = row["reason"] if row["disposition"] == "filtered" else row["stage"]
            report[bucket][key] = report[bucket].get(key, 0) + row["n"]
    if "dead_letters" in present:
        report["dead_letters_by_stage_and_reason"] = _rows(bq, (
            "SELECT stage, SUBSTR(reason, 1, 120) AS reason, COUNT(*) AS n "
            f"FROM `{dataset}.dead_letters` WHERE time >= @since "
            "GROUP BY stage, reason ORDER BY n DESC LIMIT 50"), since)
    return report


def pubsub_dead_letters(stack) -> dict[str, Any]:
    """Messages Pub/Sub itself gave up on (max delivery attempts), peeked and left in place."""
    subscriber = stack.subscriber()
    response = subscriber.pull(subscription=stack.dead_letter_subscription_path,
                               max_messages=100, timeout=5)
    received = list(response.received_messages)
    if received:
        subscriber.modify_ack_deadline(subscription=stack.dead_letter_subscription_path,
                                       ack_ids=[m.ack_id for m in received],
                                       ack_deadline_seconds=0)
    return {"waiting": len(received),
            "message_ids": [m.message.message_id for m in received][:20]}
