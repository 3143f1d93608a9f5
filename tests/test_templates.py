"""templates/: the Flex Template metadata, the images, the deploy script and the Terraform."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.ops import iam
from pipeline.options import LOCAL_ONLY, TileStreamOptions

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "templates"
METADATA = json.loads((TEMPLATES / "metadata.json").read_text())
PARAMS = {p["name"]: p for p in METADATA["parameters"]}
BIN = Path(sys.executable).parent

# One value each regex must accept and one it must reject.
EXAMPLES = {
    "subscription": ("projects/tilestream-prod/subscriptions/tiles-sub",
                     "projects/tilestream-prod/topics/tiles"),
    "input_buckets": ("gs://tilestream-prod-tiles/incoming,gs://landsat-mirror",
                      "http://169.254.169.254/computeMetadata"),
    "max_tile_pixels": ("144000000", "-1"),
    "input_scale": ("0.0255", "x2"),
    "input_offset": ("-10.5", "ten"),
    "max_out_of_range_fraction": ("0.5", "1.5"),
    "read_budget_secs": ("120", "2m"),
    "bq_dataset": ("tilestream-prod:tilestream", "tilestream-prod:tile-stream"),
    "output_prefix": ("gs://tilestream-prod-tiles/output", "s3://bucket/output"),
    "model_uri": ("gs://models-bucket/landcover-student/v1", "models/landcover"),
    "model_registry": ("gs://models-bucket/registry", "/etc/registry"),
    "channels_poll_secs": ("30", "30s"),
    "device": ("GPU", "TPU"),
    "accelerator": ("type:nvidia-l4;count:1;install-nvidia-driver", "nvidia-l4"),
    "chip_size": ("64", "64px"),
    "stride": ("48", "-1"),
    "min_valid_fraction": ("0.05", "1.5"),
    "window_secs": ("2.5", "five"),
    "min_batch_size": ("1", "0"),
    "max_batch_size": ("64", "0"),
    "max_batch_duration_secs": ("10", "1.5"),
    "chip_rows_load_secs": ("60", "1m"),
    "results_topic": ("projects/p/topics/tilestream-results", "tilestream-results"),
    "results_wait_secs": ("900", "15m"),
    "confidence_band": ("true", "yes"),
    "change_rules": ("gs://tilestream-prod-config/change_rules.json", "/etc/change_rules.json"),
    "change_history": ("8", "0"),
    "granule_pattern": (r"^(?P<granule>.+)\.(?P<band>B\d+)\.tif$", r"^(.+)\.(B\d+)\.tif$"),
    "band_aliases": ("B02=blue,B03=green", "B02:blue"),
    "band_preset": ("landsat7-c2", "landsat9"),
    "granule_timeout_secs": ("600", "10m"),
    "tile_timeout_secs": ("900.5", "15 min"),
    "dedup_ttl_secs": ("86400", "1d"),
    "release": ("0.2.0", "../0.2.0"),
}


def option_names() -> set[str]:
    parser = __import__("argparse").ArgumentParser()
    TileStreamOptions._add_argparse_args(parser)
    return {a.dest for a in parser._actions if a.dest != "help"}


def test_every_template_parameter_is_a_pipeline_option_and_back():
    assert set(PARAMS) == option_names() - set(LOCAL_ONLY)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_parameter_regexes_accept_a_valid_value_and_reject_an_invalid_one(name):
    good, bad = EXAMPLES[name]
    [regex] = PARAMS[name]["regexes"]
    assert re.fullmatch(regex, good), f"{name} rejects {good!r}"
    assert not re.fullmatch(regex, bad), f"{name} accepts {bad!r}"


def test_regex_examples_cover_every_parameter():
    assert set(EXAMPLES) == set(PARAMS)


def test_example_parameters_are_valid_and_parse_as_options():
    example = json.loads((TEMPLATES / "example-parameters.json").read_text())
    for name, value in example.items():
        [regex] = PARAMS[name]["regexes"]
        assert re.fullmatch(regex, value), (name, value)
    options = TileStreamOptions([f"--{k}={v}" for k, v in example.items()])
    assert options.device == "GPU" and options.confidence_band is True
    assert options.max_batch_size == 64 and options.min_valid_fraction == 0.05
    required = {n for n, p in PARAMS.items() if not p["isOptional"]}
    assert required <= set(example)


def _beam_version() -> str:
    return re.search(r'BEAM_VERSION = "([^"]+)"', (ROOT / "setup.py").read_text()).group(1)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_images_pin_the_beam_version_of_setup_py(dockerfile):
    text = (TEMPLATES / dockerfile).read_text()
    assert re.search(r"^ARG BEAM_VERSION=(\S+)$", text, re.M).group(1) == _beam_version()
    assert "FROM apache/beam_python3.11_sdk:${BEAM_VERSION}" in text
    assert "COPY --from=launcher /opt/google/dataflow/python_template_launcher" in text
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in text
    assert "FLEX_TEMPLATE_PYTHON_PY_FILE=/template/pipeline/main.py" in text


def test_the_beam_patches_were_written_for_the_pinned_beam():
    """A Beam upgrade in setup.py is also a review of every patch of its internals."""
    from transforms import process

    assert process.BEAM_VERSION == _beam_version(), "re-check the patches (transforms/process.py)"


def test_gpu_image_has_a_cuda_base_and_a_cuda_torch():
    """PyPI's Linux torch wheel is the CUDA build (a CPU index would make a GPU job run on CPU);
    the CPU image takes the CPU build of the same version."""
    text = (TEMPLATES / "Dockerfile").read_text()
    assert re.search(r"^ARG CUDA_BASE=nvidia/cuda:\S+-runtime-", text, re.M)
    assert "pip install torch==${TORCH_VERSION}" in text and "whl/cpu" not in text
    assert "COPY --from=beam /opt/apache/beam /opt/apache/beam" in text
    cpu = (TEMPLATES / "Dockerfile.cpu").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu torch==${TORCH_VERSION}" in cpu


def test_dockerfiles_pass_hadolint():
    done = subprocess.run([str(BIN / "hadolint"), "--no-color", "Dockerfile", "Dockerfile.cpu",
                           "Dockerfile.map"],
                          cwd=TEMPLATES, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_deploy_script_passes_shellcheck():
    done = subprocess.run([str(BIN / "shellcheck"), "deploy.sh"], cwd=TEMPLATES,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --- terraform ---------------------------------------------------------------------------------

def terraform() -> dict[str, dict]:
    """Every resource in templates/terraform as {"type.name": attributes}, read by the project's
    one HCL reader (``pipeline/ops/iam.py``), references left as written."""
    return {address: iam.unquoted(body) for address, body in iam.Terraform().resources.items()}


def _first(value):
    return value[0] if isinstance(value, list) else value


def test_no_identity_holds_a_basic_role_and_the_registry_keeps_every_generation():
    """What the grants are is checked from needs (tests/test_iam.py); never a basic role."""
    r = terraform()
    for key, grant in r.items():
        if "_iam_" in key and "role" in grant:  # a binding (a custom role has role_id)
            assert grant["role"] not in ("roles/owner", "roles/editor", "roles/viewer"), key
    assert _first(r["google_storage_bucket.models"]["versioning"])["enabled"] is True


def test_notification_topic_and_subscription_are_wired_for_new_tiles_only():
    r = terraform()
    note = r["google_storage_notification.new_tiles"]
    assert note["event_types"] == ["OBJECT_FINALIZE"]
    assert note["payload_format"] == "JSON_API_V1"
    assert "input_prefix" in note["object_name_prefix"]
    sub = r["google_pubsub_subscription.tiles"]
    assert sub["ack_deadline_seconds"] >= 60
    assert "dead_letter" in _first(sub["dead_letter_policy"])["dead_letter_topic"]
    assert _first(sub["retry_policy"])["maximum_backoff"]


@pytest.mark.parametrize("table", ["chips", "tiles", "dead_letters", "events", "messages",
                                   "changes"])
def test_tables_use_the_schema_files_and_partitioning_of_the_stream(table):
    from transforms.sinks import table_parameters

    spec = terraform()[f"google_bigquery_table.{table}"]
    assert f"../bigquery/{table}.json" in spec["schema"]
    assert (TEMPLATES / "bigquery" / f"{table}.json").exists()
    params = table_parameters(table)
    assert _first(spec["time_partitioning"])["field"] == params["timePartitioning"]["field"]
    assert spec.get("clustering") == params.get("clustering", {}).get("fields")


def test_no_credentials_in_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    suspicious = [f for f in tracked if re.search(r"(credentials|service[-_]account).*\.json$|"
                                                  r"\.(pem|p12|key)$", f)]
    assert suspicious == []


def test_every_checkov_skip_says_why():
    """`make iac` runs checkov over templates/terraform: a finding is fixed or skipped where it
    is, with its reason, never silenced without one."""
    skips = [(path.name, line.strip()) for path in (TEMPLATES / "terraform").glob("*.tf")
             for line in path.read_text().splitlines() if "checkov:skip" in line]
    assert skips
    for name, line in skips:
        assert re.fullmatch(r"#checkov:skip=CKV2?_[A-Z]+_\d+:.{20,}", line), (name, line)
