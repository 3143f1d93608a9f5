"""Which release answers: ``release_role`` over real channels documents, the follower keeping a
document's releases when it refuses a model, and a green job on the local stack that must never
write a live row (a candidate its workers refuse; ``release abort`` while it still runs)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from model.channels import Channels, release_role
from model.registry import Registry
from model.serving import ChannelsFollower, start_snapshot
from tests.test_bluegreen import BLUE, GREEN, NEXT
from tests.test_registry import STUDENT, V1, V2, variant


@pytest.fixture()
def registry(tmp_path) -> Registry:
    """A registry with the student live and ``BLUE`` recorded as the live release."""
    registry = Registry(str(tmp_path / "registry"))
    registry.publish(str(STUDENT))
    registry.promote(V1, by="test")
    registry.release_live(BLUE, "sub-a", "blue", by="test")
    return registry


def roles(registry: Registry) -> dict[str, str]:
    channels, _ = registry.read_channels()
    return {r: release_role(channels, r) for r in (BLUE, GREEN, NEXT, "9.9.9")}


def test_a_stream_outside_any_blue_green_is_live(tmp_path):
    bare = Registry(str(tmp_path / "bare"))
    bare.publish(str(STUDENT))
    bare.promote(V1, by="test")
    channels, _ = bare.read_channels()
    assert release_role(channels, BLUE) == release_role(Channels(), "anything") == "live"


def test_only_the_live_release_answers_and_an_unnamed_one_is_shadow(registry):
    assert roles(registry) == {BLUE: "live", GREEN: "shadow", NEXT: "shadow", "9.9.9": "shadow"}


def test_green_on_trial_is_shadow(registry):
    registry.release_green(GREEN, "sub-b", "green", by="test")
    assert roles(registry) == {BLUE: "live", GREEN: "shadow", NEXT: "shadow", "9.9.9": "shadow"}


def test_an_aborted_green_stays_shadow(registry):
    registry.release_green(GREEN, "sub-b", "green", by="test")
    registry.release_abort(GREEN, by="test")
    assert roles(registry) == {BLUE: "live", GREEN: "shadow", NEXT: "shadow", "9.9.9": "shadow"}


def test_after_cut_over_green_is_live_and_the_retiring_release_drains_live(registry):
    registry.release_green(GREEN, "sub-b", "green", by="test")
    registry.release_cutover(GREEN, by="test")
    assert roles(registry) == {BLUE: "live", GREEN: "live", NEXT: "shadow", "9.9.9": "shadow"}
    # a model change after the cut-over does not end retiring: it is no release change
    registry.publish(str(variant(Path(registry.prefix).parent, "2")))
    registry.shadow(V2, by="test")
    assert roles(registry)[BLUE] == "live"


@pytest.mark.parametrize("then", ["green", "live"])
def test_a_later_release_change_ends_retiring(registry, then):
    registry.release_green(GREEN, "sub-b", "green", by="test")
    registry.release_cutover(GREEN, by="test")
    if then == "green":
        registry.release_green(NEXT, "sub-a", "next", by="test")
    else:
        registry.release_live(GREEN, "sub-b", "green-updated", by="test")
    assert roles(registry) == {BLUE: "shadow", GREEN: "live", NEXT: "shadow", "9.9.9": "shadow"}


def test_a_history_entry_of_odd_shape_is_doubt_and_doubt_is_shadow():
    entry = {"action": "release-cutover", "before": {"releases": {"live": BLUE}}}
    assert release_role(Channels(history=(entry,)), BLUE) == "shadow"
    assert release_role(Channels(history=({"action": "release-abort"},)), BLUE) == "shadow"


# --- the follower keeps a document's releases when it refuses a model -----------------------


def _damaged_candidate(registry: Registry, tmp_path: Path) -> None:
    """v2 published and made the shadow candidate, then its weights damaged in the registry."""
    registry.publish(str(variant(tmp_path, "2")))
    registry.shadow(V2, by="test")
    weights = Path(registry.prefix) / V2.name / V2.version / "model.pt"
    weights.write_bytes(weights.read_bytes()[:-64] + b"\0" * 64)


def test_a_refused_candidate_keeps_green_shadow_in_the_follower(registry, tmp_path):
    card, start = start_snapshot(registry.prefix, tmp_path / "cache")
    follower = ChannelsFollower(registry.prefix, card, start, tmp_path / "cache", poll_secs=0.0)
    registry.release_green(GREEN, "sub-b", "green", by="test")
    _damaged_candidate(registry, tmp_path)
    [refusal] = follower.refresh()
    assert "landcover-student/2 refused as shadow candidate" in refusal.reason
    assert "sha256" in refusal.reason and not refusal.transient
    channels = follower.snapshot.channels
    assert channels.candidate is None and channels.green_release.release == GREEN
    assert release_role(channels, GREEN) == "shadow" and release_role(channels, BLUE) == "live"
    assert follower.refresh() == []  # reported once


def test_a_refused_candidate_at_start_up_keeps_the_releases(registry, tmp_path):
    registry.release_green(GREEN, "sub-b", "green", by="test")
    _damaged_candidate(registry, tmp_path)
    _, start = start_snapshot(registry.prefix, tmp_path / "cache")
    assert start.channels.candidate is None and start.channels.green_release.release == GREEN
    assert release_role(start.channels, GREEN) == "shadow"


def test_a_refused_live_model_still_takes_the_documents_releases(registry, tmp_path):
    """Roles follow the newest readable document even when its models are refused: an abort
    written beside a hand edit to a damaged live version still ends green's trial."""
    card, start = start_snapshot(registry.prefix, tmp_path / "cache")
    follower = ChannelsFollower(registry.prefix, card, start, tmp_path / "cache", poll_secs=0.0)
    registry.release_green(GREEN, "sub-b", "green", by="test")
    assert follower.refresh() == [] and release_role(follower.snapshot.channels, GREEN) == "shadow"
    registry.publish(str(variant(tmp_path, "2")))
    (Path(registry.prefix) / V2.name / V2.version / "model.pt").write_bytes(b"tampered")
    channels, _ = registry.read_channels()
    registry.store.write("channels.json", Channels(
        live=V2, live_release=channels.live_release, green_release=None,
        history=(*channels.history, {"action": "release-abort", "before": channels.state()})
    ).to_bytes(), None)
    [refusal] = follower.refresh()
    assert "refused as live" in refusal.reason
    assert follower.snapshot.channels.live == V1 and follower.snapshot.channels.green_release \
        is None
    assert release_role(follower.snapshot.channels, GREEN) == "shadow"
    assert release_role(follower.snapshot.channels, BLUE) == "live"


