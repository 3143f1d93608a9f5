"""TileStream benchmarks: chipping memory and speed, inference throughput, the local stream.

    .venv/bin/python bench/run.py [--quick] [--device CPU|GPU] [--skip-stream] [--shuffle-only]

Writes bench/results.json (raw numbers and the machine) and bench/RESULTS.md (tables). The
machines here are shared and noisy: compare ratios measured in one run, not absolute numbers
across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scale import mosaic  # noqa: E402  (bench/ is on sys.path as the script's folder)

from model.card import ModelCard, load_card  # noqa: E402
from pipeline.ops.check import SAMPLE_TILE  # noqa: E402
from pipeline.options import DEFAULT_MODEL_URI  # noqa: E402
from transforms.chips import ChipSettings, ChipTileFn, chips_in  # noqa: E402
from transforms.model_handlers import StudentModelHandler, segmentation_inference_fn  # noqa: E402
from transforms.records import TileRef  # noqa: E402

TEACHER_URI = ROOT / "model" / "artifacts" / "landcover-teacher" / "v1"


def bench_chipping(card: ModelCard, sizes: list[tuple[int, int]], workdir: Path) -> list[dict]:
    settings = ChipSettings.from_card(card)
    results = []
    for height, width in sizes:
        path = mosaic(workdir / f"tile_{height}x{width}.tif", height, width)
        fn = ChipTileFn(settings)
        tracemalloc.start()
        started = time.perf_counter()
        n = sum(1 for _ in chips_in(fn.process(TileRef("bench", (str(path),), "1", 0.0, 0.0))))
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        results.append({
            "height": height, "width": width, "chips": n, "seconds": round(seconds, 2),
            "chips_per_s": round(n / seconds, 1), "peak_mb": round(peak / 1e6, 1),
            "tile_mb_uint8": round(6 * height * width / 1e6, 1),
        })
        print(f"chipping {height}x{width}: {results[-1]}", file=sys.stderr)
    return results


def bench_inference(card: ModelCard, device: str, batch_sizes: list[int],
                    seconds_each: float) -> list[dict]:
    handler = StudentModelHandler(card, device=device)
    model = handler.load_model()
    target = torch.device("cuda" if device == "GPU" else "cpu")
    chip = torch.randn(len(card.input.bands), card.input.chip_size, card.input.chip_size)
    results = []
    for batch_size in batch_sizes:
        batch = [chip] * batch_size
        segmentation_inference_fn(batch, model, target)  # warm-up
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds_each:
            segmentation_inference_fn(batch, model, target)
            runs += 1
        elapsed = time.perf_counter() - started
        results.append({"model": card.model_id, "device": device, "batch_size": batch_size,
                        "chips_per_s": round(runs * batch_size / elapsed, 1),
                        "ms_per_batch": round(elapsed / runs * 1000, 2)})
        print(f"inference {results[-1]}", file=sys.stderr)
    return results


def bench_stream(tiles: int, model_uri: str, max_batch_size: int) -> dict:
    """The local stream end to end: N copies of the sample tile, latency and throughput."""
    from pipeline.local import stack as local_stack
    from pipeline.ops import announce

    run_dir = Path(tempfile.mkdtemp(prefix="tilestream-bench-"))
    stack = local_stack.up(run_dir)
    log = open(run_dir / "stream.log", "wb")
    stream = subprocess.Popen(
        [sys.executable, "-m", "pipeline.ops.cli", "run", "--local", f"--stack_dir={run_dir}",
         f"--model_uri={model_uri}", f"--max_batch_size={max_batch_size}"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        time.sleep(8)  # the stream's start-up is not what is measured
        started = time.time()
        for i in range(tiles):
            name = f"incoming/bench_{i:03d}.tif"
            _, generation = announce.upload(stack.storage(), str(SAMPLE_TILE), stack.bucket,
                                            name)
            announce.publish(stack.publisher(), stack.topic_path,
                             *announce.gcs_notification(stack.bucket, name, generation))
        rows: list[dict] = []
        deadline = time.monotonic() + 120 + 30 * tiles
        while time.monotonic() < deadline and len(rows) < tiles:
            time.sleep(2)
            try:
                rows = [dict(r) for r in stack.bigquery().query(
                    f"SELECT latency_s, chips_scored, completed_at FROM "
                    f"`{stack.dataset}.tiles`").result()]
            except Exception:
                rows = []
        if len(rows) < tiles:
            raise RuntimeError(f"only {len(rows)} of {tiles} tiles finished; {run_dir}")
        last = max(r["completed_at"].timestamp() for r in rows)
        latencies = sorted(r["latency_s"] for r in rows)
        chips = sum(r["chips_scored"] for r in rows)
        return {"tiles": tiles, "chips": chips, "max_batch_size": max_batch_size,
                "wall_s": round(last - started, 1),
                "chips_per_s": round(chips / (last - started), 1),
                "latency_p50_s": round(statistics.median(latencies), 1),
                "latency_max_s": round(latencies[-1], 1)}
    finally:
        stream.send_signal(signal.SIGTERM)
        stream.wait(timeout=60)
        log.close()
        local_stack.down(run_dir)


def markdown(results: dict) -> str:
    lines = ["# Benchmark results", "",
             f"Generated by `bench/run.py` on {results['machine']['when']} "
             f"({results['machine']['cpus']} CPUs, {results['machine']['gpu'] or 'no GPU'}, "
             f"torch {results['machine']['torch']}). Compare ratios within this run only.", "",
             "## Chipping (rasterio windows, a strip task at a time: ~512 rows, <= ~2 Mpx)", "",
             "| tile (rows x cols) | tile as uint8 | chips | chips/s | peak traced memory |",
             "|---|---|---|---|---|"]
    for r in results["chipping"]:
        lines.append(f"| {r['height']} x {r['width']} | {r['tile_mb_uint8']} MB | {r['chips']} "
                     f"| {r['chips_per_s']} | {r['peak_mb']} MB |")
    lines += ["", "## Inference (the stream's inference function, random chips)", "",
              "| model | device | batch | chips/s | ms/batch |", "|---|---|---|---|---|"]
    for r in results["inference"]:
        lines.append(f"| {r['model']} | {r['device']} | {r['batch_size']} | {r['chips_per_s']} "
                     f"| {r['ms_per_batch']} |")
    if results.get("stream"):
        s = results["stream"]
        lines += ["", "## Local stream end to end (emulators, BundleBasedDirectRunner)", "",
                  f"{s['tiles']} tiles ({s['chips']} chips) announced at once, max batch "
                  f"{s['max_batch_size']}: all scored in {s['wall_s']} s ({s['chips_per_s']} "
                  f"chips/s); tile latency publish -> raster + row: median "
                  f"{s['latency_p50_s']} s, max {s['latency_max_s']} s."]
    if results.get("scale"):
        import scale

        lines += ["", *scale.markdown(results["scale"])]
    return "\n".join(lines) + "\n"


def measure_shuffle(results: dict) -> None:
    """What crosses each shuffle and state boundary, and what one SDK process holds."""
    import memory
    import shuffle

    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    results["shuffle"] = {**shuffle.run(3660), "when": when}
    results["shuffle_bytes_per_chip"] = results["shuffle"]["shuffle_bytes_per_chip"]
    results["memory"] = {**memory.measure(3660), "when": when}


def shuffle_only(out: Path) -> int:
    import cost

    path = out / "results.json"
    results = json.loads(path.read_text())
    measure_shuffle(results)
    path.write_text(json.dumps(results, indent=2) + "\n")
    cost.main()
    print(json.dumps({k: results[k] for k in ("shuffle", "memory")}, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="GPU" if torch.cuda.is_available() else "CPU",
                        choices=["CPU", "GPU"])
    parser.add_argument("--model_uri", default=DEFAULT_MODEL_URI)
    parser.add_argument("--quick", action="store_true", help="small sizes, short timings")
    parser.add_argument("--skip-stream", action="store_true")
    parser.add_argument("--skip-scale", action="store_true",
                        help="skip the 3,660² / 7,320² whole-stream ratios (issue 9)")
    parser.add_argument("--skip-map", action="store_true",
                        help="skip the map's tile speed (bench/map.py)")
    parser.add_argument("--out", default=str(ROOT / "bench"))
    parser.add_argument("--shuffle-only", action="store_true",
                        help="re-measure only the shuffle bytes and the worker memory into the "
                        "existing results.json (its other figures keep their own run's date)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.shuffle_only:
        return shuffle_only(Path(args.out))

    card = load_card(args.model_uri)
    sizes = [(1024, 1024), (4096, 1024), (1024, 4096)] if args.quick else \
        [(2048, 2048), (8192, 2048), (2048, 8192), (10_000, 10_000)]
    batches = [1, 8, 32] if args.quick else [1, 8, 32, 128]
    with tempfile.TemporaryDirectory() as tmp:
        chipping = bench_chipping(card, sizes, Path(tmp))
    models = [card] + ([load_card(str(TEACHER_URI))] if TEACHER_URI.exists() else [])
    inference = [r for m in models
                 for r in bench_inference(m, args.device, batches, 1.0 if args.quick else 3.0)]
    results = {
        "machine": {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "chipping": chipping,
        "inference": inference,
        "stream": None if args.skip_stream else bench_stream(
            4 if args.quick else 8, args.model_uri, 32),
    }
    measure_shuffle(results)
    if not args.skip_scale:
        import scale

        with tempfile.TemporaryDirectory() as tmp:
            results["scale"] = scale.run(card, args.model_uri, Path(tmp))
        for key in scale.TARGETS:  # the headline ratios, at the top level as well
            results[key] = results["scale"][key]
    if not args.skip_map:
        import map as map_bench  # bench/map.py: the map's tile speed

        results["map"] = map_bench.run(seconds=2.0 if args.quick else 5.0)
        results["map_tiles_per_s"] = results["map"]["map_tiles_per_s"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "RESULTS.md").write_text(markdown(results))
    if results.get("scale"):  # the Dataflow cost model follows the measured rates and bytes
        import cost

        cost.main()
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

