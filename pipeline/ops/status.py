"""``tilestream status``: is the stream up, and is it keeping up?

Answers what an operator asks first: is a stream running against this stack, how many messages
wait on its subscription, which tile was scored last and when, and how many dead letters (by
stage) the last hour brought; which releases of the stream and which model versions answer
(live), are on trial (shadow, canary) or are green, from the registry's channels and from the
rows each wrote in the window. ``tilestream run --local`` records its PID in the stack's run
directory so that this command can tell.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

from pipeline.local import stack as local_stack
from pipeline.ops.clients import Target
from pipeline.ops.queries import compose

PID_FILE = "stream.pid"
PEEK_MAX = 1000


def record_stream(stack: local_stack.LocalStack) -> Path:
    """Note this process as the stack's stream (called by ``tilestream run --local``)."""
    path = Path(stack.run_dir, PID_FILE)
    path.write_text(f"{os.getpid()}\n")
    return path


def stream_pid(stack: local_stack.LocalStack) -> int | None:
    """The PID of a live ``tilestream run --local`` on this stack, or None."""
    try:
        pid = int(Path(stack.run_dir, PID_FILE).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if b"run" in cmdline and b"--local" in cmdline else None


def peek_backlog(stack: local_stack.LocalStack, subscription: str,
                 limit: int = PEEK_MAX) -> int:
    """Messages waiting on the subscription (up to ``limit``), handed back at once.

    The emulator has no backlog metric, so this pulls without acknowledging and returns every
    message with an ack deadline of 0; only done while no stream pulls from the subscription.
    """
    subscriber = stack.subscriber()
    seen: set[str] = set()
    ack_ids: list[str] = []
    while len(seen) < limit:
        response = subscriber.pull(subscription=subscription,
                                   max_messages=min(100, limit - len(seen)),
                                   return_immediately=True, timeout=10)
        fresh = [m for m in response.received_messages if m.message.message_id not in seen]
        if not fresh:
            break
        seen.update(m.message.message_id for m in fresh)
        ack_ids += [m.ack_id for m in response.received_messages]
    if ack_ids:
        subscriber.modify_ack_deadline(subscription=subscription, ack_ids=ack_ids,
                                       ack_deadline_seconds=0)
    return len(seen)


def _rows(bigquery, sql: str, params: list | None = None) -> list[dict[str, Any]]:
    from google.api_core.exceptions import NotFound
    from google.cloud import bigquery as bq

    try:
        config = bq.QueryJobConfig(query_parameters=params or [])
        return [dict(r) for r in bigquery.query(sql, job_config=config).result()]
    except NotFound:  # no stream has written that table yet
        return []


def report(target: Target, hours: float = 1.0, subscription: str | None = None,
           registry: Any = None) -> dict[str, Any]:
    """The status as a dict: stack health, stream, backlog, last tile, recent dead letters.

    On the local stack also whether the stream runs and the subscription's backlog; on GCP
    those are Dataflow's and Cloud Monitoring's to tell (docs/operations.md).
    """
    from google.cloud import bigquery as bq

    dataset = target.need_dataset()
    result: dict[str, Any] = {}
    stack = target.stack
    if stack is not None:
        subscription = subscription or stack.subscription_path
        if "/" not in subscription:
            subscription = f"projects/{stack.project}/subscriptions/{subscription}"
        health = local_stack.status(stack)
        pid = stream_pid(stack)
        result.update({"stack": health, "stream_running": pid is not None, "stream_pid": pid})
        if not all(health.values()):
            return result
        result["backlog"] = ("pulled by the running stream" if pid is not None
                             else peek_backlog(stack, subscription))
    client = target.bigquery()
    last = _rows(client, f"SELECT tile_id, tile_generation, completed_at, complete, "
                         f"chips_scored, raster_uri, stac_uri FROM `{dataset}.tiles` "
                         "ORDER BY completed_at DESC LIMIT 1")
    if last:
        row = last[0]
        row["completed_at"] = row["completed_at"].isoformat()
        result["last_tile"] = row
    else:
        result["last_tile"] = None
    since = dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours)
    letters = _rows(client, f"SELECT stage, COUNT(*) AS n FROM `{dataset}.dead_letters` "
                            "WHERE time >= @since GROUP BY stage",
                    [bq.ScalarQueryParameter("since", "TIMESTAMP", since)])
    result[f"dead_letters_last_{hours:g}h"] = {r["stage"]: r["n"] for r in letters}
    writing = _rows(client, (
        "SELECT IFNULL(release, '(unrecorded)') AS release, IFNULL(role, 'live') AS role, "
        "model_name, model_version, COUNT(DISTINCT row_id) AS tiles, "
        f"MAX(completed_at) AS last FROM `{dataset}.tiles` WHERE completed_at >= @since "
        "GROUP BY release, role, model_name, model_version ORDER BY release, role"),
        [bq.ScalarQueryParameter("since", "TIMESTAMP", since)])
    # What each job writes (shadow included) is not what consumers read: the tiles answered are
    # counted by the one definition (sql/answered.sql).
    result[f"writing_last_{hours:g}h"] = [
        {**r, "model": f"{r.pop('model_name')}/{r.pop('model_version')}",
         "last": r["last"].isoformat()} for r in writing]
    answered = _rows(client, compose(
        "WITH {answered since TIMESTAMP_SUB(@since, INTERVAL 2 DAY)} SELECT COUNT(*) AS tiles "
        "FROM tile_answers WHERE completed_at >= @since", dataset),
        [bq.ScalarQueryParameter("since", "TIMESTAMP", since)])
    result[f"tiles_answered_last_{hours:g}h"] = answered[0]["tiles"] if answered else 0
    if registry is not None:
        channels, _ = registry.read_channels()
        state = channels.state()
        result["channels"] = {"models": {k: state[k] for k in ("live", "candidate", "mode",
                                                               "canary_fraction")},
                              "releases": state.get("releases")}
    return result
