"""``tilestream model VERB``: one parser for every model verb, one help that lists them all.

Training verbs come from ``model/training/commands.py``, imported only when one of them runs, so
an install without the ``train`` extra operates models fine; the registry verbs from
``model/registry.py``. What a user reads is :data:`DESCRIPTION`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.ops import clients

DESCRIPTION = """\
Train, publish and operate the model the stream scores with.

Training: train-teacher, distill, evaluate, export, build, robust-student (they need the
`train` extra and the training data; see docs/model.md).
Registry: publish, list, status, promote, canary, shadow, rollback; watch is the automatic
rollback rule; drift compares one raster with a model card's training data.

The registry is a local directory or a gs:// prefix (--registry, default $TILESTREAM_REGISTRY or
.tilestream/registry); add --local to reach a gs:// registry on the local stack. A stream started
with --model_registry follows its channels; a stream without it scores --model_uri. Every verb
that changes the channels prints what it did; a refused change exits 2, a lost race with another
writer exits 3.
"""

TRAINING = ("train-teacher", "distill", "evaluate", "export", "build", "robust-student")
REGISTRY = ("publish", "list", "status", "promote", "canary", "shadow", "rollback", "watch")


def add_parser(verbs) -> argparse.ArgumentParser:
    """``model`` and its verbs, under the top-level parser's ``verbs``."""
    model = verbs.add_parser("model", help="train, distil, evaluate and export the student; "
                             "publish, promote, canary, shadow, roll back, watch; drift",
                             description=DESCRIPTION, formatter_class=argparse.
                             RawDescriptionHelpFormatter)
    sub = model.add_subparsers(dest="model_verb", required=True, metavar="MODEL_VERB")
    _training_verbs(sub)
    _registry_verbs(sub)
    drift = sub.add_parser("drift", help="PSI of a raster against a card's training data")
    drift.add_argument("raster", help="a GeoTIFF with the card's bands (local path or gs://)")
    drift.add_argument("--model_uri", default=None, help="model directory (default: shipped)")
    drift.add_argument("--threshold", type=float, default=None,
                       help="a band drifts when its PSI exceeds this (default: the stream's)")
    model.set_defaults(func=run)
    return model


def _training_verbs(sub) -> None:
    from model.training.config import ARTIFACTS, WORKDIR, DistillConfig, TrainConfig

    helps = {"train-teacher": "train the teacher on the NC scene", "distill": "distil the "
             "student from the teacher", "evaluate": "score both on the held-out blocks and "
             "Olinda; --report refreshes docs/model.md", "export": "write TorchScript + model "
             "cards under --artifacts", "build": "all four in order, committed artifacts and "
             "docs/model.md included", "robust-student": "the second student (v2): v1 distilled "
             "again with stronger radiometric augmentation"}
    for verb in TRAINING:
        p = sub.add_parser(verb, help=helps[verb],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--workdir", type=Path, default=WORKDIR,
                       help="checkpoints, metrics and curves")
        p.add_argument("--artifacts", type=Path, default=ARTIFACTS,
                       help="where export writes <name>/v<version>/")
        p.add_argument("--report", type=Path, default=None,
                       help="markdown report to (re)generate; build defaults to docs/model.md")
        p.add_argument("--img_dir", type=Path, default=None,
                       help="figures for the report (default: docs/img beside the report)")
        p.add_argument("--seed", type=int, default=0, help="random seed of every run")
        p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
        p.add_argument("--batch_size", type=int, default=TrainConfig.batch_size,
                       help="chips per optimiser step")
        for role, config in (("teacher", TrainConfig), ("student", DistillConfig)):
            p.add_argument(f"--{role}_steps", type=int, default=config.steps,
                           help=f"optimiser steps of the {role}")
            p.add_argument(f"--{role}_lr", type=float, default=config.lr,
                           help=f"learning rate of the {role}")
            p.add_argument(f"--{role}_class_weighting", choices=("sqrt-inverse", "none"),
                           default=config.class_weighting,
                           help=f"loss weight per class of the {role}: inverse square root of "
                           "its pixel share, or none")
        p.add_argument("--ce_weight", type=float, default=DistillConfig.ce_weight,
                       help="weight of cross-entropy on labels in the student loss")
        p.add_argument("--kd_weight", type=float, default=DistillConfig.kd_weight,
                       help="weight of the T^2-scaled KL to the teacher in the student loss")
        p.add_argument("--temperature", type=float, default=DistillConfig.temperature,
                       help="softmax temperature T of the distillation")
        p.add_argument("--student_widths", default=None,
                       help="comma-separated U-Net widths overriding the default student")
        p.add_argument("--student_steps_v2", type=int, default=None,
                       help="robust-student: distillation steps (default: its recipe's)")


