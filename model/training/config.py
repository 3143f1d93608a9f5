"""Training and distillation settings, and where runs and exports go (no torch import: the
command line shows these defaults in its help)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKDIR = REPO_ROOT / ".tilestream" / "model-run"  # checkpoints, metrics and curves
ARTIFACTS = REPO_ROOT / "model" / "artifacts"  # <name>/v<version>/ of the shipped models


@dataclass
class TrainConfig:
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 1e-4
    eval_every: int = 100
    seed: int = 0
    threads: int = 2
    class_weighting: str = "none"  # or "sqrt-inverse"
    balanced_fraction: float = 0.25  # share of chips centred on a randomly chosen class
    gain_jitter: float = 0.1  # per-band multiplicative DN jitter, for other dates and places
    offset_jitter: float = 0.0  # per-band additive DN jitter (0: off, and no random draw)


@dataclass
class DistillConfig(TrainConfig):
    """The small student learns rare classes late: it needs more steps, a higher learning rate
    and more weight on rare classes than the teacher (chosen on the validation blocks)."""

    steps: int = 800
    lr: float = 1e-2
    class_weighting: str = "sqrt-inverse"
    balanced_fraction: float = 0.5
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    temperature: float = 2.0
