"""Local mode only: recording proxies in front of the emulators, and faults on cue.

GCP decides every API call by who makes it; the emulators accept anything. So the local stack
puts a proxy in front of each emulator (GCS and BigQuery over HTTP, Pub/Sub over gRPC) that
passes every request through unchanged and appends one JSON line per call to
``<run_dir>/audit/<service>.jsonl``: the identity the caller names
(``Authorization: Bearer local.<identity>``, ``pipeline/local/patches.py``), the method, the
resource, the status, and for a BigQuery job what it loads or queries. ``pipeline/ops/iam.py``
maps those calls to IAM permissions and evaluates them against the Terraform's grants.

The same proxies inject faults a test asks for in ``<run_dir>/audit/faults.json``: after a call
that matches a rule has completed (its side effect done), the process named by the rule's PID
file is killed with SIGKILL, as a preempted worker would be. Nothing here runs on Dataflow.

``python -m pipeline.local.audit http|grpc --listen PORT --upstream PORT --service NAME
--run_dir DIR`` (the stack starts them).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import http.server
import json
import os
import re
import signal
import socketserver
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

AUDIT_DIR = "audit"
FAULTS_FILE = "faults.json"
TOKEN = "Bearer local."
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailers", "transfer-encoding", "upgrade", "content-length"}
KEPT_QUERY = ("name", "generation", "uploadType", "ifGenerationMatch", "prefix", "alt",
              "upload_id")


def audit_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / AUDIT_DIR


def read_calls(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every recorded call of a stack, in time order."""
    calls = []
    for path in sorted(audit_dir(run_dir).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                calls.append(json.loads(line))
    return sorted(calls, key=lambda c: c["t"])


def identity_of(authorization: str | None) -> str:
    if authorization and authorization.startswith(TOKEN):
        return authorization[len(TOKEN):].strip() or "anonymous"
    return "anonymous"


class Recorder:
    """Appends calls to one JSON-lines file and applies the fault rules after each call."""

    def __init__(self, run_dir: str, service: str):
        self.dir = audit_dir(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"{service}.jsonl"
        self.service = service
        self._lock = threading.Lock()

    def record(self, call: dict[str, Any]) -> None:
        line = json.dumps({"t": time.time(), "service": self.service, **call},
                          sort_keys=True) + "\n"
        with self._lock, open(self.path, "a") as out:
            out.write(line)
        self._faults(call)

    def _faults(self, call: dict[str, Any]) -> None:
        """Kill a process after a matching call: {"rules": [{"service", "method", "path"
        (regex, searched in the call's path, resource, object written, BigQuery job and query:
        a resumable upload's object is named in its upload_id), "identity", "pid_file",
        "times"}]}."""
        path = self.dir / FAULTS_FILE
        if not path.exists():
            return
        with self._lock:
            try:
                rules = json.loads(path.read_text())
            except (OSError, ValueError):
                return
            fired = False
            for rule in rules.get("rules", []):
                if rule.get("times", 1) <= 0 or rule.get("service") != self.service:
                    continue
                if rule.get("method") and rule["method"] != call.get("method"):
                    continue
                if rule.get("identity") and rule["identity"] != call.get("identity"):
                    continue
                subject = " ".join(str(call.get(k, "")) for k in ("path", "resource",
                                                                   "object", "job", "query"))
                if not re.search(rule.get("path", ""), subject) or call.get("status", 0) >= 400:
                    continue
                rule["times"] = rule.get("times", 1) - 1
                rule["fired"] = rule.get("fired", 0) + 1
                fired = True
                with contextlib.suppress(OSError, ValueError):
                    pid = int(Path(rule["pid_file"]).read_text().split()[0])
                    os.kill(pid, signal.SIGKILL)
            if fired:
                path.write_text(json.dumps(rules, indent=1))


# --- HTTP: GCS and BigQuery -------------------------------------------------------------------

def _upload_name(query: dict[str, list[str]], body: bytes) -> str | None:
    """The object an upload writes: ``name=`` in the query, else the JSON part of a multipart
    (or resumable-start) body."""
    if "name" in query:
        return query["name"][0]
    found = re.search(rb'"name"\s*:\s*"((?:[^"\\]|\\.)*)"', body[:65536])
    return json.loads(b'"' + found.group(1) + b'"') if found else None


def _batch_requests(body: bytes) -> list[tuple[str, str]]:
    """(method, path) of each request inside a JSON API batch (Beam deletes in batches)."""
    found = re.findall(rb"^(GET|POST|PUT|PATCH|DELETE) (\S+)(?: HTTP/[\d.]+)?\r?$", body, re.M)
    return [(m.decode(), unquote(urlsplit(p.decode()).path)) for m, p in found]


def _bigquery_job(path: str, body: bytes) -> dict[str, Any] | None:
    """What a BigQuery job insert (or jobs.query) loads or queries, from its body."""
    if not re.search(r"/projects/[^/]+/(jobs|queries)$", path) or not body:
        return None
    try:
        request = json.loads(body)
    except ValueError:
        return None
    if path.endswith("/queries"):
        return {"type": "query", "sql": str(request.get("query", ""))[:4000]}
    config = request.get("configuration") or {}
    if "load" in config:
        table = config["load"].get("destinationTable") or {}
        return {"type": "load", "table": ".".join(table.get(k, "") for k in
                                                  ("projectId", "datasetId", "tableId")),
                "sources": config["load"].get("sourceUris", [])[:20],
                "create": config["load"].get("createDisposition", "")}
    if "query" in config:
        return {"type": "query", "sql": str(config["query"].get("query", ""))[:4000]}
    return {"type": next(iter(config), "unknown")}


class _HttpProxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    upstream: tuple[str, int] = ("127.0.0.1", 0)
    recorder: Recorder

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _connection(self) -> http.client.HTTPConnection:
        local = threading.current_thread().__dict__
        if "upstream" not in local:
            local["upstream"] = http.client.HTTPConnection(*self.upstream, timeout=300)
        return local["upstream"]

    def _forward(self) -> None:
        body = self._body()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body or self.command in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        for attempt in range(2):  # a kept-alive upstream connection may have been closed
            connection = self._connection()
            try:
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                break
            except (http.client.HTTPException, OSError):
                connection.close()
                threading.current_thread().__dict__.pop("upstream", None)
                if attempt:
                    raise
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        self.wfile.flush()
        split = urlsplit(self.path)
        query = parse_qs(split.query)
        call: dict[str, Any] = {
            "identity": identity_of(self.headers.get("Authorization")),
            "method": self.command, "path": split.path, "status": response.status,
            "query": {k: v[0] for k, v in query.items() if k in KEPT_QUERY},
        }
        if self.recorder.service == "storage" and split.path.startswith("/batch/"):
            for method, path in _batch_requests(body):  # each sub-request is its own call
                self.recorder.record({**call, "method": method, "path": urlsplit(path).path,
                                      "query": {}, "batch": True})
            return
        if self.recorder.service == "storage" and self.command in ("POST", "PUT") \
                and "upload_id" not in query:  # a resumable upload's chunks: counted at start
            name = _upload_name(query, body)
            if name:
                call["object"] = name
        if self.recorder.service == "bigquery" and self.command == "POST":
            job = _bigquery_job(split.path, body)
            if job:
                call["job"] = job
        self.recorder.record(call)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

    def log_message(self, *args):
        pass


class _ThreadingServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve_http(listen: int, upstream: int, service: str, run_dir: str) -> None:
    handler = type("Proxy", (_HttpProxy,), {"upstream": ("127.0.0.1", upstream),
                                            "recorder": Recorder(run_dir, service)})
    _ThreadingServer(("127.0.0.1", listen), handler).serve_forever()


# --- gRPC: Pub/Sub ------------------------------------------------------------------------------

# method -> (request type in google.pubsub_v1.types, the field naming the resource)
PUBSUB_RESOURCES = {
    "Publish": ("PublishRequest", "topic"), "GetTopic": ("GetTopicRequest", "topic"),
    "CreateTopic": ("Topic", "name"), "DeleteTopic": ("DeleteTopicRequest", "topic"),
    "Pull": ("PullRequest", "subscription"), "StreamingPull": ("StreamingPullRequest",
                                                               "subscription"),
    "Acknowledge": ("AcknowledgeRequest", "subscription"),
    "ModifyAckDeadline": ("ModifyAckDeadlineRequest", "subscription"),
    "GetSubscription": ("GetSubscriptionRequest", "subscription"),
    "CreateSubscription": ("Subscription", "name"),
    "DeleteSubscription": ("DeleteSubscriptionRequest", "subscription"),
    "ListTopicSubscriptions": ("ListTopicSubscriptionsRequest", "topic"),
    "Seek": ("SeekRequest", "subscription"),
    "CreateSnapshot": ("CreateSnapshotRequest", "name"),
    "DeleteSnapshot": ("DeleteSnapshotRequest", "snapshot"),
}


def _pubsub_resource(method: str, request: bytes) -> dict[str, str]:
    from google.pubsub_v1 import types

    short = method.rsplit("/", 1)[-1]
    kind = PUBSUB_RESOURCES.get(short)
    if kind is None:
        return {}
    try:
        message = getattr(types, kind[0]).deserialize(request)
    except Exception:  # a request the proxy cannot read is still passed through
        return {}
    found = {"resource": str(getattr(message, kind[1], ""))}
    if short == "CreateSubscription":
        found["topic"] = str(message.topic)
    if short == "CreateSnapshot":  # of a subscription: its backlog
        found["subscription"] = str(message.subscription)
    if short == "Seek" and message.snapshot:
        found["snapshot"] = str(message.snapshot)
    return found


def serve_grpc(listen: int, upstream: int, run_dir: str) -> None:
    from concurrent import futures

    import grpc

    recorder = Recorder(run_dir, "pubsub")
    channel = grpc.insecure_channel(f"127.0.0.1:{upstream}", options=[
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20)])

    def record(method: str, request: bytes, context, status) -> None:
        metadata = dict(context.invocation_metadata())
        recorder.record({"identity": identity_of(metadata.get("authorization")),
                         "method": method.rsplit("/", 1)[-1], "path": method,
                         "status": status, **_pubsub_resource(method, request)})

    class Passthrough(grpc.GenericRpcHandler):
        def service(self, details):
            method = details.method
            if method.endswith("/StreamingPull"):
                def stream(requests, context):
                    first: list[bytes] = []

                    def remember():
                        for request in requests:
                            if not first:
                                first.append(request)
                                record(method, request, context, 200)
                            yield request

                    call = channel.stream_stream(method)(
                        remember(), metadata=context.invocation_metadata())
                    yield from call

                return grpc.stream_stream_rpc_method_handler(stream)

            def unary(request, context):
                try:
                    response = channel.unary_unary(method)(
                        request, metadata=context.invocation_metadata(),
                        timeout=context.time_remaining())
                except grpc.RpcError as exc:
                    record(method, request, context, 500 if exc.code() != grpc.StatusCode.
                           NOT_FOUND else 404)
                    context.abort(exc.code(), exc.details() or "")
                record(method, request, context, 200)
                return response

            return grpc.unary_unary_rpc_method_handler(unary)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32), handlers=[Passthrough()],
                         options=[("grpc.max_receive_message_length", 64 << 20),
                                  ("grpc.max_send_message_length", 64 << 20)])
    server.add_insecure_port(f"127.0.0.1:{listen}")
    server.start()
    server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.local.audit")
    parser.add_argument("protocol", choices=("http", "grpc"))
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--upstream", type=int, required=True)
    parser.add_argument("--service", default="pubsub")
    parser.add_argument("--run_dir", required=True)
    args = parser.parse_args(argv)
    if args.protocol == "http":
        serve_http(args.listen, args.upstream, args.service, args.run_dir)
    else:
        serve_grpc(args.listen, args.upstream, args.run_dir)


if __name__ == "__main__":
    main()
