"""``tilestream model publish|list|status|promote|canary|shadow|rollback|watch|drift``.

The registry is a local directory or ``gs://`` prefix (``--registry``, default
``$TILESTREAM_REGISTRY`` or ``.tilestream/registry``); ``--local`` reaches a ``gs://`` registry
on the local stack's GCS emulator. Every verb that changes the channels document prints what it
did; a refused change exits 2, a lost race with another writer exits 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

VERBS = ("publish", "list", "status", "promote", "canary", "shadow", "rollback", "watch",
         "drift")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tilestream model", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    def verb(name: str, help_text: str, changes: bool = False) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=help_text)
        sub.add_argument("--registry", default=os.environ.get("TILESTREAM_REGISTRY",
                                                              ".tilestream/registry"),
                         help="local directory or gs:// prefix (default: %(default)s)")
        sub.add_argument("--local", action="store_true",
                         help="gs:// registries live on the local stack's GCS emulator")
        sub.add_argument("--stack_dir", default=None, help="run directory of the local stack")
        if changes:
            sub.add_argument("--by", default=None, help="who (default: the login name)")
            sub.add_argument("--reason", default="", help="why; kept in the history")
        return sub

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
    watch.add_argument("--bq_dataset", default=None,
                       help="PROJECT:DATASET (default with --local: the stack's)")
    watch.add_argument("--hours", type=int, default=24, help="window (default %(default)s)")
    watch.add_argument("--min_tiles", type=int, default=20)
    watch.add_argument("--max_dead_letter_excess", type=float, default=0.02)
    watch.add_argument("--min_agreement", type=float, default=0.6)
    watch.add_argument("--every", type=float, default=0,
                       help="repeat every N seconds (default: once)")
    drift = verbs.add_parser("drift", help="PSI of a raster against a card's training data")
    drift.add_argument("raster")
    drift.add_argument("--model_uri", default=None, help="model directory (default: shipped)")
    drift.add_argument("--threshold", type=float, default=None)
    return parser


def _registry(args: argparse.Namespace):
    from model.registry import Registry

    client = None
    if args.local:
        from pipeline.local import stack as local_stack

        client = local_stack.load(args.stack_dir).storage()
    return Registry(args.registry, gcs_client=client)


def _run(args: argparse.Namespace) -> Any:
    from model.registry import ModelRef

    if args.verb == "drift":
        from model.card import load_card
        from model.drift import PSI_THRESHOLD, raster_drift
        from pipeline.options import DEFAULT_MODEL_URI

        card = load_card(args.model_uri or DEFAULT_MODEL_URI)
        return raster_drift(args.raster, card, threshold=args.threshold or PSI_THRESHOLD
                            ).to_dict()
    registry = _registry(args)
    if args.verb == "watch":
        return _watch(args, registry)
    if args.verb == "publish":
        ref, card = registry.publish(args.model_dir)
        return f"published {ref} to {card.uri} (card, sha256 {card.weights_sha256[:12]}... " \
               f"and one scored chip checked)"
    if args.verb == "list":
        return "\n".join(str(r) for r in registry.versions()) or "(no versions)"
    if args.verb == "status":
        return registry.status()
    kwargs = {"by": args.by, "why": args.reason}
    if args.verb == "promote":
        return str(registry.promote(ModelRef.parse(args.ref), **kwargs))
    if args.verb == "canary":
        return str(registry.canary(ModelRef.parse(args.ref), args.fraction, **kwargs))
    if args.verb == "shadow":
        return str(registry.shadow(ModelRef.parse(args.ref), **kwargs))
    return str(registry.rollback(**kwargs))


def _watch(args: argparse.Namespace, registry) -> str:
    import time

    from model.registry import RegistryError
    from model.watch import RollbackRule, judge

    if args.local:
        from pipeline.local import stack as local_stack

        stack = local_stack.load(args.stack_dir)
        client, dataset = stack.bigquery(), f"{stack.project}.{stack.dataset}"
    else:
        from google.cloud import bigquery

        if not args.bq_dataset:
            raise RegistryError("--bq_dataset PROJECT:DATASET is required without --local")
        client = bigquery.Client(project=args.bq_dataset.replace(":", ".").split(".")[0])
    if args.bq_dataset:
        dataset = args.bq_dataset.replace(":", ".")
    rule = RollbackRule(args.hours, args.min_tiles, args.max_dead_letter_excess,
                        args.min_agreement)
    while True:
        verdict = judge(registry, client, dataset, rule)
        if not args.every:
            return str(verdict)
        print(verdict, flush=True)
        time.sleep(args.every)


def main(argv: list[str]) -> int:
    from model.card import CardError
    from model.registry import ConflictError, RegistryError

    args = _parser().parse_args(argv)
    try:
        result = _run(args)
    except ConflictError as exc:
        print(f"tilestream model {args.verb}: conflict: {exc}", file=sys.stderr)
        return 3
    except (RegistryError, CardError, OSError) as exc:
        print(f"tilestream model {args.verb}: {exc}", file=sys.stderr)
        return 2
    print(result if isinstance(result, str) else json.dumps(result, indent=2))
    return 0
