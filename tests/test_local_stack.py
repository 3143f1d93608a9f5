"""The local stack: real emulators behind the real client libraries, and Beam against them."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import numpy as np
import pytest
import rasterio
from google.cloud import bigquery
from rasterio.transform import from_origin

from pipeline.local import gcs_emulator, smoke
from pipeline.local import stack as local_stack

pytestmark = pytest.mark.stack


def test_pubsub_publish_then_pull_keeps_data_and_attributes(stack):
    name = f"t-{uuid.uuid4().hex[:6]}"
    topic = f"projects/{stack.project}/topics/{name}"
    sub = f"projects/{stack.project}/subscriptions/{name}"
    stack.publisher().create_topic(name=topic)
    subscriber = stack.subscriber()
    subscriber.create_subscription(name=sub, topic=topic)
    stack.publisher().publish(topic, b"payload", eventType="OBJECT_FINALIZE",
                              objectId="a/b.tif").result(timeout=30)
    response = subscriber.pull(subscription=sub, max_messages=5, timeout=30)
    [received] = response.received_messages
    assert received.message.data == b"payload"
    assert dict(received.message.attributes) == {"eventType": "OBJECT_FINALIZE",
                                                 "objectId": "a/b.tif"}


def test_stack_created_the_streams_resources(stack):
    topics = {t.name for t in stack.publisher().list_topics(project=f"projects/{stack.project}")}
    assert {stack.topic_path, stack.dead_letter_topic_path, stack.results_topic_path} <= topics
    sub = stack.subscriber().get_subscription(subscription=stack.subscription_path)
    assert sub.topic == stack.topic_path
    assert stack.storage().lookup_bucket(stack.bucket) is not None
    assert stack.bigquery().get_dataset(stack.dataset).dataset_id == stack.dataset


def test_bigquery_create_insert_and_query_with_geography(stack):
    client = stack.bigquery()
    table = bigquery.Table(
        f"{stack.project}.{stack.dataset}.places_{uuid.uuid4().hex[:6]}",
        schema=[bigquery.SchemaField("name", "STRING"),
                bigquery.SchemaField("area", "GEOGRAPHY"),
                bigquery.SchemaField("seen", "TIMESTAMP"),
                bigquery.SchemaField("tags", "STRING", mode="REPEATED")])
    client.create_table(table)
    errors = client.insert_rows_json(table, [
        {"name": "olinda", "area": "POLYGON((-34.9 -8.05, -34.8 -8.05, -34.8 -7.95, "
                                   "-34.9 -7.95, -34.9 -8.05))",
         "seen": "2026-11-26T10:00:00Z", "tags": ["coast", "urban"]},
        {"name": "recife", "area": "POINT(-34.88 -8.06)", "seen": "2026-11-26T11:00:00Z",
         "tags": []},
    ])
    assert errors == []
    rows = list(client.query(
        f"SELECT name, ST_INTERSECTS(area, ST_GEOGPOINT(-34.85, -8.0)) AS hit, "
        f"ST_AREA(area) / 1e6 AS km2, ARRAY_LENGTH(tags) AS n_tags "
        f"FROM `{table.project}.{table.dataset_id}.{table.table_id}` ORDER BY name").result())
    assert [(r.name, r.hit, r.n_tags) for r in rows] == [("olinda", True, 2), ("recife", False, 0)]
    # 0.1° x 0.1° at 8° S is about 11.0 km x 11.1 km.
    assert rows[0].km2 == pytest.approx(121.7, rel=0.02)


def test_gcs_through_beam_filesystems_and_rasterio(adapted, tmp_path):
    from apache_beam.io.filesystems import FileSystems

    path = tmp_path / "tiny.tif"
    data = np.arange(2 * 16 * 24, dtype=np.uint8).reshape(2, 16, 24)
    with rasterio.open(path, "w", driver="GTiff", width=24, height=16, count=2, dtype="uint8",
                       crs="EPSG:32725", transform=from_origin(290000, 9120000, 30, 30)) as d:
        d.write(data)
    uri = f"gs://{adapted.bucket}/tests/{uuid.uuid4().hex[:6]}/tiny.tif"
    with FileSystems.create(uri) as out:
        out.write(path.read_bytes())
    assert FileSystems.exists(uri)
    [match] = FileSystems.match([uri])[0].metadata_list
    assert match.size_in_bytes == path.stat().st_size
    with rasterio.open(uri) as src:  # GDAL /vsigs/ against the emulator
        assert src.crs.to_epsg() == 32725
        assert np.array_equal(src.read(2, window=((3, 5), (4, 9))), data[1, 3:5, 4:9])


def test_smoke_stream_writes_bigquery_rows_and_a_gcs_file(stack):
    result = smoke.run_smoke(stack, messages=3)
    assert result["exit_code"] == 0, "the stream process did not stop cleanly"
    rows = result["rows"]
    assert sorted(r["message_id"] for r in rows) == sorted(result["published"])
    assert [r["lon"] for r in rows] == [-35.0, -34.0, -33.0]
    assert all(r["tags"] == ["smoke", "local"] for r in rows)
    assert all(r["published"].tzinfo is not None for r in rows)
    lines = [json.loads(line) for line in result["file_lines"]]
    assert sorted(line["text"] for line in lines) == ["message 0", "message 1", "message 2"]


def _tilestream(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.ops.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_two_stacks_run_side_by_side_and_down_leaves_no_process(tmp_path):
    first = local_stack.up(tmp_path / "one")
    try:
        # The second through the CLI, as a user would.
        up = _tilestream("local", "up", "--stack_dir", str(tmp_path / "two"))
        assert up.returncode == 0, up.stderr
        second = local_stack.load(tmp_path / "two")
        ports = {first.pubsub_port, first.bigquery_port, first.gcs_port}
        assert ports.isdisjoint({second.pubsub_port, second.bigquery_port, second.gcs_port})
        first.bigquery().create_dataset("only_in_first")
        assert "only_in_first" not in {d.dataset_id for d in second.bigquery().list_datasets()}
        status = _tilestream("local", "status", "--stack_dir", str(tmp_path / "two"))
        assert json.loads(status.stdout)["services"] == dict.fromkeys(
            ("pubsub", "bigquery", "gcs", "pubsub-proxy", "bigquery-proxy", "gcs-proxy"), True)
        env = _tilestream("local", "env", "--stack_dir", str(tmp_path / "two")).stdout
        assert f"export PUBSUB_EMULATOR_HOST={second.pubsub_host}" in env
        assert local_stack.up(tmp_path / "one").pubsub_port == first.pubsub_port  # idempotent
        down = _tilestream("local", "down", "--stack_dir", str(tmp_path / "two"))
        assert down.returncode == 0, down.stderr
        assert all(not local_stack.group_members(pid) for pid in second.pids.values())
        assert all(local_stack.group_members(pid) for pid in first.pids.values())
    finally:
        local_stack.down(tmp_path / "one")
    assert all(not local_stack.group_members(pid) for pid in first.pids.values())


def test_a_fresh_stack_forgets_the_journal_of_an_earlier_one(tmp_path):
    """New emulators mean a new Pub/Sub: an old journal must not be replayed into them (the
    demo reuses its run directory, and scored its tile twice before this)."""
    stale = tmp_path / "journal" / "old.jsonl"
    stale.parent.mkdir(parents=True)
    stale.write_text('{"id": "1", "data": "", "attributes": {}}\n')
    local_stack.up(tmp_path)
    try:
        assert not stale.exists()
    finally:
        local_stack.down(tmp_path)


def test_a_port_that_answers_in_another_protocol_is_not_ready_and_ports_are_distinct():
    """CI once gave the Pub/Sub emulator and the BigQuery emulator's gRPC server one port: the
    readiness probe read gRPC's answer and crashed the stack's start instead of waiting."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def answer_like_grpc():
        conn, _ = server.accept()
        with conn:
            conn.recv(1024)
            conn.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00Unexpected HTTP/1.x request")

    threading.Thread(target=answer_like_grpc, daemon=True).start()
    try:
        assert local_stack._http_ok(f"http://127.0.0.1:{server.getsockname()[1]}/") is False
    finally:
        server.close()
    ports = local_stack._free_ports(64)
    assert len(set(ports)) == 64


