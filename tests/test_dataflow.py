"""The Dataflow path, verified offline with DataflowRunner's own ``--dry_run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import main
from pipeline.options import DEFAULT_MODEL_URI

ROOT = Path(__file__).resolve().parents[1]
DATAFLOW_ARGS = [
    "--runner=DataflowRunner", "--project=tilestream-prod", "--region=us-central1",
    "--temp_location=gs://tilestream-prod-dataflow/tmp",
    "--staging_location=gs://tilestream-prod-dataflow/staging", "--no_auth", "--dry_run=True",
    "--sdk_location=container",
    "--sdk_container_image=us-central1-docker.pkg.dev/tilestream-prod/tilestream/tilestream:test",
    "--subscription=projects/tilestream-prod/subscriptions/tiles-sub",
    "--bq_dataset=tilestream-prod:tilestream", "--output_prefix=gs://tilestream-prod-out/stream",
    f"--model_uri={DEFAULT_MODEL_URI}",
]


def dry_run(*extra: str) -> dict:
    """The dry run in a clean interpreter: no emulator variables, nothing applied before."""
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_EMULATOR_HOST") and k not in ("CPL_GS_ENDPOINT",
                                                              "GS_NO_SIGN_REQUEST")}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "dataflow_dry_run.py"),
                           *DATAFLOW_ARGS, *extra], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def gpu_job() -> dict:
    return dry_run("--device=GPU")


def test_dataflow_translation_leaves_the_local_adapter_out(gpu_job):
    assert gpu_job["adapter_applied"] is False
    assert gpu_job["bq_client_patched"] is False
    assert gpu_job["emulator_env"] == []


def test_local_flag_is_refused_with_the_dataflow_runner():
    with pytest.raises(main.ConfigError, match="cannot be used with --runner=DataflowRunner"):
        main.configure([*DATAFLOW_ARGS, "--local"])


def test_dataflow_needs_a_model_its_workers_can_read():
    args = [a for a in DATAFLOW_ARGS if not a.startswith("--sdk_container_image")]
    with pytest.raises(main.ConfigError, match="workers cannot read"):
        main.configure(args)
