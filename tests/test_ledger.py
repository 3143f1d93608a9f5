"""The books, counted at entry: a ledger of messages of every kind, published around a stream
that is killed in the middle and restarted, and every id of it with exactly one outcome.

"In" is what the stream booked in its ``messages`` table as each message arrived, never what
came out; ``tilestream stats`` matches each entry to its outcome. A message the killed stream
had pulled but not finished is published again by the local journal as a new id: the original
is booked ``replayed``, the new one (``replay_of`` in ``messages``) gets its own outcome, and its
latency runs from the original's publish.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from pipeline.local import journal
from pipeline.ops import announce, stats
from tests import tiles
from tests.conftest import REPORT
from tests.streams import fresh_input, query, start_stream, stop_stream, wait_until
from transforms.sinks import BigQueryTables

pytestmark = [pytest.mark.stack, pytest.mark.slow]
GOOD_GRANULE = "HLS.S30.T25MBL.2001196T120000.v2.0"
REFUSED_GRANULE = "HLS.S30.T25MBP.2001196T120000.v2.0"
PARTIAL_GRANULE = "HLS.S30.T25MBQ.2001196T120000.v2.0"
HELD_GRANULE = "HLS.S30.T25MBS.2001196T120000.v2.0"  # in flight when the stream is killed


def _scaled(src: Path, out: Path, factor: int) -> Path:
    with rasterio.open(src) as s:
        profile = s.profile | {"dtype": "uint16"}
        data = s.read().astype(np.uint16) * factor
    with rasterio.open(out, "w", **profile) as d:
        d.write(data)
    return out


class Ledger:
    """Publishes to one topic and remembers every message id and what it should become."""

    def __init__(self, stack, topic: str, work: Path):
        self.stack, self.topic, self.work = stack, topic, work
        self.store, self.publisher = stack.storage(), stack.publisher()
        self.expected: dict[str, str] = {}  # message id -> the outcome it must reach

    def upload(self, path: Path, name: str) -> int:
        return announce.upload(self.store, str(path), self.stack.bucket, name)[1]

    def send(self, expected: str, data: bytes, attributes: dict) -> str:
        message_id = announce.publish(self.publisher, self.topic, data, attributes)
        self.expected[message_id] = expected
        return message_id

    def notify(self, expected: str, name: str, generation: int, **kw) -> str:
        return self.send(expected, *announce.gcs_notification(self.stack.bucket, name,
                                                              generation, **kw))

    def granule(self, expected: str, granule: str, src: Path, bands: slice = slice(6)
                ) -> list[str]:
        files = list(tiles.per_band_files(self.work, granule, src).values())[bands]
        return [self.notify(expected, f"incoming/ledger/{path.name}",
                            self.upload(path, f"incoming/ledger/{path.name}"))
                for path in files]


def test_every_message_of_the_ledger_has_exactly_one_outcome(stack, model_uri, tmp_path):
    topic, subscription, dataset = fresh_input(stack, "ledger")
    ledger = Ledger(stack, topic, tmp_path)
    crop = tiles.crop(tmp_path / "crop.tif", 0, 0, 100, 100)
    args = (f"--subscription={subscription}", f"--bq_dataset={stack.project}:{dataset}",
            f"--output_prefix={stack.output_prefix}/{dataset}", "--window_secs=1",
            "--max_batch_size=8")
    # Before the first stream: good tiles and bad input of every kind.
    for i in range(4):
        name = f"incoming/ledger/good-{i}.tif"
        ledger.notify("scored", name, ledger.upload(crop, name))
    ledger.send("dead_letter", b"\x00 not json", {})
    ledger.send("dead_letter", json.dumps({"schema": "tilestream.announcement/v1"}).encode(),
                {})
    ledger.notify("filtered", "incoming/ledger/good-0.tif", 1, event_type="OBJECT_DELETE")
    ledger.notify("filtered", "incoming/ledger/notes.txt", 1)
    ledger.notify("dead_letter", "incoming/ledger/never-written.tif", 42)
    old = ledger.upload(crop, "incoming/ledger/replaced.tif")
    new = ledger.upload(crop, "incoming/ledger/replaced.tif")
    ledger.notify("superseded", "incoming/ledger/replaced.tif", old)
    ledger.notify("scored", "incoming/ledger/replaced.tif", new)
    ledger.granule("scored", GOOD_GRANULE, crop)
    ledger.granule("dead_letter", REFUSED_GRANULE,  # refused at the chips stage, all six
                   _scaled(crop, tmp_path / "x40.tif", 40))
    # Five of a granule's six bands: the first stream holds them, waiting for the sixth (its
    # granule timeout is longer than it lives), so the kill always finds them pulled and
    # unfinished. The sixth never comes: their replays are dead-lettered as incomplete.
    held = ledger.granule("dead_letter", HELD_GRANULE, crop, bands=slice(5))
    log = tmp_path / "stream.log"
    first = start_stream(stack, model_uri, log, *args, "--granule_timeout_secs=3600")
    pulled = journal.journal_path(stack, subscription,
                                  BigQueryTables.in_dataset(f"{stack.project}:{dataset}"))

    def in_flight() -> bool:
        """Two tiles out, and the held bands pulled (the journal has them, so they are acked:
        only the journal's replay can bring them back)."""
        tiles_in = query(stack, f"SELECT tile_id FROM `{dataset}.tiles`")
        return len(tiles_in) >= 2 and set(held) <= {e.message_id for e in journal.read(pulled)}

    started = wait_until(in_flight, 480, first, every_s=0.5)
    first.kill()  # SIGKILL with messages in flight
    first.wait(timeout=30)
    assert started, log.read_text(errors="replace")[-3000:]
    # While it is down: more of every kind, one tile delivered twice (which of the two is the
    # duplicate is the stream's to know; the killed one's memory of what it took is gone, as a
    # Dataflow job's would not be), and a granule that will never be complete.
    for i in range(4, 7):
        name = f"incoming/ledger/good-{i}.tif"
        generation = ledger.upload(crop, name)
        ledger.notify("scored", name, generation)
        if i == 4:
            ledger.notify("duplicate", name, generation)
    ledger.send("dead_letter", b"{\"truncated\": ", {})
    ledger.granule("dead_letter", PARTIAL_GRANULE, crop, bands=slice(2))
    restarted = time.time()  # the journal publishes its replays after this
    second = start_stream(stack, model_uri, log, *args, "--granule_timeout_secs=20")
    published = set(ledger.expected)

    def booked() -> dict:
        return stats.books(stack.bigquery(), f"{stack.project}.{dataset}", 1)

    def settled() -> bool:
        """Every message in and answered, the journal's replays (booked ``replayed`` at the
        restart) among them: a replay still queued is in no count until it is pulled."""
        report = booked()
        [replayed] = query(stack, f"SELECT COUNT(*) AS n FROM `{dataset}.events` "
                                  "WHERE disposition = 'replayed'") or [{"n": 0}]
        [replays_in] = query(stack, f"SELECT COUNT(DISTINCT message_id) AS n FROM "
                                    f"`{dataset}.messages` WHERE replay_of IS NOT NULL")
        return report["messages"]["pending"] == 0 and report["messages"]["in"] >= len(
            published) and replays_in["n"] >= replayed["n"] > 0

    try:
        done = wait_until(settled, 240, second, every_s=3)
    finally:
        stop_stream(second)
    report = booked()
    assert done, json.dumps(report, indent=1, default=str)[:3000]
    entries = {r["message_id"]: r["replay_of"] for r in query(
        stack, f"SELECT message_id, replay_of FROM `{dataset}.messages`")}
    # Counted at entry: every published message came in, and every replay says whose it is.
    replays = {m: original for m, original in entries.items() if original}
    assert published <= set(entries) and set(replays.values()) <= published
    assert set(entries) - published == set(replays)
    assert set(held) <= set(replays.values()), "the kill found the held bands unfinished"
    outcomes = stats.outcomes(stack.bigquery(), f"{stack.project}.{dataset}",
                              report_since(), {"messages", "tiles", "dead_letters", "events"})
    wrong = {}
    for message_id, expected in ledger.expected.items():
        kinds = outcomes[message_id]["kinds"]
        if message_id in replays.values():  # pulled by the killed stream, published again
            [replay] = [m for m, original in replays.items() if original == message_id]
            if kinds != {"replayed"} or outcomes[replay]["kinds"] != {expected}:
                wrong[message_id] = (expected, kinds, outcomes[replay]["kinds"])
        elif kinds != {expected}:
            wrong[message_id] = (expected, kinds)
    assert wrong == {}
    assert report["balanced"] and report["conflicts"] == [] and report["pending"] == []
    # The refused granule: one letter carrying all six band messages.
    letters = query(stack, f"SELECT tile_id, source_message_ids FROM `{dataset}.dead_letters` "
                           f"WHERE tile_id = '{REFUSED_GRANULE}'")
    assert [len(letter["source_message_ids"]) for letter in letters] == [6]
    # Latency runs from the first publish: every replay is booked with its original's publish
    # time (before the restart), not its own (after it).
    published_at = {r["message_id"]: r["published"].timestamp() for r in query(
        stack, f"SELECT message_id, published FROM `{dataset}.messages`")}
    first = {m: (published_at[m], published_at[original]) for m, original in replays.items()}
    assert all(abs(mine - theirs) < 1e-3 and mine < restarted
               for mine, theirs in first.values()), (first, restarted)
    REPORT["ledger"] += [
        ("ledger ids published (good, duplicate, bad, filtered, missing object, superseded, "
         "granules complete, refused and incomplete), stream SIGKILLed in the middle",
         "each id: exactly one outcome", f"{len(published)} ids, "
         f"{len(published) - len(wrong)} with exactly one outcome"),
        ("messages pulled by the killed stream", "booked `replayed`, their replay answered",
         f"{len(replays)} replayed, each linked to its original (`messages.replay_of`)"),
        ("`tilestream stats`", "in = outcomes + pending, no conflicts",
         f"in {report['messages']['in']}: " + ", ".join(
             f"{k} {v}" for k, v in report["messages"].items() if k != "in" and v))]


def report_since():
    import datetime as dt

    return dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)


