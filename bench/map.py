"""Map tile speed: prediction map tiles rendered by the map's TiTiler endpoint, per second.

    .venv/bin/python bench/map.py [--size 3660] [--seconds 5]

A prediction COG as the stream writes it (uint8 classes, nodata 255, DEFLATE, nearest
overviews; the class texture of the Olinda sample) on the local stack's GCS emulator, read
through ``/cog/tiles`` of the map's own app (the allow-list, GDAL's ``/vsigs/`` to the emulator,
the card's colour map, PNG encoding) in process: at the zoom where one map tile covers the whole
COG, and two and four levels deeper. Writes the numbers into bench/results.json (``map`` and
``map_tiles_per_s``) unless ``--no_write``; bench/run.py calls :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prediction_cog(path: Path, size: int, classes: int) -> Path:
    """A ``size``² class raster like the stream's COGs, in UTM zone 25S (Olinda)."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    from pipeline.ops.check import SAMPLE_TILE

    with rasterio.open(SAMPLE_TILE) as src:
        nir = src.read(4).astype(np.int32)
    edges = np.quantile(nir, np.linspace(0, 1, classes + 1)[1:-1])
    base = np.digitize(nir, edges).astype(np.uint8)
    data = np.tile(base, (-(-size // base.shape[0]), -(-size // base.shape[1])))[:size, :size]
    data[:, : size // 20] = 255  # a nodata margin, as a partial tile has
    tmp = path.with_suffix(".plain.tif")
    with rasterio.open(tmp, "w", driver="GTiff", width=size, height=size, count=1,
                       dtype="uint8", nodata=255, crs="EPSG:31985",
                       transform=from_origin(280000, 9130000, 30, 30), tiled=True) as dst:
        dst.write(data, 1)
    rasterio.shutil.copy(tmp, path, driver="COG", compress="DEFLATE",
                         overview_resampling="nearest")
    return path


def tiles_at(bounds: tuple[float, float, float, float], zoom: int) -> list[tuple[int, int, int]]:
    """The WebMercatorQuad tiles at ``zoom`` over ``bounds`` (lon/lat)."""
    import morecantile

    tms = morecantile.tms.get("WebMercatorQuad")
    return [(t.x, t.y, t.z) for t in tms.tiles(*bounds, zooms=[zoom])]


def run(size: int = 3660, seconds: float = 5.0) -> dict:
    from fastapi.testclient import TestClient
    from rasterio.warp import transform_bounds

    from model.card import load_card
    from pipeline.local import stack as local_stack
    from pipeline.local.identity import authorization
    from pipeline.map.app import MapConfig, create_app
    from pipeline.options import DEFAULT_MODEL_URI

    card = load_card(DEFAULT_MODEL_URI, verify_weights=False)
    with tempfile.TemporaryDirectory() as tmp:
        stack = local_stack.up(Path(tmp) / "stack")
        try:
            import rasterio

            cog = prediction_cog(Path(tmp) / "pred.tif", size, card.num_classes)
            with rasterio.open(cog) as src:
                bounds = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
            name = "output/bench/predictions/bench/1/map/1.tif"
            stack.storage().bucket(stack.bucket).blob(name).upload_from_filename(str(cog))
            url = f"gs://{stack.bucket}/{name}"
            env = {"CPL_GS_ENDPOINT": stack.gcs_url + "/", "GS_NO_SIGN_REQUEST": "YES",
                   "GDAL_HTTP_HEADERS": f"Authorization: {authorization('map')}"}
            app = create_app(MapConfig("p.d", stack.output_prefix, card), lambda: None, env)
            # The zoom where one map tile covers the COG: its width in degrees fits one tile.
            whole = max(0, math.floor(math.log2(360 / max(bounds[2] - bounds[0],
                                                          bounds[3] - bounds[1]))) - 1)
            levels = []
            with TestClient(app) as client:
                for zoom in (whole, whole + 2, whole + 4):
                    tiles = tiles_at(bounds, zoom)
                    client.get(f"/cog/tiles/WebMercatorQuad/{zoom}/{tiles[0][0]}/"
                               f"{tiles[0][1]}.png", params={"url": url, "bidx": 1})  # warm
                    times, i, started = [], 0, time.perf_counter()
                    while time.perf_counter() - started < seconds:
                        x, y, z = tiles[i % len(tiles)]
                        t0 = time.perf_counter()
                        answer = client.get(f"/cog/tiles/WebMercatorQuad/{z}/{x}/{y}.png",
                                            params={"url": url, "bidx": 1})
                        times.append(time.perf_counter() - t0)
                        if answer.status_code not in (200, 204):
                            raise RuntimeError(f"tile {z}/{x}/{y}: {answer.status_code} "
                                               f"{answer.text[:200]}")
                        i += 1
                    times.sort()
                    levels.append({"zoom": zoom, "tiles_in_view": len(tiles),
                                   "tiles_per_s": round(len(times) / sum(times), 1),
                                   "p50_ms": round(statistics.median(times) * 1000, 1),
                                   "p95_ms": round(times[int(0.95 * (len(times) - 1))] * 1000, 1)})
                    print(f"map tiles {levels[-1]}", file=sys.stderr)
        finally:
            local_stack.down(stack.run_dir)
    return {"cog_px": size, "levels": levels,
            "map_tiles_per_s": levels[0]["tiles_per_s"],
            "map_tile_p95_ms": max(level["p95_ms"] for level in levels)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=3660, help="COG width and height (px)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per zoom level")
    parser.add_argument("--no_write", action="store_true", help="print only")
    args = parser.parse_args()
    result = run(args.size, args.seconds)
    print(json.dumps(result, indent=2))
    if not args.no_write:
        path = ROOT / "bench" / "results.json"
        results = json.loads(path.read_text()) if path.exists() else {}
        results["map"] = result
        results["map_tiles_per_s"] = result["map_tiles_per_s"]
        path.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
