"""The stream follows the model registry on the local stack: promote, refuse, canary, shadow.

One stream (its own topic, subscription and dataset) runs through the phases an operator would:
tiles under v1, ``promote v2``, a broken v3 made live by editing the files directly, a canary at
50 % and a shadow. Every tile is checked at the end: scored once per role, never by two versions.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from model.card import CARD_FILE, sha256_of
from model.channels import CHANNELS_FILE, Channels, ModelRef, assignments
from model.registry import Registry
from pipeline.ops import announce
from pipeline.ops.queries import run_query
from tests import tiles
from tests.streams import fresh_input, query, start_stream, stop_stream, wait_until

pytestmark = [pytest.mark.stack, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "model" / "artifacts" / "landcover-student"
V1, V2, V3 = (ModelRef("landcover-student", v) for v in ("1", "2", "3"))
POLL_S = 3.0
MIN_VALID = 0.05


class _ThreeClasses(torch.nn.Module):
    """A network that loads and runs but answers 3 classes where the card promises 7."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros((x.shape[0], 3, x.shape[2], x.shape[3]))


def write_broken_v3(registry: Registry) -> None:
    """v3 written straight into the registry, bypassing publish's validation."""
    target = Path(registry.prefix) / V3.name / V3.version
    target.mkdir(parents=True)
    torch.jit.script(_ThreeClasses()).save(str(target / "model.pt"))
    card = json.loads((ARTIFACTS / "v1" / CARD_FILE).read_text())
    card["version"] = "3"
    card["weights"]["sha256"] = sha256_of(str(target / "model.pt"))
    (target / CARD_FILE).write_text(json.dumps(card))


def edit_channels(registry: Registry, live: ModelRef) -> None:
    """An operator's hand edit of channels.json (no validation, no verb)."""
    before, _ = registry.read_channels()
    entry = {"at": "2026-11-29T10:00:00+00:00", "by": "hand", "why": "edited", "action": "edit",
             "before": before.state()}
    doc = Channels(live=live, history=(*before.history, entry))
    (Path(registry.prefix) / CHANNELS_FILE).write_bytes(doc.to_bytes())


