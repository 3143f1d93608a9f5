"""A minimal stream that proves the local stack is wired right, end to end through Beam.

ReadFromPubSub (with attributes) -> one trivial transform -> WriteToBigQuery (streaming inserts
into a table with GEOGRAPHY, TIMESTAMP and REPEATED columns) and JSON lines on gs://. It runs in
a child process, as a real stream would, and is stopped with SIGTERM.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.transforms.window import FixedWindows

from pipeline.local import patches
from pipeline.local import stack as local_stack
from pipeline.main import exit_now, supervise
from transforms.sinks import bq_timestamp

SMOKE_SCHEMA = {
    "fields": [
        {"name": "message_id", "type": "STRING", "mode": "REQUIRED"},
        {"name": "location", "type": "GEOGRAPHY", "mode": "REQUIRED"},
        {"name": "published", "type": "TIMESTAMP", "mode": "REQUIRED"},
        {"name": "tags", "type": "STRING", "mode": "REPEATED"},
        {"name": "text", "type": "STRING", "mode": "NULLABLE"},
    ]
}


def to_row(message) -> dict:
    """The trivial transform: attributes ``lon``, ``lat`` and ``tags`` become columns."""
    attrs = message.attributes
    return {
        "message_id": message.message_id,
        "location": f"POINT({float(attrs['lon'])} {float(attrs['lat'])})",
        "published": bq_timestamp(message.publish_time.timestamp()),
        "tags": [t for t in attrs.get("tags", "").split(",") if t],
        "text": message.data.decode(),
    }


def build(p: beam.Pipeline, subscription: str, table: str, out_prefix: str) -> None:
    rows = (p
            | "Read" >> beam.io.ReadFromPubSub(subscription=subscription, with_attributes=True)
            | "ToRow" >> beam.Map(to_row))
    rows | "ToBigQuery" >> beam.io.WriteToBigQuery(
        table, schema=SMOKE_SCHEMA, method=beam.io.WriteToBigQuery.Method.STREAMING_INSERTS,
        create_disposition=beam.io.BigQueryDisposition.CREATE_IF_NEEDED,
        write_disposition=beam.io.BigQueryDisposition.WRITE_APPEND)
    (rows
     | "ToJson" >> beam.Map(json.dumps, sort_keys=True)
     | "Windows" >> beam.WindowInto(FixedWindows(2))
     | "ToGcs" >> fileio.WriteToFiles(out_prefix, shards=1,
                                      file_naming=fileio.default_file_naming("smoke", ".jsonl")))


def stream_main(argv: list[str]) -> int:
    """Child entry: ``python -m pipeline.local.smoke STACK_DIR SUBSCRIPTION TABLE PREFIX``."""
    stack_dir, subscription, table, out_prefix = argv
    stack = local_stack.load(stack_dir)
    patches.apply(stack)
    options = PipelineOptions(["--runner=BundleBasedDirectRunner", "--streaming",
                               f"--project={stack.project}"])
    p = beam.Pipeline(options=options)
    build(p, subscription, table, out_prefix)
    return supervise(p.run(), None)


def run_smoke(stack: local_stack.LocalStack, messages: int = 3,
              timeout_s: float = 120.0) -> dict:
    """Publish, run the smoke stream in a child process until its outputs exist, stop it."""
    name = f"smoke_{uuid.uuid4().hex[:8]}"
    topic = f"projects/{stack.project}/topics/{name}"
    subscription = f"projects/{stack.project}/subscriptions/{name}"
    stack.publisher().create_topic(name=topic)
    stack.subscriber().create_subscription(name=subscription, topic=topic)
    table = f"{stack.project}:{stack.dataset}.{name}"
    prefix = f"gs://{stack.bucket}/smoke/{name}"
    publisher = stack.publisher()
    ids = [
        publisher.publish(topic, f"message {i}".encode(), lon=str(-35.0 + i), lat="-8.0",
                          tags="smoke,local").result(timeout=30)
        for i in range(messages)
    ]
    child = subprocess.Popen([sys.executable, "-m", "pipeline.local.smoke", stack.run_dir,
                              subscription, table, prefix])
    bq, gcs = stack.bigquery(), stack.storage()
    deadline = time.monotonic() + timeout_s
    rows: list[dict] = []
    files: list[str] = []
    try:
        while time.monotonic() < deadline and child.poll() is None:
            time.sleep(1.0)
            files = [b.name for b in gcs.list_blobs(stack.bucket, prefix=f"smoke/{name}/")
                     if b.name.endswith(".jsonl")]
            if not files:
                continue
            try:
                rows = [dict(r) for r in bq.query(
                    f"SELECT message_id, ST_X(location) AS lon, ST_ASTEXT(location) AS wkt, "
                    f"published, tags FROM `{stack.dataset}.{name}` ORDER BY lon").result()]
            except Exception:  # the table appears with the first insert
                continue
            if len(rows) >= messages:
                break
    finally:
        if child.poll() is None:
            child.terminate()
        exit_code = child.wait(timeout=60)
    lines = [line for f in files
             for line in gcs.bucket(stack.bucket).blob(f).download_as_text().splitlines()]
    return {"published": ids, "rows": rows, "files": files, "file_lines": lines,
            "exit_code": exit_code, "table": table}


if __name__ == "__main__":
    exit_now(stream_main(sys.argv[1:]))
