"""Running the real stream in a child process against the test stack, and reading its outputs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from google.api_core.exceptions import NotFound


def query(stack, sql: str) -> list[dict]:
    """Rows of ``sql`` on the stack's BigQuery; none while the table does not exist yet."""
    try:
        return [dict(r) for r in stack.bigquery().query(sql).result()]
    except NotFound:
        return []


def fresh_input(stack, name: str) -> tuple[str, str, str]:
    """A topic, a subscription on it (10 s ack deadline, like the stack's) and a dataset."""
    suffix = uuid.uuid4().hex[:6]
    topic = f"projects/{stack.project}/topics/{name}-{suffix}"
    subscription = f"projects/{stack.project}/subscriptions/{name}-{suffix}"
    stack.publisher().create_topic(name=topic)
    stack.subscriber().create_subscription(
        request={"name": subscription, "topic": topic, "ack_deadline_seconds": 10})
    dataset = f"{name.replace('-', '_')}_{suffix}"
    stack.bigquery().create_dataset(dataset)
    return topic, subscription, dataset


def start_stream(stack, model_uri: str, log: Path, *args: str) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "run", "--local",
             f"--stack_dir={stack.run_dir}", f"--model_uri={model_uri}", *args],
            stdout=out, stderr=subprocess.STDOUT)


def stop_stream(child: subprocess.Popen) -> int:
    if child.poll() is None:
        child.send_signal(signal.SIGTERM)
    return child.wait(timeout=60)


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set size so far (VmHWM), 0 once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def wait_until(condition, timeout_s: float, child: subprocess.Popen | None = None,
               every_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        if child is not None and child.poll() is not None:
            return False
        time.sleep(every_s)
    return condition()