def _row(schema: dict, **values) -> dict:
    """A row with every REQUIRED field of ``schema`` filled in, then ``values``."""
    filler = {"STRING": "x", "INT64": 0, "FLOAT64": 0.0, "BOOL": True, "GEOGRAPHY": "POINT(0 0)",
              "TIMESTAMP": "2026-01-01T00:00:00Z"}
    row = {f["name"]: filler[f["type"]] for f in schema["fields"]
           if f["mode"] == "REQUIRED" and f["type"] in filler}
    return {**row, **values}


def test_a_tile_row_whose_chip_rows_are_not_all_in_is_replayed_not_kept(stack):
    """Chip rows reach BigQuery in load jobs, so a stream can die after a tile row and before
    its chip rows: on restart that tile is scored again, its partial rows removed first."""
    import base64

    from pipeline.local import journal
    from tests.streams import fresh_input, query
    from transforms.announcements import FIRST_PUBLISHED, REPLAY_OF
    from transforms.sinks import CHIP_SCHEMA, SCHEMAS, TILE_SCHEMA, BigQueryTables

    _, subscription, dataset = fresh_input(stack, "journal")
    tables = BigQueryTables.in_dataset(f"{stack.project}:{dataset}")
    bq = stack.bigquery()
    for name, schema in SCHEMAS.items():  # as the stream creates them at start-up
        bq.create_table(bigquery.Table(f"{stack.project}.{dataset}.{name}", schema=[
            bigquery.SchemaField.from_api_repr(f) for f in schema["fields"]]))
    for tile, message in (("whole", "m-whole"), ("partial", "m-partial")):
        assert not bq.insert_rows_json(f"{stack.project}.{dataset}.tiles", [_row(
            TILE_SCHEMA, row_id=f"tile-{tile}", tile_id=tile, chips_scored=2, role="live",
            message_id=message, source_message_ids=[message])])
    assert not bq.insert_rows_json(f"{stack.project}.{dataset}.chips", [
        _row(CHIP_SCHEMA, row_id=f"{tile}-{i}", tile_id=tile, chip_index=i, role="live",
             message_id=f"m-{tile}", source_message_ids=[f"m-{tile}"])
        for tile, i in (("whole", 0), ("whole", 1), ("partial", 0))])
    path = journal.journal_path(stack, subscription, tables)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": m, "data": base64.b64encode(m.encode()).decode(),
                                        "attributes": {}}) + "\n"
                            for m in ("m-whole", "m-partial")))

    assert journal.replay_unfinished(stack, subscription, tables) == {"journalled": 2,
                                                                       "replayed": 1}
    assert [r["tile_id"] for r in query(stack, f"SELECT tile_id FROM `{dataset}.tiles`")] \
        == ["whole"]
    assert sorted(r["row_id"] for r in query(stack, f"SELECT row_id FROM `{dataset}.chips`")) \
        == ["whole-0", "whole-1"]
    [again] = stack.subscriber().pull(subscription=subscription, max_messages=5,
                                      timeout=30).received_messages
    assert again.message.data == b"m-partial"
    assert again.message.attributes[REPLAY_OF] == "m-partial"
    assert again.message.attributes[FIRST_PUBLISHED]  # latency from the first publish
    [booked] = query(stack, f"SELECT disposition, message_id, reason FROM `{dataset}.events`")
    assert (booked["disposition"], booked["message_id"]) == ("replayed", "m-partial")
    assert booked["reason"].startswith(f"replayed as {again.message.message_id}")


