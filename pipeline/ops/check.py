"""``tilestream check``: what to run on a GPU VM (or in the image) before launching a job.

It proves, in order, that torch imports and sees CUDA, that the model card loads and its weights
match their sha256, and that one real chip of the sample tile scores through the same handler
and inference function the stream uses.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from model.card import load_card
from model.inference import model_input
from transforms.chips import ChipSettings, ChipTileFn, chips_in
from transforms.inference import to_prediction
from transforms.model_handlers import StudentModelHandler, segmentation_inference_fn
from transforms.records import Chip, TileRef

# The project's sample tile (Landsat-7 ETM+ over Olinda; licence in sample/README.md).
SAMPLE_TILE = Path(__file__).resolve().parent / "sample" / "L7_ETMs.tif"


def first_chip(card) -> Chip:
    fn = ChipTileFn(ChipSettings.from_card(card))
    tile = TileRef("check", (str(SAMPLE_TILE),), "0", time.time(), time.time())
    return next(chips_in(fn.process(tile)))


def run_check(model_uri: str, device: str) -> dict:
    report: dict = {
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "device": device,
    }
    card = load_card(model_uri)
    report["model"] = card.model_id
    handler = StudentModelHandler(card, device=device)
    model = handler.load_model()
    chip = first_chip(card)
    target = torch.device("cuda" if device == "GPU" else "cpu")
    started = time.perf_counter()
    [result] = segmentation_inference_fn([torch.from_numpy(model_input(chip.raw, chip.valid))],
                                         model, target, spec=card.input)
    report["first_chip_ms"] = round((time.perf_counter() - started) * 1000, 1)
    prediction = to_prediction(dataclasses.replace(chip, raw=None), np.asarray(result.inference),
                               card.name, card.version)
    counts = prediction.class_counts
    report["chip_class_counts"] = dict(zip((c.name for c in card.classes), counts, strict=True))
    report["ok"] = sum(counts) == int(chip.valid.sum())
    return report
