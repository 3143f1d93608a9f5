"""The Dataflow cost model, written to docs/performance.md from bench/results.json.

    python bench/cost.py            # after `make bench`; `make bench` runs it too

What a Dataflow bill follows is worker time per chip, so the model rests on one measured figure:
**CPU seconds per chip** in the running stream (3 runs of a 3,660² tile on the in-process
runner) and in the local backfill (Beam's portable runner, the Fn API harness that Dataflow's
workers run, one and two SDK worker processes). Chips per vCPU-second is its inverse; the spread
of those observations is the model's stated uncertainty. Everything else is an input written down
here with its source: prices, the region's arrivals, the batch job overhead. GPU rates are
assumptions until ``bench/gpu.sh`` runs on a CUDA machine (its results, when present in
bench/gpu_results.json, cap the GPU worker's rate).

Streaming Engine's share follows the **bytes per chip measured** at each shuffle and state
boundary (``bench/shuffle.py``), and the always-on floor the **smallest worker** whose memory
holds the measured SDK process (``bench/memory.py``) once per vCPU.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOURS_PER_MONTH = 730.0


@dataclass(frozen=True)
class Prices:
    """On-demand list prices, USD, us-central1. Inputs, not measurements: confirm on the live
    pricing pages before quoting a figure to a buyer."""

    as_of: str = "2026-09-08"
    source: str = ("cloud.google.com/dataflow/pricing (us-central1), as also carried in Apache "
                   "Beam's load-test cost constants (sdks/python/apache_beam/testing/load_tests/"
                   "dataflow_cost_consts.py); FlexRS terms from cloud.google.com/dataflow/docs/"
                   "guides/flexrs")
    streaming_vcpu_h: float = 0.069
    streaming_gb_h: float = 0.003557
    batch_vcpu_h: float = 0.056
    batch_gb_h: float = 0.003557
    flexrs_vcpu_h: float = 0.0336  # 40 % below batch
    flexrs_gb_h: float = 0.0021342
    streaming_engine_gb: float = 0.018  # data processed (the legacy unit; see Reading it)
    pd_standard_gb_h: float = 0.000054
    t4_h: float = 0.42
    l4_h: float = 0.672


@dataclass(frozen=True)
class Region:
    """What arrives: every tile of the region once per revisit."""

    name: str = "Brazil, every HLS tile"
    tiles: int = 700
    chips_per_tile: int = 5776  # a 3,660² HLS tile, counted by the chipper
    revisit_days: float = 3.0  # HLS L30 + S30 together: a clear or cloudy look every 2-3 days

    @property
    def chips_per_revisit(self) -> int:
        return self.tiles * self.chips_per_tile

    @property
    def chips_per_month(self) -> float:
        return self.chips_per_revisit * HOURS_PER_MONTH / 24 / self.revisit_days


@dataclass(frozen=True)
class Worker:
    name: str
    vcpus: int
    memory_gb: float
    gpu: str | None = None
    disk_gb: int = 30  # the boot disk a Streaming Engine / Shuffle worker keeps

    def usd_per_hour(self, prices: Prices, mode: str) -> float:
        vcpu, gb = {"streaming": (prices.streaming_vcpu_h, prices.streaming_gb_h),
                    "batch": (prices.batch_vcpu_h, prices.batch_gb_h),
                    "flexrs": (prices.flexrs_vcpu_h, prices.flexrs_gb_h)}[mode]
        gpu = {"T4": prices.t4_h, "L4": prices.l4_h, None: 0.0}[self.gpu]
        return (self.vcpus * vcpu + self.memory_gb * gb + gpu
                + self.disk_gb * prices.pd_standard_gb_h)


# CPU workers, smallest first. Shared-core types (e2-micro/small/medium, f1-micro, g1-small) are
# left out: Dataflow does not cover them by its SLA (cloud.google.com/dataflow/docs/guides/
# configure-worker-vm), and a stream that is always on is what the SLA is for.
CPU_WORKERS = (Worker("n1-standard-1", 1, 3.75), Worker("n1-standard-2", 2, 7.5),
               Worker("n1-standard-4", 4, 15.0))
GPU_WORKERS = (Worker("n1-standard-4 + T4", 4, 15.0, "T4"),
               Worker("g2-standard-4 (L4)", 4, 16.0, "L4"))
WORKERS = CPU_WORKERS + GPU_WORKERS
# Assumed, not measured here: what a Dataflow worker VM keeps for itself beside the SDK
# processes (the OS, the runner harness and the logging and monitoring agents).
VM_RESERVE_GB = 1.0
MIN_WORKERS = 1  # a streaming job never scales below one worker
# Assumed, not measured: a scheduled batch job pays its workers' boot, container pull, model load
# and teardown each time; Dataflow bills worker time from start to stop.
BATCH_JOB_OVERHEAD_MIN = 5.0
FLEXRS_START_DELAY_H = 6.0  # FlexRS queues a job for up to 6 hours before it starts
INTERVALS_H = {"15 min": 0.25, "1 h": 1.0, "1 day": 24.0}


def observations(results: dict) -> list[tuple[str, float]]:
    """CPU seconds per chip, each measured on the whole running job (not a component)."""
    raw = results["scale"]["raw"]
    seen = [(f"stream run {i + 1} (in-process runner)", run["cpu_ms_per_chip"] / 1000)
            for i, run in enumerate(raw.get("stream_3660_runs") or [raw["stream_3660"]])]
    backfill = raw.get("backfill") or {}
    for key, label in (("one_worker", "backfill, 1 SDK worker (Fn API)"),
                       ("two_workers", "backfill, 2 SDK workers (Fn API)")):
        if key in backfill:
            seen.append((label, backfill[key]["cpu_ms_per_chip"] / 1000))
    return seen


@dataclass(frozen=True)
class Rate:
    """Chips per vCPU-second: the median of the observations, with their range."""

    central: float
    low: float
    high: float

    @property
    def uncertainty(self) -> float:
        return self.high / self.low

    def scaled(self, factor: float) -> Rate:
        return Rate(self.central * factor, self.low * factor, self.high * factor)


def cpu_rate(results: dict) -> Rate:
    rates = [1 / seconds for _, seconds in observations(results)]
    return Rate(statistics.median(rates), min(rates), max(rates))


def gpu_rate(results: dict, cpu: Rate, gpu: str) -> tuple[Rate, str]:
    """A GPU worker's chips per vCPU-second: the model's forward leaves the cores, the rest of
    the measured CPU per chip stays. Capped by the GPU's own forward rate where measured."""
    parts = results["scale"]["raw"]["components_cpu_ms_per_chip"]
    total = results["scale"]["raw"]["components_cpu_ms_per_chip_total"]
    share = parts["forward"] / total  # of the components' CPU, the part a GPU takes over
    rate = cpu.scaled(1 / (1 - share))
    measured = _gpu_results().get(gpu)
    if measured:
        return rate, f"the forward's {share:.0%} of CPU moves to the {gpu} (measured " \
                     f"{measured:,.0f} chips/s there)"
    return rate, (f"the forward's {share:.0%} of CPU moves to the {gpu}; its own rate is assumed "
                  "not to bind (unmeasured: no GPU lent, bench/gpu.sh ready)")


