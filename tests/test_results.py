"""The results topic: a real subscriber on the local Pub/Sub emulator reads what the stream
publishes (docs/results.md): one ``answered`` event per tile version answered, equal to what the
tables say, a ``refused`` one per refusal, none from a green job, each valid against the shipped
JSON Schema."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import jsonschema
import pytest

from pipeline.ops import announce
from tests import tiles
from tests.streams import fresh_input, query, start_stream, stop_stream, wait_until

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "templates" / "schemas" / "result-event.json").read_text())


def results_subscription(stack, name: str) -> tuple[str, str]:
    """A results topic of the test's own and a subscription on it (made before the stream
    publishes: Pub/Sub keeps messages only for subscriptions that exist)."""
    suffix = uuid.uuid4().hex[:6]
    topic = f"projects/{stack.project}/topics/{name}-results-{suffix}"
    subscription = f"projects/{stack.project}/subscriptions/{name}-results-{suffix}"
    stack.publisher().create_topic(name=topic)
    stack.subscriber().create_subscription(request={"name": subscription, "topic": topic,
                                                    "ack_deadline_seconds": 30})
    return topic, subscription


class Inbox:
    """Every message a subscription delivered (acked), in arrival order."""

    def __init__(self, stack, subscription: str):
        self.client, self.subscription = stack.subscriber(), subscription
        self.messages: list[dict] = []

    def pull(self) -> list[dict]:
        from google.api_core.exceptions import DeadlineExceeded

        try:
            got = self.client.pull(request={"subscription": self.subscription,
                                            "max_messages": 100}, timeout=10)
        except DeadlineExceeded:
            return self.messages
        if got.received_messages:
            self.client.acknowledge(request={"subscription": self.subscription, "ack_ids": [
                m.ack_id for m in got.received_messages]})
        for m in got.received_messages:
            self.messages.append({"data": json.loads(m.message.data),
                                  "attributes": dict(m.message.attributes)})
        return self.messages

    def of(self, outcome: str) -> list[dict]:
        return [m for m in self.messages if m["data"]["outcome"] == outcome]


def test_the_schema_is_a_valid_json_schema_and_refuses_a_globe_of_nonsense():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"schema": SCHEMA["$id"], "event_id": "0" * 32,
                             "outcome": "answered", "tile_id": "x"}, SCHEMA)


def _pending(generation: str = "2", release: str = "0.3.0", since: float = 0.0):
    from transforms.result_events import Pending

    return Pending("t", generation, f"row-{generation}", release, "live",
                   f"2026-01-0{generation}T00:00:00+00:00", since, footprint="POLYGON((0 0, "
                   "1 0, 1 1, 0 0))")


def _answer(generation: str, release: str = "0.3.0") -> dict:
    return {"row_id": f"row-{generation}", "release": release, "read_role": "live",
            "tile_generation": generation,
            "generation_time": f"2026-01-0{generation}T00:00:00+00:00"}


@pytest.mark.parametrize(("answer", "readable", "now", "verdict"), [
    (None, True, 10.0, "wait"),  # the tile has no whole answer yet
    (None, True, 1000.0, "expired"),  # ... and never had one within the bound
    (_answer("2"), True, 10.0, "publish"),
    (_answer("2"), False, 10.0, "wait"),  # whole in BigQuery, COG or STAC Item not there yet
    (_answer("2", release="0.2.0"), True, 10.0, "settled"),  # blue wrote this version first
    (_answer("3"), True, 10.0, "settled"),  # a newer generation answers the tile
    (_answer("1"), True, 10.0, "wait"),  # an older one answers until this one is whole
])
def test_a_waiting_answer_is_published_only_as_the_tiles_readable_answer(answer, readable, now,
                                                                        verdict):
    from transforms.result_events import decide

    decision = decide([_pending()], {"t": answer} if answer else {}, lambda _: readable, now,
                      wait_secs=900)
    got = {name for name in ("publish", "wait", "settled", "expired")
           if getattr(decision, name)}
    assert got == {verdict}


def test_letters_are_refusals_of_the_input_or_failures_of_the_stream_with_every_id():
    from transforms.records import DeadLetter
    from transforms.result_events import letter_event

    parse = letter_event(DeadLetter("parse", "not JSON", "m1", time=1.0), "0.3.0")
    failed = letter_event(DeadLetter("inference", "model refused", "m2", "t", time=1.0,
                                     message_ids=("m2", "m3")), "0.3.0")
    assert parse.payload["outcome"] == "refused" and parse.payload["source_message_ids"] == ["m1"]
    assert failed.payload["outcome"] == "dead_lettered"
    assert failed.payload["source_message_ids"] == ["m2", "m3"]
    for event in (parse, failed):
        jsonschema.validate(event.payload, SCHEMA)
    again = letter_event(DeadLetter("parse", "not JSON", "m1", time=2.0), "0.3.0")
    assert again == parse  # the same letter, later: the same id and the same payload


def _notify(stack, topic: str, path: Path, name: str) -> tuple[str, int]:
    generation = announce.upload(stack.storage(), str(path), stack.bucket, name)[1]
    return announce.publish(stack.publisher(), topic, *announce.gcs_notification(
        stack.bucket, name, generation)), generation


@pytest.mark.stack
@pytest.mark.slow
def test_a_mixed_run_publishes_one_event_per_answer_equal_to_the_tables(stack, model_uri,
                                                                         tmp_path):
    """Good tiles, a refused message, a duplicate, a second generation of a tile and a stream
    killed in the middle and restarted: one answered event per tile version answered, each
    equal to its tile row; copies (at-least-once) carry the same id and the same payload."""
    topic, subscription, dataset = fresh_input(stack, "results")
    results_topic, results_sub = results_subscription(stack, "mixed")
    inbox = Inbox(stack, results_sub)
    crop = tiles.crop(tmp_path / "crop.tif", 0, 0, 100, 100)
    other = tiles.crop(tmp_path / "other.tif", 100, 100, 100, 100)
    args = (f"--subscription={subscription}", f"--bq_dataset={stack.project}:{dataset}",
            f"--output_prefix={stack.output_prefix}/{dataset}", "--window_secs=1",
            "--max_batch_size=8", f"--results_topic={results_topic}")
    names = [f"incoming/results/{dataset}/good-{i}.tif" for i in range(4)]
    for name in names[:2]:
        _notify(stack, topic, crop, name)
    refused_id = announce.publish(stack.publisher(), topic, b"\x00 not json", {})
    log = tmp_path / "stream.log"
    first = start_stream(stack, model_uri, log, *args)
    # Killed once the first two answers are out (an answer whose row is written but whose event
    # is not yet published dies with a killed local process: docs/results.md, "Known limits").
    started = wait_until(lambda: len(inbox.pull() and inbox.of("answered")) >= 2, 240, first,
                         every_s=1)
    first.kill()  # SIGKILL
    first.wait(timeout=30)
    assert started, log.read_text(errors="replace")[-3000:]
    # While it is down: two more tiles, one delivered twice, and a new generation of the first.
    for name in names[2:]:
        generation = _notify(stack, topic, crop, name)[1]
    announce.publish(stack.publisher(), topic, *announce.gcs_notification(
        stack.bucket, names[3], generation))  # the duplicate
    _notify(stack, topic, other, names[0])  # a second generation of good-0
    metrics = tmp_path / "metrics.json"
    second = start_stream(stack, model_uri, log, *args, f"--metrics_file={metrics}")
    tile_ids = {Path(n).stem for n in names}

    def answers() -> dict:
        return {(r["tile_id"], r["tile_generation"]): r for r in query(
            stack, f"SELECT * EXCEPT (footprint) FROM `{dataset}.tiles` WHERE role = 'live'")}

    def arrived() -> bool:
        inbox.pull()
        versions = {(m["data"]["tile_id"], m["data"]["tile_generation"])
                    for m in inbox.of("answered")}
        return (len(versions) >= 5 and set(answers()) <= versions
                and any(refused_id in m["data"]["source_message_ids"]
                        for m in inbox.of("refused")))

    try:
        done = wait_until(arrived, 300, second, every_s=2)
        time.sleep(6)  # anything more it would publish (it must not) has time to arrive
        inbox.pull()
    finally:
        stop_stream(second)
    assert done, (inbox.messages, log.read_text(errors="replace")[-3000:])
    counts = json.loads(metrics.read_text())  # the check's cost (docs/results.md)
    print(f"second stream: {counts.get('tiles_written')} tiles, {counts.get('results_checks')} "
          f"check queries, {counts.get('results_published')} events published")
    for message in inbox.messages:
        jsonschema.validate(message["data"], SCHEMA)
    by_id: dict[str, list[dict]] = {}
    for message in inbox.of("answered"):
        by_id.setdefault(message["data"]["event_id"], []).append(message)
    # Never two payloads for one id; one id per tile version.
    assert all(len({json.dumps(m["data"], sort_keys=True) for m in copies}) == 1
               for copies in by_id.values())
    versions = [(c[0]["data"]["tile_id"], c[0]["data"]["tile_generation"])
                for c in by_id.values()]
    assert len(versions) == len(set(versions)) == 5, versions
    assert {v[0] for v in versions} == tile_ids
    rows = answers()
    assert set(versions) == set(rows)
    for copies in by_id.values():
        event, attributes = copies[0]["data"], copies[0]["attributes"]
        row = rows[(event["tile_id"], event["tile_generation"])]
        total = sum(c["pixels"] for c in row["classes"])
        assert event["model"] == {"name": row["model_name"], "version": row["model_version"]}
        assert event["release"] == row["release"] and event["role"] == "live"
        assert event["raster_uri"] == row["raster_uri"] and event["stac_uri"] == row["stac_uri"]
        assert event["latency_s"] == pytest.approx(row["latency_s"])
        assert event["source_message_ids"] == list(row["source_message_ids"])
        assert event["classes"] == [
            {"class_id": c["class_id"], "name": c["name"], "pixels": c["pixels"],
             "area_m2": pytest.approx(c["area_m2"]), "fraction": pytest.approx(
                 c["pixels"] / total)} for c in sorted(row["classes"],
                                                       key=lambda c: c["class_id"])]
        assert event["footprint"]["type"] == "Polygon"
        assert attributes["outcome"] == "answered" and attributes["tile_id"] == row["tile_id"]
        assert attributes["model"] == f"{row['model_name']}/{row['model_version']}"
        assert attributes["event_id"] == event["event_id"]
        chips = query(stack, f"SELECT COUNT(DISTINCT row_id) AS n FROM `{dataset}.chips` "
                             f"WHERE tile_id = '{row['tile_id']}' AND "
                             f"tile_generation = '{row['tile_generation']}'")
        assert chips[0]["n"] >= row["chips_scored"] > 0
    [refusal] = [m for m in inbox.of("refused") if refused_id in m["data"]["source_message_ids"]]
    assert refusal["data"]["stage"] == "parse" and refusal["data"]["reason"]
    # The duplicate and the superseded are not outcomes a consumer reads: no event of theirs.
    assert {m["data"]["outcome"] for m in inbox.messages} <= {"answered", "refused"}


@pytest.mark.stack
@pytest.mark.slow
def test_a_green_job_on_trial_publishes_nothing(stack, model_uri, tmp_path):
    """Green before cut-over: its rows are shadow and its refusals not the books consumers
    read, so neither an answered nor a refused event leaves it, nor a changed one for a
    location whose second acquisition gains water."""
    from tests.test_bluegreen import GREEN, Trial, _ok
    from tests.test_changes import Scenario, granule, grid_tiles

    trial = Trial(stack, model_uri, tmp_path)
    results_topic, results_sub = results_subscription(stack, "green")
    inbox = Inbox(stack, results_sub)
    _ok(trial.release("green", GREEN, f"--subscription={trial.green_sub}", "--job=green"))
    for i in range(2):
        _notify(stack, trial.topic, trial.crop, f"incoming/results/{trial.dataset}/g-{i}.tif")
    announce.publish(stack.publisher(), trial.topic, b"\x00 not json", {})
    scenario = Scenario(stack, trial.topic, grid_tiles(tmp_path), trial.dataset)
    dry, wet = granule("25MCP", 10), granule("25MCP", 20)
    scenario.publish(dry, "dry", 10)
    scenario.publish(wet, "wet", 20)
    green = start_stream(stack, model_uri, tmp_path / "green.log",
                         f"--subscription={trial.green_sub}",
                         f"--bq_dataset={stack.project}:{trial.dataset}",
                         f"--output_prefix={stack.output_prefix}/{trial.dataset}",
                         f"--model_registry={trial.registry_uri}", "--channels_poll_secs=1",
                         "--window_secs=1", f"--release={GREEN}",
                         f"--results_topic={results_topic}")

    def whole() -> bool:
        chips = query(stack, f"SELECT COUNT(DISTINCT tile_id) AS n FROM `{trial.dataset}.chips`")
        letters = query(stack, f"SELECT stage FROM `{trial.dataset}.dead_letters`")
        return bool(chips and chips[0]["n"] >= 4 and letters)

    try:
        done = wait_until(whole, 240, green, every_s=2)
        time.sleep(10)  # several checks of the publisher after its rows are whole
        inbox.pull()
    finally:
        stop_stream(green)
    assert done, trial.log("green.log")
    assert {r["role"] for r in trial.rows("TRUE")} == {"shadow"}
    assert {dry, wet} <= {r["tile_id"] for r in trial.rows("complete")}
    assert inbox.messages == []


@pytest.mark.stack
@pytest.mark.slow
def test_tilestream_follow_local_shows_the_tiles_event(stack, model_uri, tmp_path):
    """`tilestream follow --local` with a filter prints the event of the tile a local stream
    (results topic by default: the stack's) answers."""
    import subprocess
    import sys

    topic, subscription, dataset = fresh_input(stack, "follow")
    tile_id = f"follow-{uuid.uuid4().hex[:6]}"
    follower = subprocess.Popen(
        [sys.executable, "-m", "pipeline.ops.cli", "follow", "--local",
         f"--stack_dir={stack.run_dir}", f"--filter=attributes.tile_id = \"{tile_id}\"",
         "--max_events=1", "--timeout_secs=300"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    crop = tiles.crop(tmp_path / "crop.tif", 0, 0, 100, 100)
    log = tmp_path / "stream.log"
    child = start_stream(stack, model_uri, log, f"--subscription={subscription}",
                         f"--bq_dataset={stack.project}:{dataset}",
                         f"--output_prefix={stack.output_prefix}/{dataset}", "--window_secs=1")
    try:
        assert wait_until(lambda: "following" in (follower.stderr.readline() or ""), 60)
        _notify(stack, topic, crop, f"incoming/results/{dataset}/{tile_id}.tif")
        out, err = follower.communicate(timeout=320)
    finally:
        stop_stream(child)
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 0, err
    [line] = out.splitlines()
    event = json.loads(line)
    assert event["tile_id"] == tile_id and event["outcome"] == "answered", line
    assert event["attributes"]["tile_id"] == tile_id
    jsonschema.validate({k: v for k, v in event.items() if k != "attributes"}, SCHEMA)


def test_a_change_is_published_only_once_its_row_is_queryable_and_never_after_the_bound():
    from transforms.result_events import PendingChange, decide_changes

    there, missing, old = (PendingChange({"change_id": "a"}, 0.0),
                           PendingChange({"change_id": "b"}, 0.0),
                           PendingChange({"change_id": "c"}, -1000.0))
    assert decide_changes([there, missing, old], {"a"}, 10.0, wait_secs=900) == (
        [there], [missing], [old])


def test_an_antimeridian_answer_carries_its_footprint_cut_at_180_degrees():
    """The event's footprint follows RFC 7946 §3.1.9 like the STAC Item: a tile over Fiji
    crossing ±180° is two small polygons, not a band around the globe (checked with shapely's
    areas, which a schema validator would not notice)."""
    from shapely.geometry import shape

    from transforms.result_events import answer_event

    fiji = ("POLYGON ((179.8 -17.2, -179.9 -17.2, -179.9 -16.9, 179.8 -16.9, 179.8 -17.2))")
    row = {"tile_id": "fiji", "tile_generation": "1", "model_name": "m", "model_version": "1",
           "release": "0.3.0", "role": "live", "complete": True, "footprint": fiji,
           "classes": [{"class_id": 0, "name": "water", "pixels": 4, "area_m2": 3600.0}],
           "drifted": False, "raster_uri": "gs://b/p.tif", "stac_uri": "gs://b/p.json",
           "published": "2026-12-07T10:00:00+00:00", "completed_at": "2026-12-07T10:00:09+00:00",
           "latency_s": 9.0, "acquired": None}
    event = answer_event(row, "CELL:-17.1,179.9")
    jsonschema.validate(event.payload, SCHEMA)
    footprint = event.payload["footprint"]
    assert footprint["type"] == "MultiPolygon"
    parts = [shape({"type": "Polygon", "coordinates": p}) for p in footprint["coordinates"]]
    assert all(p.bounds[2] - p.bounds[0] < 1 for p in parts)  # each side of ±180°, small
    assert sum(p.area for p in parts) == pytest.approx(0.3 * 0.3, rel=1e-4)
