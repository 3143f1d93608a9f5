"""Renders the measured numbers into ``docs/model.md``.

Only the block between the two markers is generated; prose outside it (such as the visual
assessment of the Olinda quicklook, which needs a human to look at the picture) is kept when the
report is regenerated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BEGIN = "<!-- BEGIN GENERATED: tilestream model evaluate --report docs/model.md -->"
END = "<!-- END GENERATED -->"

TARGETS = {"params_ratio": 10.0, "speed_ratio": 5.0, "miou_ratio": 0.95}

SKELETON = """# The land-cover model

Written by hand: the model's purpose, contract and the Olinda assessment.

{generated}
"""


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _si(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def generated_block(metrics: dict[str, Any], build: dict[str, Any] | None, img: str) -> str:
    teacher, student = metrics["models"]["teacher"], metrics["models"]["student"]
    names = metrics["class_names"]
    bench = metrics["bench"]
    lines = [BEGIN, "", "## Teacher vs student on the held-out blocks", ""]
    lines += _table(
        ["", "teacher", "student", "ratio"],
        [
            ["architecture", f"U-Net widths {teacher['architecture']['widths']}",
             f"U-Net widths {student['architecture']['widths']}", ""],
            ["parameters", f"{teacher['parameters']:,}", f"{student['parameters']:,}",
             f"{teacher['parameters'] / student['parameters']:.1f}x fewer"],
            ["FLOPs per 64x64 chip", _si(teacher["flops_per_chip"]),
             _si(student["flops_per_chip"]),
             f"{teacher['flops_per_chip'] / student['flops_per_chip']:.1f}x fewer"],
            [f"CPU chips/s (batch {bench['batch']}, {bench['threads']} threads)",
             f"{teacher['cpu_chips_per_s']:.1f}", f"{student['cpu_chips_per_s']:.1f}",
             f"{student['cpu_chips_per_s'] / teacher['cpu_chips_per_s']:.1f}x faster"],
            ["test mIoU", _fmt(teacher["test"]["miou"]), _fmt(student["test"]["miou"]),
             f"{100 * student['test']['miou'] / teacher['test']['miou']:.1f} % of teacher"],
            ["test pixel accuracy", _fmt(teacher["test"]["pixel_accuracy"]),
             _fmt(student["test"]["pixel_accuracy"]), ""],
            ["val mIoU (monitoring only)", _fmt(teacher["val"]["miou"]),
             _fmt(student["val"]["miou"]), ""],
            ["training time (s)", f"{teacher['train_seconds']:.0f}",
             f"{student['train_seconds']:.0f}", ""],
        ],
    )
    lines += ["", "Per-class IoU on the test blocks (support = reference pixels):", ""]
    lines += _table(
        ["class", "support", "teacher IoU", "student IoU"],
        [[n, f"{teacher['test']['support'][n]:,}", _fmt(teacher["test"]["per_class_iou"][n]),
          _fmt(student["test"]["per_class_iou"][n])] for n in names],
    )
    ratios = {
        "params_ratio": teacher["parameters"] / student["parameters"],
        "speed_ratio": student["cpu_chips_per_s"] / teacher["cpu_chips_per_s"],
        "miou_ratio": student["test"]["miou"] / teacher["test"]["miou"],
    }
    labels = {
        "params_ratio": ("student parameters", "x fewer", ">= 10x fewer"),
        "speed_ratio": ("student CPU throughput", "x the teacher's", ">= 5x"),
        "miou_ratio": ("student mIoU", " of the teacher's", ">= 95 %"),
    }
    lines += ["", "Targets:", ""]
    for key, (what, unit, goal) in labels.items():
        value = ratios[key]
        shown = f"{100 * value:.1f} %" if key == "miou_ratio" else f"{value:.1f}"
        verdict = "met" if value >= TARGETS[key] else "**missed**"
        lines.append(f"- {what}: {shown}{unit} (target {goal}) - {verdict}")
    lines += [
        "",
        f"Throughput: {bench['runtime']}, {bench['chip']}x{bench['chip']} chips, batch "
        f"{bench['batch']}, torch {bench['torch']}, {bench['machine']}; best of 9 interleaved "
        "repeats. The machine is shared, so absolute rates vary between runs; the ratio is the "
        "stable figure. FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` "
        "(convolutions only, 2 per multiply-add).",
        "",
        f"![teacher, student and reference on the test blocks]({img}/model_nc_test.png)",
        "",
        "## Data and split",
        "",
    ]
    split = metrics["split"]
    lines += _table(
        ["split", "pixels", *names],
        [[part, f"{split['pixels'][part]:,}", *(f"{counts[n]:,}" for n in names)]
         for part, counts in split["class_counts"].items()],
    )
    lines += [
        "",
        f"Split: {split['method']}. Class counts are valid pixels (all six bands have data and "
        "the label is known); everything else is masked out of losses and scores. mIoU averages "
        "the classes present in the reference.",
        "",
        "## Training",
        "",
    ]
    for role in ("teacher", "student"):
        cfg = metrics["configs"][role]
        keys = ["steps", "batch_size", "lr", "class_weighting", "balanced_fraction",
                "gain_jitter", "seed", "threads"]
        if role == "student":
            keys += ["ce_weight", "kd_weight", "temperature"]
        lines.append(f"- {role}: " + ", ".join(f"{k}={cfg[k]}" for k in keys))
    lines += ["", f"![training curves]({img}/model_training_curves.png)", ""]
    if build:
        lines += [f"Full `build` (fetch, both trainings, evaluation, export) took "
                  f"{build['seconds'] / 60:.1f} min of wall time on this machine.", ""]
        for role, sha in build.get("sha256", {}).items():
            lines.append(f"- {role} weights sha256 `{sha}`")
        lines.append("")
    olinda = metrics["olinda"]
    lines += [
        "## Student on the Olinda sample tile",
        "",
        f"![Olinda false colour and student classes]({img}/model_olinda_student.png)",
        "",
        f"Class shares over {olinda['valid_pixels']:,} pixels of `{olinda['tile']}`: "
        + ", ".join(f"{k} {100 * v:.1f} %" for k, v in olinda["class_fractions"].items()) + ".",
        "",
        END,
    ]
    return "\n".join(lines)


def render(workdir: Path, report: Path, img_dir: Path) -> Path:
    metrics = json.loads((workdir / "metrics.json").read_text())
    build_file = workdir / "build.json"
    build = json.loads(build_file.read_text()) if build_file.is_file() else None
    try:
        img = img_dir.resolve().relative_to(report.resolve().parent).as_posix()
    except ValueError:
        img = img_dir.resolve().as_posix()
    block = generated_block(metrics, build, img)
    text = report.read_text() if report.is_file() else SKELETON.format(generated=block)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(text)
    return report
