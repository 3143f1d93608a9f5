"""Live vs candidate: the comparison SQL of pipeline/ops/sql/operations.sql on emulator rows."""

from __future__ import annotations

import datetime as dt

import pytest

from pipeline.ops.queries import OPERATIONS_FILE, run_query
from tests.streams import empty_dataset
from transforms.sinks import SCHEMAS

pytestmark = pytest.mark.stack

NAMES = ("developed", "forest", "water")
NOW = dt.datetime.now(dt.UTC)


def classes(pixels: tuple[int, int, int], area: float = 900.0) -> list[dict]:
    return [{"class_id": i, "name": n, "pixels": p, "area_m2": p * area}
            for i, (n, p) in enumerate(zip(NAMES, pixels, strict=True))]


def chip(tile: str, index: int, version: str, role: str, pixels, confidence: float) -> dict:
    dominant = NAMES[max(range(3), key=pixels.__getitem__)]
    t = NOW - dt.timedelta(minutes=5)
    return {"row_id": f"{version}-{tile}-{index}", "tile_id": tile, "tile_generation": "1",
            "chip_index": index, "row_off": 0, "col_off": 0, "height": 10, "width": 10,
            "crs": "EPSG:4326", "footprint": "POINT(0 0)", "valid_fraction": 1.0,
            "classes": classes(pixels), "dominant_class": dominant,
            "mean_confidence": confidence, "event_time": t.isoformat(),
            "published": t.isoformat(), "source": "gcs", "source_uris": [], "attributes": [],
            "model_name": "landcover-student", "model_version": version, "role": role,
            "chipped_at": t.isoformat(), "scored_at": t.isoformat(), "latency_s": 2.0}


def tile(tile_id: str, version: str, role: str, pixels, latency: float, failed: int = 0,
         ) -> dict:
    t = NOW - dt.timedelta(minutes=5)
    return {"row_id": f"{version}-{tile_id}", "tile_id": tile_id, "tile_generation": "1",
            "complete": failed == 0, "chips_total": 4, "chips_scored": 4 - failed,
            "chips_skipped": 0, "chips_failed": failed, "width": 10, "height": 10,
            "crs": "EPSG:4326", "footprint": "POINT(0 0)", "classes": classes(pixels),
            "raster_uri": "gs://b/x.tif", "event_time": t.isoformat(), "published": t.isoformat(),
            "source": "gcs", "source_uris": [], "attributes": [],
            "model_name": "landcover-student", "model_version": version, "role": role,
            "completed_at": (t + dt.timedelta(seconds=latency)).isoformat(),
            "latency_s": latency}


# Two tiles of 4 chips (100 valid pixels each) scored by live v1 and shadow v2.
LIVE = {("a", 0): (80, 20, 0), ("a", 1): (10, 90, 0), ("a", 2): (0, 30, 70),
        ("a", 3): (50, 40, 10), ("b", 0): (60, 40, 0), ("b", 1): (20, 80, 0),
        ("b", 2): (0, 0, 100), ("b", 3): (30, 70, 0)}
SHADOW = {("a", 0): (70, 30, 0), ("a", 1): (10, 90, 0), ("a", 2): (0, 40, 60),
          ("a", 3): (30, 60, 10), ("b", 0): (40, 60, 0), ("b", 1): (20, 80, 0),
          ("b", 2): (0, 10, 90), ("b", 3): (30, 70, 0)}


