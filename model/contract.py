"""The card's promise checked against the network itself: load it and score one synthetic chip.

A card can be well-formed while its TorchScript file answers with another class count, expects
other input channels, or does not load at all. Those faults would otherwise surface only after the
stream has pulled messages (and, in a ``zip`` over classes, take the bundle down with them), so
the stream runs this before it reads a message, and again whenever it loads a model.
"""

from __future__ import annotations

import threading

import torch

from model.card import CardError, ModelCard
from model.inference import off_the_main_thread


def check_model(card: ModelCard, model: torch.nn.Module, device: torch.device | str = "cpu",
                ) -> None:
    """Score one all-zero chip (the card's nodata value) and compare the output with the card."""
    size, channels = card.input.chip_size, len(card.input.bands)
    chip = torch.zeros((1, channels, size, size), dtype=torch.float32, device=device)
    try:
        with torch.inference_mode():
            out = model(chip)
    except Exception as exc:  # any failure of the network is the card's promise broken
        raise CardError(f"{card.model_id}: the model does not score a ({channels}, {size}, "
                        f"{size}) chip of the card's bands: {_first_line(exc)}") from exc
    if not isinstance(out, torch.Tensor):
        raise CardError(f"{card.model_id}: the model returns {type(out).__name__}, "
                        "not a logits tensor")
    expected = (1, card.num_classes, size, size)
    if tuple(out.shape) != expected:
        raise CardError(f"{card.model_id}: the model returns shape {tuple(out.shape)}, the card "
                        f"promises {expected} ({card.num_classes} classes)")
    if not torch.isfinite(out.float()).all():
        raise CardError(f"{card.model_id}: the model returns non-finite logits for a blank chip")


def release(version: str) -> tuple[int, ...]:
    """``"2.13.0+cpu"`` -> ``(2, 13, 0)``: the release, without local or pre-release labels."""
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (3 - len(parts)))


def check_runtime(card: ModelCard, runtime: str | None = None) -> None:
    """Refuse a model exported by a newer torch than this runtime's, by name, before loading it:
    TorchScript from a newer torch does not load in an older one (operators it compiled to may
    not exist there), and the error torch gives is a compiler stack trace."""
    runtime = runtime or torch.__version__
    if card.exported_with_torch and release(runtime) < release(card.exported_with_torch):
        raise CardError(f"{card.model_id} was exported with torch {card.exported_with_torch}; "
                        f"this runtime has torch {runtime}, which cannot load TorchScript from a "
                        f"newer torch: run it where torch >= {card.exported_with_torch} (the "
                        "images pin one version with CI: templates/Dockerfile)")


def load_checked(card: ModelCard, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Load the card's TorchScript file and :func:`check_model` it; CardError on any fault,
    a runtime older than the exporting torch included (:func:`check_runtime`).

    Called on the main thread (a launch, a registry check), it runs on a thread of its own:
    the local stream scores on Beam's threads in the same process, and one forward pass on the
    main thread would slow all of them (:func:`model.inference.off_the_main_thread`).
    """
    if threading.current_thread() is threading.main_thread():
        return off_the_main_thread(lambda: load_checked(card, device))
    from apache_beam.io.filesystems import FileSystems

    check_runtime(card)
    try:
        with FileSystems.open(card.weights_uri) as handle:
            model = torch.jit.load(handle, map_location=device)
    except Exception as exc:
        raise CardError(f"{card.model_id}: {card.weights_uri} does not load as TorchScript: "
                        f"{_first_line(exc)}") from exc
    model.eval()
    check_model(card, model, device)
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1] if len(lines) > 1 else lines[0]
    name = type(exc).__name__
    return last if last.startswith(name) else f"{name}: {last}"
