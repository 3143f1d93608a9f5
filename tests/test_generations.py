"""Reads pinned to the announced object generation, on a local GCS as strict as GCS.

GCS serves a superseded generation of an object (in a bucket without versioning) as a 404; the
emulator served the newest bytes under any generation, so nothing here could see a stream that
labels the newest pixels with an older generation. The stack's GCS now refuses such a read, and
the stream books a notification whose generation was replaced before it was read as
``superseded`` instead of scoring it: a flood of N uploads of one object costs one scoring.
"""

from __future__ import annotations

import pytest
from google.api_core.exceptions import NotFound, PreconditionFailed

from model.card import load_card
from pipeline.ops import announce
from tests import tiles
from tests.streams import fresh_input, query, start_stream, stop_stream, wait_until
from transforms import process, storage
from transforms.chip_reader import TileReader
from transforms.chips import ChipSettings, _PlanStripsFn
from transforms.guards import InputAllowList
from transforms.records import TileRef

pytestmark = [pytest.mark.stack]


def test_the_local_gcs_answers_a_superseded_generation_with_404(adapted, tmp_path):
    path = tmp_path / "a.bin"
    bucket = adapted.storage().bucket(adapted.bucket)
    gens = []
    for content in (b"first", b"second"):
        path.write_bytes(content)
        blob = bucket.blob("generations/a.bin")
        blob.upload_from_filename(str(path))
        gens.append(blob.generation)
    old, live = gens
    assert old < live
    assert bucket.get_blob("generations/a.bin", generation=old) is None
    assert bucket.get_blob("generations/a.bin", generation=live).generation == live
    with pytest.raises(NotFound):
        bucket.blob("generations/a.bin", generation=old).download_as_bytes()
    assert bucket.blob("generations/a.bin", generation=live).download_as_bytes() == b"second"
    with pytest.raises(PreconditionFailed):
        bucket.blob("generations/a.bin").download_as_bytes(if_generation_match=old)


def test_the_local_gcs_answers_byte_ranges_as_gcs_does(adapted, tmp_path):
    """Ranged reads (GDAL reads a tile in hundreds of them) come from disk as the range alone:
    the bytes asked for, an end past the object clipped, a start past it 416, and a superseded
    generation still 404."""
    from google.api_core.exceptions import RequestRangeNotSatisfiable

    content = bytes(range(256)) * 40  # 10,240 bytes
    path = tmp_path / "r.bin"
    path.write_bytes(content)
    bucket = adapted.storage().bucket(adapted.bucket)
    blob = bucket.blob("generations/r.bin")
    blob.upload_from_filename(str(path))
    live = blob.generation
    read = bucket.blob("generations/r.bin", generation=live)
    assert read.download_as_bytes(start=1000, end=1999) == content[1000:2000]
    assert read.download_as_bytes(start=10_000) == content[10_000:]
    assert read.download_as_bytes(start=10_200, end=99_999) == content[10_200:]
    with pytest.raises(RequestRangeNotSatisfiable):
        read.download_as_bytes(start=10_240)
    path.write_bytes(b"newer")
    bucket.blob("generations/r.bin").upload_from_filename(str(path))
    with pytest.raises(NotFound):  # a fresh handle: the client forgets a blob's generation
        bucket.blob("generations/r.bin", generation=live).download_as_bytes(start=0, end=9)


def test_a_tile_replaced_while_its_strips_are_read_yields_no_chip_of_either(adapted, tmp_path,
                                                                           model_uri):
    """Planned at one generation, overwritten before a strip is read: the strip's rows fail
    as superseded, no chip of the new bytes is labelled with the old generation."""
    process.reset()
    crop = tiles.crop(tmp_path / "c.tif", 0, 0, 200, 200)
    uri, gen = announce.upload(adapted.storage(), str(crop), adapted.bucket,
                               "incoming/replaced/t.tif")
    settings = ChipSettings.from_card(load_card(model_uri), allow=InputAllowList.parse(
        f"gs://{adapted.bucket}/incoming"))
    tile = TileRef("t", (uri,), str(gen), 0.0, 0.0, message_id="m", band_generations=(str(gen),))
    planner = _PlanStripsFn(settings)
    planner.setup()
    task = next(iter(planner.process(tile)))
    assert task.tile.band_generations == (str(gen),)
    announce.upload(adapted.storage(), str(crop), adapted.bucket, "incoming/replaced/t.tif")
    reader = TileReader(settings)
    reader.setup()
    out = list(reader.chip(task))
    [report] = [o.value for o in out]  # no ChipBlock: every chip row failed
    assert sum(report.expected) == 0 and report.failed > 0
    assert "superseded by generation" in report.unreadable[0]
    with pytest.raises(storage.Superseded, match=f"generation {gen} was superseded"):
        storage.pin((uri,), (str(gen),))


def test_a_flood_of_generations_is_scored_once_at_the_newest(stack, model_uri, tmp_path):
    topic, subscription, dataset = fresh_input(stack, "flood")
    crop = tiles.crop(tmp_path / "flood.tif", 0, 0, 100, 100)
    name = "incoming/flood/tile.tif"
    store, publisher = stack.storage(), stack.publisher()
    generations = [announce.upload(store, str(crop), stack.bucket, name)[1] for _ in range(12)]
    assert generations == sorted(set(generations))
    ids = [announce.publish(publisher, topic, *announce.gcs_notification(stack.bucket, name, g))
           for g in generations]
    child = start_stream(stack, model_uri, tmp_path / "stream.log",
                         f"--subscription={subscription}",
                         f"--bq_dataset={stack.project}:{dataset}",
                         f"--output_prefix={stack.output_prefix}/{dataset}",
                         "--window_secs=1")

    def booked() -> bool:
        """Every older notification booked, the tile row in and all its chip rows with it."""
        events = query(stack, f"SELECT message_id FROM `{dataset}.events` "
                              "WHERE disposition = 'superseded'")
        tiles_in = query(stack, f"SELECT chips_scored FROM `{dataset}.tiles`")
        chips_in = query(stack, f"SELECT COUNT(*) AS n FROM `{dataset}.chips`")
        return len(events) >= len(ids) - 1 and len(tiles_in) >= 1 and (
            chips_in[0]["n"] >= sum(t["chips_scored"] for t in tiles_in))

    try:
        done = wait_until(booked, 180, child)
    finally:
        stop_stream(child)
    log = (tmp_path / "stream.log").read_text(errors="replace")
    assert done, log[-3000:]
    [tile] = query(stack, f"SELECT tile_generation, source_message_ids, chips_scored FROM "
                          f"`{dataset}.tiles`")
    assert tile["tile_generation"] == str(generations[-1])
    assert tile["source_message_ids"] == [ids[-1]]
    events = query(stack, f"SELECT message_id, reason FROM `{dataset}.events` "
                          "WHERE disposition = 'superseded'")
    assert sorted(e["message_id"] for e in events) == sorted(ids[:-1])
    assert all(f"superseded by generation {generations[-1]}" in e["reason"] for e in events)
    # One scoring: as many chip rows as the tile row counts, every one of the newest bytes.
    chips = query(stack, f"SELECT tile_generation FROM `{dataset}.chips`")
    assert tile["chips_scored"] > 0 and len(chips) == tile["chips_scored"]
    assert {c["tile_generation"] for c in chips} == {str(generations[-1])}
    assert query(stack, f"SELECT * FROM `{dataset}.dead_letters`") == []
