"""The blend math without Beam: blocks blended where they are scored, strips from their parts,
against the whole-tile blend (tests/reference_blend.py) on any grid, mask and chip loss."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reference_blend import blended
from transforms.blend import blend_parts, block_parts, failed_parts, overlaps
from transforms.geometry import chip_starts, own_strip, strip_bounds, strip_chip_rows
from transforms.records import NODATA_CLASS, Chip, ChipPrediction, TileRef, pack_mask

TILE = TileRef("t", ("t.tif",), "1", 0.0, 0.0)


def grid_chips(height: int, width: int, size: int, stride: int, rng) -> list[Chip]:
    """Every chip of the grid, each with a random valid mask (edges padded, as the chipper
    pads them)."""
    out = []
    for row in chip_starts(height, size, stride):
        for col in chip_starts(width, size, stride):
            h, w = min(size, height - row), min(size, width - col)
            valid = np.zeros((size, size), bool)
            valid[:h, :w] = rng.random((h, w)) < 0.9
            out.append(Chip(TILE, len(out), row, col, h, w, size, stride, height, width,
                            (1, 0, 0, 0, -1, 0), "EPSG:32633", "", 1.0, 0.9, pack_mask(valid),
                            0.0))
    return out


def predict(chip: Chip, classes: int, rng, runs: bool) -> ChipPrediction:
    h, w = chip.height, chip.width
    if runs:  # what a model gives: one class over most of a chip
        probs = np.full((classes, h, w), 20, np.uint8)
        probs[rng.integers(classes)] = 200
    else:
        probs = rng.integers(0, 256, (classes, h, w), dtype=np.uint8)
    return ChipPrediction(chip, probs.argmax(0).astype(np.uint8), probs, (0,) * classes, 0.5,
                          "m", "1", 0.0)


def strips_of(predictions, failed, height, width, size, stride, classes, confidence=True):
    """Each strip task's block blended where it was scored, each strip from its parts."""
    bounds = strip_bounds(height, width, size, stride)
    by_task: dict[int, list] = {}
    for p in predictions:
        by_task.setdefault(own_strip(p.chip.row, bounds), []).append(p)
    parts = [part for block in by_task.values() for part in block_parts(block, confidence)]
    parts += failed_parts(failed) if failed else []
    rows = [blend_parts([p for p in parts if p.strip == j], classes, end - start, width,
                        overlaps(size, stride), confidence)
            for j, (start, end) in enumerate(bounds)]
    return (np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows]),
            sum(r[2] for r in rows), parts)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(height=st.integers(1, 1600), width=st.integers(1, 40),  # strips are ~512 rows
       size_stride=st.sampled_from([(16, 12), (16, 16), (16, 10), (8, 3)]),
       classes=st.integers(2, 5), seed=st.integers(0, 2**16), lost=st.floats(0, 0.5),
       runs=st.booleans())
def test_strips_from_blocks_are_the_whole_tile_blend(height, width, size_stride, classes, seed,
                                                     lost, runs):
    """Any grid (overlapping or edge to edge), masks, and chips lost to skipping or
    to the model: pixel for pixel the whole-tile blend, with the same class counts."""
    size, stride = size_stride
    if height > 600:  # several strip tasks, so blocks share rows with their neighbours
        assert len(strip_chip_rows(height, width, size, stride)) > 1
    rng = np.random.default_rng(seed)
    chips = grid_chips(height, width, size, stride, rng)
    gone = rng.random(len(chips)) < lost
    failed = [c for c, g in zip(chips, gone, strict=True) if g and rng.random() < 0.5]
    predictions = [predict(c, classes, rng, runs) for c, g in zip(chips, gone, strict=True)
                   if not g]
    manifest = SimpleNamespace(chip_size=size, stride=stride, height=height, width=width)
    want_classes, want_confidence = blended(manifest, predictions, classes)
    got_classes, got_confidence, counts, parts = strips_of(predictions, failed, height, width,
                                                           size, stride, classes)
    assert np.array_equal(got_classes, want_classes)
    assert np.array_equal(got_confidence, want_confidence)
    assert counts.tolist() == np.bincount(want_classes[want_classes != NODATA_CLASS],
                                          minlength=classes).tolist()
    # Every chip is waited for by every strip it overlaps, and counted in one.
    assert sum(p.own for p in parts) == len(predictions) + len(failed)
    assert sum(p.own_failed for p in parts) == len(failed)


def test_only_rows_shared_with_the_next_block_travel_as_sums():
    """An HLS-like grid (chip 64, stride 48): a middle block sends its own rows finished and
    only the 16 rows each neighbour's chips also cover as sums."""
    height, width, size, stride = 1000, 200, 64, 48
    rng = np.random.default_rng(1)
    chips = grid_chips(height, width, size, stride, rng)
    bounds = strip_bounds(height, width, size, stride)
    first, stop = strip_chip_rows(height, width, size, stride)[1]
    block = [predict(c, 3, rng, True) for c in chips if first <= c.row // stride < stop]
    parts = {p.strip: p for p in block_parts(block, confidence=False)}
    assert sorted(parts) == [1, 2]
    own, next_ = parts[1], parts[2]
    assert [(r.first, r.shape[1]) for r in own.sums] == [(0, size - stride)]
    assert (own.final.first, own.final.shape) == (size - stride, (1, bounds[1][1] - bounds[1][0]
                                                                  - (size - stride), width))
    assert next_.final is None and [(r.first, r.shape[1]) for r in next_.sums] == [
        (0, size - stride)]
    assert own.own == own.chips == len(block) and next_.own == 0


def test_a_strip_wanted_with_confidence_refuses_parts_without_it():
    rng = np.random.default_rng(2)
    chips = grid_chips(64, 64, 16, 12, rng)
    parts = block_parts([predict(c, 3, rng, True) for c in chips], confidence=False)
    with pytest.raises(ValueError, match="without its confidence band"):
        blend_parts(parts, 3, 64, 64, overlaps(16, 12), confidence=True)
