"""A blue-green release of the stream on the local stack, end to end, with traffic flowing.

Blue (release 0.1.0) answers from one subscription of the topic; green (0.2.0) starts on a
second one, writing every row as shadow; the comparison reads both; cut-over makes green live
(green reports it) and blue stops; a second trial on the idle slot is aborted. Tiles are
published throughout. Nothing is lost and the shipped queries count each tile once.
"""

from __future__ import annotations

import collections
import json
import time
import uuid

import pytest

from model.registry import Registry
from pipeline.ops.queries import run_query
from tests import tiles
from tests.conftest import REPORT
from tests.streams import (
    TilePublisher,
    cli,
    fresh_input,
    query,
    start_stream,
    stop_stream,
    wait_until,
)
from tests.test_registry import STUDENT

pytestmark = [pytest.mark.stack, pytest.mark.slow]
BLUE, GREEN, NEXT = "0.1.0", "0.2.0", "0.3.0"


def _ok(done) -> str:
    assert done.returncode == 0, (done.stdout[-1500:], done.stderr[-1500:])
    return done.stdout


def test_blue_green_release_loses_nothing_and_counts_each_tile_once(stack, model_uri,
                                                                     tmp_path):
    registry_uri = f"{stack.registry_prefix}/bluegreen-{uuid.uuid4().hex[:6]}"
    registry = Registry(registry_uri, gcs_client=stack.storage())
    ref, _ = registry.publish(str(STUDENT))
    registry.promote(ref, by="test")
    topic, blue_sub, dataset = fresh_input(stack, "bluegreen")
    green_sub = f"{blue_sub}-b"  # the second subscription slot (templates/terraform/releases.tf)
    stack.subscriber().create_subscription(
        request={"name": green_sub, "topic": topic, "ack_deadline_seconds": 10})
    target = (f"--registry={registry_uri}", f"--bq_dataset={stack.project}:{dataset}")
    _ok(cli(stack, "release", "live", BLUE, f"--subscription={blue_sub}", "--job=blue",
            *target))

    def stream(release: str, subscription: str, log: str):
        return start_stream(stack, model_uri, tmp_path / log, f"--subscription={subscription}",
                            f"--bq_dataset={stack.project}:{dataset}",
                            f"--output_prefix={stack.output_prefix}/{dataset}",
                            f"--model_registry={registry_uri}", "--channels_poll_secs=1",
                            "--window_secs=1", f"--release={release}")

    def rows(where: str) -> list[dict]:
        return query(stack, f"SELECT tile_id, release, role FROM `{dataset}.tiles` WHERE {where}")

    crop = tiles.crop(tmp_path / "crop.tif", 0, 0, 100, 100)
    blue = stream(BLUE, blue_sub, "blue.log")
    green = None
    try:
        with TilePublisher(stack, topic, crop, "bg", every_s=1.5) as traffic:
            assert wait_until(lambda: len(rows(f"release = '{BLUE}'")) >= 3, 180, blue, 1), \
                (tmp_path / "blue.log").read_text()[-3000:]
            # Green: its subscription sought to now, its job started, its rows shadow.
            _ok(cli(stack, "release", "green", GREEN, f"--subscription={green_sub}",
                    "--job=green", *target))
            green = stream(GREEN, green_sub, "green.log")
            assert wait_until(lambda: len(rows(f"release = '{GREEN}'")) >= 3, 180, green, 1), \
                (tmp_path / "green.log").read_text()[-3000:]
            # Chip rows follow tile rows by a load job: compare again until green's are in,
            # as an operator repeats it while the trial runs.
            compared: dict = {}

            def compare() -> bool:
                compared.update({r["side"]: r for r in json.loads(_ok(cli(
                    stack, "release", "compare", f"--blue={BLUE}", f"--green={GREEN}",
                    *target)))})
                return compared["green"]["chips_compared"] >= 4
            assert wait_until(compare, 60, green, 2), compared
            # Cut-over while tiles keep coming: green says it took it, then blue stops.
            cutover_at = time.time()
            _ok(cli(stack, "release", "cutover", GREEN, "--wait_secs=90", *target))
            blue_exit = stop_stream(blue)
            after = time.time()
            assert wait_until(lambda: len(traffic.since(after)) >= 3, 60)
        published = traffic.sent
        # Every tile answered in the shipped queries, by one release or the other.
        dataset_sql = f"{stack.project}.{dataset}"

        def ready() -> list[dict]:  # the sample tile is out of the model's distribution
            return run_query(stack.bigquery(), "tiles_ready", dataset_sql, days=1,
                             include_drifted=True)

        assert wait_until(lambda: {r["tile_id"] for r in ready()} >= set(published), 180,
                          green, 2), sorted(set(published) - {r["tile_id"] for r in ready()})
        # A second trial on the idle slot (blue's), aborted: the live release stays.
        _ok(cli(stack, "release", "green", NEXT, f"--subscription={blue_sub}", *target))
        _ok(cli(stack, "release", "abort", NEXT, *target))
    finally:
        for child in (blue, green):
            if child is not None:
                stop_stream(child)
    answered = collections.Counter(r["tile_id"] for r in ready())
    chips = collections.Counter((r["tile_id"], r["chip_index"]) for r in run_query(
        stack.bigquery(), "latest_prediction_per_chip", dataset_sql, days=1,
        include_drifted=True))
    areas = collections.Counter((r["tile_id"], r["class_name"]) for r in run_query(
        stack.bigquery(), "class_area_per_tile_and_day", dataset_sql, include_drifted=True))
    per_tile = collections.Counter(tile for tile, _ in chips)
    assert blue_exit == 0  # the old stream stops cleanly
    assert set(answered) == set(published) and set(answered.values()) == {1}
    assert set(chips.values()) == {1} and set(per_tile.values()) == {4}
    assert set(areas.values()) == {1}
    # Before green: blue's alone; during the trial both (green's as shadow); after: green's.
    live_after = {r["tile_id"] for r in rows(f"release = '{GREEN}' AND role = 'live'")}
    assert set(traffic.since(after)) <= live_after
    shadow = rows(f"release = '{GREEN}' AND role = 'shadow'")
    assert shadow and all(r["release"] == GREEN for r in shadow)
    green_row, blue_row = compared["green"], compared["blue"]
    assert green_row["tiles"] >= 3 and green_row["chips_compared"] >= 4
    assert green_row["chip_agreement"] == 1.0  # same model, same code path: same answers
    assert blue_row["dead_letters"] == green_row["dead_letters"] == 0
    channels, _ = registry.read_channels()
    assert channels.live_release.release == GREEN and channels.green_release is None
    assert [h["action"] for h in channels.history][-4:] == [
        "release-green", "release-cutover", "release-green", "release-abort"]
    both = {r["tile_id"] for r in rows(f"release = '{BLUE}'")} & {
        r["tile_id"] for r in rows(f"release = '{GREEN}'")}
    REPORT["releases"] += [
        ("blue-green release, tiles published every 1.5 s throughout (green started, compared, "
         "cut over, blue stopped)", "0 lost, 0 counted twice in the shipped queries",
         f"{len(published)} tiles published, {len(answered)} in `tiles_ready` once each, "
         f"{sum(chips.values())} chips once each; {len(both)} scored by both releases; "
         f"cut-over to blue stopped {after - cutover_at:.1f} s; blue exit code {blue_exit}"),
        ("green against blue (`tilestream release compare`)", "agreement, dead letters, latency",
         f"{green_row['chips_compared']} chips compared, agreement "
         f"{green_row['chip_agreement']:.3f}; dead letters {blue_row['dead_letters']} / "
         f"{green_row['dead_letters']}; latency p50 {blue_row['latency_p50_s']:.1f} s / "
         f"{green_row['latency_p50_s']:.1f} s")]