def _gpu_results() -> dict[str, float]:
    path = ROOT / "bench" / "gpu_results.json"
    if not path.exists():
        return {}
    found = json.loads(path.read_text())
    name = (found.get("machine") or {}).get("gpu") or ""
    best = (found.get("best_at_99pct_agreement") or {}).get("chips_per_s", 0)
    return {kind: best for kind in ("T4", "L4") if kind in name}


def streaming_month(worker: Worker, rate: float, region: Region, prices: Prices,
                    bytes_per_chip: float) -> dict:
    """Keeping the stream up for a month: the always-on minimum, plus workers beyond it when
    the month's work does not fit, plus Streaming Engine's data processed."""
    hourly = worker.usd_per_hour(prices, "streaming")
    always_on = MIN_WORKERS * hourly * HOURS_PER_MONTH
    work_vcpu_h = region.chips_per_month / rate / 3600
    beyond = max(0.0, work_vcpu_h - MIN_WORKERS * worker.vcpus * HOURS_PER_MONTH)
    engine = region.chips_per_month * bytes_per_chip / 1e9 * prices.streaming_engine_gb
    return {"always_on": always_on, "beyond": beyond / worker.vcpus * hourly, "engine": engine,
            "total": always_on + beyond / worker.vcpus * hourly + engine,
            "busy": work_vcpu_h / (MIN_WORKERS * worker.vcpus * HOURS_PER_MONTH)}


