"""Retries: every side effect survives being done twice (Dataflow retries bundles and Pub/Sub
redelivers), and a storage read is retried through transient faults behind one breaker per
process (``transforms/storage.py``).

Two ways of doing a side effect again are tested. Run twice in place (a retried bundle): each
writer of storage objects leaves the same object and the stitch of a tile whose pieces are gone
is a no-op. Killed right after it (a preempted worker): the stack's proxy kills the stream the
moment a chosen call has completed, the stream restarts and the journal publishes what was not
finished again; the end state must be the clean run's: the same answers from the shipped
queries, the same COG pixels and georeference, no orphan strip pieces, the same dead letters.
"""

from __future__ import annotations

import datetime as dt
import json
import socketserver
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from pipeline.local.audit import FAULTS_FILE, audit_dir
from pipeline.ops import announce, stats
from pipeline.ops.queries import run_query
from tests import tiles
from tests.streams import FlakyGcs, fresh_input, query, start_stream, stop_stream, wait_until
from transforms import process, storage

MIN_VALID = 0.05
# Side effects of the stream, as the calls that make them: (service, method, what the call is)
FAULTS = {
    "entry-row": ("bigquery", "POST", r"/tables/messages/insertAll"),
    # Objects are written by resumable uploads: the object exists once its last PUT is done.
    "strip-piece": ("storage", "PUT", r"\.strips/\d+\.tif"),
    "pieces-deleted": ("storage", "DELETE", r"\.strips/\d+\.tif"),
    "cog": ("storage", "PUT", r"predictions/(?:[^ /:]+/)*[^ /.:]+/\d+\.tif"),
    "stac-item": ("storage", "PUT", r"predictions/.+\.json"),
    "dead-letter-file": ("storage", "PUT", r"dead_letters/dt="),
    "tile-row": ("bigquery", "POST", r"/tables/tiles/insertAll"),
    "chip-rows-load": ("bigquery", "POST", r"'table': '[^']*\.chips'"),
}


