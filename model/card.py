"""The model card: the only contract between a trained student and the stream.

A model is a directory (local path or ``gs://`` prefix) holding a TorchScript file and a
``model_card.json`` beside it. The stream reads nothing else, so any network that honours the
card can be scored, including one exported from another framework.

The TorchScript module takes a float32 tensor ``(N, C, H, W)`` of normalised bands (in the card's
band order, nodata pixels set to 0 after normalisation) and returns logits ``(N, K, H, W)`` for the
card's K classes.

Validation happens when the pipeline is built, so a broken card is a clear error at start-up
rather than a crash inside a worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

CARD_FILE = "model_card.json"
CARD_SCHEMA_VERSION = 1
TASKS = ("segmentation",)
_COLOUR = re.compile(r"^#[0-9a-fA-F]{6}$")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


class CardError(ValueError):
    """A model card that the stream cannot honour; the message names the card and the field."""


@dataclass(frozen=True)
class ClassInfo:
    id: int
    name: str
    colour: str  # "#rrggbb", used for the colour table of prediction rasters

    @property
    def rgb(self) -> tuple[int, int, int]:
        return tuple(int(self.colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


@dataclass(frozen=True)
class InputSpec:
    """How raw raster values become the model's input tensor.

    ``normalised = (raw * scale + offset - mean[b]) / std[b]``; pixels equal to ``nodata`` (or to
    the raster's own nodata) are invalid, excluded from statistics and fed to the model as 0.
    ``valid_range`` is the range of raw values the model was trained on (e.g. ``[0, 255]`` for
    8-bit DN); a tile whose values mostly fall outside it is refused rather than scored blind.
    """

    bands: tuple[str, ...]
    chip_size: int
    stride: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1.0
    offset: float = 0.0
    nodata: float | None = None
    valid_range: tuple[float, float] | None = None


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    task: str
    input: InputSpec
    classes: tuple[ClassInfo, ...]
    weights_file: str
    weights_sha256: str
    parameters: int
    flops_per_chip: int | None = None
    teacher: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    training_data: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    uri: str = ""  # directory the card was loaded from; not serialised
    architecture: dict[str, Any] = field(default_factory=dict)  # how to rebuild the network
    # training data's per-band and class distributions (model/drift.py reads and checks it)
    drift_reference: dict[str, Any] = field(default_factory=dict)
    # the torch that exported the TorchScript file: an older runtime cannot load it
    # (model/contract.py refuses it by name); None on cards written before it was recorded
    exported_with_torch: str | None = None

    @property
    def model_id(self) -> str:
        return f"{self.name}/{self.version}"

    @property
    def weights_uri(self) -> str:
        return join_uri(self.uri, self.weights_file) if self.uri else self.weights_file

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def band_indices(self, available: Sequence[str | None]) -> list[int]:
        """0-based positions of the card's bands among a raster's band names.

        A raster whose bands carry no names (no descriptions) is accepted positionally when it has
        at least as many bands as the card needs.
        """
        named = [a.lower() if a else None for a in available]
        if any(named):
            missing = [b for b in self.input.bands if b.lower() not in named]
            if missing:
                raise CardError(
                    f"{self.model_id}: raster bands {list(available)} lack {missing} "
                    f"(card needs {list(self.input.bands)})"
                )
            return [named.index(b.lower()) for b in self.input.bands]
        if len(available) < len(self.input.bands):
            raise CardError(
                f"{self.model_id}: raster has {len(available)} bands, card needs "
                f"{len(self.input.bands)} ({', '.join(self.input.bands)})"
            )
        return list(range(len(self.input.bands)))

    def to_dict(self) -> dict[str, Any]:
        data = {
            "card_schema": CARD_SCHEMA_VERSION,
            "name": self.name,
            "version": self.version,
            "task": self.task,
            "description": self.description,
            "input": {**asdict(self.input), "bands": list(self.input.bands)},
            "classes": [asdict(c) for c in self.classes],
            "weights": {"file": self.weights_file, "format": "torchscript",
                        "sha256": self.weights_sha256},
            "parameters": self.parameters,
            "flops_per_chip": self.flops_per_chip,
            "teacher": self.teacher,
            "metrics": self.metrics,
            "training_data": self.training_data,
            "architecture": self.architecture,
        }
        if self.drift_reference:
            data["drift_reference"] = self.drift_reference
        if self.exported_with_torch:
            data["exported_with"] = {"torch": self.exported_with_torch}
        data["input"]["mean"] = list(self.input.mean)
        data["input"]["std"] = list(self.input.std)
        if self.input.valid_range is None:
            del data["input"]["valid_range"]
        else:
            data["input"]["valid_range"] = list(self.input.valid_range)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def join_uri(base: str, name: str) -> str:
    return posixpath.join(base.rstrip("/"), name) if "://" in base else os.path.join(base, name)


def _require(data: dict[str, Any], key: str, where: str) -> Any:
    if key not in data or data[key] is None:
        raise CardError(f"{where}: missing field '{key}'")
    return data[key]


def card_from_dict(data: dict[str, Any], uri: str = "") -> ModelCard:
    """Parse and validate a card; every problem is a CardError naming the card."""
    where = f"model card {join_uri(uri, CARD_FILE) if uri else '(in memory)'}"
    if not isinstance(data, dict):
        raise CardError(f"{where}: expected a JSON object")
    schema = data.get("card_schema", CARD_SCHEMA_VERSION)
    if schema != CARD_SCHEMA_VERSION:
        raise CardError(f"{where}: card_schema {schema} is not supported (expected 1)")
    task = _require(data, "task", where)
    if task not in TASKS:
        raise CardError(f"{where}: task '{task}' is not one of {TASKS}")
    inp = _require(data, "input", where)
    bands = tuple(_require(inp, "bands", f"{where} input"))
    mean = tuple(float(v) for v in _require(inp, "mean", f"{where} input"))
    std = tuple(float(v) for v in _require(inp, "std", f"{where} input"))
    if not bands or len(set(b.lower() for b in bands)) != len(bands):
        raise CardError(f"{where}: input.bands must be non-empty and unique, got {list(bands)}")
    if len(mean) != len(bands) or len(std) != len(bands):
        raise CardError(
            f"{where}: input.mean/std need one value per band ({len(bands)}), "
            f"got {len(mean)}/{len(std)}"
        )
    if any(s <= 0 for s in std):
        raise CardError(f"{where}: input.std must be positive, got {list(std)}")
    chip_size = int(_require(inp, "chip_size", f"{where} input"))
    stride = int(inp.get("stride", chip_size))
    if chip_size < 8 or not 0 < stride <= chip_size:
        raise CardError(f"{where}: need chip_size >= 8 and 0 < stride <= chip_size, "
                        f"got {chip_size}/{stride}")
    valid_range = inp.get("valid_range")
    if valid_range is not None:
        if (not isinstance(valid_range, list) or len(valid_range) != 2
                or not float(valid_range[0]) < float(valid_range[1])):
            raise CardError(f"{where}: input.valid_range must be [low, high] with low < high, "
                            f"got {valid_range!r}")
        valid_range = (float(valid_range[0]), float(valid_range[1]))
    spec = InputSpec(
        bands=bands,
        chip_size=chip_size,
        stride=stride,
        mean=mean,
        std=std,
        scale=float(inp.get("scale", 1.0)),
        offset=float(inp.get("offset", 0.0)),
        nodata=None if inp.get("nodata") is None else float(inp["nodata"]),
        valid_range=valid_range,
    )
    classes = tuple(
        ClassInfo(
            id=int(_require(c, "id", f"{where} classes[{i}]")),
            name=str(_require(c, "name", f"{where} classes[{i}]")),
            colour=str(_require(c, "colour", f"{where} classes[{i}]")),
        )
        for i, c in enumerate(_require(data, "classes", where))
    )
    if [c.id for c in classes] != list(range(len(classes))):
        ids = [c.id for c in classes]
        raise CardError(f"{where}: class ids must be 0..K-1 in order, got {ids}")
    if len(classes) < 2 or len(classes) > 255:
        raise CardError(f"{where}: need 2..255 classes (255 is the nodata value of predictions)")
    bad = [c.colour for c in classes if not _COLOUR.match(c.colour)]
    if bad:
        raise CardError(f"{where}: class colours must be '#rrggbb', got {bad}")
    weights = _require(data, "weights", where)
    if weights.get("format", "torchscript") != "torchscript":
        raise CardError(f"{where}: weights.format must be 'torchscript', got {weights['format']!r}")
    sha = str(_require(weights, "sha256", f"{where} weights")).lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise CardError(f"{where}: weights.sha256 is not a sha256 hex digest")
    exported = data.get("exported_with") or {}
    torch_version = exported.get("torch") if isinstance(exported, dict) else None
    if torch_version is not None and not re.fullmatch(r"\d+\.\d+(\.\d+)?", str(torch_version)):
        raise CardError(f"{where}: exported_with.torch {str(torch_version)[:40]!r} is not a "
                        "version like 2.13.0")
    name, version = str(_require(data, "name", where)), str(_require(data, "version", where))
    for what, value in (("name", name), ("version", version)):
        if not _SAFE_NAME.fullmatch(value):
            raise CardError(f"{where}: {what} {value[:80]!r} must be 1-64 characters of "
                            "[A-Za-z0-9_.-] (it becomes part of output paths)")
    return ModelCard(
        name=name,
        version=version,
        task=task,
        input=spec,
        classes=classes,
        weights_file=str(_require(weights, "file", f"{where} weights")),
        weights_sha256=sha,
        parameters=int(_require(data, "parameters", where)),
        flops_per_chip=data.get("flops_per_chip"),
        teacher=dict(data.get("teacher") or {}),
        metrics=dict(data.get("metrics") or {}),
        training_data=dict(data.get("training_data") or {}),
        description=str(data.get("description", "")),
        uri=uri,
        architecture=dict(data.get("architecture") or {}),
        drift_reference=dict(data.get("drift_reference") or {}),
        exported_with_torch=str(torch_version) if torch_version is not None else None,
    )


def sha256_of(uri: str) -> str:
    from apache_beam.io.filesystems import FileSystems

    digest = hashlib.sha256()
    with FileSystems.open(uri) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_card(model_uri: str, verify_weights: bool = True) -> ModelCard:
    """Read ``model_card.json`` under ``model_uri`` (local or gs://) and validate it.

    With ``verify_weights`` the TorchScript file must exist and match the card's sha256.
    """
    from apache_beam.io.filesystems import FileSystems

    model_uri = model_uri.rstrip("/")
    card_uri = join_uri(model_uri, CARD_FILE)
    try:
        with FileSystems.open(card_uri) as handle:
            raw = handle.read()
    except Exception as exc:
        raise CardError(f"cannot read model card {card_uri}: {exc}") from exc
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CardError(f"model card {card_uri} is not valid JSON: {exc}") from exc
    card = card_from_dict(data, uri=model_uri)
    if verify_weights:
        if not FileSystems.exists(card.weights_uri):
            raise CardError(f"{card_uri}: weights file {card.weights_uri} does not exist")
        actual = sha256_of(card.weights_uri)
        if actual != card.weights_sha256:
            raise CardError(
                f"{card_uri}: sha256 of {card.weights_uri} is {actual}, card says "
                f"{card.weights_sha256}"
            )
    return card


def write_card(card: ModelCard, directory: str) -> str:
    from apache_beam.io.filesystems import FileSystems

    path = join_uri(directory, CARD_FILE)
    with FileSystems.create(path) as handle:
        handle.write(card.to_json().encode())
    return path