def per_revisit(worker: Worker, rate: float, region: Region, prices: Prices,
                bytes_per_chip: float, mode: str = "streaming") -> float:
    """The marginal cost of one revisit: its worker time, plus Streaming Engine when streaming."""
    hours = region.chips_per_revisit / rate / 3600 / worker.vcpus
    engine = (region.chips_per_revisit * bytes_per_chip / 1e9 * prices.streaming_engine_gb
              if mode == "streaming" else 0.0)
    return hours * worker.usd_per_hour(prices, mode) + engine


def batch_month(worker: Worker, rate: float, region: Region, prices: Prices, interval_h: float,
                mode: str) -> float:
    """Scoring the same arrivals as one batch job every ``interval_h``: each job pays its
    overhead on one worker, the work is the same chips at the batch (or FlexRS) price."""
    hourly = worker.usd_per_hour(prices, mode)
    jobs = HOURS_PER_MONTH / interval_h
    work_h = region.chips_per_month / rate / 3600 / worker.vcpus
    return jobs * BATCH_JOB_OVERHEAD_MIN / 60 * hourly + work_h * hourly


def break_even_h(stream_total: float, worker: Worker, rate: float, region: Region,
                 prices: Prices, mode: str) -> float | None:
    """The batch interval at which scheduled jobs cost what the always-on stream costs:
    shorter intervals cost more than streaming, longer ones less."""
    hourly = worker.usd_per_hour(prices, mode)
    work = region.chips_per_month / rate / 3600 / worker.vcpus * hourly
    per_job = BATCH_JOB_OVERHEAD_MIN / 60 * hourly
    if stream_total <= work:
        return None
    return HOURS_PER_MONTH / ((stream_total - work) / per_job)


def bytes_per_chip(results: dict) -> float:
    """What one chip puts through Streaming Engine: the bytes measured at every shuffle and state
    boundary of the default graph (bench/shuffle.py, 3,660² tile)."""
    return results["shuffle"]["shuffle_bytes_per_chip"]


def worker_memory_gb(results: dict, worker: Worker) -> float:
    """Memory a worker needs: one SDK process per vCPU at its measured peak, plus the VM's own."""
    return worker.vcpus * results["memory"]["peak_mb"] / 1024 + VM_RESERVE_GB


def smallest_worker(results: dict, prices: Prices) -> Worker:
    """The cheapest always-on CPU worker whose memory holds what the stream measurably needs."""
    fits = [w for w in CPU_WORKERS if worker_memory_gb(results, w) <= w.memory_gb]
    return min(fits, key=lambda w: w.usd_per_hour(prices, "streaming"))


def revisit_costs(results: dict, prices: Prices = Prices(), region: Region = Region()) -> dict:
    """USD per revisit by worker type, central and the range the rate's spread gives."""
    cpu = cpu_rate(results)
    found = {}
    for worker in WORKERS:
        rate = cpu if worker.gpu is None else gpu_rate(results, cpu, worker.gpu)[0]
        cost = [per_revisit(worker, r, region, prices, bytes_per_chip(results))
                for r in (rate.central, rate.high, rate.low)]
        found[worker.name] = {"central": round(cost[0], 3), "low": round(cost[1], 3),
                              "high": round(cost[2], 3)}
    return found


