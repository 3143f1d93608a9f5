"""The training verbs of ``tilestream model`` (parsed in ``pipeline/ops/model_cli.py``): train
the teacher, distil the student, evaluate, export, or ``build`` all four in order and refresh
the committed artifacts and ``docs/model.md``; ``robust-student`` builds the second student.

Each verb reads what the earlier ones left in ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from model.training.config import REPO_ROOT, DistillConfig, TrainConfig

VERBS = ("train-teacher", "distill", "evaluate", "export", "build", "robust-student")
STEPS = VERBS[:4]  # what build runs


def configs(args: argparse.Namespace) -> tuple[TrainConfig, DistillConfig]:
    common = {"seed": args.seed, "threads": args.threads, "batch_size": args.batch_size}
    teacher = TrainConfig(steps=args.teacher_steps, lr=args.teacher_lr,
                          class_weighting=args.teacher_class_weighting, **common)
    student = DistillConfig(steps=args.student_steps, lr=args.student_lr,
                            class_weighting=args.student_class_weighting,
                            ce_weight=args.ce_weight, kd_weight=args.kd_weight,
                            temperature=args.temperature, **common)
    return teacher, student


def run(args: argparse.Namespace) -> int:
    from model.training import report, workflow

    if args.model_verb == "robust-student":  # the second student, v2 (model/training/robust.py)
        from model.training import robust

        print(robust.build(threads=args.threads, steps=args.student_steps_v2))
        return 0
    teacher_cfg, student_cfg = configs(args)
    workdir: Path = args.workdir
    report_path = args.report
    if args.model_verb == "build" and report_path is None:
        report_path = REPO_ROOT / "docs" / "model.md"
    img_dir = args.img_dir or (report_path.parent / "img" if report_path else workdir)
    started = time.perf_counter()
    verbs = STEPS if args.model_verb == "build" else (args.model_verb,)
    for verb in verbs:
        if verb == "train-teacher":
            workflow.step_train_teacher(workdir, teacher_cfg)
        elif verb == "distill":
            workflow.step_distill(workdir, student_cfg,
                                  workflow.spec_widths(args.student_widths))
        elif verb == "evaluate":
            workflow.step_evaluate(workdir, args.threads, img_dir)
            if report_path:
                print(f"report: {report.render(workdir, report_path, img_dir)}")
        elif verb == "export":
            cards = workflow.step_export(workdir, args.artifacts)
            if args.model_verb == "build":
                shas = {role: json.loads(path.read_text())["weights"]["sha256"]
                        for role, path in cards.items()}
                seconds = round(time.perf_counter() - started, 1)
                (workdir / "build.json").write_text(
                    json.dumps({"seconds": seconds, "sha256": shas}, indent=2) + "\n")
                if report_path:
                    report.render(workdir, report_path, img_dir)
                print(f"build: {seconds / 60:.1f} min")
    return 0
