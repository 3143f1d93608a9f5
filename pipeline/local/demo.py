"""``make demo``: the whole product on one machine, with the real sample tile.

Local stack up -> the stream starts in a child process -> the Landsat-7 Olinda tile is uploaded
to the GCS emulator and its OBJECT_FINALIZE notification published -> wait for its prediction
raster and BigQuery rows -> print a SQL result and the raster URI -> write a quicklook PNG ->
stop the stream and the stack. The last line on stdout is a JSON summary.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from google.api_core.exceptions import NotFound

from model.card import load_card
from pipeline.local import stack as local_stack
from pipeline.local.quicklook import TileFacts, write_quicklook
from pipeline.ops import announce
from pipeline.ops.check import SAMPLE_TILE
from pipeline.ops.queries import run_query
from pipeline.options import DEFAULT_MODEL_URI

DEMO_STACK_DIR = Path(".tilestream") / "demo-stack"


_T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[demo {time.monotonic() - _T0:5.1f}s] {message}", file=sys.stderr, flush=True)


def _count(client, sql: str) -> int:
    try:
        return int(next(iter(client.query(sql).result()))[0])
    except NotFound:  # before the stream has created its tables
        return 0


def wait_until_ready(stack, tile_id: str, generation: str, timeout_s: float) -> dict | None:
    """The tile's row once its answer is complete in SQL: the ``tiles_ready`` query (the tile row
    and every chip row in), which is what a consumer should react to, not the tile row alone."""
    dataset = f"{stack.project}.{stack.dataset}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ready = [r for r in run_query(stack.bigquery(), "tiles_ready", dataset, days=1,
                                          include_drifted=True)
                     if r["tile_id"] == tile_id and r["tile_generation"] == generation]
        except NotFound:
            ready = []
        if ready:
            [row] = [dict(r) for r in stack.bigquery().query(
                "SELECT tile_id, chips_scored, chips_skipped, latency_s, raster_uri, drifted, "
                f"drift_max_band_psi, acquired FROM `{dataset}.tiles` WHERE tile_id = '{tile_id}' "
                f"AND tile_generation = '{generation}'").result()]
            return row
        time.sleep(1.0)
    return None


def run_demo(out_dir: str = "out/demo", keep_stack: bool = False,
             model_uri: str = DEFAULT_MODEL_URI, timeout_s: float = 150.0,
             stack_dir: str | Path = DEMO_STACK_DIR) -> dict:
    """One demo at a time per stack directory: a second one refuses at once (its stop would take
    the first one's stack away), so two `make demo` never fight over ports and processes."""
    # A SIGTERM (a CI timeout, `kill`) stops the demo like Ctrl-C: its stream and stack too.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    with local_stack.hold(stack_dir, "demo", wait_s=0):
        return _run_demo(out_dir, keep_stack, model_uri, timeout_s, Path(stack_dir))


def _run_demo(out_dir: str, keep_stack: bool, model_uri: str, timeout_s: float,
              stack_dir: Path) -> dict:
    started = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    card = load_card(model_uri)
    say(f"model {card.model_id}: {card.parameters:,} parameters, classes "
        f"{', '.join(c.name for c in card.classes)}")
    stack = local_stack.up(stack_dir)
    say(f"local stack up at {stack.run_dir} ({time.monotonic() - started:.1f}s)")
    dataset = f"{stack.project}.{stack.dataset}"
    log = open(out / "stream.log", "wb")
    stream = subprocess.Popen(
        [sys.executable, "-m", "pipeline.ops.cli", "run", "--local", f"--stack_dir={stack.run_dir}",
         f"--model_uri={model_uri}", f"--metrics_file={out / 'metrics.json'}"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        uri, generation = announce.upload(stack.storage(), str(SAMPLE_TILE), stack.bucket,
                                          "incoming/L7_ETMs.tif")
        data, attributes = announce.gcs_notification(stack.bucket, "incoming/L7_ETMs.tif",
                                                     generation)
        announce.publish(stack.publisher(), stack.topic_path, data, attributes)
        say(f"uploaded {uri} (generation {generation}) and published its notification")
        tile = wait_until_ready(stack, "L7_ETMs", str(generation), timeout_s)
        if tile is None:
            raise RuntimeError(f"no tile ready after {timeout_s:.0f}s; see {out / 'stream.log'}")
        say(f"tile scored: {tile['chips_scored']} chips, end-to-end latency "
            f"{tile['latency_s']:.1f}s, raster {tile['raster_uri']}")
        areas = [r for r in run_query(stack.bigquery(), "class_area_per_tile_and_day", dataset,
                                      include_drifted=True) if r["tile_id"] == "L7_ETMs"]
        flag = (f"the model flags this tile as out of distribution (max band PSI "
                f"{tile['drift_max_band_psi']:.2f}): the shipped queries leave it out unless "
                "asked (include_drifted), as here" if tile["drifted"] else "")
        print("class_area_per_tile_and_day (pipeline/ops/sql/queries.sql)"
              + (f"; {flag}:" if flag else ":"))
        for row in areas:
            print(f"  {row['day'] or 'acquisition time unknown'}  {row['tile_id']}  "
                  f"{row['class_name']:<12} "
                  f"{row['area_km2']:8.2f} km²")
        print(f"prediction raster: {tile['raster_uri']}")
        png = write_quicklook(str(SAMPLE_TILE), _download(stack, tile["raster_uri"], out),
                              card, str(out / "quicklook.png"),
                              TileFacts(tile["tile_id"], tile["acquired"], tile["drifted"],
                                        tile["drift_max_band_psi"]))
        say(f"quicklook written to {png}")
        bq = stack.bigquery()
        summary = {
            "tiles_scored": _count(bq, f"SELECT COUNT(*) FROM `{dataset}.tiles` "
                                       "WHERE complete"),
            "chips_scored": int(tile["chips_scored"]),
            "chips_skipped": int(tile["chips_skipped"]),
            "bq_chip_rows": _count(bq, f"SELECT COUNT(*) FROM `{dataset}.chips`"),
            "bq_tile_rows": _count(bq, f"SELECT COUNT(*) FROM `{dataset}.tiles`"),
            "rasters": [tile["raster_uri"]],
            "dead_letters": _count(bq, f"SELECT COUNT(*) FROM `{dataset}.dead_letters`"),
            "latency_s": round(float(tile["latency_s"]), 2),
            # A bare bucket notification says when the file was uploaded, not when the scene
            # was seen: None, never the upload day.
            "acquired": tile["acquired"].isoformat() if tile["acquired"] else None,
            "drifted": bool(tile["drifted"]),
            "quicklook": str(png),
            "model": card.model_id,
        }
    finally:
        say("stopping the stream")
        stream.terminate()
        try:
            stream.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stream.kill()
        log.close()
        if not keep_stack:
            local_stack.down(stack.run_dir)
    summary["seconds"] = round(time.monotonic() - started, 1)
    say(f"done in {summary['seconds']}s")
    return summary


def _download(stack, uri: str, out: Path) -> str:
    bucket, _, name = uri[len("gs://"):].partition("/")
    path = out / "prediction.tif"
    stack.storage().bucket(bucket).blob(name).download_to_filename(str(path))
    return str(path)
