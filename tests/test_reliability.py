"""Hostile input and faults on the local stack: the stream stays up, loses nothing, reads nothing
it should not, and its books balance.

What they observe also makes docs/reliability.md, the table of every input and fault tried and
what the stream did with it: `make reliability` runs them and writes it (``tests/conftest.py``);
`make test` never rewrites a document.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import random
import shutil
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from model.card import card_from_dict, load_card, sha256_of
from pipeline.ops import announce, stats
from pipeline.ops.check import SAMPLE_TILE
from pipeline.ops.queries import load_queries, run_query
from tests import corpus, tiles
from tests.conftest import REPORT, cell
from tests.streams import (
    FlakyGcs,
    fresh_input,
    peak_rss_bytes,
    query,
    start_stream,
    stop_stream,
    wait_until,
)
from transforms import process, sinks
from transforms.chips import ChipSettings, ChipTileFn, chips_in
from transforms.deadletter import _JsonLinesPerBundleFn
from transforms.guards import InputAllowList
from transforms.records import TileRef

pytestmark = [pytest.mark.stack, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
MIN_VALID = 0.05
RSS_LIMIT = 1.5 * 2**30


class _Counting(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self):
        _Counting.hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"secret-token")

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def loopback():
    """An HTTP server on 127.0.0.1 that counts every request made to it."""
    _Counting.hits = []
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Counting.hits
    server.shutdown()


@pytest.fixture(scope="module")
def hostile_run(stack, model_uri, loopback, tmp_path_factory):
    """Good tiles and the whole corpus, interleaved, through one running stream."""
    http, hits = loopback
    work = tmp_path_factory.mktemp("hostile")
    topic, subscription, dataset = fresh_input(stack, "hostile")
    bad = corpus.build(work / "bad", stack.bucket, http)
    store, publisher = stack.storage(), stack.publisher()
    # The corpus names incoming/olinda.tif in some messages: it exists, so only the guards
    # stand between those messages and a read.
    announce.upload(store, str(SAMPLE_TILE), stack.bucket, "incoming/olinda.tif")
    good = {
        "good-a": tiles.crop(work / "good-a.tif", 0, 0, 120, 130),
        "good-b": tiles.crop(work / "good-b.tif", 100, 90, 110, 140),
        "good-c": tiles.crop(work / "good-c.tif", 200, 200, 150, 149),
        "good-olinda": SAMPLE_TILE,
    }
    sends: list[tuple[str, bytes, dict]] = []  # (name, data, attributes)
    for name, path in good.items():
        uri, generation = announce.upload(store, str(path), stack.bucket,
                                          f"hostile/{name}.tif")
        if name == "good-c":
            sends.append((name, *announce.json_announcement(name, corpus.ACQUIRED, uri=uri)))
        else:
            bucket, _, obj = uri[len("gs://"):].partition("/")
            sends.append((name, *announce.gcs_notification(bucket, obj, generation)))
    for item in bad:
        if item.upload is not None:
            uri, generation = announce.upload(store, str(item.upload), stack.bucket,
                                              f"hostile/{item.upload.name}")
            item.data, item.attributes = announce.gcs_notification(
                stack.bucket, uri.split("/", 3)[3], generation)
        sends += [(item.name, item.data, item.attributes)] * item.messages
    random.Random(11).shuffle(sends)

    log = work / "stream.log"
    child = start_stream(stack, model_uri, log, f"--subscription={subscription}",
                         f"--bq_dataset={stack.project}:{dataset}",
                         f"--output_prefix={stack.output_prefix}/{dataset}",
                         f"--min_valid_fraction={MIN_VALID}", "--tile_timeout_secs=120",
                         "--window_secs=2", "--max_batch_size=16", "--read_budget_secs=10")
    ids: dict[str, list[str]] = {}
    peak = 0
    try:
        for name, data, attributes in sends:
            ids.setdefault(name, []).append(announce.publish(publisher, topic, data, attributes))
        n_letters = sum(item.messages for item in bad)

        def done() -> bool:
            nonlocal peak
            peak = max(peak, peak_rss_bytes(child.pid))
            letters = query(stack, f"SELECT message_id FROM `{dataset}.dead_letters`")
            rows = query(stack, f"SELECT chips_scored FROM `{dataset}.tiles`")
            chips = query(stack, f"SELECT COUNT(*) AS n FROM `{dataset}.chips`")
            return len(letters) >= n_letters and len(rows) >= len(good) + 1 and (
                chips[0]["n"] >= sum(r["chips_scored"] for r in rows))  # chip rows load later

        finished = wait_until(done, 300, child)
        peak = max(peak, peak_rss_bytes(child.pid))
        alive = child.poll() is None
    finally:
        code = stop_stream(child)
    text = log.read_text(errors="replace")
    assert alive and code == 0, f"stream died (exit {code}):\n{text[-4000:]}"
    if not finished:
        seen = {r["message_id"] for r in query(
            stack, f"SELECT message_id FROM `{dataset}.dead_letters`")}
        rows = query(stack, f"SELECT tile_id FROM `{dataset}.tiles`")
        missing = [n for n, i in ids.items() if not set(i) & seen]
        pytest.fail(f"not everything came out: tiles {rows}, no letter for {missing}:\n"
                    f"{text[-3000:]}")
    return {"dataset": dataset, "bad": bad, "good": good, "ids": ids, "peak_rss": peak,
            "hits": hits, "published": len(sends), "log": text}


def test_every_hostile_input_is_dead_lettered_once_with_its_reason(stack, hostile_run):
    letters = query(stack, f"SELECT stage, reason, message_id FROM "
                           f"`{hostile_run['dataset']}.dead_letters`")
    by_message: dict[str, list[dict]] = {}
    for letter in letters:
        by_message.setdefault(letter["message_id"], []).append(letter)
    wrong = []
    for item in hostile_run["bad"]:
        for message_id in hostile_run["ids"][item.name]:
            got = by_message.get(message_id, [])
            ok = len(got) == 1 and got[0]["stage"] == item.stage and item.reason in got[0]["reason"]
            if not ok:
                wrong.append((item.name, item.stage, item.reason, got))
        observed = by_message.get(hostile_run["ids"][item.name][0], [{}])[0]
        REPORT["inputs"].append((f"`{item.name}`: {item.what}",
                                 f"dead letter, stage `{observed.get('stage')}`"
                                 + (" + tile row with complete=false" if item.partial else ""),
                                 cell(observed.get("reason", "(none)"))))
    assert not wrong, "\n".join(map(str, wrong))


def test_good_tiles_among_them_are_each_scored_once_and_exactly(stack, stream_card, hostile_run):
    dataset = hostile_run["dataset"]
    for name, path in hostile_run["good"].items():
        total, kept = tiles.expected_chips(path, stream_card.input.chip_size,
                                           stream_card.input.stride, MIN_VALID)
        [tile] = query(stack, f"SELECT complete, chips_total, chips_scored, chips_failed "
                              f"FROM `{dataset}.tiles` WHERE tile_id = '{name}'")
        assert (tile["complete"], tile["chips_total"], tile["chips_scored"],
                tile["chips_failed"]) == (True, total, kept, 0)
        [chips] = query(stack, f"SELECT COUNT(*) AS n, COUNT(DISTINCT row_id) AS d "
                               f"FROM `{dataset}.chips` WHERE tile_id = '{name}'")
        assert chips["n"] == chips["d"] == kept
        REPORT["inputs"].append((f"`{name}` (good, interleaved)", "scored once",
                                 f"{kept} chip rows, 1 tile row, complete"))


def test_a_truncated_tile_is_written_partial_not_complete(stack, hostile_run):
    [tile] = query(stack, f"SELECT complete, chips_total, chips_scored, chips_skipped, "
                          f"chips_failed FROM `{hostile_run['dataset']}.tiles` "
                          "WHERE tile_id = 'truncated'")
    assert tile["complete"] is False and tile["chips_failed"] > 0 and tile["chips_scored"] > 0
    assert tile["chips_total"] == tile["chips_scored"] + tile["chips_skipped"] + tile[
        "chips_failed"]


def test_nothing_outside_the_allow_list_was_ever_requested(hostile_run):
    assert hostile_run["hits"] == []
    REPORT["faults"].append(("URLs, /vsicurl/, VRTs and metadata paths in the corpus",
                             "no request reached the loopback HTTP server the test ran",
                             f"{len(hostile_run['hits'])} requests"))


def test_the_stream_stayed_under_its_memory_ceiling(hostile_run):
    assert 0 < hostile_run["peak_rss"] < RSS_LIMIT
    REPORT["faults"].append(("the whole hostile corpus through one stream",
                             "alive throughout, peak RSS under 1.5 GB",
                             f"peak RSS {hostile_run['peak_rss'] / 2**20:.0f} MiB"))


def test_the_books_balance_for_the_mixed_corpus(stack, hostile_run):
    report = stats.books(stack.bigquery(), f"{stack.project}.{hostile_run['dataset']}", 1)
    messages = report["messages"]
    bad_messages = sum(item.messages for item in hostile_run["bad"])
    partial = sum(item.messages for item in hostile_run["bad"] if item.partial)
    assert messages["in"] == hostile_run["published"]  # counted where they came in
    assert messages["scored"] == len(hostile_run["good"]) + partial
    assert messages["dead_letter"] == bad_messages - partial
    assert messages["filtered"] == messages["duplicate"] == messages["pending"] == 0
    assert report["balanced"] and report["conflicts"] == []
    assert report["tiles"]["unbalanced"] == 0
    assert report["chips"]["rows"] == report["chips"]["distinct_rows"] == report["tiles"][
        "chips_scored"]
    REPORT["faults"].append(("books of the mixed corpus (`tilestream stats`)",
                             "in = scored + dead-lettered + filtered + duplicates",
                             f"{messages['in']} = {messages['scored']} + "
                             f"{messages['dead_letter']} + 0 + 0"))


@pytest.fixture(scope="module")
def stream_card(model_uri):
    return load_card(model_uri)


# --- faults -------------------------------------------------------------------------------

def test_kill_and_restart_scores_every_tile_exactly_once(stack, model_uri, stream_card,
                                                         tmp_path):
    topic, subscription, dataset = fresh_input(stack, "restart")
    crop = tiles.crop(tmp_path / "crop.tif", 0, 0, 100, 100)
    _, kept = tiles.expected_chips(crop, stream_card.input.chip_size,
                                       stream_card.input.stride, MIN_VALID)
    store, publisher = stack.storage(), stack.publisher()
    names = [f"restart-{i:02d}" for i in range(20)]
    for name in names:
        _, generation = announce.upload(store, str(crop), stack.bucket, f"restart/{name}.tif")
        announce.publish(publisher, topic, *announce.gcs_notification(
            stack.bucket, f"restart/{name}.tif", generation))
    args = (f"--subscription={subscription}", f"--bq_dataset={stack.project}:{dataset}",
            f"--output_prefix={stack.output_prefix}/{dataset}", f"--min_valid_fraction={MIN_VALID}",
            "--window_secs=1", "--max_batch_size=8")
    log = tmp_path / "stream.log"
    first = start_stream(stack, model_uri, log, *args)

    def rows() -> list[dict]:
        return query(stack, f"SELECT tile_id FROM `{dataset}.tiles`")

    started = wait_until(lambda: len(rows()) >= 1, 180, first, every_s=0.2)
    first.kill()  # SIGKILL: no cleanup, whatever was in flight is in flight
    first.wait(timeout=30)
    assert started, log.read_text(errors="replace")[-3000:]
    before = len(rows())
    second = start_stream(stack, model_uri, log, *args)

    def chip_rows() -> int:
        counted = query(stack, f"SELECT COUNT(*) AS n FROM `{dataset}.chips`")
        return counted[0]["n"] if counted else 0

    try:  # chip rows are loaded every 2 s: they may land after the last tile row
        finished = wait_until(lambda: len(rows()) >= len(names)
                              and chip_rows() >= kept * len(names), 240, second)
    finally:
        stop_stream(second)
    assert finished, log.read_text(errors="replace")[-3000:]
    counts = query(stack, f"SELECT tile_id, COUNT(*) AS n FROM `{dataset}.tiles` "
                          "GROUP BY tile_id")
    assert sorted(c["tile_id"] for c in counts) == names
    assert all(c["n"] == 1 for c in counts), counts
    [chips] = query(stack, f"SELECT COUNT(*) AS n, COUNT(DISTINCT row_id) AS d "
                           f"FROM `{dataset}.chips`")
    assert chips["n"] == chips["d"] == kept * len(names)
    REPORT["faults"].append((f"SIGKILL with {len(names) - before} of {len(names)} tiles in "
                             "flight, then restart", "every tile scored exactly once",
                             f"{len(counts)} tile rows, {chips['n']} chip rows = "
                             f"{chips['d']} distinct row_ids"))


def test_a_stop_is_a_drain_that_finishes_every_tile_the_stream_read(stack, model_uri,
                                                                    stream_card, tmp_path):
    """SIGTERM on the local stream, as Dataflow's drain: it reads nothing more and exits only
    once every message it read is answered, without a restart (a blue-green cut-over stops blue
    this way). Messages it had not read stay in the subscription for the next job."""
    from pipeline.local import journal

    topic, subscription, dataset = fresh_input(stack, "drain")
    crop = tiles.crop(tmp_path / "crop.tif", 0, 0, 100, 100)
    _, kept = tiles.expected_chips(crop, stream_card.input.chip_size,
                                   stream_card.input.stride, MIN_VALID)
    store, publisher = stack.storage(), stack.publisher()
    sent = {}
    for i in range(20):
        name = f"drain-{i:02d}"
        path = f"incoming/drain/{name}.tif"  # the prefix notifications announce
        _, generation = announce.upload(store, str(crop), stack.bucket, path)
        sent[announce.publish(publisher, topic, *announce.gcs_notification(
            stack.bucket, path, generation))] = name
    log = tmp_path / "stream.log"
    child = start_stream(stack, model_uri, log, f"--subscription={subscription}",
                         f"--bq_dataset={stack.project}:{dataset}",
                         f"--output_prefix={stack.output_prefix}/{dataset}",
                         f"--min_valid_fraction={MIN_VALID}", "--window_secs=1")
    path = journal.journal_path(stack, subscription,
                                sinks.BigQueryTables.in_dataset(dataset, stack.project))

    def rows() -> list[dict]:
        return query(stack, f"SELECT tile_id FROM `{dataset}.tiles`")

    def read_now() -> set[str]:
        return {sent[e.message_id] for e in journal.read(path)}

    started = wait_until(lambda: len(rows()) >= 1, 180, child, every_s=0.2)
    # The stop comes once the stream has read more than it answered: a pull's tiles are
    # answered together, so the first answer alone does not say that any are in flight.
    wait_until(lambda: len(read_now()) > len(rows()), 120, child, every_s=0.1)
    answered_at_stop = len(rows())
    code = stop_stream(child)
    assert started, log.read_text(errors="replace")[-3000:]
    read = read_now()
    assert code == 0
    assert len(read) > answered_at_stop  # tiles were in flight when the stop came
    counts = query(stack, f"SELECT tile_id, COUNT(*) AS n FROM `{dataset}.tiles` "
                          "GROUP BY tile_id")
    assert sorted(c["tile_id"] for c in counts) == sorted(read)  # every tile read, no other
    assert all(c["n"] == 1 for c in counts), counts
    [chips] = query(stack, f"SELECT COUNT(*) AS n, COUNT(DISTINCT row_id) AS d "
                           f"FROM `{dataset}.chips`")
    assert chips["n"] == chips["d"] == kept * len(read)
    REPORT["faults"].append((f"SIGTERM with {len(read) - answered_at_stop} of {len(read)} tiles "
                             "read still in flight (a local stop drains, as on Dataflow)",
                             "every tile read answered before exit, no restart",
                             f"{len(counts)} tile rows, {chips['n']} chip rows at exit "
                             f"(code {code}); {len(sent) - len(read)} unread stay queued"))


HALF_GRANULE = "HLS.S30.T25MBP.2001196T120000.v2.0"


def test_a_drain_books_a_half_granule_as_drained_not_refused_and_the_books_add_up(
        stack, model_uri, tmp_path):
    """A stop (a drain) while a granule has only some bands in: the job's input has ended, so
    its bands become one ``drained`` event naming every band message, never a "missing bands"
    refusal, and the drain ends with every message read booked, without waiting for the
    granule's timeout: in = scored + filtered + dead-lettered + drained. (Before drains fired
    the end-of-input timers, the bands had no outcome at exit and were left to a replay.)"""
    from pipeline.local import journal

    topic, subscription, dataset = fresh_input(stack, "drain-granule")
    store, publisher = stack.storage(), stack.publisher()
    crop = tiles.crop(tmp_path / "crop.tif", 0, 0, 100, 100)
    sent: dict[str, str] = {}  # message id -> what it is

    def notify(path: str, generation: int, what: str) -> None:
        sent[announce.publish(publisher, topic, *announce.gcs_notification(
            stack.bucket, path, generation))] = what

    _, generation = announce.upload(store, str(crop), stack.bucket, "incoming/drain/whole.tif")
    notify("incoming/drain/whole.tif", generation, "tile")
    bands = list(tiles.per_band_files(tmp_path, HALF_GRANULE, crop).values())[:2]
    for path in bands:
        name = f"incoming/drain/{path.name}"
        notify(name, announce.upload(store, str(path), stack.bucket, name)[1], "band")
    notify("incoming/drain/notes.txt", 1, "filtered")
    sent[announce.publish(publisher, topic, b"\x00 not json", {})] = "bad"
    log = tmp_path / "stream.log"
    child = start_stream(stack, model_uri, log, f"--subscription={subscription}",
                         f"--bq_dataset={stack.project}:{dataset}",
                         f"--output_prefix={stack.output_prefix}/{dataset}",
                         f"--min_valid_fraction={MIN_VALID}", "--window_secs=1")
    path = journal.journal_path(stack, subscription,
                                sinks.BigQueryTables.in_dataset(dataset, stack.project))

    def tile_rows() -> list[dict]:
        return query(stack, f"SELECT tile_id, complete FROM `{dataset}.tiles`")

    read_all = wait_until(lambda: len(journal.read(path)) == len(sent) and tile_rows(), 240,
                          child, every_s=0.5)
    code = stop_stream(child)
    assert read_all, log.read_text(errors="replace")[-3000:]
    assert code == 0
    assert "every message this stream read is finished" in log.read_text(errors="replace")
    drained = query(stack, f"SELECT stage, tile_id, reason, source_message_ids "
                           f"FROM `{dataset}.events` WHERE disposition = 'drained'")
    band_ids = sorted(m for m, what in sent.items() if what == "band")
    assert [(d["stage"], d["tile_id"], sorted(d["source_message_ids"])) for d in drained] == [
        ("granules", HALF_GRANULE, band_ids)], drained
    assert "drained before complete" in drained[0]["reason"]
    letters = query(stack, f"SELECT stage, reason, source_message_ids "
                           f"FROM `{dataset}.dead_letters`")
    assert not [x for x in letters if x["stage"] == "granules"], letters  # no refusal
    assert [r["tile_id"] for r in tile_rows()] == ["whole"]
    # The books: every message read has exactly one outcome, of the kind it should.
    outcome: dict[str, list[str]] = {}
    for r in query(stack, f"SELECT source_message_ids FROM `{dataset}.tiles`"):
        for m in r["source_message_ids"]:
            outcome.setdefault(m, []).append("scored")
    for r in query(stack, f"SELECT disposition, source_message_ids FROM `{dataset}.events`"):
        for m in r["source_message_ids"]:
            outcome.setdefault(m, []).append(r["disposition"])
    for r in letters:
        for m in r["source_message_ids"]:
            outcome.setdefault(m, []).append("dead_letter")
    expected = {"tile": ["scored"], "band": ["drained"], "filtered": ["filtered"],
                "bad": ["dead_letter"]}
    assert {m: outcome.get(m) for m in sent} == {m: expected[w] for m, w in sent.items()}
    report = stats.books(stack.bigquery(), f"{stack.project}.{dataset}",
                         pulled={e.message_id for e in journal.read(path)})
    assert report["balanced"] and report["pending"] == [], report
    assert {k: report["messages"][k] for k in ("in", "scored", "filtered", "dead_letter",
                                                "drained")} == {
        "in": len(sent), "scored": 1, "filtered": 1, "dead_letter": 1, "drained": len(band_ids)}
    REPORT["faults"].append(("SIGTERM with a granule holding 2 of its 6 bands",
                             "its bands booked drained (one event, both message ids), no "
                             "'missing bands' refusal; in = scored + filtered + dead-lettered "
                             "+ drained",
                             f"{len(sent)} in: 1 scored, 1 filtered, 1 dead-lettered, "
                             f"{len(band_ids)} drained (code {code})"))


def test_a_drain_writes_no_row_for_a_half_scored_tile_only_a_drained_event(tmp_path):
    """A tile whose input ends (a drain) with a quarter of its chips scored: no tile row (a
    partial row is whole in the books, so it would read as the tile's answer), no piece left,
    one ``drained`` event with its message id. The stream's own steps,
    driven by hand through their drain callbacks; until drains had their own path, these
    callbacks (and Dataflow's wall-clock timeout during a drain) wrote the partial tile row."""
    from apache_beam.pvalue import TaggedOutput

    from tests import test_stages as stages
    from transforms import assemble, chips
    from transforms.records import DRAINED, ChipPrediction, PredictionBlock

    path = tiles.crop(tmp_path / "c.tif", 0, 0, 200, 64)  # four chip rows
    card = stages.test_card()
    tile = TileRef("half", (str(path),), "1", 0.0, 0.0, message_id="m-half")
    out, tagged = stages.chip_tile(path, chips.ChipSettings.from_card(card), tile)
    manifest = next(t.value for t in tagged if t.tag == chips.MANIFESTS_TAG)
    reports = [t.value for t in tagged if t.tag == chips.REPORTS_TAG]
    first_row = [ChipPrediction(
        dataclasses.replace(chip, raw=None), np.ones((chip.height, chip.width), np.uint8),
        np.full((card.num_classes, chip.height, chip.width), 100, np.uint8), (0,) * 3, 0.5,
        "m", "1", 0.0) for chip in out if chip.row == 0]  # only the first chip row scored
    prefix = tmp_path / "out"
    strips_fn = assemble._AssembleStripFn(card, str(prefix), 60, True, False)
    tiles_fn = assemble._FinishTileFn(card, str(prefix), 60, True, False)
    strips_fn.setup()
    tiles_fn.setup()
    to_strips, to_tile, events, rows = [], [], [], []

    def sort(outputs, downstream):
        for item in outputs:
            if isinstance(item, TaggedOutput):
                (to_tile if item.tag == assemble.TILES_TAG else events).append(item.value)
            else:
                downstream.append(item)

    for item in (manifest, *reports, PredictionBlock(tile, 0, tuple(first_row))):
        sort(assemble._RouteFn().process(item), to_strips)
    strip_states: dict[str, dict] = {}
    for key, item in to_strips:
        state = strip_states.setdefault(key, {
            "reports": stages._State("bag"), "plan_state": stages._State(),
            "pieces": stages._State("bag"), "arrived": stages._State("sum")})
        sort(strips_fn.process((key, item), **state, wall=stages._State(),
                               end=stages._State()), to_tile)
    tile_state = {"manifest_state": stages._State(), "results": stages._State("bag")}
    for kv in to_tile:
        sort(tiles_fn.process(kv, **tile_state, wall=stages._State(), end=stages._State()),
             rows)
    assert rows == [] and events == []  # still waiting for the other chip rows
    before = len(to_tile)
    for key, state in strip_states.items():  # the drain: strips first, as the watermark goes
        sort(strips_fn.on_end_of_input(key, **state, wall=stages._State()), to_tile)
    assert len(to_tile) == before  # no strip result that would let the tile finish partial
    sort(tiles_fn.on_end_of_input(tile.assignment_key, **tile_state, wall=stages._State()),
         rows)
    assert rows == []
    assert [(e.disposition, e.stage, e.message_ids) for e in events] == [
        (DRAINED, "assemble", ("m-half",))], events
    assert "drained before complete" in events[0].reason
    assert list(prefix.rglob("*.strips/*.tif")) == []


def test_transient_storage_errors_are_retried_then_a_failing_bucket_is_paused(
        adapted, stream_card, monkeypatch):
    uris = {n: announce.upload(adapted.storage(), str(SAMPLE_TILE), adapted.bucket,
                               f"flaky/{n}.tif")[0] for n in ("a", "b", "c")}
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), FlakyGcs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FlakyGcs.upstream = adapted.gcs_url
    flaky = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("CPL_GS_ENDPOINT", f"{flaky}/")  # GDAL's reads
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", flaky)  # the generation checks
    settings = ChipSettings.from_card(stream_card, allow=InputAllowList.parse(
        f"gs://{adapted.bucket}"), read_budget_secs=6)
    process.reset()  # a fresh worker process: its breaker closed, its clients new

    def chip(name: str) -> tuple[int, list[str]]:  # a new object each time: nothing cached
        tile = TileRef(name, (uris[name],), "1", 0.0, 0.0, message_id=name)
        fn = ChipTileFn(settings)  # a new DoFn per tile, as the runners make them: the breaker
        fn.setup()  # is the worker process's, not the DoFn's
        out = list(fn.process(tile))
        letters = [o.value.reason for o in out if getattr(o, "tag", "") == "dead_letters"]
        return sum(1 for _ in chips_in(out)), letters

    try:
        FlakyGcs.fail, FlakyGcs.seen = 3, 0  # a burst of 503s: retried through
        scored, letters = chip("a")
        assert scored > 0 and letters == [] and FlakyGcs.seen > 3, (letters, FlakyGcs.seen)
        FlakyGcs.fail, FlakyGcs.seen = 10**6, 0  # the bucket is down
        scored, [reason] = chip("b")
        assert scored == 0 and "503" in reason and "still failing after" in reason
        hammered = FlakyGcs.seen
        FlakyGcs.seen = 0
        scored, [reason] = chip("c")  # the breaker is open: this tile waits, it does not hammer
        assert scored == 0 and "paused" in reason
        assert FlakyGcs.seen < hammered
    finally:
        server.shutdown()
    REPORT["faults"].append(("GCS answers 503 to 8 requests, then recovers",
                             "retried with backoff and jitter; the tile is scored",
                             "scored, no dead letter"))
    REPORT["faults"].append(("GCS answers 503 to everything",
                             "dead letter after the read budget; the breaker pauses the "
                             "bucket for the next tile", cell(reason)))


def test_every_shipped_query_counts_a_twice_written_row_once(stack):
    dataset = f"dupes_{int(time.time() * 1000) % 10**8}"
    bq = stack.bigquery()
    bq.create_dataset(dataset)
    from google.cloud import bigquery

    for kind in ("chips", "tiles", "dead_letters"):
        bq.create_table(bigquery.Table(
            f"{stack.project}.{dataset}.{kind}",
            schema=[bigquery.SchemaField.from_api_repr(f)
                    for f in sinks.SCHEMAS[kind]["fields"]]))
    now = sinks.bq_timestamp(time.time())
    base = {"tile_id": "t", "tile_generation": "1", "event_time": now, "published": now,
            "source": "gcs", "source_uris": ["gs://b/t.tif"], "source_message_ids": ["m"],
            "attributes": [], "model_name": "m", "model_version": "1",
            "crs": "EPSG:4326", "classes": [{"class_id": 0, "name": "water", "pixels": 10,
                                             "area_m2": 100.0}]}
    footprint = "POLYGON((0 0, 1 0, 1 1, 0 1, 0 0))"
    chips = [{**base, "row_id": f"c{i}", "chip_index": i, "row_off": 0, "col_off": i,
              "height": 1, "width": 1, "footprint": footprint, "valid_fraction": 1.0,
              "dominant_class": "water", "mean_confidence": 0.9, "chipped_at": now,
              "scored_at": now, "latency_s": 1.0} for i in range(3)]
    tile = {**base, "row_id": "t1", "complete": True, "chips_total": 3, "chips_scored": 3,
            "chips_skipped": 0, "chips_failed": 0, "width": 3, "height": 1,
            "footprint": footprint, "raster_uri": "gs://b/p.tif", "completed_at": now,
            "latency_s": 2.0}
    letter = {"stage": "parse", "reason": "r", "message_id": "x", "tile_id": "", "payload": "",
              "time": now}
    for _ in range(2):  # a retried insert after a stall writes every row again
        assert not bq.insert_rows_json(f"{stack.project}.{dataset}.chips", chips)
        assert not bq.insert_rows_json(f"{stack.project}.{dataset}.tiles", [tile])
        assert not bq.insert_rows_json(f"{stack.project}.{dataset}.dead_letters", [letter])
    full = f"{stack.project}.{dataset}"
    answers = {
        "latest_prediction_per_chip": run_query(bq, "latest_prediction_per_chip", full, days=1),
        "class_area_per_tile_and_day": run_query(bq, "class_area_per_tile_and_day", full),
        "chips_intersecting_region": run_query(bq, "chips_intersecting_region", full,
                                               region_wkt="POINT(0.5 0.5)"),
        "dead_letters_by_stage": run_query(bq, "dead_letters_by_stage", full, days=1),
        "tiles_ready": run_query(bq, "tiles_ready", full, days=1),
    }
    assert set(answers) == set(load_queries())
    assert [r["tile_id"] for r in answers["tiles_ready"]] == ["t"]
    assert len(answers["latest_prediction_per_chip"]) == 3
    [area] = answers["class_area_per_tile_and_day"]
    assert area["area_km2"] == pytest.approx(100.0 / 1e6)
    assert len(answers["chips_intersecting_region"]) == 3
    assert [r["letters"] for r in answers["dead_letters_by_stage"]] == [1]
    REPORT["faults"].append(("every chip, tile and dead-letter row written twice (a BigQuery "
                             "stall and retry)",
                             "every query in pipeline/ops/sql/queries.sql counts it once",
                             f"{len(answers)} queries deduplicated on row_id"))


def test_the_dead_letter_file_writer_never_fails_the_stream(adapted):
    row = {"stage": "parse", "reason": "r"}
    broken = _JsonLinesPerBundleFn("gs://no-such-bucket-for-dead-letters/x")
    broken.start_bundle()
    broken.process(row)
    broken.finish_bundle()  # a missing bucket: logged and counted, not raised
    working = _JsonLinesPerBundleFn(f"gs://{adapted.bucket}/writer-check")
    working.start_bundle()
    working.process(row)
    working.finish_bundle()
    written = list(adapted.storage().list_blobs(adapted.bucket, prefix="writer-check/"))
    assert len(written) == 1
    REPORT["faults"].append(("dead-letter JSON lines to a bucket that does not exist",
                             "logged, counted; the stream goes on", "no exception"))


def _model_dir(tmp_path: Path, model_uri: str, name: str, module: torch.nn.Module | None,
               raw: bytes | None = None) -> Path:
    target = tmp_path / name
    target.mkdir()
    if module is not None:
        torch.jit.script(module).save(str(target / "model.pt"))
    else:
        (target / "model.pt").write_bytes(raw or b"")
    card = json.loads((Path(model_uri) / "model_card.json").read_text())
    card["weights"]["sha256"] = sha256_of(str(target / "model.pt"))
    card_from_dict(card)
    (target / "model_card.json").write_text(json.dumps(card))
    return target


class _WrongClasses(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros((x.shape[0], 3, x.shape[2], x.shape[3]))


class _WrongChannels(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 7, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize(("name", "module", "raw", "words"), [
    ("wrong_class_count", _WrongClasses(), None, "the card promises"),
    ("wrong_input_channels", _WrongChannels(), None, "does not score a (6, 64, 64) chip"),
    ("corrupt_torchscript", None, b"PK\x03\x04 not a model", "does not load as TorchScript"),
])
def test_a_model_that_breaks_its_card_is_refused_before_a_message_is_pulled(
        stack, model_uri, tmp_path, name, module, raw, words):
    bad = _model_dir(tmp_path, model_uri, name, module, raw)
    topic, subscription, dataset = fresh_input(stack, "model")
    announce.publish(stack.publisher(), topic, b"a waiting message", {})
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.ops.cli", "run", "--local", f"--stack_dir={stack.run_dir}",
         f"--model_uri={bad}", f"--subscription={subscription}",
         f"--bq_dataset={stack.project}:{dataset}"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and words in done.stderr, done.stderr[-2000:]
    waiting = stack.subscriber().pull(subscription=subscription, max_messages=5, timeout=10)
    assert [m.message.data for m in waiting.received_messages] == [b"a waiting message"]
    REPORT["faults"].append((f"model `{name}` at start-up", "refused before any message is "
                             "pulled (exit 2)", cell(done.stderr.strip().splitlines()[-1])))


def test_assembly_scratch_of_dead_processes_is_swept():
    """Assembly scratch of this process is removed by teardown; none left from dead ones."""
    from transforms.cog import scratch_dir

    mine = scratch_dir()
    stale = Path(mine).parent / "999999999"
    stale.mkdir(exist_ok=True)
    scratch_dir()
    assert not stale.exists()
    shutil.rmtree(mine, ignore_errors=True)