def scenario(stack, workdir: Path, fault: str | None) -> dict:
    """The sample crop and a bad message through a stream; with ``fault``, the stream is killed
    right after that side effect and started again. Returns what a user can observe."""
    topic, subscription, dataset = fresh_input(stack, f"retry-{fault or 'clean'}")
    crop = tiles.crop(workdir / "crop.tif", 40, 30, 150, 140)
    name = f"incoming/retry/{dataset}/tile.tif"  # every run's tile is "tile"
    _, generation = announce.upload(stack.storage(), str(crop), stack.bucket, name)
    prefix = f"{stack.output_prefix}/{dataset}"
    args = (f"--subscription={subscription}", f"--bq_dataset={stack.project}:{dataset}",
            f"--output_prefix={prefix}", f"--min_valid_fraction={MIN_VALID}",
            "--window_secs=1", "--max_batch_size=8")
    faults = audit_dir(stack.run_dir) / FAULTS_FILE
    if fault:
        service, method, pattern = FAULTS[fault]
        faults.write_text(json.dumps({"rules": [{
            "service": service, "method": method, "path": pattern, "identity": "worker",
            "pid_file": str(Path(stack.run_dir) / "stream.pid"), "times": 1}]}))
    log = workdir / f"{dataset}.log"
    child = start_stream(stack, str(Path(__file__).resolve().parents[1] / "model" /
                                    "artifacts" / "landcover-student" / "v1"), log, *args)
    try:
        announce.publish(stack.publisher(), topic, *announce.gcs_notification(
            stack.bucket, name, generation))
        announce.publish(stack.publisher(), topic, b"\x00 not an announcement", {})

        def finished() -> bool:
            """Everything in is booked, the tile's chip rows are all in, its STAC Item and the
            dead-letter file are written, no piece is left."""
            rows = query(stack, f"SELECT chips_scored, (SELECT COUNT(DISTINCT row_id) FROM "
                                f"`{dataset}.chips`) AS chips FROM `{dataset}.tiles`")
            if not rows or any(r["chips"] < r["chips_scored"] for r in rows):
                return False
            if not query(stack, f"SELECT stage FROM `{dataset}.dead_letters`"):
                return False
            books = stats.books(stack.bigquery(), f"{stack.project}.{dataset}", 1)
            names = [b.name for b in stack.storage().list_blobs(
                stack.bucket, prefix=prefix[len(f"gs://{stack.bucket}/"):] + "/")]
            return books["messages"]["in"] >= 2 and books["messages"]["pending"] == 0 \
                and not any(".strips/" in n for n in names) \
                and any(n.endswith(".jsonl") for n in names) \
                and any(n.endswith(".json") for n in names)

        if fault:
            wait_until(lambda: child.poll() is not None or finished(), 120, every_s=0.2)
            killed = child.poll() is not None
            fired = json.loads(faults.read_text())["rules"][0].get("fired", 0)
            faults.unlink()
            assert killed and fired == 1, f"{fault}: the fault did not fire\n" + log.read_text(
                errors="replace")[-2000:]
            child = start_stream(stack, str(Path(__file__).resolve().parents[1] / "model" /
                                            "artifacts" / "landcover-student" / "v1"),
                                 log, *args)
        done = wait_until(finished, 180, child)
    finally:
        stop_stream(child)
        faults.unlink(missing_ok=True)
    assert done, log.read_text(errors="replace")[-3000:]
    full = f"{stack.project}.{dataset}"
    bq = stack.bigquery()
    answers = {
        "latest": sorted((r["chip_index"], r["dominant_class"]) for r in run_query(
            bq, "latest_prediction_per_chip", full, days=1, include_drifted=True)),
        "area": sorted((r["tile_id"], r["class_name"], round(r["area_km2"], 6)) for r in
                       run_query(bq, "class_area_per_tile_and_day", full,
                                 include_drifted=True)),
        "region": sorted(r["chip_index"] for r in run_query(
            bq, "chips_intersecting_region", full, region_wkt="POINT(-34.86 -8.0)",
            include_drifted=True)),
        "letters": sorted((r["stage"], r["letters"]) for r in run_query(
            bq, "dead_letters_by_stage", full, days=1)),
    }
    [raster] = {r["raster_uri"] for r in query(stack, f"SELECT raster_uri FROM `{dataset}.tiles`")}
    local = workdir / f"{dataset}.tif"
    bucket, _, blob = raster[len("gs://"):].partition("/")
    stack.storage().bucket(bucket).blob(blob).download_to_filename(str(local))
    with rasterio.open(local) as cog:
        pixels, georef = cog.read(), (cog.crs.to_wkt(), tuple(cog.transform), cog.shape)
    objects = [b.name for b in stack.storage().list_blobs(
        stack.bucket, prefix=prefix[len(f"gs://{stack.bucket}/"):] + "/")]
    letter_files = [json.loads(line) for b in objects if b.endswith(".jsonl")
                    for line in stack.storage().bucket(stack.bucket).blob(b)
                    .download_as_text().splitlines()]
    return {"answers": answers, "pixels": pixels, "georef": georef,
            "pieces": [o for o in objects if ".strips/" in o],
            "items": sum(o.endswith(".json") for o in objects),
            "letters": sorted({(x["stage"], x["reason"]) for x in letter_files})}


@pytest.fixture(scope="module")
def clean(stack, tmp_path_factory) -> dict:
    return scenario(stack, tmp_path_factory.mktemp("clean"), None)


@pytest.mark.stack
@pytest.mark.slow
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_worker_killed_right_after_a_side_effect_leaves_the_clean_runs_end_state(
        stack, clean, tmp_path, fault):
    got = scenario(stack, tmp_path, fault)
    assert got["answers"] == clean["answers"]
    np.testing.assert_array_equal(got["pixels"], clean["pixels"])
    assert got["georef"] == clean["georef"]
    assert got["pieces"] == [] and clean["pieces"] == []
    assert got["items"] == clean["items"] == 1
    assert got["letters"] == clean["letters"] and got["letters"]


