"""SLOs: `tilestream slo` on rows in the BigQuery emulator, the SLI counters, the alert policies."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter

from pipeline.ops import slo
from pipeline.options import LATENCY_SLO_S
from tests.streams import empty_dataset
from tests.test_templates import TEMPLATES, _first, terraform
from transforms.slis import CountTileSlis

ROOT = Path(__file__).resolve().parents[1]
END = dt.datetime(2026, 5, 4, 12, 0, tzinfo=dt.UTC)


def test_budget_arithmetic():
    result = slo.SloResult("latency", "x", 0.95, good=37, total=40)
    assert result.attainment == pytest.approx(0.925)
    assert result.budget_left == pytest.approx(1 - 3 / 2)  # 2 slow tiles allowed, 3 seen
    assert result.burn_rate == pytest.approx(1.5) and result.met is False
    fine = slo.SloResult("errors", "x", 0.995, good=999, total=1000)
    assert fine.budget_left == pytest.approx(0.8) and fine.met is True
    empty = slo.SloResult("errors", "x", 0.995, good=0, total=0)
    assert (empty.attainment, empty.budget_left, empty.met) == (None, None, None)


@pytest.mark.parametrize("text", ["28", "1w", "-1h", "0s", "401d", "1h; DROP TABLE"])
def test_bad_windows_are_refused(text):
    with pytest.raises(slo.SloError):
        slo.parse_window(text)


def _tile(i: int, latency: float, completed: dt.datetime, **extra) -> dict:
    published = completed - dt.timedelta(seconds=latency)
    return {"row_id": f"row-{i}", "tile_id": f"t{i}", "tile_generation": "1", "complete": True,
            "chips_total": 4, "chips_scored": 4, "chips_skipped": 0, "chips_failed": 0,
            "width": 100, "height": 100, "crs": "EPSG:4326", "footprint": "POINT(0 0)",
            "classes": [], "raster_uri": f"gs://b/{i}.tif", "event_time": published.isoformat(),
            "published": published.isoformat(), "source": "gcs", "source_uris": [],
            "attributes": [], "model_name": "landcover-student", "model_version": "1",
            "role": "live", "completed_at": completed.isoformat(), "latency_s": latency,
            **extra}


def _chips(tile: dict) -> list[dict]:
    """The chip rows a tile row promises: with them all in, the tile is answered."""
    keep = ("tile_id", "tile_generation", "crs", "footprint", "event_time", "published",
            "source", "source_uris", "attributes", "model_name", "model_version", "role",
            "latency_s")
    return [{**{k: tile[k] for k in keep}, "row_id": f"{tile['row_id']}/{i}", "chip_index": i,
             "row_off": 0, "col_off": 0, "height": 50, "width": 50, "valid_fraction": 1.0,
             "classes": [], "dominant_class": "forest", "mean_confidence": 0.9,
             "chipped_at": tile["completed_at"], "scored_at": tile["completed_at"]}
            for i in range(tile["chips_scored"])]


@pytest.fixture()
def dataset(stack):
    """A dataset of the emulator with the stream's tables, created through its API."""
    return empty_dataset(stack, "slo")


def _insert(stack, dataset: str, table: str, rows: list[dict]) -> None:
    errors = stack.bigquery().insert_rows_json(f"{stack.project}.{dataset}.{table}", rows)
    assert errors == []