def _verb(stack, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.ops.cli", *argv, "--local",
                           f"--stack_dir={stack.run_dir}"], capture_output=True, text=True,
                          timeout=120)


def test_a_fresh_stream_answers_every_verb_and_books_a_late_band_at_once(stack, model_uri,
                                                                         tmp_path):
    """Every table exists from start-up, so each operator verb answers on a stream that has
    scored a tile and written no dead letter yet. A band that arrives after its granule was
    dead-lettered as incomplete is booked at once, saying so, not after another timeout. The
    ``--metrics_file`` counts every message in, as the ``messages`` table does."""
    topic, subscription, dataset = fresh_input(stack, "fresh")
    ledger = Ledger(stack, topic, tmp_path)
    crop = tiles.crop(tmp_path / "crop.tif", 0, 0, 100, 100)
    timeout_s = 12
    log = tmp_path / "stream.log"
    child = start_stream(stack, model_uri, log, f"--subscription={subscription}",
                         f"--bq_dataset={stack.project}:{dataset}",
                         f"--output_prefix={stack.output_prefix}/{dataset}",
                         f"--granule_timeout_secs={timeout_s}", "--window_secs=1",
                         f"--metrics_file={tmp_path / 'metrics.json'}")
    try:
        ledger.notify("scored", "incoming/fresh/good.tif",
                      ledger.upload(crop, "incoming/fresh/good.tif"))
        def answered() -> bool:  # by the one definition `stats` counts with
            return stats.books(stack.bigquery(), f"{stack.project}.{dataset}",
                               1)["messages"]["scored"] == 1

        assert wait_until(answered, 180, child, every_s=0.5), \
            log.read_text(errors="replace")[-3000:]
        assert query(stack, f"SELECT COUNT(*) AS n FROM `{dataset}.dead_letters`") == [{"n": 0}]
        target = f"--bq_dataset={stack.project}:{dataset}"
        answers = {
            "stats": _verb(stack, "stats", target),
            "slo": _verb(stack, "slo", target, "--window=1h"),
            "status": _verb(stack, "status", target, f"--subscription={subscription}"),
            "stac": _verb(stack, "stac", target, f"--out={tmp_path / 'stac'}"),
        }
        failed = {verb: (done.returncode, done.stderr[-1500:]) for verb, done in answers.items()
                  if done.returncode != 0 or "Traceback" in done.stderr}
        assert failed == {}
        books = json.loads(answers["stats"].stdout)
        assert books["messages"]["in"] == 1 and books["messages"]["scored"] == 1
        assert books["balanced"] and books["dead_letters_by_stage_and_reason"] == []
        assert json.loads(answers["stac"].stdout)["items"] == 1

        # A granule whose last band comes after the timeout.
        files = list(tiles.per_band_files(tmp_path, "HLS.S30.T25MBR.2001196T120000.v2.0",
                                          crop).values())
        for path in files[:-1]:
            ledger.notify("dead_letter", f"incoming/fresh/{path.name}",
                          ledger.upload(path, f"incoming/fresh/{path.name}"))

        def letters() -> list[dict]:
            return query(stack, f"SELECT reason, source_message_ids, time FROM "
                                f"`{dataset}.dead_letters` ORDER BY time")

        assert wait_until(lambda: len(letters()) == 1, 120, child, every_s=0.5)
        [incomplete] = letters()
        assert "missing bands" in incomplete["reason"]
        assert len(incomplete["source_message_ids"]) == len(files) - 1
        late = files[-1]
        late_id = ledger.notify("dead_letter", f"incoming/fresh/{late.name}",
                                ledger.upload(late, f"incoming/fresh/{late.name}"))
        assert wait_until(lambda: len(letters()) == 2, 120, child, every_s=0.5)
    finally:
        stop_stream(child)
    [_, second] = letters()
    assert second["source_message_ids"] == [late_id]
    # Booked by the late-band rule, not held as a new granule until its timeout (whose letter
    # would say "missing bands" and carry no word of the earlier one).
    assert "after the granule was dead-lettered as incomplete" in second["reason"]
    assert "missing" in second["reason"] and "publish the granule's bands again" in second["reason"]
    entries = query(stack, f"SELECT COUNT(*) AS n FROM `{dataset}.messages`")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["messages_in"] == entries[0]["n"] == len(ledger.expected)
