"""The inference step's arithmetic: fast paths that must give the bytes the plain formulas give."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.card import InputSpec
from model.inference import model_input, normalise, normalise_batch
from transforms.model_handlers import StudentModelHandler, segmentation_inference_fn

MEAN, STD = (80.0, 66.9, 0.0), (40.0, 17.25, 3.0)


def _batch(dtype: type, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    raws = [rng.integers(0, 256, (3, 16, 16)).astype(dtype) for _ in range(4)]
    valids = [rng.random((16, 16)) > 0.2 for _ in range(4)]
    if np.issubdtype(dtype, np.floating):  # values the float path must carry through
        raws[0][0, 0, :4] = [-0.0, np.nan, np.inf, -3.5]
    return raws, valids


@pytest.mark.parametrize("dtype,scale,offset", [(np.uint8, 1.0, 0.0), (np.uint16, 0.0001, -0.1),
                                                (np.float32, 1.0, 0.0), (np.float32, 2.5, 0.5)])
def test_normalise_batch_gives_the_bits_of_normalise(dtype, scale, offset):
    spec = InputSpec(("a", "b", "c"), 16, 8, MEAN, STD, scale=scale, offset=offset)
    raws, valids = _batch(dtype, np.random.default_rng(0))
    pairs = list(zip(raws, valids, strict=True))
    x = torch.stack([torch.from_numpy(model_input(r, v)) for r, v in pairs])
    before = x.clone()
    got = normalise_batch(x, spec).numpy()
    expected = np.stack([normalise(r, v, spec) for r, v in pairs])
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert torch.equal(x.nan_to_num(), before.nan_to_num())  # the input is left alone


def test_probabilities_are_the_rounded_softmax_times_255():
    spec = InputSpec(("a", "b", "c"), 16, 8, MEAN, STD)
    raws, valids = _batch(np.uint8, np.random.default_rng(1))
    chips = [torch.from_numpy(model_input(r, v)) for r, v in zip(raws, valids, strict=True)]
    model = torch.nn.Conv2d(3, 5, 3, padding=1).eval()
    results = list(segmentation_inference_fn(chips, model, "cpu", model_id="m/1", spec=spec))
    with torch.inference_mode():
        logits = model(normalise_batch(torch.stack(chips), spec))
        expected = (torch.softmax(logits, dim=1) * 255.0).round().to(torch.uint8)
    assert [r.model_id for r in results] == ["m/1"] * 4
    assert torch.equal(torch.stack([torch.from_numpy(r.inference) for r in results]), expected)


def test_a_batch_counts_its_real_bytes():
    chips = [torch.zeros((7, 64, 64), dtype=torch.uint8) for _ in range(3)]
    assert StudentModelHandler.get_num_bytes(None, chips) == 3 * 7 * 64 * 64  # type: ignore[arg-type]


def test_a_block_the_model_raises_on_is_dead_lettered_chip_by_chip_and_the_rest_scores():
    """RunInference batches blocks; a batch the network raises on fails only its own blocks,
    each of their chips gets a dead letter and comes back as failed, the other blocks score."""
    import dataclasses

    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from model.card import load_card
    from pipeline.ops.check import SAMPLE_TILE
    from pipeline.options import DEFAULT_MODEL_URI
    from tests.test_stages import chip_tile, runner_options
    from transforms.chips import ChipSettings
    from transforms.inference import ScoreChips
    from transforms.records import ChipBlock

    card = load_card(DEFAULT_MODEL_URI)
    chips, _ = chip_tile(SAMPLE_TILE, ChipSettings.from_card(card))
    tile = chips[0].tile
    good = ChipBlock(tile, 0, tuple(chips[:3]))
    bad = ChipBlock(tile, 1, tuple(dataclasses.replace(c, raw=c.raw[:2])  # 2 of 6 bands
                                   for c in chips[3:6]))
    with beam.Pipeline(options=runner_options()) as p:
        scored = (p | beam.Create([good, bad])
                  | ScoreChips(card, min_batch_size=3, max_batch_size=3))
        assert_that(scored.predictions | beam.Map(
            lambda b: (b.task, [x.chip.index for x in b.predictions])),
            equal_to([(0, [c.index for c in chips[:3]])]), label="scored")
        assert_that(scored.failed | beam.Map(lambda b: (b.task, [c.index for c in b.chips])),
                    equal_to([(1, [c.index for c in chips[3:6]])]), label="failed")
        assert_that(scored.dead_letters | beam.Map(
            lambda d: (d.stage, d.reason.startswith("model raised"), d.payload.split()[1])),
            equal_to([("inference", True, str(c.index)) for c in chips[3:6]]), label="letters")
