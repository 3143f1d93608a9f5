"""The one way every operator verb reaches the stream's resources: the local stack or GCP.

Each verb takes the same flags (:func:`add_arguments`): ``--local`` [``--stack_dir``] for the
emulator stack, otherwise the Google clients' own credentials and ``--project``; and one
spelling of the dataset, ``--bq_dataset PROJECT:DATASET`` (default with ``--local``: the
stack's). :func:`resolve` turns them into a :class:`Target` whose clients are bound to the one or
the other.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

from pipeline.local import stack as local_stack

# The model registry a verb works on when --registry is not given (docs/configuration.md).
REGISTRY_ENV = "TILESTREAM_REGISTRY"
LOCAL_REGISTRY = ".tilestream/registry"  # `make demo`'s


def add_registry_argument(parser: argparse.ArgumentParser, fallback: str | None = LOCAL_REGISTRY,
                          help_text: str = "model registry: a local directory or gs:// prefix"
                          ) -> None:
    """``--registry``, defaulting to ``$TILESTREAM_REGISTRY``, else ``fallback`` (None: no
    registry). The one place every verb reads that default."""
    parser.add_argument("--registry", default=os.environ.get(REGISTRY_ENV, fallback),
                        help=f"{help_text} (default: ${REGISTRY_ENV}, else "
                        f"{fallback or 'none'}; now %(default)s)")


class TargetError(ValueError):
    """The flags do not name a place to work on."""


def add_arguments(parser: argparse.ArgumentParser, dataset: bool = True) -> None:
    parser.add_argument("--local", action="store_true",
                        help="the local emulator stack (`tilestream local up`)")
    parser.add_argument("--stack_dir", default=None,
                        help="run directory of the local stack (default .tilestream/stack, or "
                        "$TILESTREAM_STACK_DIR)")
    parser.add_argument("--project", default=None,
                        help="GCP project (default: the client's; with --local, the stack's)")
    if dataset:
        parser.add_argument("--bq_dataset", default=None, metavar="PROJECT:DATASET",
                            help="the stream's BigQuery dataset (default with --local: the "
                            "stack's)")


@dataclass
class Target:
    """Where a verb works: clients for the local stack or for GCP, and the dataset."""

    stack: local_stack.LocalStack | None
    project: str | None
    dataset: str | None  # project.dataset, as SQL names it

    def bigquery(self) -> Any:
        if self.stack is not None:
            return self.stack.bigquery()
        from google.cloud import bigquery

        return bigquery.Client(project=self.project)

    def storage(self) -> Any:
        if self.stack is not None:
            return self.stack.storage()
        from google.cloud import storage

        return storage.Client(project=self.project)

    def publisher(self) -> Any:
        if self.stack is not None:
            return self.stack.publisher()
        from google.cloud import pubsub_v1

        return pubsub_v1.PublisherClient()

    def subscriber(self) -> Any:
        if self.stack is not None:
            return self.stack.subscriber()
        from google.cloud import pubsub_v1

        return pubsub_v1.SubscriberClient()

    def need_dataset(self) -> str:
        if not self.dataset:
            raise TargetError("--bq_dataset PROJECT:DATASET is required without --local")
        return self.dataset


def resolve(args: argparse.Namespace) -> Target:
    """The target the flags name (the local stack must be up for ``--local``)."""
    from transforms.sinks import dataset_ref

    stack = local_stack.load(args.stack_dir) if args.local else None
    project = getattr(args, "project", None) or (stack.project if stack else None)
    spec = getattr(args, "bq_dataset", None)
    if spec is None and stack is not None:
        spec = f"{stack.project}:{stack.dataset}"
    dataset = None
    if spec:
        try:
            dataset = ".".join(dataset_ref(spec, project))
        except ValueError as exc:
            raise TargetError(str(exc)) from exc
    return Target(stack, project or (dataset.split(".")[0] if dataset else None), dataset)