@pytest.fixture(scope="module")
def dataset(stack):
    bq = stack.bigquery()
    name = empty_dataset(stack, "cmp")
    chips = [chip(t, i, "1", "live", p, 0.8) for (t, i), p in LIVE.items()]
    chips += [chip(t, i, "2", "shadow", p, 0.7) for (t, i), p in SHADOW.items()]
    chips += [dict(chips[0])]  # a retried insert: counted once
    chips += [chip("c", 0, "2", "canary", (0, 100, 0), 0.9)]  # canary: no live pair
    chips += [chip("a", 0, "1", "live", (0, 0, 100), 0.1) | {"model_name": "other"}]
    tiles = [tile(t, "1", "live", tuple(sum(LIVE[(t, i)][k] for i in range(4))
                                        for k in range(3)), 3.0 + n)
             for n, t in enumerate("ab")]
    tiles += [tile(t, "2", "shadow", tuple(sum(SHADOW[(t, i)][k] for i in range(4))
                                           for k in range(3)), 5.0 + n)
              for n, t in enumerate("ab")]
    tiles += [tile("c", "2", "canary", (0, 300, 0), 9.0, failed=1)]
    letters = [{"stage": "inference", "reason": "model raised", "tile_id": "c",
                "time": NOW.isoformat()},
               {"stage": "parse", "reason": "not JSON", "tile_id": "a",
                "time": NOW.isoformat()}]
    for table, rows in (("chips", chips), ("tiles", tiles), ("dead_letters", letters)):
        assert bq.insert_rows_json(f"{stack.project}.{name}.{table}", rows) == []
    return f"{stack.project}.{name}"


def ask(stack, name: str, dataset: str) -> list[dict]:
    return run_query(stack.bigquery(), name, dataset, OPERATIONS_FILE, window_hours=24,
                     model_name="landcover-student", live_version="1", candidate_version="2")


def test_agreement_on_the_same_chips(stack, dataset):
    [row] = ask(stack, "compare_agreement", dataset)
    same = sum(max(range(3), key=LIVE[k].__getitem__) == max(range(3), key=SHADOW[k].__getitem__)
               for k in LIVE)
    overlap = sum(sum(min(a, b) for a, b in zip(LIVE[k], SHADOW[k], strict=True)) for k in LIVE)
    assert (row["tiles"], row["chips"]) == (2, 8)
    assert row["chip_agreement"] == pytest.approx(same / 8) == pytest.approx(6 / 8)
    assert row["pixel_overlap"] == pytest.approx(overlap / 800)
    assert row["live_mean_confidence"] == pytest.approx(0.8)
    assert row["candidate_mean_confidence"] == pytest.approx(0.7)


def test_class_area_deltas(stack, dataset):
    rows = {r["class_name"]: r for r in ask(stack, "compare_class_area", dataset)}
    for k, name in enumerate(NAMES):
        live = sum(p[k] for p in LIVE.values()) * 900 / 1e6
        cand = sum(p[k] for p in SHADOW.values()) * 900 / 1e6
        assert rows[name]["live_km2"] == pytest.approx(live)
        assert rows[name]["candidate_km2"] == pytest.approx(cand)
        assert rows[name]["delta_km2"] == pytest.approx(cand - live)
    assert rows["developed"]["delta_ratio"] == pytest.approx((200 - 250) / 250)
    assert next(iter(rows)) == "forest"  # biggest change (+70 px of 900 m²) first


def test_per_version_dead_letters_confidence_and_latency(stack, dataset):
    rows = {(r["model_version"], r["role"]): r for r in ask(stack, "compare_versions", dataset)}
    assert set(rows) == {("1", "live"), ("2", "shadow"), ("2", "canary")}
    canary = rows[("2", "canary")]
    assert (canary["tiles"], canary["dead_letters"], canary["dead_letter_rate"]) == (1, 1, 1.0)
    assert canary["chip_failure_ratio"] == pytest.approx(0.25)
    live = rows[("1", "live")]
    assert (live["tiles"], live["dead_letters"]) == (2, 0)  # a parse letter is not the model's
    assert live["mean_confidence"] == pytest.approx(0.8)
    assert rows[("2", "shadow")]["latency_p95_s"] == pytest.approx(6.0)


