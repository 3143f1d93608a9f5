"""What crosses the stream's shuffle and state boundaries, measured with Beam's own coders.

    .venv/bin/python bench/shuffle.py [SIZE]     # one SIZE² mosaic (default 3,660), JSON out

Streaming Engine bills the bytes a job shuffles and keeps in state, so each boundary of the
streaming graph is measured by encoding the elements that really cross it, for one tile, with the
coder Beam picks for that PCollection (``KEYED`` pairs: a str key and ``FastPrimitivesCoder``,
which pickles our records; state: the ``PickleCoder`` of the step's state spec):

- ``strip_tasks``: ``ByTask`` keys each strip task apart (shuffle) to spread a tile's reads.
- ``strip_reports``: ``ByTile`` to the manifest merge (shuffle + its bag state).
- ``predictions_to_assembly``: what ``RouteToStrips`` keys by strip and tile (shuffle), and
  the same elements held in ``AssembleStrips``' bag state until the strip is whole (state).
- ``chip_rows``: with load jobs (the default on BigQuery) the rows are written to files in the
  scoring stage and only a (table, file) pair per bundle crosses, counted as one per block;
  with ``--chip_rows_load_secs=0`` (insertAll) Beam reshuffles every row before the insert:
  ``shuffle_bytes_per_chip_insert_all`` counts those instead.

Chip blocks (chipper -> model) are reported beside, not in the total: ``ChipStrips``,
``RunInference`` (without ``--max_batch_duration_secs``, whose keyed batching would shuffle
them) and ``RouteToStrips`` are one fused stage, so a block never leaves its worker.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

COUNTED = ("strip_tasks", "strip_reports", "predictions_to_assembly", "assembly_state",
           "chip_rows")  # the default graph: chip rows by load jobs


def predictions(path: Path, card, model) -> tuple:
    """The tile's strip tasks, chip blocks, reports, manifest and scored blocks, as the stream's
    own functions make them (the student model on the CPU)."""
    import apache_beam as beam
    import torch

    from model.inference import off_the_main_thread
    from transforms.chips import MANIFESTS_TAG, ChipSettings, ChipTileFn
    from transforms.inference import block_input, to_prediction
    from transforms.model_handlers import segmentation_inference_fn
    from transforms.records import ChipBlock, PredictionBlock, TileRef

    fn = ChipTileFn(ChipSettings.from_card(card))
    fn.setup()
    tile = TileRef("bench", (str(path),), "1", 0.0, 0.0)
    tasks = fn.plan(tile)
    out = list(fn.process(tile))
    blocks = [o for o in out if isinstance(o, ChipBlock)]
    tagged = [o for o in out if isinstance(o, beam.pvalue.TaggedOutput)]
    manifest = next(t.value for t in tagged if t.tag == MANIFESTS_TAG)
    reports = [t.value for t in tagged if t.tag != MANIFESTS_TAG]

    def score(block: ChipBlock) -> PredictionBlock:
        light, array = block_input(block)
        tensor = torch.from_numpy(array)
        results = []
        for start in range(0, len(block), 32):
            results += segmentation_inference_fn(list(tensor[start : start + 32]), model,
                                                 torch.device("cpu"), spec=card.input)
        return PredictionBlock(block.tile, block.task, tuple(
            to_prediction(c, np.asarray(r.inference), card.name, card.version)
            for c, r in zip(light.chips, results, strict=True)))

    scored = off_the_main_thread(lambda: [score(b) for b in blocks])
    return tasks, blocks, reports, manifest, scored


def route(items, confidence: bool) -> list:
    """RouteToStrips' outputs for ``items`` (both the strip keys and the tile keys)."""
    import inspect

    from transforms import assemble

    fn = (assemble._RouteFn(confidence) if inspect.signature(assemble._RouteFn).parameters
          else assemble._RouteFn())
    routed = []
    for item in items:
        for out in fn.process(item):
            routed.append(getattr(out, "value", out))
    return routed


def measure(path: Path, card, model, confidence: bool = False) -> dict:
    from apache_beam.coders import PickleCoder, registry
    from apache_beam.typehints import Any

    from transforms.records import KEYED
    from transforms.sinks import chip_rows

    keyed, anything, pickled = registry.get_coder(KEYED), registry.get_coder(Any), PickleCoder()
    tasks, blocks, reports, manifest, scored = predictions(path, card, model)
    chips = sum(len(b) for b in scored)
    started = time.process_time()
    routed = route([manifest, *reports, *scored], confidence)
    route_cpu = time.process_time() - started
    to_assembly = routed  # every element keyed to a strip or a tile, and held in its state
    names = tuple(c.name for c in card.classes)
    rows = [row for block in scored for row in chip_rows(block, names)]
    measured = {
        "strip_tasks": sum(len(keyed.encode((f"{t.tile.assignment_key}#{t.index}", t)))
                           for t in tasks),
        "strip_reports": sum(len(keyed.encode((r.task.tile.assignment_key, r))) +
                             len(pickled.encode(r)) for r in reports),
        "predictions_to_assembly": sum(len(keyed.encode(kv)) for kv in to_assembly),
        "assembly_state": sum(len(pickled.encode(kv[1])) for kv in to_assembly),
        "chip_rows": len(scored) * len(anything.encode((
            "project:dataset.chips", f"gs://bucket/temp/bq_load/{'0' * 32}/{'0' * 36}"))),
        "chip_rows_insert_all": sum(len(anything.encode(((manifest.tile.tile_id, i % 50), row)))
                                    for i, row in enumerate(rows)),
    }
    per_chip = {k: round(v / chips, 1) for k, v in measured.items()}
    blocks_bytes = sum(len(anything.encode(b)) for b in blocks)
    counted = sum(measured[k] for k in COUNTED)
    return {
        "tile": f"{manifest.height}x{manifest.width}", "chips": chips,
        "confidence_band": confidence,
        "shuffle_bytes_per_chip": round(counted / chips, 1),
        "shuffle_bytes_per_chip_insert_all": round(
            (counted - measured["chip_rows"] + measured["chip_rows_insert_all"]) / chips, 1),
        "per_boundary_bytes_per_chip": per_chip,
        "chip_blocks_bytes_per_chip_fused": round(blocks_bytes / chips, 1),
        "route_cpu_ms_per_chip": round(route_cpu / chips * 1000, 4),
        "elements": {"strip_tasks": len(tasks), "strip_reports": len(reports),
                     "to_assembly": len(to_assembly), "chip_rows": len(rows)},
    }


def run(size: int = 3660, confidence: bool = False) -> dict:
    from mosaics import mosaic

    from model.card import load_card
    from pipeline.options import DEFAULT_MODEL_URI
    from transforms.model_handlers import StudentModelHandler

    card = load_card(DEFAULT_MODEL_URI)
    model = StudentModelHandler(card).load_model()
    with tempfile.TemporaryDirectory() as tmp:
        path = mosaic(Path(tmp) / f"mosaic_{size}.tif", size)
        return measure(path, card, model, confidence)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    print(json.dumps(run(int(args[0]) if args else 3660,
                         confidence="--confidence_band" in sys.argv), indent=2))