def _registry_verbs(sub) -> None:
    def verb(name: str, help_text: str, changes: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        clients.add_registry_argument(p)
        clients.add_arguments(p, dataset=name == "watch")
        if changes:
            p.add_argument("--by", default=None, help="who (default: the login name)")
            p.add_argument("--reason", default="", help="why; kept in the history")
        return p

    verb("publish", "validate a model directory and copy it into the registry").add_argument(
        "model_dir", help="directory (or gs:// prefix) with model_card.json and its weights")
    verb("list", "published versions")
    verb("status", "channels: live, candidate, mode, last change (JSON)")
    verb("promote", "make a version live", changes=True).add_argument("ref", help="name/version")
    canary = verb("canary", "a version answers a stable fraction of tiles", changes=True)
    canary.add_argument("ref", help="name/version")
    canary.add_argument("--fraction", type=float, required=True, help="in (0, 1]")
    verb("shadow", "a version scores every tile beside live", changes=True).add_argument(
        "ref", help="name/version")
    verb("rollback", "end the trial, or go back to the previous live version", changes=True)
    watch = verb("watch", "judge the candidate on its BigQuery rows; roll back if it fails")
    watch.add_argument("--hours", type=int, default=24, help="window (default %(default)s)")
    watch.add_argument("--min_tiles", type=int, default=20,
                       help="judge only once the candidate has scored this many tiles in the "
                       "window (default %(default)s)")
    watch.add_argument("--max_dead_letter_excess", type=float, default=0.02,
                       help="roll back when the candidate's dead-letter rate exceeds live's by "
                       "more than this (default %(default)s)")
    watch.add_argument("--min_agreement", type=float, default=0.6,
                       help="roll back when chip agreement with live (shadow) falls below this "
                       "(default %(default)s)")
    watch.add_argument("--every", type=float, default=0,
                       help="repeat every N seconds (default: once, as a scheduled job runs it)")


def _registry(args: argparse.Namespace):
    from model.registry import Registry

    target = clients.resolve(args)
    return Registry(args.registry, gcs_client=target.storage() if target.stack else None)


def _registry_verb(args: argparse.Namespace) -> Any:
    from model.channels import ModelRef

    registry = _registry(args)
    if args.model_verb == "watch":
        return _watch(args, registry)
    if args.model_verb == "publish":
        ref, card = registry.publish(args.model_dir)
        return f"published {ref} to {card.uri} (card, sha256 {card.weights_sha256[:12]}... " \
               f"and one scored chip checked)"
    if args.model_verb == "list":
        return "\n".join(str(r) for r in registry.versions()) or "(no versions)"
    if args.model_verb == "status":
        status = registry.status()
        if status.get("live") is None:
            status["note"] = ("no live version in this registry: only a stream started with "
                              "--model_registry follows it; a stream without it scores its "
                              "--model_uri (default: the shipped student)")
        return status
    kwargs = {"by": args.by, "why": args.reason}
    if args.model_verb == "promote":
        return str(registry.promote(ModelRef.parse(args.ref), **kwargs))
    if args.model_verb == "canary":
        return str(registry.canary(ModelRef.parse(args.ref), args.fraction, **kwargs))
    if args.model_verb == "shadow":
        return str(registry.shadow(ModelRef.parse(args.ref), **kwargs))
    return str(registry.rollback(**kwargs))


def _watch(args: argparse.Namespace, registry) -> str:
    import time

    from model.channels import RegistryError
    from pipeline.ops.watch import RollbackRule, judge

    target = clients.resolve(args)
    if not target.dataset:
        raise RegistryError("--bq_dataset PROJECT:DATASET is required without --local")
    client = target.bigquery()
    rule = RollbackRule(args.hours, args.min_tiles, args.max_dead_letter_excess,
                        args.min_agreement)
    while True:
        if not args.every:
            return str(judge(registry, client, target.dataset, rule))
        try:  # as a scheduler runs it: one failed run is logged, the next one comes
            print(judge(registry, client, target.dataset, rule), flush=True)
        except Exception as exc:
            print(f"error: {type(exc).__name__}: {exc}", flush=True)
        time.sleep(args.every)


def _drift(args: argparse.Namespace) -> dict:
    from model.card import load_card
    from model.drift import PSI_THRESHOLD, raster_drift
    from pipeline.options import DEFAULT_MODEL_URI

    card = load_card(args.model_uri or DEFAULT_MODEL_URI)
    return raster_drift(args.raster, card, threshold=args.threshold or PSI_THRESHOLD).to_dict()


def run(args: argparse.Namespace) -> int:
    if args.model_verb in TRAINING:
        from model.training import commands

        return commands.run(args)
    from model.card import CardError
    from model.channels import ConflictError, RegistryError

    try:
        result = _drift(args) if args.model_verb == "drift" else _registry_verb(args)
    except ConflictError as exc:
        print(f"tilestream model {args.model_verb}: conflict: {exc}", file=sys.stderr)
        return 3
    except (RegistryError, CardError, OSError, clients.TargetError) as exc:
        print(f"tilestream model {args.model_verb}: {exc}", file=sys.stderr)
        return 2
    print(result if isinstance(result, str) else json.dumps(result, indent=2))
    return 0