@pytest.fixture(scope="module")
def swap_run(stack, tmp_path_factory):
    work = tmp_path_factory.mktemp("swap")
    registry = Registry(str(work / "registry"))
    registry.publish(str(ARTIFACTS / "v1"))
    registry.publish(str(ARTIFACTS / "v2"))
    registry.promote(V1, by="test", why="first model")
    topic, subscription, dataset = fresh_input(stack, "swap")
    crop = tiles.crop(work / "crop.tif", 0, 0, 100, 100)
    store, publisher = stack.storage(), stack.publisher()
    sent: dict[str, float] = {}  # tile id -> publish time

    def send(name: str) -> None:
        _, generation = announce.upload(store, str(crop), stack.bucket, f"swap/{name}.tif")
        sent[name] = time.time()
        announce.publish(publisher, topic, *announce.gcs_notification(
            stack.bucket, f"swap/{name}.tif", generation))

    def rows_for(names: list[str], per_tile: int = 1) -> bool:
        got = query(stack, f"SELECT tile_id FROM `{dataset}.tiles`")
        return sum(r["tile_id"] in names for r in got) >= per_tile * len(names)

    log = work / "stream.log"
    child = start_stream(stack, str(ARTIFACTS / "v1"), log, f"--model_registry={registry.prefix}",
                         f"--channels_poll_secs={POLL_S}", f"--subscription={subscription}",
                         f"--bq_dataset={stack.project}:{dataset}",
                         f"--output_prefix={stack.output_prefix}/{dataset}",
                         f"--min_valid_fraction={MIN_VALID}", "--window_secs=1",
                         "--max_batch_size=8", "--chip_rows_load_secs=0")
    phases: dict[str, list[str]] = {}
    marks: dict[str, float] = {}

    def took(line: str) -> bool:
        """Whether the stream's channels follower has logged taking (or refusing) a change."""
        return line in log.read_text(errors="replace")

    def follow(line: str) -> None:
        """Wait for the stream to take a change before the next phase's tiles are sent."""
        if not wait_until(lambda: took(line), 120, child, every_s=0.5):
            pytest.fail(f"the stream never logged {line!r}:\n"
                        + log.read_text(errors="replace")[-3000:])

    def phase(name: str, names: list[str], per_tile: int = 1, send_them: bool = True) -> None:
        phases[name] = names
        for tile_id in names if send_them else ():
            send(tile_id)
        if not wait_until(lambda: rows_for(names, per_tile), 240, child):
            books = {t: query(stack, f"SELECT {c} FROM `{dataset}.{t}`") for t, c in (
                ("tiles", "tile_id, model_version, role"), ("dead_letters", "stage, reason"),
                ("events", "disposition, reason"))}
            pytest.fail(f"phase {name}: tiles missing; tables: "
                        f"{[(r['tile_id'], r['model_version'], r['role']) for r in books['tiles']]}"
                        f"\n{books['dead_letters']}\n{books['events']}\n"
                        + log.read_text(errors="replace")[-3000:])

    try:
        phase("v1", ["a-0", "a-1"])
        marks["promote"] = time.time()
        registry.promote(V2, by="test", why="v2 everywhere")
        # A tile a second while the stream takes the promote, then two more once it has.
        promoted, sent_then = "model channels now {'live': 'landcover-student/2', " \
                              "'candidate': None", []
        while not took(promoted) and len(sent_then) < 120 and child.poll() is None:
            sent_then.append(f"b-{len(sent_then)}")
            send(sent_then[-1])
            time.sleep(1.0)  # the traffic's pace, not a wait for the stream
        marks["taken"], marks["taken_after"] = time.time(), len(sent_then)
        for _ in range(2):
            sent_then.append(f"b-{len(sent_then)}")
            send(sent_then[-1])
        phase("promote", sent_then, send_them=False)
        write_broken_v3(registry)
        marks["broken"] = time.time()
        edit_channels(registry, V3)
        follow("model refused: model landcover-student/3 refused as live")
        phase("broken", ["c-0", "c-1"])
        registry.promote(V2, by="test", why="undo the hand edit")
        registry.canary(V1, 0.5, by="test", why="canary of v1")
        follow("model channels now {'live': 'landcover-student/2', 'candidate': "
               "'landcover-student/1', 'mode': 'canary'")
        canary = [f"d-{i}" for i in range(10)]
        phase("canary", canary)
        marks["canary_channels"] = registry.read_channels()[0]
        registry.shadow(V1, by="test", why="shadow of v1")
        follow("model channels now {'live': 'landcover-student/2', 'candidate': "
               "'landcover-student/1', 'mode': 'shadow'")
        phase("shadow", ["e-0", "e-1"], per_tile=2)
        alive = child.poll() is None
    finally:
        code = stop_stream(child)
    text = log.read_text(errors="replace")
    assert alive and code == 0, f"stream died (exit {code}):\n{text[-4000:]}"
    return {"dataset": dataset, "sent": sent, "phases": phases, "marks": marks, "log": text,
            "registry": registry}


def tile_rows(stack, run) -> list[dict]:
    return query(stack, f"SELECT tile_id, model_version, role, raster_uri, published, "
                        f"chips_scored FROM `{run['dataset']}.tiles`")


def test_every_tile_is_scored_once_per_role_and_never_by_two_versions(stack, swap_run):
    rows = tile_rows(stack, swap_run)
    seen = [(r["tile_id"], r["role"]) for r in rows]
    assert len(seen) == len(set(seen)), "a tile scored twice in one role"
    assert {r["tile_id"] for r in rows} == set(swap_run["sent"]), "a tile lost"
    chips = query(stack, f"SELECT tile_id, role, COUNT(DISTINCT model_version) AS versions, "
                         f"MIN(model_version) AS version, COUNT(*) AS n, "
                         f"COUNT(DISTINCT row_id) AS d FROM `{swap_run['dataset']}.chips` "
                         "GROUP BY tile_id, role")
    by_key = {(c["tile_id"], c["role"]): c for c in chips}
    for row in rows:
        chip = by_key[(row["tile_id"], row["role"])]
        assert chip["versions"] == 1 and chip["version"] == row["model_version"], (row, chip)
        assert chip["n"] == chip["d"] == row["chips_scored"]


def test_tile_rows_carry_drift_against_the_card_of_the_version_that_scored_them(stack,
                                                                                 swap_run):
    rows = query(stack, f"SELECT tile_id, role, drifted, drift_max_band_psi, drift_class_psi, "
                        f"ARRAY_LENGTH(drift_band_psi) AS bands "
                        f"FROM `{swap_run['dataset']}.tiles`")
    assert rows and all(r["drifted"] is not None and r["drift_max_band_psi"] >= 0
                        and r["drift_class_psi"] is not None and r["bands"] == 6 for r in rows)