def test_the_local_stream_paces_its_chipper_and_dataflow_does_not(adapted, model_uri):
    """With --local the chipper waits for the model by default (memory follows a strip task,
    not the tile); an explicit 0 turns it off. The Dataflow side is in test_dataflow.py."""
    from pipeline import main
    from pipeline.local import launch
    from pipeline.options import TileStreamOptions

    def pacing(*extra: str) -> int:
        job = main.configure(["--local", f"--stack_dir={adapted.run_dir}",
                              f"--model_uri={model_uri}", *extra], local=launch)
        return job.options.view_as(TileStreamOptions).max_chips_in_flight

    assert pacing() == launch.LOCAL_CHIPS_IN_FLIGHT > 0
    assert pacing("--max_chips_in_flight=0") == 0
    # a backfill cannot pace (it runs stage by stage): an explicit limit is refused, not ignored
    with pytest.raises(main.ConfigError, match="cannot honour it"):
        pacing("--input_glob=/tmp/*.tif", "--max_chips_in_flight=100")
    assert pacing("--input_glob=/tmp/*.tif") == 0
    with pytest.raises(main.ConfigError, match="tilestream run --local"):
        main.configure(["--local", f"--stack_dir={adapted.run_dir}"])


def test_the_local_runner_fixes_keep_beams_answers_and_run_serial_work_in_order():
    """pipeline/local/patches.py: memoised specs equal Beam's own for the stream's stateful
    DoFns (and instance-bound methods are still inspected); a stateful step's queued bundles run
    oldest first, as they arrived, each as soon as the step is free (Beam's own queue runs the
    newest first, and behind whatever else was queued meanwhile)."""
    from apache_beam.runners.direct import executor
    from apache_beam.transforms import userstate

    from model.card import load_card
    from pipeline.local import patches as local_runner
    from pipeline.options import DEFAULT_MODEL_URI
    from transforms.assemble import _AssembleStripFn, _FinishTileFn
    from transforms.chips import ChipSettings, _MergeReportsFn
    from transforms.pacing import PacedChipStripFn

    beams = getattr(userstate.get_dofn_specs, "__wrapped__", userstate.get_dofn_specs)
    calls = []
    memo = local_runner.memoised(lambda dofn: calls.append(dofn) or beams(dofn))
    card = load_card(DEFAULT_MODEL_URI)
    dofns = [_AssembleStripFn(card, "/tmp/out", 60, True, False),
             _FinishTileFn(card, "/tmp/out", 60, True, False),
             PacedChipStripFn(ChipSettings.from_card(card)), _MergeReportsFn()]
    for dofn in dofns * 2:  # the second round from the memo
        assert memo(dofn) == beams(dofn) and memo(dofn)[0]
    assert len(calls) == len(dofns)
    bound = _MergeReportsFn()
    bound.process = bound.process  # a method bound on the instance: asked every time
    memo(bound), memo(bound)
    assert calls[-2:] == [bound, bound]

    def run_order(state_class) -> list[str]:
        """The order the runner's worker takes work in: another step's work is queued first,
        then three bundles of one serial step; each bundle completes as soon as it is taken."""
        service = type("Service", (), {})()
        service.queue, service.shutdown_requested = local_runner._WorkQueue(), False
        service.submit = service.queue.put
        state = state_class(service, set())
        service.submit("other step")
        for work in ("first", "second", "third"):
            state.schedule(work)
        taken = []
        while not service.queue.empty():
            taken.append(service.queue.get_nowait())
            if taken[-1] != "other step":
                state.complete(taken[-1])
        return taken

    class InOrder(executor._SerialEvaluationState):
        _update_currently_evaluating = local_runner.serial_in_order

    # Beam's own: newest first, and each next bundle waits behind everything queued meanwhile.
    assert run_order(executor._SerialEvaluationState) == ["other step", "first", "third",
                                                          "second"]
    # Ours: oldest first, each straight to the front once the step is free, so a serial step
    # (a strip waiting for its pieces) never falls a turn of the queue behind per bundle.
    assert run_order(InOrder) == ["first", "second", "third", "other step"]


