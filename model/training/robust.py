"""A second student, ``landcover-student`` v2: v1's network and distillation, with stronger
radiometric augmentation (per-band gain +-25 %, offset +-15 DN instead of gain +-10 %), so that it
should hold up better on tiles whose radiometry differs from the training scene's (another date,
sensor gain or region). It is the candidate the registry's canary and shadow modes compare with v1.

It is distilled from the committed teacher's TorchScript (no teacher retraining), evaluated on the
same held-out test blocks as v1, clean and with the radiometry shifted, and exported with its own
card (drift reference included) beside v1, which stays as it is.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.card import ModelCard, load_card, sha256_of, write_card
from model.inference import normalise, predict_logits
from model.training import data as nc
from model.training import workflow
from model.training.architectures import UNetSpec, count_flops, count_parameters, student_spec
from model.training.architectures import build as build_net
from model.training.config import ARTIFACTS, DistillConfig
from model.training.train import distil_student

VERSION = "2"
RECIPE = DistillConfig(gain_jitter=0.25, offset_jitter=15.0)
# Radiometric shifts the evaluation applies to the held-out blocks (gain, offset in DN).
SHIFTS = ((1.0, 0.0), (1.2, 10.0), (0.85, -8.0), (1.0, 20.0))


def _scores(model: torch.nn.Module, prep: workflow.Prepared) -> dict[str, Any]:
    """Test-block scores with the raw DN shifted by each of SHIFTS (valid pixels only)."""
    test = prep.eval_set(nc.TEST)
    out = {}
    for gain, offset in SHIFTS:
        raw = np.where(prep.scene.valid, prep.scene.image * gain + offset, 0).astype(np.float32)
        image = normalise(raw, prep.scene.valid, prep.spec)
        logits = predict_logits(model, image, workflow.CHIP_SIZE, workflow.STRIDE)
        score = test.score(logits)
        out[f"gain {gain:g}, offset {offset:+g}"] = {
            "miou": score["miou"], "pixel_accuracy": score["pixel_accuracy"]}
    return out


def build(artifacts: Path | None = None, threads: int = 2, steps: int | None = None) -> Path:
    """Train, evaluate and export v2; returns its directory. Seeded like v1."""
    torch.set_num_threads(threads)
    artifacts = artifacts or ARTIFACTS
    v1 = load_card(str(artifacts / workflow.STUDENT_NAME / "v1"))
    teacher_card = load_card(str(artifacts / workflow.TEACHER_NAME / "v1"))
    teacher = build_net(UNetSpec.from_dict(teacher_card.architecture))  # eager, from the card
    teacher.load_state_dict(torch.jit.load(teacher_card.weights_uri,
                                           map_location="cpu").state_dict())
    config = replace(RECIPE, steps=steps or RECIPE.steps, threads=threads)
    prep = workflow.prepare(config.class_weighting)
    if prep.spec != v1.input:
        raise RuntimeError("the data's normalisation differs from v1's card; v2 would not be "
                           "comparable")
    spec = student_spec(len(nc.BANDS), len(nc.CLASSES))
    started = time.perf_counter()
    model, history = distil_student(spec, teacher, prep.sampler(config), config, prep.weights,
                                    prep.eval_set(nc.VAL))
    seconds = round(time.perf_counter() - started, 1)
    scripted = torch.jit.script(model.eval())
    target = artifacts / workflow.STUDENT_NAME / f"v{VERSION}"
    target.mkdir(parents=True, exist_ok=True)
    scripted.save(str(target / "model.pt"))

    test = prep.eval_set(nc.TEST)
    clean = test.score(predict_logits(scripted, test.image, workflow.CHIP_SIZE,
                                      workflow.STRIDE))
    v1_model = torch.jit.load(v1.weights_uri, map_location="cpu").eval()
    shifted = {"v2": _scores(scripted, prep), "v1": _scores(v1_model, prep)}
    card = ModelCard(
        name=workflow.STUDENT_NAME,
        version=VERSION,
        task="segmentation",
        input=prep.spec,
        classes=nc.CLASSES,
        weights_file="model.pt",
        weights_sha256=sha256_of(str(target / "model.pt")),
        parameters=count_parameters(model),
        flops_per_chip=count_flops(model, len(nc.BANDS), workflow.CHIP_SIZE),
        teacher=v1.teacher,
        exported_with_torch=torch.__version__.split("+")[0],
        metrics={
            "split": v1.metrics["split"],
            "test_pixels": v1.metrics["test_pixels"],
            "miou": clean["miou"],
            "pixel_accuracy": clean["pixel_accuracy"],
            "per_class_iou": clean["per_class_iou"],
            "val_miou": history.val_miou[-1],
            "radiometric_shift_test": shifted,
        },
        training_data={
            **{k: v for k, v in v1.training_data.items() if k not in ("recipe", "command")},
            "recipe": asdict(config),
            "train_seconds": seconds,
            "command": "tilestream model robust-student",
        },
        description=(
            "landcover-student v2: v1's U-Net and distillation from landcover-teacher, trained "
            "with stronger radiometric augmentation (per-band gain +-25 %, offset +-15 DN) to "
            "transfer better to scenes whose radiometry differs from the NC training scene."),
        architecture=spec.to_dict(),
    )
    write_card(replace(card, drift_reference=workflow.scene_reference(scripted, card,
                                                                      threads).to_dict()),
               str(target))
    load_card(str(target))
    print(json.dumps({"seconds": seconds, "test_miou": clean["miou"], "shifted": shifted},
                     indent=2))
    return target