def test_the_handover_names_what_only_blue_can_answer(stack):
    """``release_handover`` on rows of every kind: green's intake until the bound, and any tile
    green answered as shadow after it (a worker that saw the cut-over late), each answered by
    blue (whole: every chip row in; or a dead letter), by green live, or by nobody yet."""
    from pipeline.ops import release

    bq = stack.bigquery()
    name = empty_dataset(stack, "handover")
    since, until = NOW - dt.timedelta(minutes=10), NOW - dt.timedelta(minutes=1)

    def entry(message_id: str, at: dt.datetime, rel: str = "G") -> dict:
        return {"message_id": message_id, "published": at.isoformat(),
                "delivered": at.isoformat(), "received_at": at.isoformat(),
                "kind": "notification", "release": rel}

    def answer(message_id: str, rel: str, role: str, chips_in: int = 4) -> list[tuple]:
        rows = [("tiles", tile(message_id, "1", role, (100, 300, 0), 2.0) | {
            "row_id": f"{rel}-{role}-{message_id}", "release": rel,
            "source_message_ids": [message_id]})]
        rows += [("chips", chip(message_id, i, "1", role, (100, 0, 0), 0.9) | {
            "row_id": f"{rel}-{role}-{message_id}-{i}", "release": rel}) for i in range(chips_in)]
        return rows

    before, after = NOW - dt.timedelta(minutes=5), NOW - dt.timedelta(seconds=30)
    entries = [entry(m, before) for m in ("m1", "m2", "m3", "m4", "m5")]
    entries += [entry("m6", after), entry("m7", after), entry("m8", before, rel="B")]
    rows = [("messages", e) for e in entries]
    rows += answer("m1", "B", "live")  # blue answered it whole
    rows += answer("m2", "B", "live", chips_in=3) + answer("m2", "G", "shadow")  # a chip short
    rows += answer("m3", "G", "live")  # green took it after its switch
    rows += answer("m4", "G", "shadow")  # green shadowed it; blue never did
    rows += [("dead_letters", {"stage": "parse", "reason": "r", "message_id": "m5",
                               "time": before.isoformat(), "release": "B"})]
    rows += answer("m6", "G", "shadow")  # after the bound, still shadow: a late switch
    rows += answer("m7", "G", "live")  # after the bound, live: green's to answer
    for table in SCHEMAS:
        batch = [row for t, row in rows if t == table]
        if batch:
            assert bq.insert_rows_json(f"{stack.project}.{name}.{table}", batch) == []
    state = release.handover(bq, f"{stack.project}.{name}", "B", "G", since, until)
    assert (state.messages, state.by_blue, state.by_green) == (6, 2, 1)
    assert state.pending == ["m2", "m4", "m6"]
    assert "3 of the 6 messages" in state.text("B", "G") and "do not drain" in state.text(
        "B", "G")


def test_the_release_comparison_starts_when_the_trial_began(stack):
    """`release compare` counts nothing from before `release green`: blue's earlier tiles have no
    green rows to be compared with, and counting them made green look behind."""
    from model.channels import Channels
    from pipeline.ops.release import compare_releases, compare_since

    bq = stack.bigquery()
    name = empty_dataset(stack, "cmprel")
    began = NOW - dt.timedelta(minutes=10)

    def at(row: dict, minutes_ago: int, release: str) -> dict:
        t = (NOW - dt.timedelta(minutes=minutes_ago)).isoformat()
        return row | {"event_time": t, "published": t, "completed_at": t, "release": release,
                      "row_id": f"{row['row_id']}-{minutes_ago}"}

    rows = [at(tile(f"old{i}", "1", "live", (1, 2, 3), 2.0), 40, "0.2.0") for i in range(3)]
    rows += [at(tile(f"new{i}", "1", "live", (1, 2, 3), 2.0), 5, "0.2.0") for i in range(2)]
    rows += [at(tile(f"new{i}", "1", "shadow", (1, 2, 3), 2.0), 5, "0.3.0") for i in range(2)]
    assert bq.insert_rows_json(f"{stack.project}.{name}.tiles", rows) == []
    channels = Channels(history=({"at": began.isoformat(), "action": "release-green"},))
    since = compare_since(channels, hours=1)
    assert since == began  # the trial began inside the hour asked for
    assert compare_since(Channels(), hours=1) < began  # no trial: the window alone
    odd = Channels(history=({"action": "release-green", "at": "yesterday"},))
    assert compare_since(odd, hours=1) < began  # an unreadable start: the window, no crash
    got = {r["side"]: r["tiles"] for r in compare_releases(
        bq, f"{stack.project}.{name}", "0.2.0", "0.3.0", since)}
    assert got == {"blue": 2, "green": 2}  # not the 5 blue wrote over the hour