BOUNDARIES = {  # bench/shuffle.py's boundaries, as a reader of the graph knows them
    "strip_tasks": "strip tasks (`ByTask`, shuffle)",
    "strip_reports": "strip reports (`ByTile`, shuffle + state)",
    "predictions_to_assembly": "scoring -> assembly (`RouteToStrips` -> `AssembleStrips`, "
                               "shuffle)",
    "assembly_state": "assembly's strip state (`AssembleStrips` bag)",
    "chip_rows": "chip rows (load jobs: one file name per bundle)",
    "chip_rows_insert_all": "chip rows with `--chip_rows_load_secs=0` (insertAll reshuffle; "
                            "not in the total)",
}


def _before() -> dict | None:
    path = ROOT / "bench" / "shuffle_before.json"
    return json.loads(path.read_text()) if path.exists() else None


def shuffle_section(results: dict) -> list[str]:
    """Bytes per chip at each boundary, the previous design's beside today's."""
    now, before = results["shuffle"], _before()
    lines = ["## What crosses the shuffle, per chip (3,660² tile, measured)", "",
             f"Measured {now.get('when', 'with the run above')} by `bench/shuffle.py` "
             "(`bench/run.py --shuffle-only` re-measures only this and the memory); before: "
             "the same script on the previous design (`bench/shuffle_before.json`).", "",
             "| boundary | before (bytes/chip) | now (bytes/chip) |", "|---|---|---|"]
    for key, label in BOUNDARIES.items():
        was = (before or {}).get("per_boundary_bytes_per_chip", {}).get(key)
        lines.append(f"| {label} | {'-' if was is None else f'{was:,.1f}'} | "
                     f"{now['per_boundary_bytes_per_chip'][key]:,.1f} |")
    total_before = (before or {}).get("shuffle_bytes_per_chip")
    lines.append(f"| **total (`shuffle_bytes_per_chip`)** | "
                 f"{'-' if total_before is None else f'{total_before:,.0f}'} | "
                 f"**{now['shuffle_bytes_per_chip']:,.0f}** |")
    if total_before:
        lines += ["", f"One eighth of before is {total_before / 8:,.0f}: now is "
                  f"**1/{total_before / now['shuffle_bytes_per_chip']:.0f}** of it. "]
    else:
        lines += [""]
    lines[-1] += (
        "Before, each chip's uint8 probabilities of every class crossed to assembly (cut into "
        "the strips they overlap) and were kept in its state until the strip was whole. Now "
        "each block of chips (one strip task) is blended where it is scored: the rows only its "
        "chips cover cross as a compressed class map (and the confidence, with "
        "`--confidence_band`), and only the rows it shares with the next block cross as "
        "integer sums, which assembly adds; the COG is pixel-identical (tests/test_blend.py, "
        "tests/test_shuffle.py). Chip blocks (chipper -> model, "
        f"{now['chip_blocks_bytes_per_chip_fused']:,.0f} bytes a chip) never leave their "
        "worker: `ChipStrips`, `RunInference` and `RouteToStrips` are one fused stage "
        "(unless `--max_batch_duration_secs` makes the batching keyed).")
    region, prices = Region(), Prices()
    extra = (now["shuffle_bytes_per_chip_insert_all"] - now["shuffle_bytes_per_chip"])
    lines += ["", "Chip rows by insertAll (`--chip_rows_load_secs=0`) would add "
              f"{extra:,.0f} bytes a chip, US$"
              f"{region.chips_per_revisit * extra / 1e9 * prices.streaming_engine_gb:.2f} a "
              "revisit: the load jobs that are the default on BigQuery write the rows to files "
              "in the scoring stage instead."]
    return [*lines, ""]