def test_tiles_flow_under_v1_then_v2_from_when_the_stream_takes_the_promote(stack, swap_run):
    """Once, and for good: tiles sent while the stream takes the promote are v1 then v2,
    never back; every tile sent after it logged the change is v2. How long taking it took is
    printed, not asserted (the poll bound is ``--channels_poll_secs`` on a machine that keeps
    up; a shared one may not)."""
    rows = {r["tile_id"]: r for r in tile_rows(stack, swap_run) if r["role"] == "live"}
    assert {rows[t]["model_version"] for t in swap_run["phases"]["v1"]} == {"1"}
    marks, names = swap_run["marks"], swap_run["phases"]["promote"]
    versions = [rows[t]["model_version"] for t in names]
    print(f"\nswap: the stream logged the promote {marks['taken'] - marks['promote']:.1f} s "
          f"after it (poll {POLL_S} s); versions of the tiles sent meanwhile: {versions}")
    assert versions == sorted(versions), versions
    assert set(versions[marks["taken_after"]:]) == {"2"}, versions


def test_a_broken_v3_is_refused_with_an_event_and_v2_stays_live(stack, swap_run):
    rows = {r["tile_id"]: r for r in tile_rows(stack, swap_run)}
    assert {rows[t]["model_version"] for t in swap_run["phases"]["broken"]} == {"2"}
    events = query(stack, f"SELECT disposition, stage, reason, message_id FROM "
                          f"`{swap_run['dataset']}.events` WHERE disposition = 'model'")
    refusals = [e for e in events if "landcover-student/3 refused" in e["reason"]]
    assert len(refusals) == 1, events
    assert refusals[0]["stage"] == "inference" and not refusals[0]["message_id"]
    assert "the card promises" in refusals[0]["reason"]
    assert "keeping landcover-student/2" in refusals[0]["reason"]
    assert "model refused: model landcover-student/3 refused as live" in swap_run["log"]


def test_a_canary_at_half_answers_the_tiles_its_stable_hash_picks(stack, swap_run):
    channels = swap_run["marks"]["canary_channels"]
    rows = [r for r in tile_rows(stack, swap_run) if r["tile_id"] in swap_run["phases"]["canary"]]
    got = {r["tile_id"]: (r["model_version"], r["role"]) for r in rows}
    expected = {t: (ref.version, role) for t in swap_run["phases"]["canary"]
                for ref, role in assignments(channels, t)}
    assert got == expected and len(rows) == len(expected)
    assert 3 <= sum(role == "canary" for _, role in got.values()) <= 7


def test_a_shadow_scores_every_tile_beside_live_and_consumers_read_live_only(stack, swap_run):
    names = swap_run["phases"]["shadow"]
    rows = [r for r in tile_rows(stack, swap_run) if r["tile_id"] in names]
    assert sorted((r["tile_id"], r["model_version"], r["role"]) for r in rows) == sorted(
        [(t, "2", "live") for t in names] + [(t, "1", "shadow") for t in names])
    shadow_uris = {r["raster_uri"] for r in rows if r["role"] == "shadow"}
    assert all("/predictions/landcover-student/1/" in u for u in shadow_uris)
    area = run_query(stack.bigquery(), "class_area_per_tile_and_day",
                     f"{stack.project}.{swap_run['dataset']}", include_drifted=True)
    assert {r["model_version"] for r in area if r["tile_id"] in names} == {"2"}


def test_each_change_the_stream_took_is_an_event_in_order(stack, swap_run):
    events = query(stack, f"SELECT reason FROM `{swap_run['dataset']}.events` "
                          "WHERE disposition = 'model' ORDER BY time")
    switches = [e["reason"].split(" (validated)")[0] for e in events
                if e["reason"].startswith("channels now")]
    # promote v2; (the hand-edited v3 refused;) promote v2 + canary v1 read in one poll; shadow
    assert switches == [
        "channels now {'live': 'landcover-student/2', 'candidate': None, 'mode': None, "
        "'canary_fraction': 0.0}",
        "channels now {'live': 'landcover-student/2', 'candidate': 'landcover-student/1', "
        "'mode': 'canary', 'canary_fraction': 0.5}",
        "channels now {'live': 'landcover-student/2', 'candidate': 'landcover-student/1', "
        "'mode': 'shadow', 'canary_fraction': 0.0}"]
