"""Scale benchmarks: the whole stream on HLS-sized tiles, each figure a ratio to its limit.

Every ratio compares two numbers measured side by side in one run on the same machine, so a
shared, noisy machine moves both: the serial limit of the stream is what one process could do if
it only chipped and ran the model, ``1 / (1/chipping + 1/model_only)`` chips/s.

Targets (issue 20): ``cpu_per_chip_stream_vs_components`` (3,660² tile: the stream process's
CPU per chip, publish -> every row queryable, vs its components alone; ``bench/cpu.py``),
``chips_per_s_7320_vs_3660`` (whole-stream throughput, publish -> tile row, on a tile four times
the area), ``backfill_speedup_2_workers`` (``bench/backfill.py``), ``inference_vs_model_only``
(RunInference in Beam vs the bare forward pass), ``chipping_vs_raw_read`` (the chipper vs reading
the tile's blocks), ``rss_ratio_7320_vs_3660`` (peak RSS of the whole stream process) and
``bytes_per_chip_vs_raw`` (a chip's share of a ChipBlock as Beam encodes it between stages vs
its raw pixels). ``stream_vs_serial_limit`` and ``rows_visible_vs_serial_limit`` stay as
reported figures: Beam's in-process runner works on one thread, so on this runner they say
more about the runner than about the stream (issue 20).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from mosaics import mosaic  # noqa: E402

TARGETS = {  # issue 20
    "cpu_per_chip_stream_vs_components": ("<=", 1.5),
    "chips_per_s_7320_vs_3660": (">=", 0.9),
    "backfill_speedup_2_workers": (">=", 1.6),
    "inference_vs_model_only": (">=", 0.85),
    "chipping_vs_raw_read": (">=", 0.5),
    "rss_ratio_7320_vs_3660": ("<=", 1.3),
    "bytes_per_chip_vs_raw": ("<=", 1.2),
}


def raw_read_mpx_s(path: Path) -> float:
    """Reading every block of every band with rasterio: the floor any chipper stands on."""
    with rasterio.open(path) as src:
        started = time.perf_counter()
        for _, window in src.block_windows(1):
            src.read(window=window)
        return src.width * src.height / 1e6 / (time.perf_counter() - started)


def chipping(path: Path, card) -> dict:
    """The stream's chipper on the tile, and the size of one Chip as Beam encodes it."""
    from apache_beam.coders import registry

    from transforms.chips import ChipSettings, ChipTileFn
    from transforms.records import ChipBlock, TileRef

    fn = ChipTileFn(ChipSettings.from_card(card))
    coder = registry.get_coder(object)
    with rasterio.open(path) as src:
        megapixels = src.width * src.height / 1e6
    started = time.perf_counter()
    blocks = [item for item in fn.process(TileRef("bench", (str(path),), "1", 0.0, 0.0))
              if isinstance(item, ChipBlock)]
    seconds = time.perf_counter() - started
    chips = sum(len(block) for block in blocks)
    # Chips travel in blocks: a chip's share of its encoded block, encoded off the clock.
    encoded = len(coder.encode(blocks[0])) // len(blocks[0])
    raw = len(card.input.bands) * card.input.chip_size ** 2  # uint8 pixels of one chip
    return {"chips": chips, "seconds": round(seconds, 2), "chips_per_s": round(chips / seconds, 1),
            "mpx_per_s": round(megapixels / seconds, 2), "bytes_per_chip": encoded,
            "raw_bytes_per_chip": raw}


