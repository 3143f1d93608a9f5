"""CPU per chip: the whole running stream against its components, measured in one run.

What a Dataflow bill follows is worker CPU time per chip, so that is what is compared:

- **the stream**: user + system CPU of the stream's process (its threads included; the
  emulators are processes of their own and are left out), from the publish of one tile until
  every row of it is queryable, divided by its chips (:func:`process_cpu_s`);
- **its components**, each done alone in a fresh process on the same tile file
  (:func:`components`): chipping (the stream's chipper), the forward pass (the stream's model
  input and inference function, in passes of 32), predictions (argmax and class counts per
  chip), row building (the chip rows), assembly (blending, strip pieces, stitching the COG).

``cpu_per_chip_stream_vs_components`` is the first over the sum of the second. The difference
is explained by a sampling profile of the stream (py-spy, every Python thread) bucketed by
stage (:func:`breakdown`); the forward pass's own threads are native and not sampled, so the
buckets are shares of the Python threads' samples.

    python bench/cpu.py --components TILE.tif     # JSON: CPU ms per chip of each component
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A stack frame's file -> the stage it belongs to (the deepest of our frames decides).
STAGES = (
    ("forward", r"^transforms/inference\.py:block_input|"
                r"^transforms/model_handlers\.py:segmentation_inference_fn|^model/inference\.py"),
    ("predictions", r"^transforms/(inference|model_handlers)\.py"),
    ("chipping", r"^transforms/(chips|chip_cut|chip_reader|rasters|pacing|radiometry|storage|"
                 r"geometry|records)\.py"),
    ("assembly", r"^transforms/(assemble|blend|strip_route|strip_assembly|tile_finish|tile_rows|"
                 r"cards|cog|stac)\.py"),
    ("rows", r"^transforms/(sinks|bq_rows|bq_check|deadletter)\.py"),
    ("results and changes", r"^transforms/(results|result_events|answered|changes|change_rules|"
                            r"change_raster|location)\.py"),
    ("parsing and routing", r"^transforms/"),
    ("local stack and launcher", r"^pipeline/"),
    ("model loading", r"^model/"),
)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process so far, all its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return found if os.access(found, os.X_OK) else None


class Profile:
    """py-spy sampling a process from ``start`` to ``stop`` (nothing when py-spy is absent)."""

    def __init__(self, pid: int, out: Path, rate: int = 50):
        self.out, self.child = out, None
        spy = py_spy()
        if spy:
            self.child = subprocess.Popen(
                [spy, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                 "--output", str(out), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> dict[str, float] | None:
        if self.child is None:
            return None
        self.child.send_signal(2)  # SIGINT: py-spy writes its file and exits
        self.child.wait(timeout=120)
        return breakdown(self.out) if self.out.exists() else None


def _stage(frames: list[str]) -> str:
    ours = []
    for frame in frames:
        found = re.search(r"\(([^:()]+):\d+\)$", frame)
        if found and found.group(1).startswith(("transforms/", "model/", "pipeline/")):
            ours.append(f"{found.group(1)}:{frame.split(' (')[0]}")
    if not ours:
        text = ";".join(frames)
        if "apache_beam" in text:
            return "runner (Beam, no stage of ours)"
        return "clients and other"
    for name, pattern in STAGES:
        if re.search(pattern, ours[-1]):
            return name
    return "other"


def breakdown(raw: Path) -> dict[str, float]:
    """Share of the sampled Python stacks per stage (py-spy's raw format: ``a;b;c count``)."""
    samples: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            samples[_stage(stack.split(";"))] += int(count)
    total = sum(samples.values()) or 1
    return {name: round(n / total, 3) for name, n in samples.most_common()}


# --- the components alone -------------------------------------------------------------------

def components(path: Path) -> dict[str, float]:
    """CPU milliseconds per chip of each component on the tile at ``path``, in this process."""
    import numpy as np
    import torch

    from model.card import load_card
    from model.inference import off_the_main_thread
    from pipeline.options import DEFAULT_MODEL_URI
    from transforms import cog
    from transforms.blend import blend_parts, block_parts, overlaps
    from transforms.chips import MANIFESTS_TAG, ChipSettings, ChipTileFn
    from transforms.geometry import strip_bounds
    from transforms.inference import block_input, to_prediction
    from transforms.model_handlers import StudentModelHandler
    from transforms.model_handlers import segmentation_inference_fn as forward
    from transforms.records import ChipBlock, PredictionBlock, TileRef
    from transforms.sinks import chip_rows

    card = load_card(DEFAULT_MODEL_URI)
    cpu: dict[str, float] = {}

    def timed(name: str, work):
        started = time.process_time()
        result = work()
        cpu[name] = cpu.get(name, 0.0) + time.process_time() - started
        return result

    fn = ChipTileFn(ChipSettings.from_card(card))
    fn.setup()
    out = timed("chipping", lambda: list(fn.process(TileRef("bench", (str(path),), "1", 0.0,
                                                            0.0))))
    blocks = [o for o in out if isinstance(o, ChipBlock)]
    [manifest] = [o.value for o in out if getattr(o, "tag", None) == MANIFESTS_TAG]
    chips = sum(len(b) for b in blocks)
    model = StudentModelHandler(card).load_model()

    def score() -> list[list]:
        results = []
        for block in blocks:
            tensor = torch.from_numpy(block_input(block)[1])
            rows = []
            for start in range(0, len(block), 32):
                rows += forward(list(tensor[start : start + 32]), model, torch.device("cpu"),
                                spec=card.input)
            results.append(rows)
        return results

    scored = timed("forward", lambda: off_the_main_thread(score))
    predicted = timed("predictions", lambda: [PredictionBlock(b.tile, b.task, tuple(
        to_prediction(c, np.asarray(r.inference), card.name, card.version)
        for c, r in zip(b.chips, rows, strict=True))) for b, rows in zip(blocks, scored,
                                                                          strict=True)])
    names = tuple(c.name for c in card.classes)
    timed("rows", lambda: [chip_rows(p, names) for p in predicted])

    def assemble() -> None:
        bounds = strip_bounds(manifest.height, manifest.width, manifest.chip_size,
                              manifest.stride)
        by_strip: dict[int, list] = {}
        for block in predicted:  # blended where scored (RouteToStrips), then per strip
            for part in block_parts(block.predictions, confidence=False):
                by_strip.setdefault(part.strip, []).append(part)
        with tempfile.TemporaryDirectory() as tmp:
            uri = os.path.join(tmp, "tile.tif")
            for j, parts in sorted(by_strip.items()):
                classes, _, _ = blend_parts(parts, card.num_classes,
                                            bounds[j][1] - bounds[j][0], manifest.width,
                                            overlaps(manifest.chip_size, manifest.stride))
                cog.write_piece(manifest, j, classes, None, cog.piece_uri(uri, j), tmp)
            cog.stitch(manifest, card, uri, sorted(by_strip), False, tmp)

    timed("assembly", assemble)
    return {name: round(seconds / chips * 1000, 4) for name, seconds in cpu.items()} | {
        "chips": chips, "torch_threads": torch.get_num_threads()}


def components_in_a_child(path: Path) -> dict[str, float]:
    """:func:`components` in a fresh interpreter, as the stream's is one."""
    done = subprocess.run([sys.executable, __file__, "--components", str(path)],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if sys.argv[1:2] == ["--components"]:
        print(json.dumps(components(Path(sys.argv[2]))))
    else:
        print(__doc__)