@pytest.mark.stack
def test_slo_from_rows_in_the_emulator(stack, dataset):
    minute = dt.timedelta(minutes=1)
    tiles = [_tile(i, 3.0 + i, END - (i + 1) * minute) for i in range(37)]  # fast, complete
    tiles += [_tile(37, 200.0, END - 5 * minute), _tile(38, 150.0, END - 6 * minute)]  # slow
    tiles += [_tile(39, 4.0, END - 7 * minute, complete=False, chips_failed=2,
                    chips_scored=2)]  # fast but incomplete: bad for the latency SLO
    tiles += [dict(tiles[0])]  # a retried insert: the same row_id twice counts once
    tiles += [_tile(40, 500.0, END - 8 * minute, role="shadow")]  # not what users read
    tiles += [_tile(41, 500.0, END - 2 * dt.timedelta(hours=1))]  # before the window
    _insert(stack, dataset, "tiles", tiles)
    _insert(stack, dataset, "chips", [c for t in tiles for c in _chips(t)])
    letters = [{"stage": "parse", "reason": "not JSON", "time": (END - minute).isoformat()},
               {"stage": "chips", "reason": "old", "time": (END - 3 * minute * 60).isoformat()}]
    _insert(stack, dataset, "dead_letters", letters)

    done = subprocess.run(
        [sys.executable, "-m", "pipeline.ops.cli", "slo", "--local", f"--stack_dir={stack.run_dir}",
         f"--bq_dataset={stack.project}:{dataset}", "--window=1h", f"--end={END.isoformat()}",
         "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    slis = report["slis"]
    assert (slis["tiles"], slis["tiles_fast"], slis["tiles_incomplete"]) == (40, 38, 1)
    assert slis["dead_letters"] == 1 and slis["dead_letters_by_stage"] == {"parse": 1}
    assert slis["error_ratio"] == pytest.approx(1 / 41)
    assert slis["chips_scored"] == 39 * 4 + 2
    assert slis["freshness_s"] == pytest.approx(60.0) and slis["fresh"] is True
    assert 38 <= slis["latency_p95_s"] <= 200 and slis["latency_p50_s"] < 40
    latency, errors = report["slos"]
    assert (latency["good"], latency["total"]) == (37, 40)
    assert latency["budget_left"] == pytest.approx(-0.5) and latency["met"] is False
    assert (errors["good"], errors["total"]) == (40, 41)
    assert errors["budget_left"] == pytest.approx(1 - 1 / (0.005 * 41))

    text = subprocess.run(
        [sys.executable, "-m", "pipeline.ops.cli", "slo", "--local", f"--stack_dir={stack.run_dir}",
         f"--bq_dataset={stack.project}:{dataset}", "--window=1h", f"--end={END.isoformat()}",
         "--latency_s=250"], capture_output=True, text=True, timeout=120).stdout
    assert "latency    tile row within 250 s of publish, complete: 97.50% of 40" in text
    assert "error budget left 50%" in text and "MISSED" in text  # errors: 97.6 % < 99.5 %


@pytest.mark.stack
def test_slo_on_an_empty_window_says_so(stack, dataset):
    report = slo.compute(stack.bigquery(), f"{stack.project}.{dataset}",
                         slo.parse_window("1h"), END)
    assert [s.total for s in report.slos] == [0, 0]
    assert "no events in the window" in report.text()
    assert report.slis["freshness_s"] is None


def test_tile_sli_counters_as_dataflow_exports_them():
    rows = [{"latency_s": 3.0, "complete": True, "chips_failed": 0},
            {"latency_s": LATENCY_SLO_S + 1, "complete": True, "chips_failed": 0},
            {"latency_s": 5.0, "complete": False, "chips_failed": 3}]
    pipeline = beam.Pipeline(runner="BundleBasedDirectRunner")
    _ = pipeline | beam.Create(rows) | beam.ParDo(CountTileSlis(LATENCY_SLO_S))
    result = pipeline.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in result.metrics().query(
        MetricsFilter().with_namespace("tilestream"))["counters"]}
    assert counters == {"slo_tiles_total": 3, "slo_tiles_slow": 1, "slo_tiles_incomplete": 1}


def _emitted_counters() -> set[str]:
    """Counter names the stream's code registers (literal or via transforms/slis.py)."""
    import transforms.slis as slis

    names = set()
    for path in (ROOT / "transforms").glob("*.py"):
        names |= set(re.findall(r'counter\(\s*(?:"tilestream"|NAMESPACE),\s*"(\w+)"\)',
                                path.read_text()))
        for const in re.findall(r"counter\(\s*NAMESPACE,\s*([A-Z_]+)\)", path.read_text()):
            names.add(getattr(slis, const))
    return names


def test_burn_rate_alerts_are_multi_window_on_counters_the_stream_emits():
    r = terraform()
    emitted = _emitted_counters()
    expected = {"latency_fast_burn": ("14.4", "1h", "5m", "slo_latency_target"),
                "latency_slow_burn": ("6", "6h", "30m", "slo_latency_target"),
                "errors_fast_burn": ("14.4", "1h", "5m", "slo_error_target"),
                "errors_slow_burn": ("6", "6h", "30m", "slo_error_target")}
    for name, (burn, long, short, target) in expected.items():
        policy = r[f"google_monitoring_alert_policy.{name}"]
        query = _first(_first(policy["conditions"])["condition_prometheus_query_language"])[
            "query"]
        assert f"[{long}]" in query and f"[{short}]" in query and " and" in query, name
        assert query.count(f"> {burn} * (1 - ${{var.{target}}})") == 2, name
        assert set(re.findall(r'metric_name="(\w+)"', query)) <= emitted, name
    variables = {}
    for path in (TEMPLATES / "terraform").glob("*.tf"):
        import hcl2

        for block in hcl2.load(path.open()).get("variable", []):
            variables.update(block)
    assert variables['"slo_latency_target"']["default"] == slo.LATENCY_TARGET
    assert variables['"slo_error_target"']["default"] == slo.ERROR_TARGET
    assert "freshness" in " ".join(k for k in r if "alert_policy" in k)


def test_dashboard_json_charts_metrics_the_stream_emits():
    text = (TEMPLATES / "terraform" / "dashboard.json").read_text()
    dashboard = json.loads(text)
    tiles = dashboard["mosaicLayout"]["tiles"]
    assert len(tiles) >= 5 and all(t["widget"]["title"] for t in tiles)
    queries = [d["timeSeriesQuery"]["prometheusQuery"] for t in tiles
               for d in t["widget"]["xyChart"]["dataSets"]]
    assert set(re.findall(r'metric_name=\\?"(\w+)', " ".join(queries))) <= _emitted_counters()
    assert any("job_data_watermark_age" in q for q in queries)


def test_the_stream_counts_answered_tiles_for_its_slis_not_shadow_ones():
    import apache_beam as beam
    from apache_beam.metrics import MetricsFilter

    from transforms.slis import TILES_SLOW, TILES_TOTAL, CountTileSlis

    rows = [{"role": "live", "latency_s": 200.0, "complete": True, "chips_failed": 0},
            {"role": "canary", "latency_s": 3.0, "complete": True, "chips_failed": 0},
            {"role": "shadow", "latency_s": 500.0, "complete": True, "chips_failed": 0}]
    p = beam.Pipeline()
    _ = p | beam.Create(rows) | beam.ParDo(CountTileSlis(LATENCY_SLO_S))
    result = p.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in result.metrics().query(
        MetricsFilter().with_namespace("tilestream"))["counters"]}
    assert (counters[TILES_TOTAL], counters[TILES_SLOW]) == (2, 1)
