"""The stream translated for Dataflow offline (DataflowRunner's own ``--dry_run``), described.

What a launch would submit, without credentials or network: the transforms, their resource
hints, and the job's *update surface* (:func:`update_surface`): for each step that keeps keyed
state or reads side inputs, its state and timer specs and the coders of its key, value and
state, plus the shape of every record that state holds in pickled form. Dataflow's in-place
update keeps state only if that surface still reads the same (``pipeline/ops/release.py``
compares two of them). Run in a fresh interpreter (``python -m pipeline.ops.dry_run ARGS``,
JSON on stdout) so nothing of a local session leaks into the translation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline import main
from pipeline.options import TileStreamOptions

# What the Flex Template launcher adds for an offline translation (no project is reached).
EXAMPLE_ARGS = [
    "--runner=DataflowRunner", "--project=tilestream-prod", "--region=us-central1",
    "--temp_location=gs://tilestream-prod-dataflow/tmp",
    "--staging_location=gs://tilestream-prod-dataflow/staging", "--no_auth", "--dry_run=True",
    "--sdk_location=container",
    "--sdk_container_image=us-central1-docker.pkg.dev/tilestream-prod/tilestream/tilestream:dry",
]
NON_RUNTIME = ("pipeline.local", "pipeline.ops", "model.training")
SELF = {"pipeline.ops", __name__, "pipeline.ops.dry_run"}  # the wrapper running the launcher
ROOT = Path(__file__).resolve().parents[2]
# What would point the translation at the local stack: never part of a Dataflow launch.
LOCAL_ENV = ("CPL_GS_ENDPOINT", "GS_NO_SIGN_REQUEST", "GDAL_HTTP_HEADERS")


class TranslationError(RuntimeError):
    """The job did not translate; the message ends with the launcher's own error."""


def translate(args: list[str], timeout_s: float = 300) -> dict[str, Any]:
    """:func:`describe` the job ``args`` (beside :data:`EXAMPLE_ARGS`) in a fresh interpreter
    whose environment names no emulator: what the Flex Template launcher would submit."""
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_EMULATOR_HOST") and k not in LOCAL_ENV}
    done = subprocess.run([sys.executable, "-m", "pipeline.ops.dry_run", *EXAMPLE_ARGS, *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode:
        raise TranslationError(f"the job does not translate: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _coder(components, coder_id: str) -> str:
    """A coder as text: its URN (the class for a pickled one) and its components."""
    coder = components.coders[coder_id]
    urn = coder.spec.urn.removeprefix("beam:coder:")
    if urn.startswith("pickled_python"):  # ref_Coder_PickleCoder_6 -> PickleCoder
        urn = "python:" + coder_id.removeprefix("ref_Coder_").rsplit("_", 1)[0]
    parts = [_coder(components, c) for c in coder.component_coder_ids]
    return f"{urn}({', '.join(parts)})" if parts else urn


def update_surface(proto_pipeline) -> dict[str, Any]:
    """Per stateful (or side-input) step: state specs and their coders, timers, side inputs,
    and the input's key and value coders; every transform name; the records state holds."""
    from apache_beam.portability.api import beam_runner_api_pb2

    components = proto_pipeline.components
    steps = {}
    for transform in components.transforms.values():
        if transform.spec.urn != "beam:transform:pardo:v1" or transform.subtransforms:
            continue
        payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)
        if not (payload.state_specs or payload.timer_family_specs or payload.side_inputs):
            continue
        state = {}
        for name, spec in sorted(payload.state_specs.items()):
            kind = spec.WhichOneof("spec")
            inner = getattr(spec, kind)
            coder_id = (getattr(inner, "element_coder_id", "") or getattr(inner, "coder_id", "")
                        or getattr(inner, "accumulator_coder_id", ""))
            state[name] = f"{kind.removesuffix('_spec')}:" + (
                _coder(components, coder_id) if coder_id else "?")
        main_inputs = [v for k, v in transform.inputs.items() if k not in payload.side_inputs]
        input_coder = (_coder(components, components.pcollections[main_inputs[0]].coder_id)
                       if main_inputs else "")
        steps[transform.unique_name] = {
            "state": state, "timers": sorted(payload.timer_family_specs),
            "side_inputs": sorted(payload.side_inputs), "input": input_coder}
    return {"steps": steps,
            "transforms": sorted(t.unique_name for t in components.transforms.values()),
            "records": record_shapes()}


def record_shapes() -> dict[str, list[str]]:
    """The fields of every record the stream keeps in state (pickled): ``name`` for a field
    with a default value (an older pickle without it reads the class's), ``name!`` for one
    without."""
    from transforms import records

    shapes = {}
    for name, value in sorted(vars(records).items()):
        if dataclasses.is_dataclass(value) and isinstance(value, type):
            # a default factory is no class attribute: an old pickle without it fails too
            shapes[name] = [f.name + ("" if f.default is not dataclasses.MISSING else "!")
                            for f in dataclasses.fields(value)]
    return shapes


def describe(argv: list[str]) -> dict[str, Any]:
    """Translate the job ``argv`` describes (a DataflowRunner with ``--dry_run``)."""
    job = main.configure(argv)
    result = main.build_pipeline(job).run()
    produced = result.job
    components = produced.proto_pipeline.components
    hints = {}
    for transform in components.transforms.values():
        env = components.environments.get(transform.environment_id)
        if env is not None and env.resource_hints and not transform.subtransforms:
            hints[transform.unique_name] = {k: v.decode() for k, v in env.resource_hints.items()}
    from apache_beam.io.gcp import bigquery_tools

    beams_client = getattr(bigquery_tools.BigQueryWrapper._bigquery_client, "__wrapped__", None)
    return {
        "job_type": int(produced.proto.type),
        "streaming": bool(job.streaming),
        "resource_hints": hints,
        "non_runtime_modules": sorted(m for m in sys.modules
                                      if m.startswith(NON_RUNTIME) and m not in SELF),
        "bq_client_patched": beams_client is not None,
        "emulator_env": sorted(k for k in os.environ if k.endswith("_EMULATOR_HOST")),
        "max_chips_in_flight": job.options.view_as(TileStreamOptions).max_chips_in_flight,
        **update_surface(produced.proto_pipeline),
    }


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)
    print(json.dumps(describe(sys.argv[1:]), sort_keys=True))
