"""The card's input contract in code: normalisation and chip-wise scoring of a whole raster.

Training, evaluation and the quicklook all go through these two functions, so the numbers in the
report come from the same preprocessing and chipping the stream is told to use by the card.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

from model.card import InputSpec

T = TypeVar("T")


def off_the_main_thread(work: Callable[[], T]) -> T:
    """``work()`` on a short-lived thread of its own: its result, or its exception re-raised.

    On CPU, one forward pass on a process's main thread left every later forward pass on any
    other thread (where Beam runs DoFns) 15-25 % slower in our measurements (docs/ARCHITECTURE.md,
    "Known limits of the in-process runner"; OpenMP's per-thread teams, as far as we can tell).
    So the main thread of a process that scores on Beam's threads never runs a model itself.
    """
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as exc:  # handed back to the caller as is
            outcome.append((False, exc))

    worker = threading.Thread(target=run, name="off-the-main-thread")
    worker.start()
    worker.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def normalise(raw: np.ndarray, valid: np.ndarray, spec: InputSpec) -> np.ndarray:
    """``(raw * scale + offset - mean) / std`` per band; invalid pixels become 0."""
    mean = np.asarray(spec.mean, np.float32)[:, None, None]
    std = np.asarray(spec.std, np.float32)[:, None, None]
    out = (raw.astype(np.float32) * spec.scale + spec.offset - mean) / std
    return np.where(valid[None], out, 0.0).astype(np.float32)


def model_input(raw: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``(C + 1, S, S)`` raw values in their own dtype with the valid mask as a last channel.

    This is what travels to the model: a quarter of normalised float32 for 8-bit sources.
    :func:`normalise_batch` turns a batch of them into the model's input, on its device.
    """
    return np.concatenate([raw, valid[None].astype(raw.dtype)])


def normalise_batch(x: torch.Tensor, spec: InputSpec) -> torch.Tensor:
    """:func:`normalise` for a batch of :func:`model_input` tensors, on whatever device ``x`` is.

    Same float32 arithmetic in the same order as :func:`normalise`, so both give identical
    values: the stream (on a GPU or not) and training see the same input. The arithmetic runs
    in place on one float32 copy (``x`` is left alone) and skips ``* 1`` and, for integer
    rasters (no -0.0), ``+ 0``, which change no value: every pass over the batch costs a busy
    2-core worker a parallel region.
    """
    invalid = x[:, -1:] == 0  # the mask channel is 0 or 1 (model_input)
    out = x[:, :-1].to(torch.float32, copy=True)
    if spec.scale != 1.0:
        out.mul_(spec.scale)
    if spec.offset != 0.0 or x.is_floating_point():
        out.add_(spec.offset)
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=x.device)[None, :, None, None]
    std = torch.tensor(spec.std, dtype=torch.float32, device=x.device)[None, :, None, None]
    return out.sub_(mean).div_(std).masked_fill_(invalid, 0.0)


def valid_mask(raw: np.ndarray, nodata: float | None) -> np.ndarray:
    """Pixels where every band is finite and differs from ``nodata``."""
    ok = np.isfinite(raw).all(axis=0)
    if nodata is not None:
        ok &= (raw != nodata).all(axis=0)
    return ok


def _starts(length: int, chip: int, stride: int) -> list[int]:
    if length <= chip:
        return [0]
    starts = list(range(0, length - chip + 1, stride))
    if starts[-1] != length - chip:
        starts.append(length - chip)
    return starts


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    image: np.ndarray,
    chip_size: int,
    stride: int,
    batch_size: int = 32,
) -> np.ndarray:
    """Class logits (K, H, W) for a normalised (C, H, W) image, averaged over overlapping chips.

    Images smaller than a chip are zero-padded, like invalid pixels, so the model always sees
    full chips.
    """
    _, height, width = image.shape
    pad_h, pad_w = max(0, chip_size - height), max(0, chip_size - width)
    padded = np.pad(image, ((0, 0), (0, pad_h), (0, pad_w)))
    windows = [(y, x) for y in _starts(padded.shape[1], chip_size, stride)
               for x in _starts(padded.shape[2], chip_size, stride)]
    total: torch.Tensor | None = None
    hits = torch.zeros(padded.shape[1:])
    source = torch.from_numpy(padded)
    for i in range(0, len(windows), batch_size):
        group = windows[i : i + batch_size]
        chips = torch.stack([source[:, y : y + chip_size, x : x + chip_size] for y, x in group])
        logits = model(chips).float()
        if total is None:
            total = torch.zeros((logits.shape[1], *padded.shape[1:]))
        for (y, x), out in zip(group, logits, strict=True):
            total[:, y : y + chip_size, x : x + chip_size] += out
            hits[y : y + chip_size, x : x + chip_size] += 1
    assert total is not None
    return (total / hits)[:, :height, :width].numpy()
