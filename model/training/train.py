"""Teacher training and student distillation on chips drawn from the training blocks only.

Runs are deterministic for a given seed, thread count and machine: numpy draws every chip from
one seeded generator, torch is seeded and restricted to deterministic kernels.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.card import InputSpec
from model.inference import normalise, predict_logits
from model.training.architectures import UNet, UNetSpec, build
from model.training.config import DistillConfig, TrainConfig
from model.training.losses import distillation_loss, masked_cross_entropy
from model.training.metrics import confusion, scores


@dataclass
class History:
    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    val_miou: list[float | None] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def _window_sums(mask: np.ndarray, size: int) -> np.ndarray:
    """Number of True pixels in every size x size window, indexed by its top-left corner."""
    integral = np.pad(mask.astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return (integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size]
            + integral[:-size, :-size])


class ChipSampler:
    """Random augmented chips whose every pixel lies outside the held-out blocks.

    Part of each batch is anchored on a uniformly chosen class so that rare classes (sediment has
    ~150 training pixels) appear in most batches.
    """

    def __init__(
        self,
        image: np.ndarray,
        labels: np.ndarray,
        train_mask: np.ndarray,
        held_out: np.ndarray,
        spec: InputSpec,
        num_classes: int,
        config: TrainConfig,
    ) -> None:
        size = spec.chip_size
        self.image, self.labels, self.mask, self.spec = image, labels, train_mask, spec
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        clean = _window_sums(held_out, size) == 0
        enough = _window_sums(train_mask, size) >= size * size // 4
        allowed = clean & enough
        self.origins = np.argwhere(allowed)
        if not len(self.origins):
            raise ValueError("no training chip fits outside the held-out blocks")
        self.by_class = []
        for k in range(num_classes):
            hits = np.argwhere(allowed & (_window_sums(train_mask & (labels == k), size) > 0))
            if len(hits):
                self.by_class.append(hits)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        size, cfg, rng = self.spec.chip_size, self.config, self.rng
        xs, ys, ms = [], [], []
        for _ in range(cfg.batch_size):
            if self.by_class and rng.random() < cfg.balanced_fraction:
                pool = self.by_class[rng.integers(len(self.by_class))]
            else:
                pool = self.origins
            y, x = pool[rng.integers(len(pool))]
            window = np.s_[y : y + size, x : x + size]
            raw = self.image[(slice(None), *window)]
            mask = self.mask[window]
            gain = 1 + rng.uniform(-cfg.gain_jitter, cfg.gain_jitter, (raw.shape[0], 1, 1))
            jittered = raw * gain.astype(np.float32)
            if cfg.offset_jitter:
                jittered = jittered + rng.uniform(-cfg.offset_jitter, cfg.offset_jitter,
                                                  (raw.shape[0], 1, 1)).astype(np.float32)
            chip = normalise(jittered, mask, self.spec)
            label = self.labels[window]
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            chip, label, mask = (np.rot90(a, k, axes=(-2, -1)) for a in (chip, label, mask))
            if flip:
                chip, label, mask = (a[..., ::-1] for a in (chip, label, mask))
            xs.append(np.ascontiguousarray(chip))
            ys.append(np.ascontiguousarray(label))
            ms.append(np.ascontiguousarray(mask))
        return (torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys).astype(np.int64)),
                torch.from_numpy(np.stack(ms)))


def class_weights(counts: np.ndarray, scheme: str) -> torch.Tensor | None:
    """Inverse square-root frequency, mean 1 over present classes: lifts rare classes without
    letting a 150-pixel class dominate the loss."""
    if scheme == "none":
        return None
    if scheme != "sqrt-inverse":
        raise ValueError(f"unknown class weighting {scheme!r}")
    freq = counts / counts.sum()
    weights = np.where(counts > 0, 1 / np.sqrt(np.maximum(freq, 1e-12)), 0.0)
    weights = weights / weights[counts > 0].mean()
    return torch.tensor(weights, dtype=torch.float32)


@dataclass
class EvalSet:
    """A normalised scene and the pixels to score on."""

    image: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    class_names: tuple[str, ...]
    chip_size: int
    stride: int

    def evaluate(self, model: torch.nn.Module) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        logits = predict_logits(model, self.image, self.chip_size, self.stride)
        model.train(was_training)
        return self.score(logits)

    def score(self, logits: np.ndarray) -> dict[str, Any]:
        matrix = confusion(logits.argmax(0), self.labels, self.mask, len(self.class_names))
        return scores(matrix, self.class_names)


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def fit(
    model: torch.nn.Module,
    sampler: ChipSampler,
    loss_fn: LossFn,
    config: TrainConfig,
    desc: str,
    val: EvalSet | None = None,
) -> History:
    """AdamW with a one-cycle schedule; ``loss_fn(logits, x, labels, mask)``."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=config.lr,
                                                   total_steps=config.steps, pct_start=0.15)
    history = History()
    model.train()
    bar = tqdm(range(1, config.steps + 1), desc=desc, unit="step", mininterval=2.0)
    for step in bar:
        x, labels, mask = sampler.batch()
        loss = loss_fn(model(x), x, labels, mask)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        history.step.append(step)
        history.loss.append(round(loss.item(), 5))
        if val is not None and (step % config.eval_every == 0 or step == config.steps):
            history.eval_step.append(step)
            history.val_miou.append(val.evaluate(model)["miou"])
            bar.set_postfix(loss=f"{loss.item():.3f}", val_miou=history.val_miou[-1])
        elif step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    history.seconds = round(bar.format_dict["elapsed"], 1)
    bar.close()
    model.eval()
    return history


