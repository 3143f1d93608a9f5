"""Running the real stream in a child process against the test stack, and reading its outputs."""

from __future__ import annotations

import contextlib
import http.server
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from google.api_core.exceptions import NotFound


def query(stack, sql: str) -> list[dict]:
    """Rows of ``sql`` on the stack's BigQuery; none while the table does not exist yet."""
    try:
        return [dict(r) for r in stack.bigquery().query(sql).result()]
    except NotFound:
        return []


def empty_dataset(stack, prefix: str) -> str:
    """A new dataset ``<prefix>_<random>`` with every table of the stream, empty, as a stream
    creates them at launch: for tests that write rows of every kind by hand."""
    from google.cloud import bigquery

    from transforms.sinks import SCHEMAS

    bq, name = stack.bigquery(), f"{prefix}_{uuid.uuid4().hex[:8]}"
    bq.create_dataset(name)
    for table, schema in SCHEMAS.items():
        fields = [bigquery.SchemaField.from_api_repr(f) for f in schema["fields"]]
        bq.create_table(bigquery.Table(f"{stack.project}.{name}.{table}", schema=fields))
    return name


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
            [sys.executable, "-m", "pipeline.ops.cli", "run", "--local",
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


class TilePublisher:
    """Uploads a copy of one tile under a new name and announces it, every ``every_s`` seconds,
    from a thread, until stopped: traffic that keeps flowing while a test changes the stream.
    ``sent`` maps each tile id to its message id, in publish order."""

    def __init__(self, stack, topic: str, tile: Path, prefix: str, every_s: float = 1.5):
        import threading

        self.stack, self.topic, self.tile, self.prefix = stack, topic, tile, prefix
        self.every_s = every_s
        self.sent: dict[str, str] = {}
        self.published_at: dict[str, float] = {}
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tile-publisher", daemon=True)

    def _run(self) -> None:
        from pipeline.ops import announce

        store, publisher = self.stack.storage(), self.stack.publisher()
        i = 0
        while not self._stop.is_set():
            tile_id = f"{self.prefix}-{i:03d}"
            name = f"incoming/{self.prefix}/{tile_id}.tif"
            try:
                generation = announce.upload(store, str(self.tile), self.stack.bucket, name)[1]
                data, attributes = announce.gcs_notification(self.stack.bucket, name, generation)
                self.sent[tile_id] = announce.publish(publisher, self.topic, data, attributes)
                self.published_at[tile_id] = time.time()
            except Exception as exc:  # surfaced by stop()
                self.errors.append(exc)
            i += 1
            self._stop.wait(self.every_s)

    def __enter__(self) -> TilePublisher:
        self._thread.start()
        return self

    def stop(self) -> dict[str, str]:
        self._stop.set()
        self._thread.join(timeout=60)
        if self.errors:
            raise self.errors[0]
        return self.sent

    def __exit__(self, *exc) -> None:
        self.stop()

    def since(self, t: float) -> list[str]:
        """Tiles published after ``t`` (epoch seconds)."""
        return [tile for tile, at in self.published_at.items() if at > t]


def cli(stack, *argv: str, timeout_s: float = 180) -> subprocess.CompletedProcess:
    """``tilestream ARGV --local`` on the test stack, as an operator types it."""
    return subprocess.run([sys.executable, "-m", "pipeline.ops.cli", *argv, "--local",
                           f"--stack_dir={stack.run_dir}"], capture_output=True, text=True,
                          timeout=timeout_s)


@contextlib.contextmanager
def map_server(stack, dataset: str, output_prefix: str, log: Path, *args: str):
    """``tilestream map --local`` on a free port, as an operator starts it; yields its base URL
    once it answers (the server's own identity, ``map``, makes its calls)."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "ab") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "pipeline.ops.cli", "map", "--local",
             f"--stack_dir={stack.run_dir}", f"--bq_dataset={stack.project}:{dataset}",
             f"--output_prefix={output_prefix}", f"--port={port}", *args],
            stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/"

    def answers() -> bool:
        try:
            with urllib.request.urlopen(base + "api/legend", timeout=5) as answer:
                return answer.status == 200
        except OSError:
            return False

    try:
        assert wait_until(answers, 90, server, every_s=0.5), \
            log.read_text(errors="replace")[-3000:]
        yield base
    finally:
        server.terminate()
        server.wait(timeout=30)


class FlakyGcs(http.server.BaseHTTPRequestHandler):
    """A proxy in front of the GCS emulator that answers 503 to the first ``fail`` requests
    (``seen`` counts them all): storage faults for the retry and breaker tests."""

    upstream = ""
    fail = 0
    seen = 0

    def _answer(self):
        cls = type(self)
        cls.seen += 1
        if cls.seen <= cls.fail:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        request = urllib.request.Request(cls.upstream + self.path, method=self.command,
                                         headers={k: v for k, v in self.headers.items()
                                                  if k.lower() == "range"})
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                body, status, headers = reply.read(), reply.status, reply.headers
        except urllib.error.HTTPError as exc:
            body, status, headers = exc.read(), exc.code, exc.headers
        self.send_response(status)
        for key in ("Content-Type", "Content-Range", "Accept-Ranges", "ETag", "Last-Modified"):
            if headers.get(key):
                self.send_header(key, headers[key])
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = _answer

    def log_message(self, *args):
        pass
