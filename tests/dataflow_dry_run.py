"""Translate the full stream for Dataflow with ``--dry_run`` and print what was produced, as JSON.

Run in a fresh interpreter by tests/test_dataflow.py so nothing of the test session (the local
adapter, emulator variables) leaks in. No credentials and no network are used.
"""

from __future__ import annotations

import json
import os
import sys

from apache_beam.io.gcp import bigquery_tools
from apache_beam.options.pipeline_options import StandardOptions

from pipeline import main
from pipeline.local import adapter as local_adapter
from pipeline.options import TileStreamOptions

ORIGINAL_BQ_CLIENT = bigquery_tools.BigQueryWrapper._bigquery_client


def dry_run(argv: list[str]) -> dict:
    job = main.configure(argv)
    result = main.build_pipeline(job).run()
    produced = result.job
    components = produced.proto_pipeline.components
    hints = {}
    for transform in components.transforms.values():
        env = components.environments.get(transform.environment_id)
        if env is not None and env.resource_hints and not transform.subtransforms:
            hints[transform.unique_name] = {k: v.decode() for k, v in env.resource_hints.items()}
    return {
        "job_type": int(produced.proto.type),
        "streaming": bool(produced.options.view_as(StandardOptions).streaming),
        "transforms": sorted(t.unique_name for t in components.transforms.values()),
        "resource_hints": hints,
        "adapter_applied": local_adapter.applied_stack() is not None,
        "bq_client_patched": bigquery_tools.BigQueryWrapper._bigquery_client
        is not ORIGINAL_BQ_CLIENT,
        "emulator_env": sorted(k for k in os.environ if k.endswith("_EMULATOR_HOST")),
        "max_chips_in_flight": job.options.view_as(TileStreamOptions).max_chips_in_flight,
    }


if __name__ == "__main__":
    print(json.dumps(dry_run(sys.argv[1:])))
