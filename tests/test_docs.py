"""The documentation runs: every local code block of README.md and docs/*.md, as a user would.

The convention (README.md, "Documentation that runs"): a fenced block whose info string is
``bash`` or ``sql`` runs on the local stack; ``bash cloud`` needs a GCP project and ``bash manual``
is left to the reader (the text says why), both not run here; any other language (``json``,
``text``, ``promql``) is shown, not run. A file's blocks run in order as one shell script, so a
stream started with ``&`` in one block keeps running for the next, against one fresh stack of the
test's own; a ``sql`` block runs through ``tilestream query --sql``. Background jobs are stopped
(SIGTERM: a drain) when the file ends.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.local import stack as local_stack

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = ("bash", "sql")
SKIP = ("cloud", "manual")
SHOWN = ("json", "text", "promql")
NOT_RUN = ("python",)  # only as `python cloud` or `python manual`
FILE_TIMEOUT_S = 480
FENCE = re.compile(r"^(?P<indent> *)```(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it starts, its info string's words, its text."""

    path: Path
    line: int
    language: str
    attributes: tuple[str, ...]
    text: str

    @property
    def runs(self) -> bool:
        return self.language in RUN and not self.attributes

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """Every fenced block of a Markdown file, indented ones (in lists) included."""
    found, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        start = FENCE.match(lines[i])
        if not start:
            i += 1
            continue
        indent, words = len(start["indent"]), start["info"].split()
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        text = "\n".join(line[indent:] for line in lines[i + 1 : end])
        found.append(Block(path, i + 1, words[0] if words else "", tuple(words[1:]), text))
        i = end + 1
    return found


def script(path: Path) -> str:
    """The file's runnable blocks as one bash script; each announces itself on stderr."""
    parts = ["set -euo pipefail", "PS4='+ ${SECONDS}s '", "set -x",
             "trap 'jobs -p | xargs -r kill -TERM 2>/dev/null; wait' EXIT"]
    for block in blocks(path):
        if not block.runs:
            continue
        parts.append(f"echo \">>> {block.where()} at $SECONDS s\" >&2")
        if block.language == "sql":
            parts.append(f"tilestream query --local --sql {shlex.quote(block.text)}")
        else:
            parts.append(block.text)
    return "\n".join(parts) + "\n"


def test_every_block_says_whether_it_runs():
    """A block without a language, or with an attribute the test does not know, would be
    skipped silently; every block must say what it is."""
    wrong = [f"{b.where()} ```{b.language} {' '.join(b.attributes)}".rstrip()
             for path in DOCS for b in blocks(path) if not _declared(b)]
    assert not wrong, f"blocks that say neither run, cloud, manual nor a shown language: {wrong}"


def _declared(block: Block) -> bool:
    if block.language in SHOWN:
        return not block.attributes
    if block.language in NOT_RUN:  # code for the reader's own program, against the cloud
        return block.attributes in tuple((a,) for a in SKIP)
    return block.language in RUN and block.attributes in ((), *((a,) for a in SKIP))


def _checkout_view(tmp: Path) -> Path:
    """A directory that looks like the checkout (its top-level entries linked) but keeps what
    the blocks write (out/, .tilestream/) out of the tree."""
    view = tmp / "checkout"
    view.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in ("out", ".tilestream", ".git"):
            (view / entry.name).symlink_to(entry)
    return view


RUNNABLE = [p for p in DOCS if any(b.runs for b in blocks(p))]


@pytest.mark.stack
@pytest.mark.slow
@pytest.mark.parametrize("path", RUNNABLE, ids=[p.name for p in RUNNABLE])
def test_local_blocks_run(path, tmp_path):
    view = _checkout_view(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "tilestream"  # `tilestream` is this tree's, whichever is installed
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m pipeline.ops.cli \"$@\"\n")
    shim.chmod(0o755)
    stack_dir = tmp_path / "stack"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "TILESTREAM_STACK_DIR": str(stack_dir), "PYTHONUNBUFFERED": "1"}
    for key in ("TILESTREAM_REGISTRY", "PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST",
                "BIGQUERY_EMULATOR_HOST"):
        env.pop(key, None)
    expected = [b.where() for b in blocks(path) if b.runs]
    shell = subprocess.Popen(["bash", "-c", script(path)], cwd=view, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        out, _ = shell.communicate(timeout=FILE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(shell.pid, signal.SIGKILL)
        out, _ = shell.communicate()
        out += f"\n(killed after {FILE_TIMEOUT_S} s)"
    finally:
        if (stack_dir / local_stack.STATE_FILE).exists():
            local_stack.down(stack_dir)
    ran = re.findall(r"^>>> (\S+) at \d+ s$", out, flags=re.MULTILINE)
    print("\n".join(re.findall(r"^(?:>>>|\+ \d+s) .*$", out, flags=re.MULTILINE)))
    assert shell.returncode == 0, (
        f"{path.name}: the block at {ran[-1] if ran else '?'} failed (exit "
        f"{shell.returncode}):\n{out[-6000:]}")
    assert ran == expected