def test_the_follower_hands_each_switch_out_once(registry, tmp_path):
    card, start = start_snapshot(registry.prefix, tmp_path / "cache")
    follower = ChannelsFollower(registry.prefix, card, start, tmp_path / "cache", poll_secs=0.0)
    registry.release_green(GREEN, "sub-b", "green", by="test")
    follower.refresh()
    update = follower.take()
    [switch] = update.switches
    assert switch.before.channels.green_release is None
    assert switch.after.channels.green_release.release == GREEN
    assert follower.take().switches == () and update.snapshot == follower.snapshot


# --- a green job on the local stack -----------------------------------------------------------


@pytest.fixture(scope="module")
def green_trial(stack, model_uri, tmp_path_factory):
    """``BLUE`` recorded live, ``GREEN`` on trial with its job running and tiles flowing; a
    shadow candidate whose weights were damaged in the registry after the verb checked them, so
    every worker refuses it; then the candidate rolled back and green's trial aborted while its
    job keeps running and tiles keep coming."""
    from tests.streams import TilePublisher, query, stop_stream, wait_until
    from tests.test_bluegreen import Trial, _ok

    tmp = tmp_path_factory.mktemp("roles")
    trial = Trial(stack, model_uri, tmp)
    registry = trial.registry
    registry.publish(str(variant(tmp, "2")))
    registry.shadow(V2, by="test")
    weights = f"{V2.name}/{V2.version}/model.pt"
    good = registry.store.read(weights, 1 << 30)[0]
    registry.store.write(weights, good[:-64] + b"\0" * 64, None)
    _ok(trial.release("green", GREEN, f"--subscription={trial.green_sub}", "--job=green"))

    def model_events() -> list[str]:
        return [r["reason"] for r in query(stack, f"SELECT reason FROM `{trial.dataset}.events`"
                                                  " WHERE disposition = 'model'")]

    def green_rows() -> list[dict]:
        return trial.rows(f"release = '{GREEN}'")

    green = trial.stream(GREEN, trial.green_sub, "green.log")
    marks: dict[str, float] = {}
    try:
        with TilePublisher(stack, trial.topic, trial.crop, "roles", every_s=1.5) as traffic:
            refused = wait_until(lambda: any("landcover-student/2 refused" in e
                                             for e in model_events())
                                 and len(green_rows()) >= 3, 300, green, 2)
            assert refused, (model_events(), trial.log("green.log"))
            before_abort = green_rows()
            registry.rollback(by="test", why="the damaged candidate out of the way")
            marks["abort"] = time.time()
            _ok(trial.release("abort", GREEN))
            took = wait_until(lambda: any(e.startswith("channels now") and "'green': None" in e
                                          for e in model_events()), 120, green, 2)
            assert took, (model_events(), trial.log("green.log"))
            marks["took_abort"] = time.time()
            after = lambda: traffic.since(marks["took_abort"])  # noqa: E731
            assert wait_until(lambda: len(after()) >= 3 and set(after()[:3]) <= {
                r["tile_id"] for r in green_rows()}, 240, green, 2), trial.log("green.log")
        alive = green.poll() is None
    finally:
        code = stop_stream(green)
    assert alive and code == 0, trial.log("green.log")
    return {"before_abort": before_abort, "rows": green_rows(), "events": model_events(),
            "after_abort": after()[:3], "sent": dict(traffic.sent),
            "all_rows": trial.rows("TRUE")}


@pytest.mark.stack
@pytest.mark.slow
def test_a_candidate_the_green_workers_refuse_leaves_every_green_row_shadow(green_trial):
    rows = green_trial["before_abort"]
    assert len(rows) >= 3 and {r["role"] for r in rows} == {"shadow"}, rows
    assert any("landcover-student/2 refused as shadow candidate" in e
               for e in green_trial["events"])
    assert not any(e.startswith(f"release {GREEN} now live") for e in green_trial["events"])


@pytest.mark.stack
@pytest.mark.slow
def test_after_release_abort_the_running_green_job_writes_no_live_row(green_trial):
    rows = green_trial["all_rows"]  # green is the only job: blue is recorded, not running
    taken_after = {r["tile_id"]: r["role"] for r in rows
                   if r["tile_id"] in green_trial["after_abort"]}
    assert set(taken_after) == set(green_trial["after_abort"])
    assert set(taken_after.values()) == {"shadow"}, taken_after
    assert {r["release"] for r in rows} == {GREEN}
    assert {r["role"] for r in rows} == {"shadow"}, [r for r in rows if r["role"] != "shadow"]
    assert set(green_trial["after_abort"]) <= {r["tile_id"] for r in rows}
    assert not any(e.startswith(f"release {GREEN} now live") for e in green_trial["events"])
