"""The Dataflow path, verified offline with DataflowRunner's own ``--dry_run``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import main
from pipeline.ops.dry_run import EXAMPLE_ARGS
from pipeline.options import DEFAULT_MODEL_URI

ROOT = Path(__file__).resolve().parents[1]
# What the Flex Template launcher adds, then the template's example parameters.
DATAFLOW_ARGS = [
    *EXAMPLE_ARGS,
    *(f"--{k}={v}" for k, v in json.loads(
        (ROOT / "templates" / "example-parameters.json").read_text()).items()),
]


def dry_run(model_uri: str, *extra: str) -> dict:
    """The dry run in a clean interpreter: no emulator variables, nothing applied before."""
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_EMULATOR_HOST") and k not in ("CPL_GS_ENDPOINT",
                                                              "GS_NO_SIGN_REQUEST")}
    done = subprocess.run([sys.executable, "-m", "pipeline.ops.dry_run",
                           *DATAFLOW_ARGS, f"--model_uri={model_uri}", *extra],
                          capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def gpu_job(model_uri) -> dict:
    return dry_run(model_uri, "--device=GPU")


def test_the_template_job_is_streaming(gpu_job):
    assert gpu_job["streaming"] is True
    assert gpu_job["job_type"] == 2  # JOB_TYPE_STREAMING


def test_only_the_inference_step_asks_for_the_gpu(gpu_job):
    hinted = gpu_job["resource_hints"]
    assert hinted, "no step carries the accelerator hint"
    assert all(name.startswith("ScoreChips/RunInference/") for name in hinted)
    assert {h["beam:resources:accelerator:v1"] for h in hinted.values()} == {
        "type:nvidia-l4;count:1;install-nvidia-driver"}
    stages = {name.split("/")[0] for name in gpu_job["transforms"]}
    assert {"ReadPubSub", "ParseAnnouncements", "AssembleGranules", "Deduplicate", "ChipTiles",
            "ScoreChips", "LoadChipRows", "AssembleTiles", "WriteTileRows",
            "WriteDeadLetters"} <= stages


def test_cpu_jobs_carry_no_accelerator_hint(model_uri):
    assert dry_run(model_uri, "--device=CPU")["resource_hints"] == {}


def test_dataflow_translation_leaves_the_local_room_out(gpu_job):
    """The launcher imports only the runtime: no local stack, operator verb or training code."""
    assert gpu_job["non_runtime_modules"] == []
    assert gpu_job["bq_client_patched"] is False
    assert gpu_job["emulator_env"] == []
    assert gpu_job["max_chips_in_flight"] == 0  # the local runner's pacing: Dataflow paces itself


def test_local_flag_is_refused_with_the_dataflow_runner():
    with pytest.raises(main.ConfigError, match="cannot be used with --runner=DataflowRunner"):
        main.configure([*DATAFLOW_ARGS, "--local"])


def test_dataflow_needs_a_model_its_workers_can_read():
    args = [a for a in DATAFLOW_ARGS if not a.startswith("--sdk_container_image")]
    args.append(f"--model_uri={DEFAULT_MODEL_URI}")
    with pytest.raises(main.ConfigError, match="workers cannot read"):
        main.configure(args)
