"""Stage 5: ChipBlocks -> PredictionBlocks with Beam RunInference and the TorchScript student.

Blocks (the chips of one strip task) are micro-batched inside ``FixedWindows``, weighed by their
chip count; :class:`BlockModelHandler` cuts a batch of blocks into forward passes of at most
``--max_batch_size`` chips and hands each to a per-chip handler: ``KeyedModelHandler`` carries
each chip's identity (the chip without its pixels) beside its tensor, and with
``--model_registry`` a ``VersionedModelHandler`` scores each chip with the version its tile was
assigned. Softmax and quantisation to uint8 happen on the device, so a GPU worker returns 1 byte
per class and pixel, not float logits. The per-chip handlers are ``transforms/model_handlers.py``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
import torch
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import (
    KeyedModelHandler,
    ModelHandler,
    PredictionResult,
    RunInference,
)
from apache_beam.transforms.window import FixedWindows, GlobalWindows
from apache_beam.utils.timestamp import Duration

from model.card import ModelCard
from model.inference import model_input
from transforms import pacing, process
from transforms.deadletter import DEAD_LETTER_TAG, dead_letter
from transforms.guards import describe
from transforms.model_handlers import StudentModelHandler, VersionedModelHandler
from transforms.records import NODATA_CLASS, Chip, ChipBlock, ChipPrediction, PredictionBlock

STAGE = "inference"
FAILED_TAG = "failed"
# Elements may carry an event time older than the watermark (a delayed notification); keep
# their windows open that long rather than drop them.
ALLOWED_LATENESS_SECS = 24 * 3600



def _block_chips(pair: tuple[ChipBlock, torch.Tensor]) -> int:
    return len(pair[0])


class BlockModelHandler(ModelHandler):
    """RunInference over ``(block without pixels, (n, C + 1, S, S) tensor)`` pairs.

    Beam batches blocks weighed by their chips (``element_size_fn``), so a batch is about
    ``max_batch_size`` chips or one bigger block; the batch is then cut into forward passes of
    at most ``max_batch_size`` chips, each scored by ``inner``, a handler over ``(chip,
    tensor)`` pairs whose model, device and version rules apply unchanged. Returns one
    ``(block, [PredictionResult per chip])`` per block, in its chips' order.
    """

    def __init__(self, inner: ModelHandler, min_batch_size: int = 1, max_batch_size: int = 32,
                 max_batch_duration_secs: int | None = None, model_key: str = ""):
        super().__init__(min_batch_size=min_batch_size, max_batch_size=max_batch_size,
                         max_batch_duration_secs=max_batch_duration_secs,
                         element_size_fn=_block_chips)
        self._inner = inner
        self._pass = max_batch_size
        self._key = model_key

    def load_model(self) -> Any:
        """The inner handler's model, loaded once per process and ``model_key``.

        RunInference keeps its model in a ``Shared`` handle that holds it only while a DoFn
        instance does; a runner that builds a fresh DoFn per bundle (Beam's in-process runner)
        dropped and reloaded the model, contract check included, in most bundles: 6 loads for
        one 3,660² tile. A worker serves one model per key for its whole life anyway.
        """
        if not self._key:
            return self._inner.load_model()
        return process.shared("model", self._key, self._inner.load_model)

    def run_inference(self, batch: Sequence[tuple[ChipBlock, np.ndarray]], model: Any,
                      inference_args: dict[str, Any] | None = None,
                      ) -> Iterable[tuple[ChipBlock, list[PredictionResult]]]:
        pairs = []
        for block, array in batch:
            tensor = torch.from_numpy(array)  # no copy
            pairs += [(chip, tensor[i]) for i, chip in enumerate(block.chips)]
        answers: dict[int, PredictionResult] = {}  # by chip identity: inner may reorder
        for start in range(0, len(pairs), self._pass):
            for chip, result in self._inner.run_inference(pairs[start : start + self._pass],
                                                          model, inference_args):
                answers[id(chip)] = result
        return [(block, [answers[id(chip)] for chip in block.chips]) for block, _ in batch]

    def get_num_bytes(self, batch: Sequence[tuple[ChipBlock, np.ndarray]]) -> int:
        return sum(array.nbytes for _, array in batch)

    def get_metrics_namespace(self) -> str:
        return self._inner.get_metrics_namespace()

    def validate_inference_args(self, inference_args: dict[str, Any] | None) -> None:
        self._inner.validate_inference_args(inference_args)


def block_input(block: ChipBlock) -> tuple[ChipBlock, np.ndarray]:
    """A block -> (its chips without pixels, their :func:`model_input` arrays stacked).

    A numpy array rather than a tensor: where a runner encodes the pair between stages (the
    FnApiRunner, Dataflow), pickling an array is one buffer copy, while a tensor goes through
    torch's own serialisation (the local backfill spent 5 % of its CPU there). The handler
    wraps it as a tensor without a copy.
    """
    chips = tuple(dataclasses.replace(c, raw=None) for c in block.chips)
    return dataclasses.replace(block, chips=chips), np.stack(
        [model_input(c.raw, c.valid) for c in block.chips])


def to_prediction(chip: Chip, probabilities: np.ndarray, model_name: str,
                  model_version: str) -> ChipPrediction:
    """Crop to the chip's in-tile window, argmax, and count classes over valid pixels only."""
    h, w = chip.height, chip.width
    probs = np.ascontiguousarray(probabilities[:, :h, :w])
    valid = chip.valid[:h, :w]
    class_map = probs.argmax(axis=0).astype(np.uint8)
    class_map[~valid] = NODATA_CLASS
    counts = np.bincount(class_map[valid], minlength=probs.shape[0])
    confidence = float(probs.max(axis=0)[valid].mean()) / 255.0 if valid.any() else 0.0
    return ChipPrediction(
        chip=chip,
        class_map=class_map,
        probabilities=probs,
        class_counts=tuple(int(n) for n in counts),
        mean_confidence=confidence,
        model_name=model_name,
        model_version=model_version,
        scored_at=time.time(),
    )


class _ToPredictionFn(beam.DoFn):
    """A scored block -> its PredictionBlock, plus a ChipBlock of the chips that failed."""

    def __init__(self, card: ModelCard):
        self._name, self._version = card.name, card.version
        self.scored = Metrics.counter("tilestream", "chips_scored")
        self.latency = Metrics.distribution("tilestream", "chip_latency_ms")

    def process(self, element: tuple[ChipBlock, list[PredictionResult]]):
        block, results = element
        pacing.in_flight().done(len(block))  # the chipper may cut the next strip
        tile = block.tile
        name, version = ((tile.model.split("/", 1)) if tile.model
                         else (self._name, self._version))
        predictions, failed = [], []
        for chip, result in zip(block.chips, results, strict=True):
            if result.inference is None:  # its version failed to load (VersionedModelHandler)
                yield dead_letter(STAGE, str(result.model_id), tile=tile)
                failed.append(chip)
                continue
            try:
                predictions.append(to_prediction(chip, np.asarray(result.inference), name,
                                                 version))
            except Exception as exc:  # one chip's output, one letter
                yield dead_letter(STAGE, f"prediction of chip {chip.index} unusable: "
                                         f"{describe(exc)}",
                                  tile=tile)
                failed.append(chip)
        if failed:
            yield beam.pvalue.TaggedOutput(FAILED_TAG, ChipBlock(tile, block.task,
                                                                 tuple(failed)))
        if predictions:
            self.scored.inc(len(predictions))
            for prediction in predictions:
                self.latency.update(int((prediction.scored_at - tile.published) * 1000))
            yield PredictionBlock(tile, block.task, tuple(predictions))


def failure_reason(exc: object) -> str:
    """Beam hands failed batches over as ``(type, repr, traceback lines)``: one sentence of it."""
    if isinstance(exc, BaseException):
        return f"model raised {describe(exc)}"
    if isinstance(exc, tuple) and len(exc) == 3 and isinstance(exc[0], type):
        lines = [line.strip() for chunk in exc[2] for line in str(chunk).splitlines()
                 if line.strip()]
        detail = lines[-1] if lines else str(exc[1])
        name = exc[0].__name__
        if not detail.startswith(name):
            detail = f"{name}: {detail}"
        return f"model raised {detail[:500]}"
    return f"model raised {str(exc)[:500]}"


class _FailedBatchFn(beam.DoFn):
    """A batch the model raised on: every chip in it is dead-lettered and reported as failed."""

    def __init__(self):
        self.failed = Metrics.counter("tilestream", "chips_failed")

    def process(self, failure):
        batch, exc = failure
        reason = failure_reason(exc)
        for block, _tensor in batch:
            pacing.in_flight().done(len(block))
            self.failed.inc(len(block))
            for chip in block.chips:
                yield dead_letter(STAGE, reason,
                                  tile=chip.tile,
                                  payload=f"chip {chip.index} window {chip.row},{chip.col}")
            yield beam.pvalue.TaggedOutput(FAILED_TAG, block)


class ScoredChips(NamedTuple):
    predictions: beam.PCollection  # PredictionBlock
    failed: beam.PCollection  # ChipBlock of chips (without pixels) the model failed on
    dead_letters: beam.PCollection


class ScoreChips(beam.PTransform):
    """Micro-batch blocks of chips in fixed windows and score them with RunInference.

    Outputs are back in the global window: everything downstream is keyed per tile, not per
    batch window.
    """

    def __init__(self, card: ModelCard, *, window_secs: float = 5.0, device: str = "CPU",
                 min_batch_size: int = 1, max_batch_size: int = 32,
                 max_batch_duration_secs: int | None = None,
                 accelerator: str | None = None, registry_uri: str | None = None):
        super().__init__()
        self._card = card
        self._window_secs = window_secs
        # With a registry, chips name their version (transforms/routing.py); else one model.
        per_chip: ModelHandler = (
            VersionedModelHandler(registry_uri, device, max_batch_size=max_batch_size)
            if registry_uri
            else KeyedModelHandler(StudentModelHandler(card, device,
                                                       max_batch_size=max_batch_size)))
        self._handler = BlockModelHandler(
            per_chip, min_batch_size, max_batch_size, max_batch_duration_secs,
            model_key=f"{registry_uri or card.weights_uri}|{device}")
        self._accelerator = accelerator if device == "GPU" else None

    def expand(self, chips) -> ScoredChips:
        run_inference = RunInference(self._handler)
        if self._accelerator:
            run_inference = run_inference.with_resource_hints(accelerator=self._accelerator)
        scored, failures = (
            chips
            | "MicroBatchWindows" >> beam.WindowInto(
                FixedWindows(self._window_secs),
                allowed_lateness=Duration(seconds=ALLOWED_LATENESS_SECS))
            | "StackBlocks" >> beam.Map(block_input)
            | "RunInference" >> run_inference.with_exception_handling()
        )
        converted = (scored
                     | "LeaveWindows" >> beam.WindowInto(GlobalWindows())
                     | "ToPrediction" >> beam.ParDo(_ToPredictionFn(self._card)).with_outputs(
                         FAILED_TAG, DEAD_LETTER_TAG, main="predictions"))
        failed = (failures.failed_inferences
                  | "FailedWindows" >> beam.WindowInto(GlobalWindows())
                  | "FailedChips" >> beam.ParDo(_FailedBatchFn()).with_outputs(FAILED_TAG,
                                                                                DEAD_LETTER_TAG))
        return ScoredChips(
            converted.predictions,
            (converted[FAILED_TAG], failed[FAILED_TAG]) | "AllFailed" >> beam.Flatten(),
            (converted[DEAD_LETTER_TAG], failed[DEAD_LETTER_TAG])
            | "AllInferenceLetters" >> beam.Flatten())
