"""``tilestream stats``: the stream's books for a window, read from BigQuery (emulator or real).

"In" is counted where messages enter: the ``messages`` table gets one row per message the stream
took in, before anything is done with it. Each message id then reaches one terminal disposition,
wherever it is written: ``scored`` (its tile's answer carries it, as
``transforms/sql/answered.sql`` defines it for every reader: a shadow's row alone is not an
answer), ``dead_letter`` (a dead letter names every message it is about), ``superseded`` (a newer
generation of its tile is answered, or the stream found it replaced before reading it),
``duplicate``, ``filtered``, ``replayed`` (the local journal published it again, as another id) or
``drained`` (the job's input ended before it was complete: docs/operations.md, "What a drain does";
a books outcome, never an answer) in ``events``. The books compare the two: ids that came in and
have no outcome yet are listed with their age (``pending``); ids with outcomes that cannot both
hold (scored and filtered, say) are ``conflicts``. A tile scored with some strips unreadable is
both scored and dead-lettered: that is one partial outcome, counted as scored. Per tile, chips
total = scored + skipped + failed.

Cross-checks outside the stream: on the local stack, the journal lists every message the
stream pulled (``pulled_not_in``: pulled but never booked in); on GCP, Cloud Monitoring's
``pubsub.googleapis.com/subscription/ack_message_count`` over the window against ``in``
(docs/operations.md has the query).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pipeline.ops.queries import compose

# Terminal dispositions, in the order one counts when a message has several (a partial tile).
DISPOSITIONS = ("scored", "dead_letter", "superseded", "duplicate", "filtered", "replayed",
                "drained")
# Outcomes one message can have together: a partial tile (scored and a dead letter about the
# strips that failed), also once a newer generation supersedes it. Any other pair is a conflict
# in the books.
COMPATIBLE = {frozenset({"scored", "dead_letter"}), frozenset({"superseded", "dead_letter"})}
PENDING_SHOWN = 50
_KIND = {"answered": "scored"}  # the books' word for a message its tile's answer carries


def _tables(bq, dataset: str) -> set[str]:
    return {t.table_id for t in bq.list_tables(dataset)}


def _rows(bq, sql: str, since: dt.datetime) -> list[dict[str, Any]]:
    from google.cloud import bigquery

    config = bigquery.QueryJobConfig(
        query_parameters=[bigquery.ScalarQueryParameter("since", "TIMESTAMP", since)])
    return [dict(row) for row in bq.query(sql, job_config=config).result()]


def outcomes(bq, dataset: str, since: dt.datetime, present: set[str]) -> dict[str, dict]:
    """Per message id that came in since ``since``: when it came in and its outcomes, as the one
    definition of "answered" gives them (``sql/answered.sql``: ``scored`` is its tile's answer,
    never a shadow's row alone; ``superseded`` also when a newer generation of its tile is
    answered). Tile rows are looked at from two days before ``since``: a message taken in now
    may announce a tile of yesterday."""
    from google.api_core.exceptions import NotFound

    if "messages" not in present:
        return {}
    entries = {r["message_id"]: {"received": r["received"], "kinds": set()} for r in _rows(
        bq, f"SELECT message_id, MIN(received_at) AS received FROM `{dataset}.messages` "
            "WHERE received_at >= @since GROUP BY message_id", since)}
    if not entries:
        return entries
    sql = compose("WITH {answered since TIMESTAMP_SUB(@since, INTERVAL 2 DAY)} "
                  "SELECT DISTINCT message_id AS id, outcome AS kind FROM message_outcomes",
                  dataset)
    try:
        rows = _rows(bq, sql, since)
    except NotFound:  # every stream creates all its tables at launch: none has written yet
        rows = []
    for row in rows:
        if row["id"] in entries:
            entries[row["id"]]["kinds"].add(_KIND.get(row["kind"], row["kind"]))
    return entries


def books(bq, dataset: str, hours: float = 24.0,
          pulled: set[str] | None = None) -> dict[str, Any]:
    """The books of ``dataset`` (``project.dataset``) over the last ``hours``; ``pulled``: the
    ids the local journal holds, to find any the stream pulled and never booked in."""
    now = dt.datetime.now(dt.UTC)
    since = now - dt.timedelta(hours=hours)
    present = _tables(bq, dataset)
    entries = outcomes(bq, dataset, since, present)
    messages = dict.fromkeys(DISPOSITIONS, 0)
    pending, conflicts = [], []
    for message_id, entry in entries.items():
        kinds = entry["kinds"]
        if len(kinds) > 1:  # drained by one job, then answered by the next: the answer counts
            kinds = kinds - {"drained"}
        if not kinds:
            pending.append({"message_id": message_id,
                            "age_s": round((now - entry["received"]).total_seconds(), 1)})
            continue
        if len(kinds) > 1 and frozenset(kinds) not in COMPATIBLE:
            conflicts.append({"message_id": message_id, "outcomes": sorted(kinds)})
        messages[next(d for d in DISPOSITIONS if d in kinds)] += 1
    report: dict[str, Any] = {
        "window_hours": hours,
        "messages": {"in": len(entries), **messages, "pending": len(pending)},
        "balanced": not conflicts and len(entries) == sum(messages.values()) + len(pending),
        "pending": sorted(pending, key=lambda p: -p["age_s"])[:PENDING_SHOWN],
        "conflicts": conflicts[:PENDING_SHOWN],
        "tiles": {}, "chips": {}, "filtered_by_reason": {}, "duplicates_by_stage": {},
        "dead_letters_by_stage_and_reason": [], "model_events": [],
    }
    if pulled is not None:
        report["pulled_not_in"] = sorted(pulled - set(entries))[:PENDING_SHOWN]
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
            if row["disposition"] not in ("filtered", "duplicate"):
                continue  # superseded and replayed: counted in "messages"
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