def model_only(card, chips: int = 3072, batch: int = 32) -> float:
    """Chips/s of the bare TorchScript forward pass on pre-stacked batches (no Beam at all)."""
    from model.contract import load_checked

    model = load_checked(card)  # normalised float32 input, already stacked: the forward alone
    x = torch.randn(batch, len(card.input.bands), card.input.chip_size, card.input.chip_size)
    with torch.inference_mode():
        model(x)
        started = time.perf_counter()
        for _ in range(chips // batch):
            model(x)
    return chips // batch * batch / (time.perf_counter() - started)


BLOCKS = 4


def _stamp(name: str):
    """A step that records when it saw its last element, as a Beam metric (the in-process
    runner shares this process's clock)."""
    from apache_beam.metrics import Metrics

    seen = Metrics.distribution("bench", name)

    def stamp(element):
        seen.update(int(time.perf_counter() * 1e6))
        return element
    return stamp


def run_inference_in_beam(card, chips: int = 3072, batch: int = 32) -> float:
    """Chips/s of the stream's RunInference step (blocks of chips, as the stream sends them,
    cut into forward passes of ``batch``) in a Beam pipeline on the in-process runner.

    Timed from the last block ready before the step to the last result out of it, so the
    step's batching, per-element work and bundle commits count, while the pipeline's
    construction and Create (paid once per job, not per chip) do not; the one-off model load in
    the step's setup is subtracted, as model_only does not time it either: a worker loads its
    model once, so it is start-up, not throughput."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.options.pipeline_options import PipelineOptions

    from model.inference import model_input
    from transforms.inference import BlockModelHandler
    from transforms.model_handlers import StudentModelHandler
    from transforms.records import ChipBlock, TileRef

    shape = (len(card.input.bands), card.input.chip_size, card.input.chip_size)
    per_block = chips // BLOCKS  # a strip task of a 3,660² tile cuts about 760 chips
    tile = TileRef("bench", ("bench.tif",), "1", 0.0, 0.0)

    def block(n: int):  # what the stream's StackBlocks step hands RunInference
        rng = np.random.default_rng(n)
        array = np.stack([model_input(rng.integers(0, 256, shape, np.uint8),
                                      np.ones(shape[1:], bool)) for _ in range(per_block)])
        return ChipBlock(tile, n, tuple((n, i) for i in range(per_block))), array

    def step() -> float:
        from apache_beam.metrics.metric import MetricsFilter

        p = beam.Pipeline(options=PipelineOptions(["--runner=BundleBasedDirectRunner"]))
        _ = (p | beam.Create(range(BLOCKS)) | beam.Map(block)
             | "Ready" >> beam.Map(_stamp("ready"))
             | RunInference(BlockModelHandler(
                 KeyedModelHandler(StudentModelHandler(card, max_batch_size=batch)),
                 min_batch_size=batch, max_batch_size=batch))
             | "Done" >> beam.Map(_stamp("done")))
        result = p.run()
        result.wait_until_finish()
        last = {d.key.metric.name: d.committed.max for d in result.metrics().query(
            MetricsFilter().with_namespace("bench"))["distributions"]}
        return (last["done"] - last["ready"]) / 1e6

    def load() -> float:
        from model.inference import off_the_main_thread

        started = time.perf_counter()
        off_the_main_thread(StudentModelHandler(card, min_batch_size=batch,
                                                max_batch_size=batch).load_model)
        return time.perf_counter() - started

    step()  # warm imports and the runner
    return per_block * BLOCKS / max(step() - load(), 1e-6)


def stream_run(path: Path, model_uri: str, *extra: str, profile: Path | None = None) -> dict:
    """One tile through the whole local stream: publish -> tile row -> every chip row, peak RSS,
    the stream process's CPU over that span (and with ``profile``, py-spy's samples of it,
    bucketed by stage) (``extra``: more ``tilestream run`` options)."""
    from cpu import Profile, process_cpu_s

    from pipeline.local import stack as local_stack
    from pipeline.ops import announce
    from tests.streams import peak_rss_bytes

    run_dir = Path(tempfile.mkdtemp(prefix="tilestream-scale-"))
    stack = local_stack.up(run_dir)
    log = open(run_dir / "stream.log", "wb")
    child = subprocess.Popen(
        [sys.executable, "-m", "pipeline.ops.cli", "run", "--local", f"--stack_dir={run_dir}",
         f"--model_uri={model_uri}", "--max_batch_size=32", "--tile_timeout_secs=1800",
         *extra],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    bq = stack.bigquery()

    def rows(sql: str) -> list[dict]:
        try:
            return [dict(r) for r in bq.query(sql).result()]
        except Exception:  # the table appears with its first row
            return []

    peak = 0
    try:
        _, generation = announce.upload(stack.storage(), str(path), stack.bucket,
                                        f"incoming/{path.name}")
        time.sleep(8)  # start-up is not what is measured
        cpu_before = process_cpu_s(child.pid)
        spy = Profile(child.pid, profile) if profile else None
        announce.publish(stack.publisher(), stack.topic_path,
                         *announce.gcs_notification(stack.bucket, f"incoming/{path.name}",
                                                    generation))
        tile: list[dict] = []
        visible_at = None
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and child.poll() is None:
            peak = max(peak, peak_rss_bytes(child.pid))
            if not tile:
                tile = rows(f"SELECT published, completed_at, chips_scored "
                            f"FROM `{stack.dataset}.tiles`")
            if tile:  # chip rows are loaded in batches: their table may not exist yet
                counted = rows(f"SELECT COUNT(*) AS n, MAX(chipped_at) AS chipped, "
                               f"MAX(scored_at) AS scored FROM `{stack.dataset}.chips`")
                count = counted[0] if counted else {"n": 0}
                if count["n"] >= tile[0]["chips_scored"]:
                    visible_at = time.time()
                    cpu_s = process_cpu_s(child.pid) - cpu_before
                    break
            time.sleep(1)
        if not tile or visible_at is None:
            raise RuntimeError(f"the tile did not finish in time; see {run_dir}/stream.log")
        peak = max(peak, peak_rss_bytes(child.pid))
        stages = spy.stop() if spy else None
        published = tile[0]["published"].timestamp()
        chips = tile[0]["chips_scored"]
        return {"chips": chips, "cpu_s": round(cpu_s, 2),
                "cpu_ms_per_chip": round(cpu_s / chips * 1000, 4),
                "profile_shares": stages,
                "publish_to_last_chip_s": round(count["chipped"].timestamp() - published, 1),
                "publish_to_last_score_s": round(count["scored"].timestamp() - published, 1),
                "publish_to_tile_row_s": round(tile[0]["completed_at"].timestamp() - published, 1),
                "publish_to_rows_visible_s": round(visible_at - published, 1),
                "peak_rss_mb": round(peak / 2**20, 1)}
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=60)
        log.close()
        local_stack.down(run_dir)


def runner_threads() -> int:
    """Worker threads of Beam's in-process streaming runner: every bundle of every stage runs
    on them, so on the local stack stages take turns rather than overlap."""
    from apache_beam.runners.direct.executor import _ExecutorServiceParallelExecutor

    return _ExecutorServiceParallelExecutor.NUM_WORKERS


def inference_side_by_side(model_uri: str, repeats: int) -> dict:
    """The bare forward pass and the stream's RunInference step, measured in a child process
    whose main thread never runs the model.

    Beam runs every DoFn on a worker thread. A forward pass on a process's main thread leaves
    every later forward on other threads 15-25 % slower (``model.inference.off_the_main_thread``),
    so measured in this process, after the main-thread benchmarks of ``bench/run.py``,
    RunInference would pay for them. The model-only figure is therefore the forward on a worker
    thread as well, like Beam's; the main thread's own forward runs last and is reported beside
    it (the serial limit takes the faster of the two).
    """
    import json

    out = subprocess.run([sys.executable, __file__, "--inference", model_uri, str(repeats)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _inference_child(model_uri: str, repeats: int) -> dict:
    from model.card import load_card
    from model.inference import off_the_main_thread

    card = load_card(model_uri)
    forward, beam_rate = best_of(repeats,
                                 lambda: off_the_main_thread(lambda: model_only(card)),
                                 lambda: run_inference_in_beam(card))
    main_thread = max(model_only(card) for _ in range(repeats))  # last: it taints the others
    return {"model_only": forward, "run_inference": beam_rate, "model_only_main": main_thread}


def best_of(repeats: int, *measures):
    """Each measure's best of ``repeats`` runs, interleaved: a neighbour's burst on a shared
    machine slows one run of one side, not the ratio of the best runs."""
    runs = [[m() for m in measures] for _ in range(repeats)]
    return [max(r[i] for r in runs) for i in range(len(measures))]


def run(card, model_uri: str, workdir: Path, sizes: tuple[int, int] = (3660, 7320),
        repeats: int = 3) -> dict:
    from backfill import speedup
    from cpu import components_in_a_child

    small, large = (mosaic(workdir / f"mosaic_{s}.tif", s) for s in sizes)
    chip_runs = [chipping(small, card) for _ in range(repeats)]
    raw, _ = best_of(repeats, lambda: raw_read_mpx_s(small), lambda: 0.0)
    chipped = max(chip_runs, key=lambda c: c["chips_per_s"])
    inference = inference_side_by_side(model_uri, repeats)
    forward, beam_rate = inference["model_only"], inference["run_inference"]
    fastest = max(forward, inference["model_only_main"])
    serial = 1.0 / (1.0 / chipped["chips_per_s"] + 1.0 / fastest)
    parts = components_in_a_child(small)
    # The 3,660² stream three times (the cost model's spread); the first is profiled.
    small_runs = [stream_run(small, model_uri, profile=workdir / "profile_3660.txt")]
    small_runs += [stream_run(small, model_uri) for _ in range(repeats - 1)]
    stream_small = small_runs[0]
    small_cpu_ms = float(np.median([r["cpu_ms_per_chip"] for r in small_runs]))
    small_rate = float(np.median([r["chips"] / r["publish_to_tile_row_s"] for r in small_runs]))
    stream_large = stream_run(large, model_uri, profile=workdir / "profile_7320.txt")
    backfill = speedup(small, model_uri, workdir, tiles=8)
    component_ms = sum(v for k, v in parts.items() if k not in ("chips", "torch_threads"))
    ratios = {
        "cpu_per_chip_stream_vs_components": small_cpu_ms / component_ms,
        "chips_per_s_7320_vs_3660":
            (stream_large["chips"] / stream_large["publish_to_tile_row_s"]) / small_rate,
        "backfill_speedup_2_workers": backfill["speedup"],
        "inference_vs_model_only": beam_rate / forward,
        "chipping_vs_raw_read": chipped["mpx_per_s"] / raw,
        "rss_ratio_7320_vs_3660": stream_large["peak_rss_mb"] / stream_small["peak_rss_mb"],
        "bytes_per_chip_vs_raw": chipped["bytes_per_chip"] / chipped["raw_bytes_per_chip"],
        # reported, no longer targets (the in-process runner works on one thread)
        "stream_vs_serial_limit":
            stream_small["chips"] / stream_small["publish_to_tile_row_s"] / serial,
        "rows_visible_vs_serial_limit":
            stream_small["chips"] / stream_small["publish_to_rows_visible_s"] / serial,
    }
    ratios = {k: round(v, 3) for k, v in ratios.items()}
    return {
        **ratios,
        "targets": {k: {"target": f"{op} {t}", "met": (ratios[k] >= t if op == ">=" else
                                                        ratios[k] <= t)}
                    for k, (op, t) in TARGETS.items()},
        "raw": {"tile_sizes": list(sizes), "repeats": repeats,
                "runner_threads": runner_threads(), "raw_read_mpx_per_s": round(raw, 1),
                "chipping_3660": chipped, "model_only_chips_per_s": round(forward, 1),
                "model_only_on_the_main_thread_chips_per_s":
                    round(inference["model_only_main"], 1),
                "run_inference_chips_per_s": round(beam_rate, 1),
                "serial_limit_chips_per_s": round(serial, 1),
                "components_cpu_ms_per_chip": parts,
                "components_cpu_ms_per_chip_total": round(component_ms, 4),
                "stream_3660": stream_small, "stream_7320": stream_large,
                "stream_3660_runs": [{k: r[k] for k in ("cpu_ms_per_chip",
                                                         "publish_to_tile_row_s",
                                                         "publish_to_rows_visible_s",
                                                         "peak_rss_mb")} for r in small_runs],
                "stream_3660_median": {"cpu_ms_per_chip": round(small_cpu_ms, 4),
                                       "chips_per_s": round(small_rate, 1)},
                "backfill": backfill},
    }


def markdown(scale: dict) -> list[str]:
    lines = ["## Scale: what a chip costs in the whole stream (issue 20)", "",
             "| ratio | value | target | met |", "|---|---|---|---|"]
    for key, target in scale["targets"].items():
        lines.append(f"| `{key}` | {scale[key]} | {target['target']} | "
                     f"{'yes' if target['met'] else 'no'} |")
    for key in ("stream_vs_serial_limit", "rows_visible_vs_serial_limit"):
        if key in scale:
            lines.append(f"| `{key}` | {scale[key]} | reported (one-thread runner) | - |")
    raw = scale["raw"]
    parts = raw.get("components_cpu_ms_per_chip") or {}
    median = raw.get("stream_3660_median") or {}
    lines += ["", f"Component rates are the best of {raw.get('repeats', 1)} interleaved runs. "
              f"Beam's in-process runner works on {raw.get('runner_threads', '?')} thread(s): "
              "on the local stack the stages take turns, they cannot overlap."]
    if parts:
        lines += ["", "CPU ms per chip, 3,660² tile: the stream "
                  f"{median.get('cpu_ms_per_chip')} (median of "
                  f"{len(raw.get('stream_3660_runs') or [])} runs: "
                  f"{[r['cpu_ms_per_chip'] for r in raw.get('stream_3660_runs') or []]}) "
                  f"against its components alone {raw['components_cpu_ms_per_chip_total']} ("
                  + ", ".join(f"{k} {v}" for k, v in parts.items()
                              if k not in ("chips", "torch_threads")) + "). "
                  f"Profile of the stream's Python threads by stage: "
                  f"{raw['stream_3660'].get('profile_shares')}."]
    if raw.get("backfill"):
        b = raw["backfill"]
        lines += ["", f"Backfill of {b['tiles']} tiles of 3,660² on the Fn API runner: one SDK "
                  f"worker {b['one_worker']}; two {b['two_workers']}."]
    lines += ["", f"Raw numbers: serial limit {raw['serial_limit_chips_per_s']} chips/s "
              f"(chipping {raw['chipping_3660']['chips_per_s']}, model only on a worker "
              f"thread {raw['model_only_chips_per_s']}, on the main thread "
              f"{raw.get('model_only_on_the_main_thread_chips_per_s', '?')}); RunInference "
              f"{raw['run_inference_chips_per_s']} chips/s; raw block read "
              f"{raw['raw_read_mpx_per_s']} Mpx/s vs chipping {raw['chipping_3660']['mpx_per_s']};"
              f" 3,660²: {raw['stream_3660']}; 7,320²: {raw['stream_7320']}; a chip in a block is "
              f"{raw['chipping_3660']['bytes_per_chip']} bytes between stages for "
              f"{raw['chipping_3660']['raw_bytes_per_chip']} bytes of raw pixels."]
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python bench/scale.py SIZE [tilestream run options]``: one mosaic of SIZE² through the
    local stream, e.g. ``python bench/scale.py 7320 --max_chips_in_flight=1024``."""
    import json
    import os

    from pipeline.options import DEFAULT_MODEL_URI

    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--inference"]:  # inference_side_by_side's child
        print(json.dumps(_inference_child(args[1], int(args[2]))))
        return 0
    if not args or not args[0].isdigit():
        print(main.__doc__)
        return 2
    size = int(args[0])
    with tempfile.TemporaryDirectory() as tmp:
        path = mosaic(Path(tmp) / f"mosaic_{size}.tif", size)
        result = stream_run(path, os.environ.get("TILESTREAM_MODEL_URI", DEFAULT_MODEL_URI),
                            *args[1:])
    print(json.dumps({"size": size, "options": args[1:], **result}))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
