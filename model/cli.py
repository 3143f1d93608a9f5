"""``tilestream model ...``: train the teacher, distil the student, evaluate, export.

Operating models (registry, channels, drift) has its own verbs in ``model/ops_cli.py``:
publish, list, status, promote, canary, shadow, rollback, drift.

Each verb reads what the earlier ones left in ``--workdir``; ``build`` runs them all in order and
refreshes the committed artifacts and ``docs/model.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from model.train import DistillConfig, TrainConfig

VERBS = ("train-teacher", "distill", "evaluate", "export", "build")


def _parser() -> argparse.ArgumentParser:
    from model import data, workflow

    root = data.repo_root()
    parser = argparse.ArgumentParser(prog="tilestream model", description=__doc__)
    parser.add_argument("verb", choices=VERBS)
    parser.add_argument("--workdir", type=Path, default=workflow.default_workdir(),
                        help="checkpoints, metrics and curves (default: %(default)s)")
    parser.add_argument("--artifacts", type=Path, default=workflow.default_artifacts(),
                        help="where export writes <name>/v<version>/ (default: %(default)s)")
    parser.add_argument("--report", type=Path, default=None,
                        help="markdown report to (re)generate; build defaults to docs/model.md")
    parser.add_argument("--img-dir", type=Path, default=None,
                        help="figures for the report (default: docs/img beside the report)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    for role, config in (("teacher", TrainConfig), ("student", DistillConfig)):
        parser.add_argument(f"--{role}-steps", type=int, default=config.steps)
        parser.add_argument(f"--{role}-lr", type=float, default=config.lr)
        parser.add_argument(f"--{role}-class-weighting", choices=("sqrt-inverse", "none"),
                            default=config.class_weighting)
    parser.add_argument("--ce-weight", type=float, default=DistillConfig.ce_weight,
                        help="weight of cross-entropy on labels in the student loss")
    parser.add_argument("--kd-weight", type=float, default=DistillConfig.kd_weight,
                        help="weight of the T^2-scaled KL to the teacher in the student loss")
    parser.add_argument("--temperature", type=float, default=DistillConfig.temperature)
    parser.add_argument("--student-widths", default=None,
                        help="comma-separated U-Net widths overriding the default student")
    parser.set_defaults(repo_root=root)
    return parser


def _configs(args: argparse.Namespace) -> tuple[TrainConfig, DistillConfig]:
    common = {"seed": args.seed, "threads": args.threads, "batch_size": args.batch_size}
    teacher = TrainConfig(steps=args.teacher_steps, lr=args.teacher_lr,
                          class_weighting=args.teacher_class_weighting, **common)
    student = DistillConfig(steps=args.student_steps, lr=args.student_lr,
                            class_weighting=args.student_class_weighting,
                            ce_weight=args.ce_weight, kd_weight=args.kd_weight,
                            temperature=args.temperature, **common)
    return teacher, student


def main(argv: list[str] | None = None) -> int:
    import sys

    from model import ops_cli, report, workflow

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ops_cli.VERBS:  # operating models: registry, channels, drift
        return ops_cli.main(argv)
    if argv and argv[0] == "robust-student":  # the second student, v2 (model/robust.py)
        from model import robust

        print(robust.build(threads=2, steps=int(argv[1]) if len(argv) > 1 else None))
        return 0
    args = _parser().parse_args(argv)
    teacher_cfg, student_cfg = _configs(args)
    workdir: Path = args.workdir
    report_path = args.report
    if args.verb == "build" and report_path is None:
        report_path = args.repo_root / "docs" / "model.md"
    img_dir = args.img_dir or (report_path.parent / "img" if report_path else workdir)
    started = time.perf_counter()
    verbs = VERBS[:-1] if args.verb == "build" else (args.verb,)
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
            if args.verb == "build":
                shas = {role: json.loads(path.read_text())["weights"]["sha256"]
                        for role, path in cards.items()}
                seconds = round(time.perf_counter() - started, 1)
                (workdir / "build.json").write_text(
                    json.dumps({"seconds": seconds, "sha256": shas}, indent=2) + "\n")
                if report_path:
                    report.render(workdir, report_path, img_dir)
                print(f"build: {seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
