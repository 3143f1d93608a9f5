"""The stream's channels follower against hostile registry contents (no stream, no stack)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from model.channels import CHANNELS_FILE, Channels
from model.registry import Registry
from model.serving import ChannelsFollower, start_snapshot
from tests.test_registry import STUDENT, V1, V2, V3, variant


@pytest.fixture()
def follower(tmp_path) -> tuple[Registry, ChannelsFollower]:
    registry = Registry(str(tmp_path / "registry"))
    registry.publish(str(STUDENT))
    registry.promote(V1, by="test")
    card, start = start_snapshot(registry.prefix, tmp_path / "cache")
    return registry, ChannelsFollower(registry.prefix, card, start, tmp_path / "cache",
                                      poll_secs=0.0)


def live_of(f: ChannelsFollower) -> str:
    return str(f.snapshot.channels.live)


def test_a_garbled_channels_document_is_refused_once_and_the_snapshot_kept(follower):
    registry, f = follower
    (Path(registry.prefix) / CHANNELS_FILE).write_bytes(b'{"schema": "tilestream.chan')
    [refusal] = f.refresh()
    assert "channels document refused" in refusal.reason and "not valid JSON" in refusal.reason
    assert f.refresh() == [] and live_of(f) == str(V1)


def test_a_version_tampered_with_after_publish_is_refused_as_live(follower, tmp_path):
    registry, f = follower
    registry.publish(str(variant(tmp_path, "2")))
    (Path(registry.prefix) / "landcover-student" / "2" / "model.pt").write_bytes(b"tampered")
    registry.store.write(CHANNELS_FILE, Channels(live=V2).to_bytes(), None)  # a hand edit
    [refusal] = f.refresh()
    assert "landcover-student/2 refused as live" in refusal.reason
    assert "sha256" in refusal.reason and "keeping landcover-student/1" in refusal.reason
    assert live_of(f) == str(V1) and f.snapshot.assign("t") == (("landcover-student/1", "live"),)


def _other_mean(card):
    card["input"]["mean"] = [m + 10 for m in card["input"]["mean"]]


def _other_nodata(card):
    card["input"]["nodata"] = 255.0


def _other_chip_size(card):
    card["input"]["chip_size"], card["input"]["stride"] = 32, 32


def _other_classes(card):
    card["classes"][0]["name"] = "ocean"


@pytest.mark.parametrize(("edit", "accepted"), [
    (_other_mean, True),  # normalised its own way: it still reads the chips the stream cuts
    (_other_nodata, False), (_other_chip_size, False), (_other_classes, False)])
def test_the_cli_and_the_stream_judge_a_candidate_by_one_rule(follower, tmp_path, edit,
                                                              accepted):
    """`tilestream model canary` (the registry) and the running stream (its follower) accept
    and refuse the same candidates: neither takes what the other would refuse."""
    from model.channels import RegistryError

    registry, f = follower
    registry.publish(str(variant(tmp_path, "3", edit)))
    try:
        registry.canary(V3, 0.5, by="test")
        cli_accepts = True
    except RegistryError as exc:
        assert "cannot" in str(exc)
        cli_accepts = False
        # what the stream would do if someone wrote the document by hand, past the CLI
        doc = Channels(live=V1, candidate=V3, mode="canary", canary_fraction=0.5)
        (Path(registry.prefix) / CHANNELS_FILE).write_bytes(doc.to_bytes())
    refusals = f.refresh()
    stream_accepts = not refusals and f.snapshot.channels.candidate == V3
    assert cli_accepts is stream_accepts is accepted, refusals
    if not accepted:
        [refusal] = refusals
        assert "landcover-student/3 refused as canary candidate" in refusal.reason
        assert {f.snapshot.assign(f"t{i}") for i in range(20)} == {(("landcover-student/1",
                                                                     "live"),)}


def test_a_valid_shadow_is_taken_and_scores_beside_live(follower, tmp_path):
    registry, f = follower
    registry.publish(str(variant(tmp_path, "2")))
    registry.shadow(V2, by="test")
    assert f.refresh() == []
    assert f.snapshot.assign("t") == (("landcover-student/1", "live"),
                                      ("landcover-student/2", "shadow"))


def test_chips_of_a_version_that_cannot_load_fail_alone_beside_a_good_one(follower, tmp_path):
    """A batch mixing versions: the unloadable one's chips get a reason, the other is scored."""
    import dataclasses

    import torch

    from model.card import load_card
    from model.inference import model_input
    from pipeline.ops.check import SAMPLE_TILE
    from tests.test_stages import chip_tile
    from transforms.chips import ChipSettings
    from transforms.inference import BlockModelHandler, block_input
    from transforms.model_handlers import VersionedModelHandler
    from transforms.records import ChipBlock, TileRef

    registry, _ = follower
    card = load_card(str(STUDENT))
    chips, _ = chip_tile(SAMPLE_TILE, ChipSettings.from_card(card))
    good = TileRef("a", (str(SAMPLE_TILE),), "1", 0.0, 0.0, model=str(V1), role="live")
    gone = dataclasses.replace(good, tile_id="b", model="landcover-student/9", role="canary")
    batch = [(dataclasses.replace(c, tile=tile, raw=None),
              torch.from_numpy(model_input(c.raw, c.valid)))
             for tile in (good, gone) for c in chips[:2]]
    handler = VersionedModelHandler(registry.prefix)
    results = handler.run_inference(batch, handler.load_model())
    by_tile = {}
    for chip, result in results:
        by_tile.setdefault(chip.tile.tile_id, []).append(result)
    assert all(r.inference is not None and r.inference.shape[0] == card.num_classes
               for r in by_tile["a"])
    assert all(r.inference is None and "landcover-student/9 could not be loaded" in r.model_id
               and "no model_card.json" in r.model_id for r in by_tile["b"])

    # The stream hands the handler blocks: forward passes mix blocks of both versions, and
    # each block still gets its own chips' answers, in its chips' order.
    blocks = [block_input(ChipBlock(tile, 0, tuple(dataclasses.replace(c, tile=tile)
                                                    for c in chips[:5])))
              for tile in (gone, good)]
    by_block = BlockModelHandler(handler, max_batch_size=3).run_inference(
        blocks, handler.load_model())
    assert [b.tile.tile_id for b, _ in by_block] == ["b", "a"]
    assert [len(r) for _, r in by_block] == [5, 5]
    assert all(r.inference is None for r in by_block[0][1])
    assert all(r.inference is not None for r in by_block[1][1])
    assert np.array_equal(by_block[1][1][0].inference, by_tile["a"][0].inference)


