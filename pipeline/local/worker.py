"""An SDK worker process of a local backfill, with the local stack installed first.

A bounded job (``--input_glob``) on the local stack runs on Beam's portable FnApiRunner with one
SDK worker process per core: the same Fn API harness Dataflow's workers run. Each worker is a
fresh interpreter, and the FnApiRunner hands its workers no pipeline options (so no
``--beam_plugins`` either), so what :func:`patches.apply` does in the launcher must happen
here: ``python -m pipeline.local.worker`` is the workers' command
(``pipeline/local/launch.py``); it points this process's clients at the launcher's stack (the
workers inherit the launcher's environment, where ``patches.apply`` exported the stack's
``TILESTREAM_STACK_DIR``), gives the model one torch thread (the cores are shared out as worker
processes), then runs Beam's own ``sdk_worker_main``.
"""

from __future__ import annotations

import sys

TORCH_THREADS = 1


def command() -> str:
    """The workers' command line, as the FnApiRunner's subprocess environment takes it."""
    return f"{sys.executable} -m pipeline.local.worker"


def main(argv: list[str]) -> None:
    import torch
    from apache_beam.runners.worker import sdk_worker_main

    from pipeline.local import patches
    from pipeline.local import stack as local_stack

    patches.apply(local_stack.load())
    torch.set_num_threads(TORCH_THREADS)
    sdk_worker_main.main(argv)


if __name__ == "__main__":
    main(sys.argv)
