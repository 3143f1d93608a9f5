"""Shared fixtures: one real local GCP stack (three emulators) for the whole test session."""

from __future__ import annotations

import os

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
    from pipeline.local import adapter as local_adapter

    local_adapter.apply(stack)
    return stack


@pytest.fixture(scope="session")
def model_uri() -> str:
    """The shipped student; TILESTREAM_TEST_MODEL_URI runs the suite against another card."""
    return os.environ.get("TILESTREAM_TEST_MODEL_URI", DEFAULT_MODEL_URI)