@pytest.mark.stack
def test_the_follower_reads_a_gcs_registry_as_the_stream_does(adapted, tmp_path):
    """The stream builds its own clients (no client passed): through the adapter, as --local."""
    import uuid

    from model.serving import CardBook

    prefix = f"{adapted.registry_prefix}/{uuid.uuid4().hex[:8]}"
    registry = Registry(prefix, gcs_client=adapted.storage())
    registry.publish(str(STUDENT))
    registry.publish(str(variant(tmp_path, "2")))
    registry.promote(V1, by="test")
    card, start = start_snapshot(prefix, tmp_path / "cache")
    follower = ChannelsFollower(prefix, card, start, tmp_path / "cache", poll_secs=0.0)
    registry.canary(V2, 1.0, by="test")
    assert follower.refresh() == []
    assert follower.snapshot.assign("any") == (("landcover-student/2", "canary"),)
    assert CardBook(card, prefix, tmp_path / "cache").get("landcover-student/2").version == "2"


def _wait(condition, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _unreadable_candidate(registry, tmp_path) -> tuple[Path, bytes]:
    """V2 on shadow trial with a directory where its weights file should be (a storage fault,
    not a fault of the model); its path and bytes, to put the file back."""
    registry.publish(str(variant(tmp_path, "2")))
    registry.shadow(V2, by="test")
    weights = Path(registry.prefix) / V2.name / V2.version / "model.pt"
    saved = weights.read_bytes()
    weights.unlink()
    weights.mkdir()
    return weights, saved


def test_a_storage_fault_is_retried_not_refused_and_the_new_snapshot_is_taken(follower,
                                                                               tmp_path):
    """A weights file that cannot be read (here: a directory where the file should be) is a
    fault of the storage, not of the model: no refusal is remembered, the next poll tries
    again, and once the file is back the candidate is taken."""
    registry, f = follower
    weights, saved = _unreadable_candidate(registry, tmp_path)
    [fault] = f.refresh()
    assert fault.transient and "IsADirectoryError" in fault.reason and "retrying" in fault.reason
    assert f.snapshot.channels.candidate is None
    assert f.refresh() == []  # tried again, reported once
    weights.rmdir()
    weights.write_bytes(saved)
    assert f.refresh() == [] and f.snapshot.channels.candidate == V2
    assert [s.after.channels.candidate for s in f.take().switches][-1] == V2


def test_the_background_thread_retries_with_backoff_until_the_fault_clears(follower, tmp_path):
    registry, f = follower
    f.poll_secs = 0.2
    weights, saved = _unreadable_candidate(registry, tmp_path)
    seen: list = []
    f.start_background()
    try:
        assert _wait(lambda: seen.extend(f.take().refusals) or seen, 60), "no fault reported"
        assert all(r.transient for r in seen) and f.snapshot.channels.candidate is None
        weights.rmdir()
        weights.write_bytes(saved)
        assert _wait(lambda: f.snapshot.channels.candidate == V2, 60)
    finally:
        f.stop()


def test_a_refresh_blocked_on_the_registry_never_blocks_a_tile(follower, tmp_path):
    """The channels document is a FIFO nobody writes yet: the follower's thread blocks in the
    read, and the stream's AssignModels keeps routing tiles by the snapshot it has; once the
    document arrives the next tile is routed by it, with its event."""
    import os
    import threading

    from model.channels import CHANNELS_FILE
    from tests.streams import wait_until
    from transforms import process, routing
    from transforms.records import TileRef

    registry, f = follower
    registry.publish(str(variant(tmp_path, "2")))
    registry.shadow(V2, by="test")
    channels = Path(registry.prefix) / CHANNELS_FILE
    document = channels.read_bytes()
    registry.rollback(by="test")  # the stream starts with v1 alone, and reads that at setup
    fn = routing._AssignFn(registry.prefix, f.running, f.start, 0.05, "0.1.0")
    process.reset()
    fn.setup()
    follower = fn._follower
    fifo = tmp_path / "channels.fifo"
    os.mkfifo(fifo)
    (tmp_path / "link").symlink_to(fifo)
    os.replace(tmp_path / "link", channels)  # atomically: no poll sees the document missing
    out: list = []

    def route(tile_id: str) -> threading.Thread:
        tile = TileRef(tile_id, ("x.tif",), "1", 0.0, 0.0)
        worker = threading.Thread(target=lambda: out.extend(fn.process(tile)), daemon=True)
        worker.start()
        return worker

    try:
        assert _wait(follower._poll_lock.locked, 30), "the follower never started reading"
        time.sleep(0.2)  # it is inside the read of the FIFO now: nothing else takes the lock
        blocked = route("during")
        blocked.join(timeout=20)
        assert not blocked.is_alive(), "process waited on the registry read"
        assert [(t.model, t.role) for t in out if isinstance(t, TileRef)] == [
            ("landcover-student/1", "live")]
        threading.Thread(target=fifo.write_bytes, args=(document,), daemon=True).start()

        def routed_by_the_new_document() -> bool:
            out.clear()
            worker = route("after")
            worker.join(timeout=20)
            return not worker.is_alive() and ("landcover-student/2", "shadow") in [
                (getattr(t, "model", None), getattr(t, "role", None)) for t in out]
        assert wait_until(routed_by_the_new_document, 60, every_s=0.1)
    finally:
        follower.stop()
        channels.unlink()
        channels.write_bytes(document)
        try:  # releases a read still waiting on the FIFO (none waiting: ENXIO)
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        process.reset()


def test_the_validated_model_cache_keeps_the_recently_used_versions_only(tmp_path,
                                                                          monkeypatch):
    """A process's cache holds at most MAX_CACHED_VERSIONS versions, the least recently used
    dropped; one asked for again after its eviction is fetched and validated again."""
    from model import serving
    from model.channels import ModelRef

    monkeypatch.setattr(serving, "MAX_CACHED_VERSIONS", 2)
    registry = Registry(str(tmp_path / "registry"))
    registry.publish(str(STUDENT))
    for version in ("2", "3"):
        registry.publish(str(variant(tmp_path, version)))
    cache = tmp_path / "cache"

    def cached() -> set[str]:
        return {p.parent.name for p in cache.glob("*/*/.validated")}

    serving.fetch_validated(registry, V1, cache)
    serving.fetch_validated(registry, V2, cache)
    serving.fetch_validated(registry, V1, cache)  # 1 is now more recent than 2
    assert cached() == {"1", "2"}
    card = serving.fetch_validated(registry, V3, cache)
    assert cached() == {"1", "3"} and card.version == "3"
    assert serving.fetch_validated(registry, ModelRef("landcover-student", "2"), cache).version \
        == "2"
    assert cached() == {"2", "3"}