def worker_section(results: dict, prices: Prices, smallest: Worker) -> list[str]:
    """Which CPU workers hold the stream, and the smallest one."""
    memory = results["memory"]
    lines = ["## The smallest always-on worker", "",
             f"One SDK process, measured {memory.get('when', '')} (`bench/memory.py`, 3,660² "
             "tile): the SDK harness with "
             f"the stream's modules (torch included) {memory['sdk_harness_mb']:,.0f} MB, the "
             f"model {memory['model_mb']:,.0f} MB, one strip's buffers (read, score, blend, "
             f"assemble; {memory['chips_in_strip']} chips) {memory['strip_buffers_mb']:,.0f} MB:"
             f" peak **{memory['peak_mb']:,.0f} MB**.", "",
             "| worker | vCPUs | memory GB | needs GB | fits | USD/h (streaming) | "
             "always-on USD/month |", "|---|---|---|---|---|---|---|"]
    for worker in CPU_WORKERS:
        need = worker_memory_gb(results, worker)
        hourly = worker.usd_per_hour(prices, "streaming")
        lines.append(f"| {worker.name} | {worker.vcpus} | {worker.memory_gb:g} | {need:.1f} | "
                     f"{'yes' if need <= worker.memory_gb else 'no'} | {hourly:.3f} | "
                     f"{_usd(MIN_WORKERS * hourly * HOURS_PER_MONTH)} |")
    lines += ["", f"The smallest is **{smallest.name}** (run with `--machine_type="
              f"{smallest.name}`). Dataflow takes any Compute Engine machine type for its "
              "workers, custom ones included (cloud.google.com/dataflow/docs/guides/"
              "configure-worker-vm); it recommends n1-standard-2 rather than n1-standard-4 "
              "with Streaming Engine (cloud.google.com/dataflow/docs/streaming-engine), and its "
              "SLA does not cover shared-core types (e2-micro/small/medium, f1, g1), which are "
              "left out. With one vCPU a 3,660² tile takes the worker about "
              f"{Region().chips_per_tile / cpu_rate(results).central:.0f} s alone; a burst "
              "of tiles is what autoscaling is for.", ""]
    return lines


def _usd(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.2f}" if x >= 1 else f"{x:.3f}"


def _span(f, rate: Rate) -> str:
    """A cost at the central rate, with the range the rate's spread gives (cost ~ 1 / rate)."""
    lo, mid, hi = f(rate.high), f(rate.central), f(rate.low)
    return f"{_usd(mid)} ({_usd(lo)}-{_usd(hi)})"


def _interval(hours: float | None) -> str:
    if hours is None:
        return "never (the work alone costs more than the stream)"
    return f"{hours * 60:.0f} min" if hours < 2 else f"{hours:.1f} h"


