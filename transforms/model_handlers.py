"""The per-chip model handlers RunInference calls (``transforms/inference.py`` builds the step):
the forward pass that normalises on the device and quantises to uint8, the card's TorchScript
student strict about its device, and the registry-served versions scored side by side.

Beam's PyTorch handler silently falls back to CPU when CUDA is missing; with ``--device=GPU`` we
refuse to start instead, because a GPU job quietly running on CPU is a cost and latency incident.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult
from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor

from model.card import InputSpec, ModelCard
from model.contract import check_model
from model.inference import normalise_batch
from transforms import process
from transforms.guards import describe
from transforms.records import Chip


def segmentation_inference_fn(
    batch: Sequence[torch.Tensor],
    model: torch.nn.Module,
    device: Any,
    inference_args: dict[str, Any] | None = None,
    model_id: str | None = None,
    spec: InputSpec | None = None,
) -> Iterable[PredictionResult]:
    """Stack chips, normalise them on the device, run the model, return per-chip class
    probabilities as uint8 (p * 255) numpy arrays.

    With ``spec`` (the card's input), each chip is a :func:`model.inference.model_input` tensor:
    raw values in their own dtype plus the valid mask, so a GPU worker receives a quarter of the
    bytes of normalised float32 and does the arithmetic itself. Without it, chips are already
    the model's input.
    """
    with torch.inference_mode():
        if len({t.dtype for t in batch}) > 1:  # tiles of different dtypes in one batch
            batch = [t.float() for t in batch]
        x = torch.stack(batch).to(device)
        if spec is not None:
            x = normalise_batch(x, spec)
        logits = model(x, **(inference_args or {}))
        # In place on the softmax's own output: one pass and one buffer fewer, same bytes.
        probs = torch.softmax(logits.float(), dim=1)
        quantised = probs.mul_(255.0).round_().to(torch.uint8).cpu().numpy()
    # The input is not kept beside its output: the stream keys each prediction by its chip, and
    # keeping the tensor would hold every input until the predictions are consumed. Arrays, not
    # tensors: a runner that encodes them between stages pickles an array as one buffer.
    return [PredictionResult(None, y, model_id) for y in quantised]


class StudentModelHandler(PytorchModelHandlerTensor):
    """PytorchModelHandlerTensor for a model-card TorchScript file, strict about the device."""

    def __init__(self, card: ModelCard, device: str = "CPU", min_batch_size: int = 1,
                 max_batch_size: int = 32, max_batch_duration_secs: int | None = None):
        if device not in ("CPU", "GPU"):
            raise ValueError(f"device must be CPU or GPU, got {device!r}")
        super().__init__(
            torch_script_model_path=card.weights_uri,
            device=device,
            inference_fn=functools.partial(segmentation_inference_fn, spec=card.input),
            min_batch_size=min_batch_size,
            max_batch_size=max_batch_size,
            max_batch_duration_secs=max_batch_duration_secs,
        )
        self._require_gpu = device == "GPU"
        self._card = card

    def load_model(self) -> torch.nn.Module:
        if self._require_gpu:
            require_cuda()
        model = super().load_model()
        check_model(self._card, model, self._device)
        return model

    def get_num_bytes(self, batch: Sequence[torch.Tensor]) -> int:
        """The batch's bytes, read off each tensor: Beam's default walks every chip's rows and
        counts one element per row, a sizeable cost per batch for a number that is wrong."""
        return sum(t.nbytes for t in batch)


def require_cuda() -> None:
    """Refuse to run a ``--device=GPU`` stream on a worker without usable CUDA."""
    try:
        torch.empty(1, device="cuda")
    except (RuntimeError, AssertionError) as exc:
        raise RuntimeError(
            "--device=GPU but CUDA is not usable on this worker "
            f"(torch {torch.__version__}, cuda build {torch.version.cuda}): {exc}. "
            "Check the accelerator hint, the NVIDIA driver install and the image's torch."
        ) from exc


class VersionedModels:
    """Validated TorchScript models by ``name/version``, loaded on first use, a few at most.

    Every load goes through :func:`model.contract.load_checked` on the local copy that
    :func:`model.serving.fetch_validated` validated; the least recently used model is dropped
    beyond ``capacity`` (live, candidate and the one being replaced).
    """

    def __init__(self, registry_uri: str, device: torch.device, capacity: int = 3):
        self._registry_uri = registry_uri
        self.device = device
        self._capacity = capacity
        self._models: dict[str, tuple[torch.nn.Module, InputSpec]] = {}
        self.loads = Metrics.counter("tilestream", "model_loads")

    def get(self, model_id: str) -> tuple[torch.nn.Module, InputSpec]:
        """The checked network of a version and the input spec its chips are normalised by."""
        entry = self._models.pop(model_id, None)
        if entry is None:
            from model.channels import ModelRef
            from model.contract import load_checked
            from model.registry import Registry
            from model.serving import fetch_validated

            card = fetch_validated(Registry(self._registry_uri), ModelRef.parse(model_id),
                                   process.model_cache())
            entry = (load_checked(card, self.device), card.input)
            self.loads.inc()
            while len(self._models) >= self._capacity:
                self._models.pop(next(iter(self._models)))
        self._models[model_id] = entry
        return entry


class VersionedModelHandler(ModelHandler):
    """A RunInference handler over ``(chip, tensor)`` pairs whose chips name their version.

    Beam's ``KeyedModelHandler`` with ``KeyModelMapping`` fixes its models at construction, and
    ``model_metadata_pcoll`` swaps the one model of a handler; the stream needs whichever
    versions the channels name now, several at once (live and candidate). So the "model" this
    handler loads is a :class:`VersionedModels` cache, and a batch is split by version.
    RunInference still does the batching, the shared model per process and the exception
    handling.
    """

    def __init__(self, registry_uri: str, device: str = "CPU", min_batch_size: int = 1,
                 max_batch_size: int = 32, max_batch_duration_secs: int | None = None):
        if device not in ("CPU", "GPU"):
            raise ValueError(f"device must be CPU or GPU, got {device!r}")
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size,
                         max_batch_duration_secs=max_batch_duration_secs)
        self._registry_uri = registry_uri
        self._gpu = device == "GPU"

    def load_model(self) -> VersionedModels:
        if self._gpu:
            require_cuda()
        return VersionedModels(self._registry_uri,
                               torch.device("cuda" if self._gpu else "cpu"))

    def run_inference(self, batch: Sequence[tuple[Chip, torch.Tensor]], model: VersionedModels,
                      inference_args: dict[str, Any] | None = None,
                      ) -> Iterable[tuple[Chip, PredictionResult]]:
        by_version: dict[str, list[tuple[Chip, torch.Tensor]]] = {}
        for chip, tensor in batch:
            by_version.setdefault(chip.tile.model, []).append((chip, tensor))
        results = []
        for model_id, pairs in by_version.items():
            try:
                network, spec = model.get(model_id)
            except Exception as exc:  # only this version's chips fail, not the batch
                reason = f"model {model_id} could not be loaded: {describe(exc)}"
                results.extend((c, PredictionResult(t, None, reason)) for c, t in pairs)
                continue
            scored = segmentation_inference_fn([t for _, t in pairs], network, model.device,
                                               inference_args, model_id, spec=spec)
            results.extend(zip([c for c, _ in pairs], scored, strict=True))
        return results

    def get_metrics_namespace(self) -> str:
        return "RunInference"
