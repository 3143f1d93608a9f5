"""The model build, step by step: each step reads the previous steps' files from a work directory.

``train-teacher`` -> ``teacher.pth``; ``distill`` -> ``student.pth``; ``evaluate`` ->
``metrics.json`` (+ report and figures); ``export`` -> TorchScript + model cards.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.card import CARD_FILE, InputSpec, ModelCard, load_card, sha256_of, write_card
from model.drift import (
    REFUSE_MEDIAN_BAND_PSI,
    DriftReference,
    band_psis,
    reference_from_pixels,
)
from model.inference import normalise, predict_logits, valid_mask
from model.training import data as nc
from model.training import render
from model.training.architectures import count_flops, count_parameters, student_spec, teacher_spec
from model.training.config import DistillConfig, TrainConfig
from model.training.train import (
    ChipSampler,
    EvalSet,
    class_weights,
    distil_student,
    history_from_dict,
    load_checkpoint,
    plot_history,
    save_checkpoint,
    train_teacher,
    write_json,
)

CHIP_SIZE = 64
STRIDE = 48
NODATA = 0.0  # Landsat Level-1 fill value; rasters' own nodata is honoured as well
VERSION = "1"
STUDENT_NAME = "landcover-student"
TEACHER_NAME = "landcover-teacher"
OLINDA = nc.repo_root() / "pipeline" / "ops" / "sample" / "L7_ETMs.tif"
BENCH_BATCH = 32


@dataclass
class Prepared:
    """Everything derived from the scene that teacher, student and evaluation must share."""

    scene: nc.Scene
    split: np.ndarray
    spec: InputSpec
    weights: torch.Tensor | None
    counts: dict[str, dict[str, int]]  # split -> class name -> valid pixels

    def eval_set(self, part: int) -> EvalSet:
        return EvalSet(
            image=normalise(self.scene.image, self.scene.valid, self.spec),
            labels=self.scene.labels,
            mask=self.split == part,
            class_names=tuple(c.name for c in nc.CLASSES),
            chip_size=self.spec.chip_size,
            stride=self.spec.stride,
        )

    def sampler(self, config: TrainConfig) -> ChipSampler:
        held_out = (self.split == nc.VAL) | (self.split == nc.TEST)
        return ChipSampler(self.scene.image, self.scene.labels, self.split == nc.TRAIN, held_out,
                           self.spec, len(nc.CLASSES), config)


def prepare(class_weighting: str = "sqrt-inverse") -> Prepared:
    scene = nc.load_scene()
    split = nc.block_split(scene.valid)
    train = split == nc.TRAIN
    mean, std = nc.band_statistics(scene.image, train)
    spec = InputSpec(
        bands=nc.BANDS, chip_size=CHIP_SIZE, stride=STRIDE,
        mean=tuple(round(m, 4) for m in mean), std=tuple(round(s, 4) for s in std),
        scale=1.0, offset=0.0, nodata=NODATA,
        valid_range=(0.0, 255.0),  # 8-bit DN, what the training scene holds
    )
    names = [c.name for c in nc.CLASSES]
    counts = {part_name: dict(zip(names, nc.class_counts(scene.labels, split == part).tolist(),
                                  strict=True))
              for part, part_name in nc.SPLIT_NAMES.items()}
    weights = class_weights(np.asarray(list(counts["train"].values())), class_weighting)
    return Prepared(scene, split, spec, weights, counts)


def step_train_teacher(workdir: Path, config: TrainConfig) -> Path:
    prep = prepare(config.class_weighting)
    spec = teacher_spec(len(nc.BANDS), len(nc.CLASSES))
    model, history = train_teacher(spec, prep.sampler(config), config, prep.weights,
                                   prep.eval_set(nc.VAL))
    path = workdir / "teacher.pth"
    save_checkpoint(path, model, spec, config=asdict(config), history=history.to_dict(),
                    input=asdict(prep.spec))
    plot_history({"teacher": history}, workdir / "teacher_curve.png")
    print(f"teacher: {history.seconds:.0f} s, final val mIoU {history.val_miou[-1]} -> {path}")
    return path


def step_distill(workdir: Path, config: DistillConfig, widths: tuple[int, ...] | None) -> Path:
    teacher, _ = load_checkpoint(workdir / "teacher.pth")
    prep = prepare(config.class_weighting)
    spec = student_spec(len(nc.BANDS), len(nc.CLASSES))
    if widths:
        spec = replace(spec, widths=widths)
    model, history = distil_student(spec, teacher, prep.sampler(config), config, prep.weights,
                                    prep.eval_set(nc.VAL))
    path = workdir / "student.pth"
    save_checkpoint(path, model, spec, config=asdict(config), history=history.to_dict(),
                    input=asdict(prep.spec))
    teacher_hist = history_from_dict(torch.load(workdir / "teacher.pth",
                                                weights_only=False)["history"])
    plot_history({"teacher": teacher_hist, "student": history}, workdir / "training_curves.png")
    print(f"student: {history.seconds:.0f} s, final val mIoU {history.val_miou[-1]} -> {path}")
    return path


def _throughput(models: dict[str, torch.jit.ScriptModule], channels: int, threads: int,
                repeats: int = 9, batches: int = 3) -> dict[str, float]:
    """Best chips/s per model over interleaved repeats: other processes on a shared machine only
    ever slow a repeat down, so the fastest repeat is the closest to the model's own speed."""
    torch.set_num_threads(threads)
    x = torch.randn(BENCH_BATCH, channels, CHIP_SIZE, CHIP_SIZE, generator=torch.Generator()
                    .manual_seed(0))
    rates: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(2):
                model(x)
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                for _ in range(batches):
                    model(x)
                rates[name].append(batches * BENCH_BATCH / (time.perf_counter() - start))
    return {name: round(max(r), 1) for name, r in rates.items()}


