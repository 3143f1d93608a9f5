"""A local backfill on one SDK worker process, then on two: the speed-up from the second core.

    python bench/backfill.py [TILES]     # JSON; TILES copies of a 3,660² mosaic (default 8)

Each run is ``tilestream run --local --input_glob=...`` on Beam's FnApiRunner (what the local
backfill runs on, ``pipeline/local/launch.py``) with ``--direct_num_workers`` 1 then 2, on one
local stack, into datasets of their own. Wall time runs from launch to exit (start-up included,
the same in both), CPU is summed over the launcher and its worker processes. Both runs must
write the same chip rows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tree_cpu_s(root: int, seen: dict[int, float]) -> None:
    """Record the CPU so far of ``root`` and every process below it (a process's last
    reading stands once it has exited)."""
    from cpu import process_cpu_s

    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry)] = int(stat[1])
            except OSError:
                continue
    family, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in family:
                family.add(child)
                frontier.append(child)
    for pid in family:
        try:
            seen[pid] = process_cpu_s(pid)
        except OSError:
            pass


def one_run(stack, folder: Path, model_uri: str, workers: int) -> dict:
    import uuid

    dataset = f"backfill{workers}_{uuid.uuid4().hex[:6]}"
    stack.bigquery().create_dataset(dataset)
    seen: dict[int, float] = {}
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "pipeline.ops.cli", "run", "--local",
         f"--stack_dir={stack.run_dir}", f"--model_uri={model_uri}",
         f"--input_glob={folder}/*.tif", f"--direct_num_workers={workers}",
         f"--bq_dataset={stack.project}:{dataset}",
         f"--output_prefix={stack.output_prefix}/{dataset}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    while child.poll() is None:
        _tree_cpu_s(child.pid, seen)
        time.sleep(0.5)
    wall = time.perf_counter() - started
    if child.returncode:
        raise RuntimeError(child.stderr.read().decode(errors="replace")[-3000:])
    [row] = [dict(r) for r in stack.bigquery().query(
        f"SELECT COUNT(*) AS chips, COUNT(DISTINCT tile_id) AS tiles FROM `{dataset}.chips`"
    ).result()]
    return {"workers": workers, "wall_s": round(wall, 1), "tiles": row["tiles"],
            "chips": row["chips"], "chips_per_s": round(row["chips"] / wall, 1),
            "chips_per_s_per_worker": round(row["chips"] / wall / workers, 1),
            "cpu_s": round(sum(seen.values()), 1),
            "cpu_ms_per_chip": round(sum(seen.values()) / row["chips"] * 1000, 3)}


def speedup(tile: Path, model_uri: str, workdir: Path, tiles: int = 8) -> dict:
    """Wall time of the backfill on one worker process over that on two."""
    from pipeline.local import stack as local_stack

    folder = workdir / "backfill"
    folder.mkdir(exist_ok=True)
    for i in range(tiles):
        target = folder / f"tile_{i:02d}.tif"
        if not target.exists():
            os.link(tile, target) if tile.stat().st_dev == folder.stat().st_dev \
                else shutil.copy(tile, target)
    run_dir = Path(tempfile.mkdtemp(prefix="tilestream-backfill-"))
    stack = local_stack.up(run_dir)
    try:
        one = one_run(stack, folder, model_uri, 1)
        two = one_run(stack, folder, model_uri, 2)
    finally:
        local_stack.down(run_dir)
    if (one["tiles"], one["chips"]) != (two["tiles"], two["chips"]):
        raise RuntimeError(f"the two runs wrote different rows: {one} vs {two}")
    return {"tiles": tiles, "one_worker": one, "two_workers": two,
            "speedup": round(one["wall_s"] / two["wall_s"], 3)}


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from mosaics import mosaic

    from pipeline.options import DEFAULT_MODEL_URI

    tiles = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    with tempfile.TemporaryDirectory() as tmp:
        tile = mosaic(Path(tmp) / "mosaic_3660.tif", 3660)
        print(json.dumps(speedup(tile, DEFAULT_MODEL_URI, Path(tmp), tiles)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
