"""What crosses the shuffle to assembly, with the student model's real predictions: few bytes,
and the same prediction COG as blending every chip's probabilities at once."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio

from model.card import load_card
from pipeline.ops.check import SAMPLE_TILE
from pipeline.options import DEFAULT_MODEL_URI
from tests import test_stages as stages
from tests.reference_blend import blended

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import shuffle  # noqa: E402  (bench/shuffle.py)
from mosaics import mosaic  # noqa: E402


@pytest.fixture(scope="module")
def student():
    from transforms.model_handlers import StudentModelHandler

    card = load_card(DEFAULT_MODEL_URI)
    return card, StudentModelHandler(card).load_model()


@pytest.mark.parametrize("confidence", [False, True])
def test_a_chip_sends_assembly_an_eighth_of_its_probabilities_or_less(student, confidence):
    """Measured with the coders Beam uses: the keyed shuffle to the strips and the strips' bag
    state. Each chip's uint8 probabilities alone are K x 64 x 64 bytes; they crossed whole."""
    card, model = student
    found = shuffle.measure(SAMPLE_TILE, card, model, confidence)
    per_chip = found["per_boundary_bytes_per_chip"]
    probabilities = card.num_classes * card.input.chip_size ** 2
    assert per_chip["predictions_to_assembly"] <= probabilities / 8, per_chip
    assert per_chip["assembly_state"] <= probabilities / 8, per_chip


@pytest.mark.parametrize("size", [None, 3660])
def test_the_cog_of_real_predictions_is_the_whole_tile_blend(tmp_path, student, size):
    """The sample tile and an HLS-sized mosaic, scored by the student: the COG the stream's
    assembly steps write (classes and confidence) is the whole-tile blend, pixel for pixel."""
    card, model = student
    path = SAMPLE_TILE if size is None else mosaic(tmp_path / "mosaic.tif", size)
    _, _, reports, manifest, scored = shuffle.predictions(path, card, model)
    predictions = [p for block in scored for p in block.predictions]
    chipped = stages.Chipped(manifest, tuple(reports))
    [row], letters, _ = stages.run_assembly(card, tmp_path / "out", chipped, predictions,
                                            confidence=True)
    classes, confidence = blended(manifest, predictions, card.num_classes)
    with rasterio.open(row["raster_uri"]) as r:
        assert np.array_equal(r.read(1), classes)
        assert np.array_equal(r.read(2), confidence)
    assert row["complete"] is True and letters == []
    assert (classes != 255).any() and len(np.unique(classes)) > 1  # a real map, not one class