def train_teacher(
    spec: UNetSpec,
    sampler: ChipSampler,
    config: TrainConfig,
    weights: torch.Tensor | None,
    val: EvalSet | None = None,
) -> tuple[UNet, History]:
    seed_everything(config.seed, config.threads)
    model = build(spec)

    def loss_fn(logits: torch.Tensor, _x: torch.Tensor, labels: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        return masked_cross_entropy(logits, labels, mask, weights)

    return model, fit(model, sampler, loss_fn, config, "teacher", val)


def distil_student(
    spec: UNetSpec,
    teacher: torch.nn.Module,
    sampler: ChipSampler,
    config: DistillConfig,
    weights: torch.Tensor | None,
    val: EvalSet | None = None,
) -> tuple[UNet, History]:
    """Student trained on labels plus the frozen teacher's softened predictions, online."""
    seed_everything(config.seed, config.threads)
    model = build(spec)
    teacher.eval().requires_grad_(False)

    def loss_fn(logits: torch.Tensor, x: torch.Tensor, labels: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            soft = teacher(x)
        return distillation_loss(logits, soft, labels, mask, config.ce_weight,
                                 config.kd_weight, config.temperature, weights)

    return model, fit(model, sampler, loss_fn, config, "student", val)


def save_checkpoint(path: Path, model: UNet, spec: UNetSpec, **extra: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"spec": spec.to_dict(), "state_dict": model.state_dict(), **extra}, path)


def load_checkpoint(path: Path) -> tuple[UNet, dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run the earlier model steps first")
    data = torch.load(path, map_location="cpu", weights_only=False)
    model = build(UNetSpec.from_dict(data["spec"]))
    model.load_state_dict(data["state_dict"])
    return model.eval(), data


def plot_history(histories: dict[str, History], path: Path) -> None:
    """Training loss (smoothed) and validation mIoU of each run, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
    for name, hist in histories.items():
        loss = np.asarray(hist.loss)
        window = max(1, min(25, len(loss) // 10))
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax_loss.plot(hist.step[window - 1 :], smooth, label=name)
        ax_val.plot(hist.eval_step, [np.nan if v is None else v for v in hist.val_miou],
                    marker="o", label=name)
    ax_loss.set(xlabel="step", ylabel="training loss",
                title="loss (moving average; student: CE + KD)")
    ax_val.set(xlabel="step", ylabel="mIoU", title="validation blocks mIoU")
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def history_from_dict(data: dict[str, Any]) -> History:
    return History(**data)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
