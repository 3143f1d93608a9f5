"""The cost model's choice of worker follows the measured memory, and its Streaming Engine
share the measured bytes (bench/cost.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import cost  # noqa: E402  (bench/cost.py)


def results(peak_mb: float, bytes_per_chip: float) -> dict:
    found = json.loads((ROOT / "bench" / "results.json").read_text())
    found["memory"] = {**found["memory"], "peak_mb": peak_mb}
    found["shuffle"] = {**found["shuffle"], "shuffle_bytes_per_chip": bytes_per_chip}
    return found


def test_the_smallest_worker_is_the_cheapest_that_holds_one_sdk_process_per_vcpu():
    assert cost.smallest_worker(results(600, 1_661), cost.Prices()).name == "n1-standard-1"
    # 2.9 GB a process: one n1-standard-1 (3.75 GB, 1 GB its own) holds none; n1-standard-2
    # (7.5 GB) holds two.
    assert cost.smallest_worker(results(2_900, 1_661), cost.Prices()).name == "n1-standard-2"


def test_a_revisit_pays_streaming_engine_by_the_measured_bytes():
    lean, heavy = (cost.revisit_costs(results(600, b))["n1-standard-1"]["central"]
                   for b in (1_661, 65_894))
    region, prices = cost.Region(), cost.Prices()
    engine = region.chips_per_revisit * (65_894 - 1_661) / 1e9 * prices.streaming_engine_gb
    assert abs(heavy - lean - engine) < 0.002
    assert lean <= 0.50
