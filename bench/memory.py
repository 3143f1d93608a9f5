"""The memory one SDK worker process needs, measured in a fresh interpreter, in three layers:

    .venv/bin/python bench/memory.py [SIZE]      # one SIZE² mosaic (default 3,660), JSON out

1. the SDK harness: Python with Beam's SDK worker and the stream's own modules imported;
2. the model: torch and the checked TorchScript student loaded (one per process);
3. the strip buffers: the peak while one strip task of the tile is read, cut, scored, blended
   where it was scored, and its strip assembled (what one bundle of each stage holds).

Dataflow's Python workers run one SDK process per vCPU, so a worker needs about
``vcpus x peak_mb`` plus what the VM's own agents keep (bench/cost.py prices the smallest
machine that fits).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return kb / 1024


def _peak_mb() -> float:
    """The process's peak RSS since :func:`_reset_peak` (Linux's VmHWM)."""
    with open("/proc/self/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return kb / 1024


def _reset_peak() -> None:
    """Start the peak afresh, so the strip's own peak is not hidden by an earlier one (imports,
    writing the mosaic)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _child(size: int) -> dict:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import apache_beam.runners.worker.sdk_worker_main  # noqa: F401  (the harness' code)

    import pipeline.graph  # noqa: F401  (every stage's module, as the worker unpickles them)

    harness = _rss_mb()
    import numpy as np
    import torch

    from model.card import load_card
    from pipeline.options import DEFAULT_MODEL_URI
    from transforms.model_handlers import StudentModelHandler

    card = load_card(DEFAULT_MODEL_URI)
    model = StudentModelHandler(card).load_model()
    torch.set_num_threads(1)  # one SDK process per vCPU
    loaded = _rss_mb()

    from mosaics import mosaic

    from transforms.blend import blend_parts, block_parts, overlaps
    from transforms.chips import ChipSettings, ChipTileFn
    from transforms.geometry import strip_bounds
    from transforms.inference import block_input, to_prediction
    from transforms.model_handlers import segmentation_inference_fn
    from transforms.records import ChipBlock, TileRef

    with tempfile.TemporaryDirectory() as tmp:
        path = mosaic(Path(tmp) / f"mosaic_{size}.tif", size)
        _reset_peak()
        fn = ChipTileFn(ChipSettings.from_card(card))
        fn.setup()
        tile = TileRef("bench", (str(path),), "1", 0.0, 0.0)
        task = fn.plan(tile)[1]  # a middle strip: it shares rows on both sides
        [block] = [o for o in fn.chip(task) if isinstance(o, ChipBlock)]
        light, array = block_input(block)
        del block
        tensor = torch.from_numpy(array)
        results = []
        for start in range(0, len(light), 32):
            results += segmentation_inference_fn(list(tensor[start : start + 32]), model,
                                                 torch.device("cpu"), spec=card.input)
        predictions = [to_prediction(c, np.asarray(r.inference), card.name, card.version)
                       for c, r in zip(light.chips, results, strict=True)]
        parts = block_parts(predictions, confidence=True)
        grid = task.grid
        start, end = strip_bounds(grid.height, grid.width, grid.chip_size, grid.stride)[1]
        blend_parts([p for p in parts if p.strip == 1], card.num_classes, end - start,
                    grid.width, overlaps(grid.chip_size, grid.stride), confidence=True)
        peak = _peak_mb()
    return {"tile": f"{size}x{size}", "chips_in_strip": len(light),
            "sdk_harness_mb": round(harness, 1), "model_mb": round(loaded - harness, 1),
            "strip_buffers_mb": round(peak - loaded, 1), "peak_mb": round(peak, 1)}


def measure(size: int = 3660) -> dict:
    """:func:`_child` in a fresh interpreter, as each SDK worker process is one."""
    done = subprocess.run([sys.executable, __file__, "--child", str(size)],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(_child(int(sys.argv[2]))))
    else:
        args = [a for a in sys.argv[1:] if a.isdigit()]
        print(json.dumps(measure(int(args[0]) if args else 3660), indent=2))
