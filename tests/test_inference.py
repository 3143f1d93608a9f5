"""The inference step's arithmetic: fast paths that must give the bytes the plain formulas give."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.card import InputSpec
from model.inference import model_input, normalise, normalise_batch
from transforms.inference import StudentModelHandler, segmentation_inference_fn

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
    assert torch.equal(torch.stack([r.inference for r in results]), expected)


def test_a_batch_counts_its_real_bytes():
    chips = [torch.zeros((7, 64, 64), dtype=torch.uint8) for _ in range(3)]
    assert StudentModelHandler.get_num_bytes(None, chips) == 3 * 7 * 64 * 64  # type: ignore[arg-type]
