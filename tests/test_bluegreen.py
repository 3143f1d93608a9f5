"""A blue-green release of the stream on the local stack, end to end, with traffic flowing.

Blue (release 0.2.0) answers from one subscription of the topic; green (0.3.0) starts on a
second one, writing every row as shadow; the comparison reads both; cut-over makes green live
(green reports it) and blue stops; a second trial on the idle slot is aborted. Tiles are
published throughout. Nothing is lost and the shipped queries count each tile once.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import re
import time
import uuid

import pytest

from model.registry import Registry
from pipeline.ops import release
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
BLUE, GREEN, NEXT = "0.2.0", "0.3.0", "0.4.0"


def _ok(done) -> str:
    assert done.returncode == 0, (done.stdout[-1500:], done.stderr[-1500:])
    return done.stdout


class Trial:
    """A registry with the student live, a topic with two subscription slots, a dataset, and
    ``BLUE`` recorded live on the first slot: the scene of a blue-green release."""

    def __init__(self, stack, model_uri: str, tmp_path):
        self.stack, self.model_uri, self.tmp_path = stack, model_uri, tmp_path
        self.registry_uri = f"{stack.registry_prefix}/bluegreen-{uuid.uuid4().hex[:6]}"
        self.registry = Registry(self.registry_uri, gcs_client=stack.storage())
        ref, _ = self.registry.publish(str(STUDENT))
        self.registry.promote(ref, by="test")
        self.topic, self.blue_sub, self.dataset = fresh_input(stack, "bluegreen")
        self.green_sub = f"{self.blue_sub}-b"  # the second slot (terraform/releases.tf)
        stack.subscriber().create_subscription(
            request={"name": self.green_sub, "topic": self.topic, "ack_deadline_seconds": 10})
        self.target = (f"--registry={self.registry_uri}",
                       f"--bq_dataset={stack.project}:{self.dataset}")
        _ok(self.release("live", BLUE, f"--subscription={self.blue_sub}", "--job=blue"))
        self.crop = tiles.crop(tmp_path / "crop.tif", 0, 0, 100, 100)

    def release(self, *argv: str, timeout_s: float = 180):
        return cli(self.stack, "release", *argv, *self.target, timeout_s=timeout_s)

    def stream(self, release: str, subscription: str, log: str):
        return start_stream(self.stack, self.model_uri, self.tmp_path / log,
                            f"--subscription={subscription}",
                            f"--bq_dataset={self.stack.project}:{self.dataset}",
                            f"--output_prefix={self.stack.output_prefix}/{self.dataset}",
                            f"--model_registry={self.registry_uri}", "--channels_poll_secs=1",
                            "--window_secs=1", f"--release={release}")

    def rows(self, where: str) -> list[dict]:
        return query(self.stack,
                     f"SELECT tile_id, release, role FROM `{self.dataset}.tiles` WHERE {where}")

    def log(self, name: str) -> str:
        return (self.tmp_path / name).read_text()[-3000:]

    def cut_over(self, version: str, log: str) -> None:
        """``release cutover`` without waiting, then poll until green reports it took it: how
        long that takes is the machine's business, and ``--wait_secs`` would also be the time
        a handover that cannot pass is waited for."""
        since = time.time() - 1
        _ok(self.release("cutover", version))
        assert release.wait_until_live(self.stack.bigquery(), self.dataset, version, since,
                                       360) is not None, self.log(log)


def test_blue_green_release_loses_nothing_and_counts_each_tile_once(stack, model_uri,
                                                                     tmp_path):
    trial = Trial(stack, model_uri, tmp_path)
    registry, dataset, target = trial.registry, trial.dataset, trial.target
    topic, blue_sub, green_sub = trial.topic, trial.blue_sub, trial.green_sub
    stream, rows, crop = trial.stream, trial.rows, trial.crop
    blue = stream(BLUE, blue_sub, "blue.log")
    green = None
    try:
        # Traffic at a pace two streams on a loaded machine keep up with.
        with TilePublisher(stack, topic, crop, "bg", every_s=3.0) as traffic:
            assert wait_until(lambda: len(rows(f"release = '{BLUE}'")) >= 3, 360, blue, 1), \
                (tmp_path / "blue.log").read_text()[-3000:]
            # Green: its subscription seeded from blue's, its job started, its rows shadow.
            _ok(cli(stack, "release", "green", GREEN, f"--subscription={green_sub}",
                    "--job=green", *target))
            green = stream(GREEN, green_sub, "green.log")
            assert wait_until(lambda: len(rows(f"release = '{GREEN}'")) >= 3, 360, green, 1), \
                (tmp_path / "green.log").read_text()[-3000:]
            # Chip rows follow tile rows by a load job: compare again until green's are in,
            # as an operator repeats it while the trial runs.
            compared: dict = {}

            def compare() -> bool:
                compared.update({r["side"]: r for r in json.loads(_ok(cli(
                    stack, "release", "compare", f"--blue={BLUE}", f"--green={GREEN}",
                    *target)))})
                return compared["green"]["tiles"] >= 3 and compared["green"]["chips_compared"] >= 4
            assert wait_until(compare, 360, green, 2), compared
            # Cut-over while tiles keep coming: green says it took it, blue answers what green
            # took in as shadow (the handover, counted at green's entry), then blue stops.
            cutover_at = time.time()
            trial_began = release.trial_start(registry.read_channels()[0])
            _ok(cli(stack, "release", "cutover", GREEN, "--wait_secs=360",
                    "--green_poll_secs=1", "--settle_secs=5", *target, timeout_s=480))
            live_at = release.wait_until_live(stack.bigquery(), dataset, GREEN, cutover_at, 0)
            handed = release.handover(stack.bigquery(), dataset, BLUE, GREEN, trial_began,
                                      live_at + dt.timedelta(seconds=1))
            blue_exit = stop_stream(blue)
            after = time.time()
            assert wait_until(lambda: len(traffic.since(after)) >= 3, 60)
        published = traffic.sent
        # Every tile answered in the shipped queries, by one release or the other.
        dataset_sql = f"{stack.project}.{dataset}"

        def ready() -> list[dict]:  # the sample tile is out of the model's distribution
            return run_query(stack.bigquery(), "tiles_ready", dataset_sql, days=1,
                             include_drifted=True)

        assert wait_until(lambda: {r["tile_id"] for r in ready()} >= set(published), 600,
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
    # What green took in as shadow was answered before blue stopped (cut-over said so).
    assert handed.messages >= 3 and not handed.pending
    assert set(answered) == set(published) and set(answered.values()) == {1}
    assert set(chips.values()) == {1} and set(per_tile.values()) == {4}
    assert set(areas.values()) == {1}
    # Before green: blue's alone; during the trial both (green's as shadow); after: green's.
    live_after = {r["tile_id"] for r in rows(f"release = '{GREEN}' AND role = 'live'")}
    assert set(traffic.since(after)) <= live_after
    # Until green reported taking the cut-over, its rows are shadow and blue's are live.
    live_us = int(live_at.timestamp() * 1e6)
    before = query(stack, f"SELECT release, role FROM `{dataset}.tiles` "
                          f"WHERE completed_at < TIMESTAMP_MICROS({live_us})")
    roles = {(r["release"], r["role"]) for r in before}
    assert roles == {(BLUE, "live"), (GREEN, "shadow")}, roles
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
        ("blue-green release, tiles published every 3 s throughout (green started, compared, "
         "cut over, blue stopped)", "0 lost, 0 counted twice in the shipped queries",
         f"{len(published)} tiles published, {len(answered)} in `tiles_ready` once each, "
         f"{sum(chips.values())} chips once each; {len(both)} scored by both releases; "
         f"cut-over to blue stopped {after - cutover_at:.1f} s; blue exit code {blue_exit}"),
        ("handover before blue stops (`release cutover --wait_secs`, counted at green's "
         "entry)", "every message green took in as shadow answered live",
         f"{handed.messages} messages green took in before it answered live, "
         f"{handed.by_blue} answered by blue, {len(handed.pending)} pending"),
        ("green against blue (`tilestream release compare`)", "agreement, dead letters, latency",
         f"{green_row['chips_compared']} chips compared, agreement "
         f"{green_row['chip_agreement']:.3f}; dead letters {blue_row['dead_letters']} / "
         f"{green_row['dead_letters']}; latency p50 {blue_row['latency_p50_s']:.1f} s / "
         f"{green_row['latency_p50_s']:.1f} s")]


def test_cutover_keeps_blue_while_a_message_green_took_as_shadow_is_unanswered(
        stack, model_uri, tmp_path):
    """Blue has died (or lags) and green has scored tiles as shadow: nobody answers them as
    users read. The handover check (``release handover``, what ``cutover --wait_secs`` runs)
    must say not to drain blue, naming them."""
    trial = Trial(stack, model_uri, tmp_path)
    _ok(trial.release("green", GREEN, f"--subscription={trial.green_sub}", "--job=green"))
    green = trial.stream(GREEN, trial.green_sub, "green.log")
    try:
        with TilePublisher(stack, trial.topic, trial.crop, "nb", every_s=1.5) as traffic:
            assert wait_until(lambda: len(trial.rows("role = 'shadow'")) >= 2, 360, green, 1), \
                trial.log("green.log")
            trial.cut_over(GREEN, "green.log")
            done = trial.release("handover", GREEN, "--wait_secs=20", "--green_poll_secs=1")
            shadow_only = {r["tile_id"] for r in trial.rows("role = 'shadow'")}
        sent = dict(traffic.sent)
    finally:
        stop_stream(green)
    assert done.returncode == 4, (done.stdout, done.stderr)
    assert "took the cut-over" in done.stdout  # green did go live: only the handover is missing
    assert f"not answered by {BLUE} yet" in done.stderr and "do not drain" in done.stderr
    named = set(re.search(r"\(first: ([^)]*)\)", done.stderr).group(1).split(", "))
    assert named and named <= {sent[t] for t in shadow_only}
    ready = {r["tile_id"] for r in run_query(stack.bigquery(), "tiles_ready",
                                             f"{stack.project}.{trial.dataset}", days=1,
                                             include_drifted=True)}
    assert not ready & {t for t, m in sent.items() if m in named}  # those really are unanswered
    pending, took_in = re.search(r"(\d+) of the (\d+) messages", done.stderr).groups()
    REPORT["releases"].append((
        "cut-over with blue gone, green's rows shadow until then (`release handover "
        "--wait_secs=20` once green took it)",
        "blue not to be drained: exit 4, the unanswered messages named",
        f"exit {done.returncode}: {pending} of the {took_in} messages green took in before it "
        f"answered live unanswered; none of the named in `tiles_ready`"))


def test_the_handover_covers_the_backlog_a_lagging_blue_had_not_pulled_before_the_trial(
        stack, model_uri, tmp_path):
    """Blue lags (its job is down) while tiles queue on its subscription; then the trial starts.
    Green's slot is seeded from a snapshot of blue's, so green takes that backlog in, and the
    handover holds blue until it has answered it: the check exits 4 while blue is down, and
    `release handover` passes once blue, started late, has caught up."""
    trial = Trial(stack, model_uri, tmp_path)
    with TilePublisher(stack, trial.topic, trial.crop, "lag", every_s=1.0) as backlog:
        assert wait_until(lambda: len(backlog.sent) >= 3, 60, every_s=0.5)
    queued = dict(backlog.sent)  # published before the trial, pulled by nobody yet
    _ok(trial.release("green", GREEN, f"--subscription={trial.green_sub}", "--job=green"))
    green, blue = trial.stream(GREEN, trial.green_sub, "green.log"), None
    try:
        def green_tiles() -> set[str]:
            return {r["tile_id"] for r in trial.rows(f"release = '{GREEN}'")}

        assert wait_until(lambda: set(queued) <= green_tiles(), 360, green, 2), (
            sorted(set(queued) - green_tiles()), trial.log("green.log"))
        with TilePublisher(stack, trial.topic, trial.crop, "lagnow", every_s=1.5):
            trial.cut_over(GREEN, "green.log")
            held = trial.release("handover", GREEN, "--wait_secs=20", "--green_poll_secs=1",
                                 "--settle_secs=5")
            blue = trial.stream(BLUE, trial.blue_sub, "blue.log")
            again = trial.release("handover", GREEN, "--wait_secs=480", "--green_poll_secs=1",
                                  "--settle_secs=5", timeout_s=600)
        channels, _ = trial.registry.read_channels()
        cut = release.last_cutover(channels, GREEN)
        bq, dataset = stack.bigquery(), f"{stack.project}.{trial.dataset}"
        live_at = release.wait_until_live(bq, dataset, GREEN, cut.at.timestamp(), 0)
        handed = release.handover(bq, dataset, BLUE, GREEN, cut.trial_began,
                                  live_at + dt.timedelta(seconds=1))
    finally:
        for child in (green, blue):
            if child is not None:
                stop_stream(child)
    assert held.returncode == 4, (held.stdout, held.stderr)
    assert f"not answered by {BLUE} yet" in held.stderr and "do not drain" in held.stderr
    assert "tilestream release handover" in held.stderr  # how to check again
    assert again.returncode == 0, (again.stdout, again.stderr, trial.log("blue.log"))
    assert "the old job can be drained" in again.stdout
    # The backlog is in the handover, and every message of it is answered (by blue, late).
    assert set(queued.values()) <= handed.taken_in and not handed.pending
    pending, took_in = re.search(r"(\d+) of the (\d+) messages", held.stderr).groups()
    REPORT["releases"].append((
        "blue lagging (down) with tiles queued on its subscription before the trial; green "
        "seeded from a snapshot of it; cut-over, then blue started late",
        "the handover covers blue's backlog: exit 4 until blue answers it, then 0 "
        "(`release handover`)",
        f"{len(queued)} tiles queued before the trial, all taken in by green; cut-over exit "
        f"{held.returncode} ({pending} of {took_in} unanswered); re-check exit "
        f"{again.returncode}: {handed.messages} messages, {handed.by_blue} answered by blue, "
        f"{handed.by_green} by green live, {len(handed.pending)} pending"))