# --- the GCS emulator's patches: the same tripwire as Beam's ----------------------------------

@pytest.mark.parametrize("patch", gcs_emulator.patches(), ids=lambda p: p.name)
def test_every_gcs_emulator_patch_still_fits_what_it_relies_on(patch):
    assert patch.problem() is None, patch.problem()


def test_the_gcs_emulator_patches_were_written_for_the_pinned_emulator():
    import runpy
    from pathlib import Path
    from unittest import mock

    import setuptools

    declared: dict = {}
    with mock.patch.object(setuptools, "setup", lambda **kwargs: declared.update(kwargs)):
        runpy.run_path(str(Path(__file__).resolve().parents[1] / "setup.py"))
    assert f"{gcs_emulator.EMULATOR}=={gcs_emulator.WRITTEN_FOR}" in \
        declared["extras_require"]["local"]


def test_an_emulator_upgrade_stops_the_emulator_before_anything_is_wrapped(monkeypatch):
    """Another emulator version: the wrapper refuses to start, naming what to re-read, and
    leaves the emulator's routes as they were."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    from transforms.process import PatchError

    routes = [dict(handlers) for _regex, handlers in server.HANDLERS]
    monkeypatch.setattr(gcs_emulator, "WRITTEN_FOR", "2025.1.1")
    with pytest.raises(PatchError, match=r"written for gcp-storage-emulator 2025\.1\.1, this is "
                                         r"2026\.7\.19: re-read gcp_storage_emulator"):
        gcs_emulator.install()
    assert [dict(handlers) for _regex, handlers in server.HANDLERS] == routes
    assert objects.get.__module__ == "gcp_storage_emulator.handlers.objects"
