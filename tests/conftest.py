"""Shared fixtures: one real local GCP stack (three emulators) for the whole test session."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from pipeline.local import stack as local_stack
from pipeline.options import DEFAULT_MODEL_URI


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    """The emulators, started by the project's own code, stopped after the session."""
    run_dir = tmp_path_factory.mktemp("stack")
    started = local_stack.up(run_dir)
    yield started
    local_stack.down(run_dir)


@pytest.fixture()
def adapted(stack):
    """This process's Google clients (Beam's included) pointed at the stack."""
    from pipeline.local import patches

    patches.apply(stack)
    return stack


@pytest.fixture(scope="session")
def model_uri() -> str:
    """The shipped student; TILESTREAM_TEST_MODEL_URI runs the suite against another card."""
    return os.environ.get("TILESTREAM_TEST_MODEL_URI", DEFAULT_MODEL_URI)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``last`` run after every other: they judge what the session did."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


# `make iam` (TILESTREAM_IAM_NEEDS): tests/test_iam.py leaves the session's needs here, and they
# are written to templates/iam/needs.json and docs/deploy.md only after a full run that passed
# (:func:`write_iam`): the needs of a selection, or of a failing run, are not the stream's.
IAM_NEEDS = "TILESTREAM_IAM_NEEDS"
IAM_PENDING: dict = {}
_DESELECTED: list = []


def pytest_deselected(items):
    _DESELECTED.extend(items)


def full_run(session) -> bool:
    """Every test of the suite was selected: no paths or node ids named, no -k or -m."""
    config = session.config
    return (config.args_source == pytest.Config.ArgsSource.TESTPATHS and not _DESELECTED
            and not config.option.collectonly and not config.getoption("lf", False))


def write_iam(session, exitstatus) -> str | None:
    """Write what test_iam recorded, or say why not."""
    out = os.environ.get(IAM_NEEDS)
    if not out:
        return None
    if not IAM_PENDING:
        return f"{IAM_NEEDS}: tests/test_iam.py did not run; nothing written"
    if exitstatus != 0 or not full_run(session):
        why = (f"the run failed (exit {int(exitstatus)})" if exitstatus != 0 else
               "only a selection of the suite ran (paths, node ids, -k, -m or --lf)")
        return f"{IAM_NEEDS}: {why}; {out} and docs/deploy.md left as they were"
    from pipeline.ops import iam

    iam.write_needs(IAM_PENDING["needs"], Path(out))
    iam.update_doc(Path(__file__).resolve().parents[1] / "docs" / "deploy.md",
                   IAM_PENDING["verdict"], IAM_PENDING["grants"])
    return f"{IAM_NEEDS}: wrote {out} and docs/deploy.md's table"


# What the reliability tests observe (tests/test_reliability.py, tests/test_ledger.py): rows of
# (what was tried, what was expected, what was observed). `make reliability` sets
# TILESTREAM_RELIABILITY_DOC and the session writes them there; `make test` writes nothing.
REPORT: dict[str, list[tuple[str, str, str]]] = {"inputs": [], "faults": [], "ledger": [],
                                                 "releases": []}
RELIABILITY_DOC = "TILESTREAM_RELIABILITY_DOC"


def pytest_sessionfinish(session, exitstatus):
    said = write_iam(session, exitstatus)
    if said:
        session.config.get_terminal_writer().line(said)
    target = os.environ.get(RELIABILITY_DOC)
    if not target or exitstatus != 0 or not (REPORT["faults"] and REPORT["inputs"]):
        return
    sections = [("inputs", "Inputs (published interleaved with good tiles into one running "
                 "stream)", ("input", "outcome", "reason as written to `dead_letters`")),
                ("ledger", "The ledger: every message id published, and its one outcome",
                 ("what", "expected", "observed")),
                ("faults", "Faults", ("fault", "expected", "observed")),
                ("releases", "Releases: blue-green and the rollback rule, on live traffic",
                 ("what", "expected", "observed"))]
    lines = ["# Reliability: hostile inputs and faults, and what the stream did", "",
             "Written by `make reliability` from a run of `tests/test_reliability.py`,",
             "`tests/test_ledger.py`, `tests/test_bluegreen.py` and",
             "`tests/test_rollback_rule.py` on the local stack (real emulators); every row is an",
             "observation of that run, not a promise. The corpus is built by `tests/corpus.py`",
             "(`python -m tests.corpus` writes its files to `tests/data/bad/`).", ""]
    for key, title, head in sections:
        if not REPORT[key]:
            continue
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|---|---|---|",
                  *(f"| {a} | {b} | {c} |" for a, b, c in REPORT[key]), ""]
    Path(target).write_text("\n".join(lines))


def cell(text: str, limit: int = 220) -> str:
    """One table cell: one line, pipes escaped, ephemeral ports hidden, bounded."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)
    return text if len(text) <= limit else text[:limit] + "…"