# --- the same side effect twice in place (a retried bundle) -----------------------------------

@pytest.mark.stack
def test_each_storage_writer_done_twice_leaves_the_same_objects(adapted, tmp_path):
    from model.card import load_card
    from pipeline.options import DEFAULT_MODEL_URI
    from transforms import cog
    from transforms.deadletter import _JsonLinesPerBundleFn
    from transforms.records import TileGrid, TileManifest, TileRef

    card = load_card(DEFAULT_MODEL_URI)
    grid = TileGrid(100, 70, (30.0, 0.0, 0.0, 0.0, -30.0, 0.0), rasterio.crs.CRS.from_epsg(
        32633).to_wkt(), 900.0, 64, 48)
    manifest = TileManifest(TileRef("t", ("gs://b/t.tif",), "1", 0.0, 0.0), grid, 4, 0, 0, 0.0)
    uri = f"{adapted.output_prefix}/twice/t.tif"
    bucket = adapted.storage().bucket(adapted.bucket)

    def state() -> dict[str, bytes]:
        return {b.name: b.download_as_bytes() for b in bucket.list_blobs(
            prefix="output/twice/")}

    classes = np.random.default_rng(1).integers(0, 7, (100, 70), dtype=np.uint8)
    for _ in range(2):  # a piece written again
        cog.write_piece(manifest, 0, classes, None, cog.piece_uri(uri, 0), str(tmp_path))
    once = state()
    assert list(once) == ["output/twice/t.strips/00000.tif"]
    cog.stitch(manifest, card, uri, [0], False, str(tmp_path))
    cog.remove_pieces(uri, [0])
    stitched = state()
    cog.stitch(manifest, card, uri, [0], False, str(tmp_path))  # retried after the removal
    cog.remove_pieces(uri, [0])
    assert state() == stitched and list(stitched) == ["output/twice/t.tif"]
    now = dt.datetime.now(dt.UTC).isoformat()
    rows = [{"stage": "parse", "reason": "r", "time": now}, {"stage": "chips", "reason": "q",
                                                            "time": now}]
    for _ in range(2):  # a bundle of dead letters written again
        writer = _JsonLinesPerBundleFn(f"{adapted.output_prefix}/twice")
        writer.start_bundle()
        for row in rows:
            writer.process(row)
        writer.finish_bundle()
    letters = [n for n in state() if n.endswith(".jsonl")]
    assert len(letters) == 1


# --- storage reads: retries and the breaker ---------------------------------------------------



