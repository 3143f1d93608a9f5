"""``tilestream follow``: print the stream's result events as they arrive (docs/results.md).

It makes a subscription of its own on the results topic (with ``--filter``, a Pub/Sub filter on
the events' attributes), prints each event as one JSON line, and deletes the subscription when
it stops: a person watching the stream answer, not a consumer (a consumer keeps its own
subscription, so that nothing published while it is away is lost).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from typing import Any, TextIO


def follow(subscriber: Any, topic: str, *, filter_: str = "", max_events: int = 0,
           timeout_s: float = 0.0, out: TextIO = sys.stdout) -> int:
    """Print events of ``topic`` from now on; stop after ``max_events`` (0: never) or
    ``timeout_s`` seconds (0: never). Returns how many were printed."""
    from google.api_core.exceptions import DeadlineExceeded, NotFound

    project = topic.split("/")[1]
    name = f"projects/{project}/subscriptions/tilestream-follow-{uuid.uuid4().hex[:8]}"
    request = {"name": name, "topic": topic, "ack_deadline_seconds": 30,
               "expiration_policy": {"ttl": {"seconds": 86400}}}  # a forgotten one goes away
    if filter_:
        request["filter"] = filter_
    subscriber.create_subscription(request=request)
    printed, ends = 0, time.monotonic() + timeout_s if timeout_s else None
    try:
        while (not max_events or printed < max_events) and (
                ends is None or time.monotonic() < ends):
            try:
                got = subscriber.pull(request={"subscription": name, "max_messages": 50},
                                      timeout=5)
            except DeadlineExceeded:
                continue
            if not got.received_messages:
                continue
            for received in got.received_messages:
                try:
                    event = json.loads(received.message.data)
                except ValueError:
                    event = {"unreadable": received.message.data.decode("utf-8", "replace")}
                print(json.dumps({"attributes": dict(received.message.attributes), **event},
                                 sort_keys=True), file=out, flush=True)
                printed += 1
            subscriber.acknowledge(request={"subscription": name, "ack_ids": [
                r.ack_id for r in got.received_messages]})
    finally:
        try:
            subscriber.delete_subscription(request={"subscription": name})
        except NotFound:
            pass
    return printed