def markdown(results: dict, prices: Prices = Prices(), region: Region = Region()) -> str:
    seen = observations(results)
    cpu = cpu_rate(results)
    per_chip = bytes_per_chip(results)
    rates = {w.name: (cpu, "measured (the observations above)") for w in CPU_WORKERS}
    for worker in GPU_WORKERS:
        rates[worker.name] = gpu_rate(results, cpu, worker.gpu)
    smallest = smallest_worker(results, prices)
    lines = [
        "# Performance and cost",
        "",
        f"Generated by `bench/cost.py` from `bench/results.json` ({results['machine']['when']}, "
        f"{results['machine']['cpus']} shared CPU cores, no GPU). Regenerate with `make bench`.",
        "",
        "## What it rests on: CPU per chip, measured on the whole running job",
        "",
        "| observation | CPU ms per chip | chips per vCPU-second |",
        "|---|---|---|",
        *(f"| {label} | {seconds * 1000:.2f} | {1 / seconds:,.0f} |" for label, seconds in seen),
        "",
        f"Chips per vCPU-second: **{cpu.central:,.0f}** (median), range {cpu.low:,.0f}-"
        f"{cpu.high:,.0f}: the stated uncertainty is **{cpu.uncertainty:.2f}x**"
        f"{'' if cpu.uncertainty <= 1.5 else ' (above the promised 1.5x: see Reading it)'}."
        " The stream's CPU is its process's user + system time from publish until every row is "
        "queryable (emulators excluded); the backfill's is summed over the launcher and its SDK "
        "worker processes, so it includes encoding between stages as Dataflow's harness does. "
        "Both include reading the tile and writing every output.",
        "",
        "## Inputs",
        "",
        f"- Prices (USD, on-demand, us-central1, as of {prices.as_of}; source: {prices.source}): "
        f"streaming vCPU {prices.streaming_vcpu_h}/h, memory {prices.streaming_gb_h}/GB-h; batch "
        f"vCPU {prices.batch_vcpu_h}/h, memory {prices.batch_gb_h}/GB-h; FlexRS vCPU "
        f"{prices.flexrs_vcpu_h}/h, memory {prices.flexrs_gb_h}/GB-h; Streaming Engine "
        f"{prices.streaming_engine_gb}/GB processed; standard PD {prices.pd_standard_gb_h}/GB-h; "
        f"T4 {prices.t4_h}/h, L4 {prices.l4_h}/h.",
        f"- Region: {region.name}: {region.tiles} tiles of {region.chips_per_tile:,} chips, one "
        f"revisit every {region.revisit_days:g} days = {region.chips_per_revisit / 1e6:.2f} M "
        f"chips a revisit, {region.chips_per_month / 1e6:.1f} M chips a month.",
        f"- The stream keeps at least {MIN_WORKERS} worker up; a batch job costs "
        f"{BATCH_JOB_OVERHEAD_MIN:g} worker-minutes of overhead (assumed); FlexRS starts a job "
        f"up to {FLEXRS_START_DELAY_H:g} h after it is submitted and takes no GPUs.",
        f"- Streaming Engine: **{per_chip:,.0f} bytes per chip**, measured: every element that "
        "crosses a shuffle or is kept in state, encoded with the coder Beam uses for it "
        "(`bench/shuffle.py`; see the next section).",
        f"- Memory: one SDK process peaks at {results['memory']['peak_mb']:,.0f} MB "
        f"(`bench/memory.py`); a worker runs one per vCPU and keeps {VM_RESERVE_GB:g} GB for "
        "itself (assumed).",
        "",
        *shuffle_section(results),
        *worker_section(results, prices, smallest),
        "## Keeping the stream up for a month",
        "",
        "| worker | chips per vCPU-s | basis | USD/h | always-on USD/month | busy share of "
        "the minimum | Streaming Engine USD/month | total USD/month | USD per revisit "
        "(marginal) | one tile on one worker |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    months = {}
    for worker in WORKERS:
        rate, basis = rates[worker.name]
        month = streaming_month(worker, rate.central, region, prices, per_chip)
        months[worker.name] = month
        tile_s = region.chips_per_tile / (rate.central * worker.vcpus)
        lines.append(
            f"| {worker.name} | {rate.central:,.0f} | {basis} | "
            f"{worker.usd_per_hour(prices, 'streaming'):.3f} | {_usd(month['always_on'])} | "
            f"{month['busy']:.1%} | {_usd(month['engine'])} | "
            f"{_span(lambda r, w=worker: streaming_month(w, r, region, prices, per_chip)['total'], rate)} | "  # noqa: E501
            f"{_span(lambda r, w=worker: per_revisit(w, r, region, prices, per_chip), rate)} | "
            f"{tile_s:.1f} s |")
    cpu_worker = smallest
    stream_total = months[cpu_worker.name]["total"]
    lines += [
        "",
        "Figures in brackets follow the range of chips per vCPU-second (a monthly total whose "
        "range is flat is all always-on price, which the rate does not move). The GPU rows keep "
        "the CPU rows' measured work except the forward pass.",
        "",
        f"## The same arrivals as scheduled batch backfills ({cpu_worker.name})",
        "",
        "| every | latency to a score | batch USD/month | FlexRS USD/month | stream "
        "USD/month |",
        "|---|---|---|---|---|",
    ]
    for label, hours in INTERVALS_H.items():
        batch = _span(lambda r, h=hours: batch_month(cpu_worker, r, region, prices, h, "batch"),
                      cpu)
        flex_ok = hours >= FLEXRS_START_DELAY_H
        flex = (_span(lambda r, h=hours: batch_month(cpu_worker, r, region, prices, h, "flexrs"),
                      cpu) if flex_ok else "not eligible (starts up to 6 h late)")
        latency = hours + BATCH_JOB_OVERHEAD_MIN / 60 + (FLEXRS_START_DELAY_H if flex_ok else 0)
        plain = hours + BATCH_JOB_OVERHEAD_MIN / 60
        lines.append(f"| {label} | up to {_interval(plain)}"
                     f"{f' ({_interval(latency)} with FlexRS)' if flex_ok else ''} | {batch} | "
                     f"{flex} | "
                     f"{_usd(stream_total)} |")
    even = break_even_h(stream_total, cpu_worker, cpu.central, region, prices, "batch")
    even_flex = break_even_h(stream_total, cpu_worker, cpu.central, region, prices, "flexrs")
    lines += [
        "",
        f"Break-even: a batch job every **{_interval(even)}** costs what the always-on stream "
        f"costs (FlexRS: every {_interval(even_flex)}, but FlexRS cannot start sooner than "
        f"{FLEXRS_START_DELAY_H:g} h). Scheduled more often, batch costs more than the stream; "
        "less often, less. A job cannot usefully run more often than its own overhead "
        f"({BATCH_JOB_OVERHEAD_MIN:g} min), so where the break-even is shorter than that, "
        "scheduled batch is the cheaper way to every latency it can offer, and what the stream "
        "sells is the latency below it: a tile scored seconds after it lands.",
        "",
        "## Reading it",
        "",
        f"- The always-on floor is now one {smallest.name}: "
        f"US${months[smallest.name]['always_on']:,.0f} a month, against "
        f"US${months[CPU_WORKERS[-1].name]['always_on']:,.0f} for the n1-standard-4 it was "
        f"priced on before. It still dominates: the region's month of work keeps the one worker "
        f"busy {months[cpu_worker.name]['busy']:.1%} of the time. The stream's bill is the "
        "price of being ready at any minute, not of the chips: a region "
        f"{0.7 / months[cpu_worker.name]['busy']:.0f} times larger would still keep the one "
        "worker under 70 % busy (autoscaling adds workers to a burst beyond that).",
        "- A GPU worker does not pay for itself at this arrival rate: it raises the always-on "
        "price while the CPU worker is mostly idle. It pays where the chips of a burst must be "
        "scored in seconds (the last column) or where the CPU worker saturates.",
        "- The uncertainty is the spread of whole-job measurements on a shared 2-core machine "
        "with the emulators beside the job. What it does not cover: Dataflow's own harness "
        "overheads beyond the Fn API runner's, worker autoscaling headroom (workers are not "
        "kept 100 % busy when scaled up), and the network read of tiles from real GCS.",
        "- Streaming Engine is now billed in compute units; its legacy per-GB price is used "
        "here because it follows the data volume, which we can measure.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    """docs/performance.md from bench/results.json, and the per-revisit costs back into it."""
    path = ROOT / "bench" / "results.json"
    results = json.loads(path.read_text())
    costs = revisit_costs(results)
    smallest = smallest_worker(results, Prices())
    results["usd_per_revisit_by_worker"] = costs
    results["smallest_worker"] = smallest.name
    results["usd_per_revisit"] = costs[smallest.name]["central"]
    path.write_text(json.dumps(results, indent=2) + "\n")
    (ROOT / "docs" / "performance.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