def _load_tile(path: Path, spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """A raster as the stream reads it: bands chosen by the card, nodata from card and file."""
    import rasterio

    probe = ModelCard(name=STUDENT_NAME, version=VERSION, task="segmentation", input=spec,
                      classes=nc.CLASSES, weights_file="", weights_sha256="", parameters=0)
    with rasterio.open(path) as src:
        idx = probe.band_indices(list(src.descriptions))
        raw = src.read([i + 1 for i in idx]).astype(np.float32)
        ok = valid_mask(raw, spec.nodata)
        if src.nodata is not None:
            ok &= (raw != src.nodata).all(axis=0)
    return raw, ok


def _colourise(classes: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 for matplotlib; invalid pixels black."""
    return render.colourise(np.where(valid, classes, 255), nc.CLASSES).transpose(1, 2, 0)


def _false_colour(raw: np.ndarray, valid: np.ndarray, order: tuple[int, int, int]) -> np.ndarray:
    """NIR/red/green composite with a 2-98 % stretch: vegetation red, water dark, city cyan."""
    return render.stretch(raw[list(order)], valid).transpose(1, 2, 0)


def _legend(ax: Any) -> None:
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c.colour, label=c.name) for c in nc.CLASSES],
              loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)


def _figure_olinda(raw: np.ndarray, valid: np.ndarray, pred: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nir_red_green = (nc.BANDS.index("nir"), nc.BANDS.index("red"), nc.BANDS.index("green"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), dpi=72)
    axes[0].imshow(_false_colour(raw, valid, nir_red_green))
    axes[0].set_title("Olinda L7 ETM+ (NIR, red, green)")
    axes[1].imshow(_colourise(pred, valid), interpolation="nearest")
    axes[1].set_title(f"{STUDENT_NAME} v{VERSION}")
    _legend(axes[1])
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    _save_small(fig, path)
    plt.close(fig)


def _save_small(fig: Any, path: Path, colours: int = 200) -> None:
    """PNG with a palette: the class colours exactly, plus an adaptive palette for the photo.

    A third of the size of the RGBA image; seeding the palette keeps the legend and the class map
    true to the card's colours.
    """
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    image = Image.open(buffer).convert("RGB")
    fixed = [c.rgb for c in nc.CLASSES] + [(0, 0, 0), (255, 255, 255)]
    adaptive = image.quantize(colors=colours, method=Image.Quantize.MEDIANCUT).getpalette()
    palette = [v for rgb in fixed for v in rgb] + (adaptive or [])[: 3 * colours]
    holder = Image.new("P", (1, 1))
    holder.putpalette(palette + [0] * (768 - len(palette)))
    image.quantize(palette=holder, dither=Image.Dither.NONE).save(path, optimize=True)


def _figure_heldout(prep: Prepared, preds: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held = prep.split == nc.TEST
    rows, cols = np.nonzero(prep.scene.valid)
    crop = np.s_[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    panels = {"reference (test blocks)": prep.scene.labels.astype(np.int64), **preds}
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels) + 1.5, 3.8), dpi=70)
    for ax, (title, classes) in zip(axes, panels.items(), strict=True):
        ax.imshow(_colourise(classes, held)[crop], interpolation="nearest")
        ax.set_title(title)
        ax.set_axis_off()
    _legend(axes[-1])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def step_evaluate(workdir: Path, threads: int = 2, img_dir: Path | None = None) -> dict[str, Any]:
    """Held-out scores, size, FLOPs and CPU speed of both models, and the Olinda quicklook."""
    torch.set_num_threads(threads)
    (workdir / "build.json").unlink(missing_ok=True)  # its timing and hashes are now stale
    teacher, t_ckpt = load_checkpoint(workdir / "teacher.pth")
    student, s_ckpt = load_checkpoint(workdir / "student.pth")
    prep = prepare(t_ckpt["config"]["class_weighting"])
    if asdict(prep.spec) != t_ckpt["input"] or t_ckpt["input"] != s_ckpt["input"]:
        raise RuntimeError("teacher, student and data disagree on input normalisation; retrain")
    scripted = {"teacher": torch.jit.script(teacher), "student": torch.jit.script(student)}
    test = prep.eval_set(nc.TEST)
    results: dict[str, Any] = {}
    preds = {}
    for name, module in scripted.items():
        logits = predict_logits(module, test.image, CHIP_SIZE, STRIDE)
        preds[name] = logits.argmax(0)
        model = teacher if name == "teacher" else student
        results[name] = {
            "parameters": count_parameters(model),
            "flops_per_chip": count_flops(model, len(nc.BANDS), CHIP_SIZE),
            "architecture": (t_ckpt if name == "teacher" else s_ckpt)["spec"],
            "test": test.score(logits),
            "val": prep.eval_set(nc.VAL).evaluate(module),
            "train_seconds": (t_ckpt if name == "teacher" else s_ckpt)["history"]["seconds"],
        }
    speed = _throughput(scripted, len(nc.BANDS), threads)
    for name, rate in speed.items():
        results[name]["cpu_chips_per_s"] = rate

    raw, ok = _load_tile(OLINDA, prep.spec)
    olinda_logits = predict_logits(scripted["student"], normalise(raw, ok, prep.spec),
                                   CHIP_SIZE, STRIDE)
    olinda_pred = olinda_logits.argmax(0)
    fractions = np.bincount(olinda_pred[ok], minlength=len(nc.CLASSES)) / max(ok.sum(), 1)

    img_dir = img_dir or workdir
    img_dir.mkdir(parents=True, exist_ok=True)
    _figure_olinda(raw, ok, olinda_pred, img_dir / "model_olinda_student.png")
    _figure_heldout(prep, preds, img_dir / "model_nc_test.png")
    if (workdir / "training_curves.png").is_file():
        shutil.copyfile(workdir / "training_curves.png", img_dir / "model_training_curves.png")

    metrics = {
        "split": {
            "method": "5x5 blocks over the valid area; Latin-square pattern puts one test block in "
                      "each block row and column; training chips never touch val/test pixels",
            "pixels": {k: sum(v.values()) for k, v in prep.counts.items()},
            "class_counts": prep.counts,
        },
        "class_names": [c.name for c in nc.CLASSES],
        "input": asdict(prep.spec),
        "bench": {"batch": BENCH_BATCH, "chip": CHIP_SIZE, "threads": threads,
                  "runtime": "TorchScript, torch.inference_mode",
                  "torch": torch.__version__, "machine": _machine()},
        "models": results,
        "configs": {"teacher": t_ckpt["config"], "student": s_ckpt["config"]},
        "histories": {"teacher": t_ckpt["history"], "student": s_ckpt["history"]},
        "olinda": {
            "tile": "pipeline/ops/sample/L7_ETMs.tif",
            "valid_pixels": int(ok.sum()),
            "class_fractions": {c.name: round(float(f), 4)
                                for c, f in zip(nc.CLASSES, fractions, strict=True)},
        },
        "provenance": prep.scene.provenance,
    }
    write_json(workdir / "metrics.json", metrics)
    return metrics


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs visible"


def _card(name: str, model_info: dict[str, Any], metrics: dict[str, Any], sha: str,
          teacher_ref: dict[str, Any], description: str) -> ModelCard:
    spec = metrics["input"]
    test = model_info["test"]
    card_metrics: dict[str, Any] = {
        "split": "held-out spatial test blocks of the NC scene (see training_data.split)",
        "test_pixels": metrics["split"]["pixels"]["test"],
        "miou": test["miou"],
        "pixel_accuracy": test["pixel_accuracy"],
        "per_class_iou": test["per_class_iou"],
        "cpu_chips_per_s": model_info["cpu_chips_per_s"],
        "cpu_bench": metrics["bench"],
    }
    return ModelCard(
        name=name,
        version=VERSION,
        task="segmentation",
        input=InputSpec(**{**spec, "bands": tuple(spec["bands"]), "mean": tuple(spec["mean"]),
                           "std": tuple(spec["std"]),
                           "valid_range": tuple(spec.get("valid_range") or (0.0, 255.0))}),
        classes=nc.CLASSES,
        weights_file="model.pt",
        weights_sha256=sha,
        parameters=model_info["parameters"],
        flops_per_chip=model_info["flops_per_chip"],
        teacher=teacher_ref,
        metrics=card_metrics,
        training_data={
            **metrics["provenance"],
            "split": metrics["split"],
            "recipe": metrics["configs"]["student" if "student" in name else "teacher"],
            "command": "tilestream model build",
        },
        description=description,
        architecture=model_info["architecture"],
        exported_with_torch=torch.__version__.split("+")[0],
    )


def step_export(workdir: Path, out_dir: Path) -> dict[str, Path]:
    """TorchScript + card for teacher and student; each export is re-read and checked."""
    metrics_path = workdir / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} not found; run 'evaluate' first")
    metrics = json.loads(metrics_path.read_text())
    written: dict[str, Path] = {}
    refs: dict[str, dict[str, Any]] = {}
    for role, name in (("teacher", TEACHER_NAME), ("student", STUDENT_NAME)):
        model, ckpt = load_checkpoint(workdir / f"{role}.pth")
        if ckpt["spec"] != metrics["models"][role]["architecture"]:
            raise RuntimeError(f"{role}.pth changed since 'evaluate'; evaluate again")
        target = out_dir / name / f"v{VERSION}"
        target.mkdir(parents=True, exist_ok=True)
        weights = target / "model.pt"
        scripted = torch.jit.script(model)
        scripted.save(str(weights))
        _check_roundtrip(model, weights)
        sha = sha256_of(str(weights))
        info = metrics["models"][role]
        if role == "teacher":
            teacher_ref: dict[str, Any] = {}
            description = (
                "Teacher for landcover-student: U-Net trained on the NC landclass96 labels. "
                "Kept for comparison; the stream scores with the student."
            )
        else:
            t = metrics["models"]["teacher"]
            teacher_ref = {
                **refs["teacher"],
                "parameters": t["parameters"],
                "flops_per_chip": t["flops_per_chip"],
                "miou": t["test"]["miou"],
                "distillation": {k: metrics["configs"]["student"][k]
                                 for k in ("ce_weight", "kd_weight", "temperature")},
            }
            description = (
                "7-class land cover (landclass96 scheme) from Landsat-7 ETM+ DN, distilled from "
                "landcover-teacher: cross-entropy on labels + temperature-scaled KL to the "
                "teacher on valid pixels."
            )
        card = _card(name, info, metrics, sha, teacher_ref, description)
        card = replace(card, drift_reference=scene_reference(scripted, card).to_dict())
        write_card(card, str(target))
        load_card(str(target))
        refs[role] = {"name": name, "version": VERSION,
                      "uri": f"model/artifacts/{name}/v{VERSION}", "weights_sha256": sha}
        written[role] = target / CARD_FILE
        print(f"{role}: {target} ({weights.stat().st_size / 1e6:.2f} MB, sha256 {sha[:12]}...)")
    return written


def scene_reference(model: torch.nn.Module, card: ModelCard,
                    threads: int = 2) -> DriftReference:
    """The card's drift reference: band deciles, label and predicted class shares, all over the
    training split's valid pixels (the pixels the network learnt from)."""
    torch.set_num_threads(threads)
    scene = nc.load_scene()
    train = nc.block_split(scene.valid) == nc.TRAIN
    image = normalise(scene.image, scene.valid, card.input)
    logits = predict_logits(model.eval(), image, card.input.chip_size, card.input.stride)
    values = scene.image[:, train] * card.input.scale + card.input.offset
    reference = reference_from_pixels(
        values, card.input.bands, logits.argmax(axis=0)[train], card.num_classes,
        labels=scene.labels[train].astype(np.int64),
        source=f"training split of {scene.provenance['source']}")
    return with_radiometry_guard(reference, card, scene.image[:, scene.valid])


def with_radiometry_guard(reference: DriftReference, card: ModelCard,
                          scene_values: np.ndarray) -> DriftReference:
    """The reference with its refusal threshold and the evidence it rests on: the median band
    PSI of the whole training scene, of the sample tile, and of the sample shifted the ways a
    tile in the wrong units or calibration would be (docs/model.md, "Radiometry guard")."""
    import rasterio

    with rasterio.open(OLINDA) as src:
        raw = src.read().astype(np.float64)
    olinda = raw[:, valid_mask(raw, card.input.nodata)]
    high = (card.input.valid_range or (0.0, 255.0))[1]
    cases = {
        "training scene": scene_values,
        "sample tile (Olinda)": olinda,
        "sample x 0.8": olinda * 0.8,
        "sample x 1.25": np.clip(olinda * 1.25, 0, high),
        "sample +20 DN": np.clip(olinda + 20, 0, high),
        "sample +40 DN": np.clip(olinda + 40, 0, high),
        "sample +60 DN": np.clip(olinda + 60, 0, high),
        "sample as reflectance 0-1": olinda / high,
    }
    evidence = {name: round(float(np.median(band_psis(
        reference, values * card.input.scale + card.input.offset))), 3)
        for name, values in cases.items()}
    return replace(reference, refuse_median_band_psi=REFUSE_MEDIAN_BAND_PSI,
                   refuse_evidence={"median_band_psi": evidence,
                                    "refused": sorted(k for k, v in evidence.items()
                                                      if v > REFUSE_MEDIAN_BAND_PSI)})


def _check_roundtrip(model: torch.nn.Module, path: Path) -> None:
    loaded = torch.jit.load(str(path), map_location="cpu")
    x = torch.randn(2, len(nc.BANDS), CHIP_SIZE, CHIP_SIZE, generator=torch.Generator()
                    .manual_seed(1))
    with torch.inference_mode():
        if not torch.allclose(loaded(x), model.eval()(x), atol=1e-5):
            raise RuntimeError(f"{path} does not reproduce the eager model")


def spec_widths(text: str | None) -> tuple[int, ...] | None:
    return tuple(int(v) for v in text.split(",")) if text else None