@pytest.fixture()
def flaky_gcs(adapted, monkeypatch):
    """GDAL's reads go through :class:`FlakyGcs`; a fresh worker process (breaker closed)."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), FlakyGcs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FlakyGcs.upstream, FlakyGcs.fail, FlakyGcs.seen = adapted.gcs_url, 0, 0
    monkeypatch.setenv("CPL_GS_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}/")
    process.reset()
    yield FlakyGcs
    server.shutdown()
    process.reset()


def _read_all(uri: str) -> np.ndarray:
    with rasterio.Env(**storage.GDAL_ENV), storage.open_geotiff(uri) as src:
        return src.read()


@pytest.mark.stack
def test_a_read_retried_on_the_same_object_reaches_the_server_again(adapted, flaky_gcs,
                                                                    tmp_path):
    """GDAL remembers a failed answer for an object; the retry must not be answered from that
    memory, or a burst of 503s becomes a permanent failure of the object."""
    crop = tiles.crop(tmp_path / "crop.tif", 0, 0, 64, 64)
    uri, _ = announce.upload(adapted.storage(), str(crop), adapted.bucket, "flaky/same.tif")
    flaky_gcs.fail = 6  # more than GDAL's own retries (GDAL_HTTP_MAX_RETRY) can ride out
    got = storage.with_retries(lambda: _read_all(uri), (uri,), time.monotonic() + 60, 60)
    with rasterio.open(crop) as src:
        np.testing.assert_array_equal(got, src.read())
    assert flaky_gcs.seen > flaky_gcs.fail


@pytest.mark.stack
def test_an_object_replaced_between_reads_is_read_at_its_new_bytes(adapted, flaky_gcs,
                                                                   tmp_path):
    """Same name, same size, new generation: nothing of the old bytes is served again."""
    first = tiles.crop(tmp_path / "a.tif", 0, 0, 64, 64)
    second = tiles.crop(tmp_path / "b.tif", 64, 64, 64, 64)
    uri, _ = announce.upload(adapted.storage(), str(first), adapted.bucket, "flaky/replaced.tif")
    before = _read_all(uri)
    announce.upload(adapted.storage(), str(second), adapted.bucket, "flaky/replaced.tif")
    after = _read_all(uri)
    with rasterio.open(first) as a, rasterio.open(second) as b:
        assert not np.array_equal(a.read(), b.read())
        np.testing.assert_array_equal(before, a.read())
        np.testing.assert_array_equal(after, b.read())


def test_a_paused_bucket_is_probed_by_one_reader_while_the_other_threads_wait():
    """Dataflow runs many threads per worker process, all behind one breaker: after the
    cool-down exactly one read goes to the bucket, and the others follow its success."""
    process.reset()
    gate = storage.breaker()
    gate.cooldown = 0.2
    for _ in range(gate.threshold):
        gate.failure("paused-bucket")
    assert gate.is_open("paused-bucket")
    release, lock = threading.Event(), threading.Lock()
    reading, most, done, errors = [0], [0], [], []

    def read() -> str:
        with lock:
            reading[0] += 1
            most[0] = max(most[0], reading[0])
        try:
            release.wait(60)
            return "read"
        finally:
            with lock:
                reading[0] -= 1

    def worker() -> None:
        try:
            done.append(storage.with_retries(read, ("gs://paused-bucket/a.tif",),
                                             time.monotonic() + 120, 120))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    assert wait_until(lambda: reading[0] >= 1, 60, every_s=0.02), "no read after the cool-down"
    # Give the waiting threads every chance to slip past the breaker while the probe is out.
    assert not wait_until(lambda: most[0] > 1, 1.0, every_s=0.02), "readers went with the probe"
    release.set()
    for t in threads:
        t.join(60)
    assert errors == [] and done == ["read"] * 8
    assert not gate.is_open("paused-bucket")
    process.reset()


def test_a_failed_probe_pauses_the_bucket_again_and_a_verdict_ends_the_probe():
    """A probe that fails re-opens the breaker (a longer pause); one that answers with a verdict
    on the object (not the bucket's health) lets the next reader through."""
    from google.api_core import exceptions as api

    from transforms.guards import Refused

    process.reset()
    gate = storage.breaker()
    gate.cooldown = 0.05
    for _ in range(gate.threshold):
        gate.failure("b")
    assert wait_until(lambda: not gate.is_open("b"), 30, every_s=0.01)

    def unavailable():
        raise api.ServiceUnavailable("503 down")

    with pytest.raises(storage.TransientReadError, match="bucket b paused"):
        storage.with_retries(unavailable, ("gs://b/x.tif",), time.monotonic() + 0.01, 1)
    assert gate.is_open("b")
    assert wait_until(lambda: not gate.is_open("b"), 30, every_s=0.01)

    def missing():
        raise Refused("gs://b/x.tif does not exist")

    with pytest.raises(Refused):
        storage.with_retries(missing, ("gs://b/x.tif",), time.monotonic() + 600, 600)
    read: list[str] = []  # were the probe still out, this reader would wait out its 600 s
    threading.Thread(target=lambda: read.append(storage.with_retries(
        lambda: "read", ("gs://b/y.tif",), time.monotonic() + 600, 600)), daemon=True).start()
    assert wait_until(lambda: read == ["read"], 120, every_s=0.01)
    assert not gate.is_open("b")
    process.reset()
