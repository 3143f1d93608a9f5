"""The live map (``tilestream map``): its allow-list against SSRF and traversal, and the page in a
real headless Chromium against the real stream on the local stack.

The browser is Debian's ``chromium`` driven by Playwright's Python API (no browser download);
``make install`` installs it. A browser that cannot start fails the test with the reason.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import rasterio
from affine import Affine

from model.card import load_card
from pipeline.map.allow import CogAllowList
from pipeline.map.app import MapConfig, colormap, create_app
from pipeline.ops import announce
from pipeline.ops.check import SAMPLE_TILE
from pipeline.options import DEFAULT_MODEL_URI
from transforms.guards import Refused

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("TILESTREAM_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
# TILESTREAM_MAP_SCREENSHOT=docs/img/map.png: the browser test also writes its screenshot there
# (the README's picture, made once by this test).
SCREENSHOT_ENV = "TILESTREAM_MAP_SCREENSHOT"
OUTCOME_COLOURS = {"answered": "#2166ac", "refused": "#b2182b", "drifted": "#ff7f00",
                   "changed": "#984ea3"}
PREFIX = "gs://tilestream-local-tilestream-tiles/output/map"
GOOD = f"{PREFIX}/predictions/landcover-student/2/L7_ETMs/123.tif"

HOSTILE = [
    "http://169.254.169.254/computeMetadata/v1/instance/service-accounts/default/token",
    "http://metadata.google.internal/computeMetadata/v1/",
    "file:///etc/passwd",
    "/etc/passwd",
    "/vsicurl/http://169.254.169.254/latest.tif",
    "/vsigs/tilestream-local-tilestream-tiles/output/map/x.tif",
    "/vsicurl?url=http://169.254.169.254/x.tif",
    "vsicurl/http://127.0.0.1/x.tif",
    f"{PREFIX}/../secret/x.tif",
    f"{PREFIX}/predictions/../../incoming/x.tif",
    f"{PREFIX}/predictions/%2e%2e/%2e%2e/incoming/x.tif",
    f"{PREFIX}/predictions/..%2F..%2Fincoming%2Fx.tif",
    f"{PREFIX}%2F..%2Fincoming/x.tif",
    f"{PREFIX}/predictions//x.tif",
    f"{PREFIX}/predictions/./x.tif",
    f"{PREFIX}/predictions/x.tif?alt=media",
    f"{PREFIX}/predictions/x.tif#frag",
    f"{PREFIX}/predictions\\..\\x.tif",
    f"{PREFIX}/predictions/x .tif",
    "gs://another-bucket/output/map/predictions/x.tif",
    "gs://tilestream-local-tilestream-tiles/incoming/x.tif",
    "gs://tilestream-local-tilestream-tiles/output/mapx/predictions/x.tif",
    "gs://tilestream-local-tilestream-tiles/output/map",
    f"{PREFIX}/predictions/x.json",
    "GS://tilestream-local-tilestream-tiles/output/map/predictions/x.tif",
    "https://storage.googleapis.com/tilestream-local-tilestream-tiles/output/map/x.tif",
    "",
]


@pytest.mark.parametrize("url", HOSTILE)
def test_the_allow_list_refuses_what_is_not_a_cog_under_the_output_prefix(url):
    with pytest.raises(Refused):
        CogAllowList(PREFIX).check(url)


def test_the_allow_list_accepts_a_cog_under_the_output_prefix():
    assert CogAllowList(PREFIX + "/").check(GOOD) == GOOD


def test_the_map_binds_to_localhost_unless_asked():
    from pipeline.ops.cli import parser

    assert parser().parse_args(["map", "--local"]).host == "127.0.0.1"
    assert parser().parse_args(["map", "--local", "--host", "0.0.0.0"]).host == "0.0.0.0"


@pytest.fixture(scope="module")
def offline_app():
    """The app with no stack behind it: every tiler request must stop at the allow-list."""
    from fastapi.testclient import TestClient

    config = MapConfig("p.d", PREFIX, load_card(DEFAULT_MODEL_URI, verify_weights=False))
    calls: list[str] = []

    def no_bigquery():
        calls.append("bigquery")
        raise AssertionError("no BigQuery in this test")

    with TestClient(create_app(config, no_bigquery)) as client:
        yield client


@pytest.mark.parametrize("endpoint", ["cog/info", "cog/tiles/WebMercatorQuad/0/0/0.png",
                                      "cog/preview.png", "cog/point/0,0", "cog/statistics"])
@pytest.mark.parametrize("url", [u for u in HOSTILE if u])
def test_every_tiler_endpoint_answers_403_outside_the_output_prefix(offline_app, endpoint, url):
    answer = offline_app.get(f"/{endpoint}", params={"url": url})
    assert answer.status_code == 403, (answer.status_code, answer.text[:300])
    assert "root:" not in answer.text and "computeMetadata" not in answer.text.split("url")[0]


def test_a_raw_percent_encoded_slash_in_the_query_is_refused_too(offline_app):
    """``%252F`` reaches the app as a literal ``%2F`` after one decoding: refused."""
    answer = offline_app.get(f"/cog/info?url={quote(PREFIX + '/p/..%2F..%2Fx.tif', safe='')}")
    assert answer.status_code == 403


def test_the_page_loads_nothing_from_the_internet(offline_app):
    page = offline_app.get("/").text
    sources = [s.split('"')[1] for s in page.split("src=")[1:]] + \
              [s.split('"')[1] for s in page.split("href=")[1:]]
    assert sources and all(not s.startswith(("http:", "https:", "//")) for s in sources), sources
    for path in sources:
        assert offline_app.get("/" + path).status_code == 200, path
    legend = offline_app.get("/api/legend").json()
    assert [c["colour"] for c in legend["classes"]] == [
        c.colour for c in load_card(DEFAULT_MODEL_URI, verify_weights=False).classes]


# --- the browser test, on the real stream -----------------------------------------------------

def _shifted(out: Path, east_m: float, gain: float = 1.0) -> Path:
    """The Olinda sample moved ``east_m`` metres east (its own footprint on the map), its
    values times ``gain`` (1.2: a radiometric shift the model flags as drift)."""
    with rasterio.open(SAMPLE_TILE) as src:
        data, profile = src.read(), src.profile
    if gain != 1.0:
        data = np.clip(data.astype(np.float64) * gain, 0, np.iinfo(data.dtype).max).astype(
            data.dtype)
    profile["transform"] = Affine.translation(east_m, 0) * profile["transform"]
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
    return out


def _olinda_reference_model(model_uri: str, out: Path) -> str:
    """The shipped model with the Olinda tile as its drift reference: the sample is then in
    distribution (answered), and the same tile shifted radiometrically drifts."""
    import torch

    from model.drift import reference_from_pixels
    from tests.test_drift import scored

    card = load_card(model_uri)
    student = torch.jit.load(card.weights_uri, map_location="cpu").eval()
    values, predicted = scored(SAMPLE_TILE, card, student)
    reference = reference_from_pixels(values, card.input.bands, predicted, card.num_classes)
    shutil.copytree(model_uri, out)
    card_file = out / "model_card.json"
    raw = json.loads(card_file.read_text())
    raw["drift_reference"] = reference.to_dict()
    card_file.write_text(json.dumps(raw))
    return str(out)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def _launch_chromium(playwright):
    try:
        return playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                          args=["--no-sandbox", "--disable-gpu"])
    except Exception as exc:
        pytest.fail(f"headless Chromium did not start from {CHROMIUM} ({exc}); install "
                    "Debian's `chromium` (make install does) or set TILESTREAM_CHROMIUM",
                    pytrace=False)


@pytest.mark.stack
@pytest.mark.slow
def test_the_map_shows_outcomes_predictions_and_new_tiles_in_a_browser(stack, model_uri,
                                                                      tmp_path):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    from tests.streams import fresh_input, map_server, start_stream, stop_stream, wait_until

    topic, subscription, name = fresh_input(stack, "map")
    dataset, prefix = f"{stack.project}.{name}", f"{stack.output_prefix}/{name}"
    bq, store, publisher = stack.bigquery(), stack.storage(), stack.publisher()
    model = _olinda_reference_model(model_uri, tmp_path / "model")
    inputs = {"answered-a": _shifted(tmp_path / "a.tif", 0),
              "drifted-b": _shifted(tmp_path / "b.tif", 12_000, gain=1.2),
              "changed-c": _shifted(tmp_path / "c.tif", 24_000),
              "late-d": _shifted(tmp_path / "d.tif", 36_000)}

    def publish(tile_id: str) -> None:
        obj = f"incoming/{name}/{tile_id}.tif"
        if tile_id in inputs:
            generation = announce.upload(store, str(inputs[tile_id]), stack.bucket, obj)[1]
        else:
            generation = 1  # never uploaded: refused (the object does not exist)
        announce.publish(publisher, topic, *announce.gcs_notification(stack.bucket, obj,
                                                                      generation))

    def answered() -> set[str]:
        try:
            return {r["tile_id"] for r in bq.query(
                f"SELECT tile_id FROM `{dataset}.tiles` WHERE complete").result()}
        except Exception:
            return set()

    def refused() -> set[str]:
        try:
            return {r["tile_id"] for r in bq.query(
                f"SELECT tile_id FROM `{dataset}.dead_letters`").result()}
        except Exception:
            return set()

    stream = start_stream(stack, model, tmp_path / "stream.log", f"--subscription={subscription}",
                          f"--bq_dataset={stack.project}:{name}", f"--output_prefix={prefix}",
                          "--window_secs=1")
    opened = contextlib.ExitStack()  # the map server, once started
    try:
        for tile_id in ("answered-a", "drifted-b", "changed-c", "refused-x"):
            publish(tile_id)
        log = tmp_path / "stream.log"
        assert wait_until(lambda: answered() >= {"answered-a", "drifted-b", "changed-c"}
                          and "refused-x" in refused(), 300, stream), \
            log.read_text(errors="replace")[-3000:]
        # A change as the stream's change detection records it, in the table the stream made.
        assert not bq.insert_rows_json(f"{dataset}.changes", [_change_row(
            location_key="olinda", before_tile_id="answered-a", after_tile_id="changed-c")])

        base = opened.enter_context(map_server(stack, name, prefix, tmp_path / "map.log",
                                               f"--model_uri={model}", "--poll_s=1"))

        # The allow-list on the running server: a COG of this stream is served, one of another
        # prefix of the same bucket is not, though it exists.
        [row] = list(bq.query(f"SELECT raster_uri FROM `{dataset}.tiles` "
                              "WHERE tile_id = 'answered-a'").result())
        assert _get(base + "cog/info?url=" + quote(row["raster_uri"]))[0] == 200
        elsewhere = f"gs://{stack.bucket}/incoming/{name}/answered-a.tif"
        assert _get(base + "cog/info?url=" + quote(elsewhere))[0] == 403

        card = load_card(model, verify_weights=False)
        class_colours = {rgba[:3] for value, rgba in colormap(card).items() if rgba[3]}
        tile_answers: list = []  # Playwright responses of prediction map tiles
        with sync_playwright() as p:
            browser = _launch_chromium(p)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.on("response", lambda r: tile_answers.append(r)
                    if "/cog/tiles/" in r.url else None)
            outside = []
            page.on("request", lambda r: outside.append(r.url)
                    if not r.url.startswith(base) else None)
            page.goto(base)
            page.wait_for_selector("path.outcome-drifted", timeout=60_000)
            page.wait_for_selector("path.outcome-changed", timeout=60_000)
            strokes = page.eval_on_selector_all(
                "path.footprint", "els => els.map(e => [e.dataset.tile, e.getAttribute('stroke')])")
            colours = dict(strokes)
            assert colours["answered-a"] == OUTCOME_COLOURS["answered"], strokes
            assert colours["drifted-b"] == OUTCOME_COLOURS["drifted"], strokes
            assert colours["changed-c"] == OUTCOME_COLOURS["changed"], strokes
            refused_item = page.locator("li.unplaced[data-tile='refused-x']")
            refused_item.wait_for(timeout=30_000)
            assert "does not exist" in refused_item.inner_text() or \
                "refused-x" in refused_item.inner_text()
            swatch = refused_item.locator(".swatch").evaluate(
                "e => getComputedStyle(e).backgroundColor")
            assert swatch == "rgb(178, 24, 43)", swatch  # the refused colour
            legend = page.locator("#legend li").all_inner_texts()
            assert legend == [c.name for c in card.classes]

            # Click the answered tile: its row in a popup.
            page.locator("path.footprint[data-tile='answered-a']").click()
            popup = page.locator(".leaflet-popup-content")
            popup.wait_for(timeout=10_000)
            text = popup.inner_text()
            assert "answered-a" in text and card.name in text and "latency" in text, text
            assert "km²" in text and ".tif" in text, text
            assert popup.locator("a.cog").get_attribute("href").startswith("cog/info?url=")

            # Prediction map tiles: fetched with 200, painted in the card's class colours.
            deadline = time.monotonic() + 60
            while not any(r.status == 200 for r in tile_answers) and time.monotonic() < deadline:
                page.wait_for_timeout(500)  # Playwright delivers events while it waits
            page.wait_for_load_state("networkidle")
            tiles_fetched = [(r.status, r.body()) for r in tile_answers]
            assert tiles_fetched, "the page fetched no prediction map tiles"
            assert all(s == 200 for s, _ in tiles_fetched), [s for s, _ in tiles_fetched]
            seen: set[tuple[int, int, int]] = set()
            for _, body in tiles_fetched:
                rgba = np.asarray(Image.open(io.BytesIO(body)).convert("RGBA")).reshape(-1, 4)
                seen |= {tuple(int(v) for v in px[:3]) for px in rgba[rgba[:, 3] == 255]}
            assert seen and seen <= class_colours, sorted(seen - class_colours)[:5]

            # A tile scored while the page is open appears without a reload.
            page.evaluate("window.__same_page = true")
            publish("late-d")
            page.wait_for_selector("path.footprint[data-tile='late-d']", timeout=300_000)
            assert page.evaluate("window.__same_page") is True
            counts = page.locator("#outcomes").inner_text()
            late_tiles = len(tile_answers)
            deadline = time.monotonic() + 60  # the new tile's prediction, for the picture
            while len(tile_answers) == late_tiles and time.monotonic() < deadline:
                page.wait_for_timeout(500)
            page.wait_for_load_state("networkidle")
            shot = tmp_path / "map.png"
            page.screenshot(path=str(shot))
            browser.close()
        assert not outside, f"the page reached outside the map: {outside[:5]}"
        assert shot.stat().st_size > 10_000
        print(f"screenshot {shot}; outcomes {' '.join(counts.split())}; "
              f"{len(tiles_fetched)} prediction tiles fetched")
        if os.environ.get(SCREENSHOT_ENV):
            shutil.copy(shot, ROOT / os.environ[SCREENSHOT_ENV])
    finally:
        opened.close()
        stop_stream(stream)


def _dense_square(lon: float, lat: float, size: float, per_side: int) -> str:
    """A square footprint with ``per_side`` vertices a side, as WKT (a reprojected tile's
    densified outline)."""
    steps = [i / per_side for i in range(per_side)]
    ring = ([(lon + size * t, lat) for t in steps] + [(lon + size, lat + size * t) for t in steps]
            + [(lon + size * (1 - t), lat + size) for t in steps]
            + [(lon, lat + size * (1 - t)) for t in steps] + [(lon, lat)])
    return "POLYGON((" + ", ".join(f"{x:.7f} {y:.7f}" for x, y in ring) + "))"


@pytest.mark.stack
@pytest.mark.slow
def test_a_thousand_tiles_are_drawn_simplified(stack, tmp_path):
    """1,000 answered tiles with 400-vertex footprints: the page draws all 1,000, each ring
    sent with at most MAX_VERTICES vertices (+ its closing one), and stays usable (it pans
    and opens a popup); the seconds are printed, not asserted (the machine is shared)."""
    import datetime as dt

    from playwright.sync_api import sync_playwright

    from pipeline.map.data import MAX_VERTICES
    from tests.streams import empty_dataset, map_server

    name = empty_dataset(stack, "map1k")
    now = dt.datetime.now(dt.UTC).isoformat()
    rows = [{"row_id": f"r{i}", "tile_id": f"t{i:04d}", "tile_generation": "1",
             "complete": True, "chips_total": 0, "chips_scored": 0, "chips_skipped": 0,
             "chips_failed": 0, "width": 100, "height": 100, "crs": "EPSG:4326",
             "footprint": _dense_square(-35 + (i % 40) * 0.1, -8 + (i // 40) * 0.1, 0.09, 100),
             "classes": [], "raster_uri": f"{stack.output_prefix}/{name}/t{i}.tif",
             "event_time": now, "published": now, "source": "gcs", "model_name": "m",
             "model_version": "1", "completed_at": now, "latency_s": 1.0, "drifted": False}
            for i in range(1000)]
    bq = stack.bigquery()
    for start in range(0, len(rows), 250):
        assert not bq.insert_rows_json(f"{stack.project}.{name}.tiles", rows[start:start + 250])
    with map_server(stack, name, f"{stack.output_prefix}/{name}", tmp_path / "map.log") as base:
        started = time.monotonic()
        status, body = _get(base + "api/tiles")
        api_s = time.monotonic() - started
        assert status == 200
        collection = json.loads(body)
        assert len(collection["features"]) == 1000
        assert max(len(ring) for f in collection["features"]
                   for ring in f["geometry"]["coordinates"]) <= MAX_VERTICES + 1
        with sync_playwright() as p:
            browser = _launch_chromium(p)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.route("**/cog/tiles/**", lambda route: route.abort())  # footprints only
            started = time.monotonic()
            page.goto(base)
            page.wait_for_function(
                "document.querySelectorAll('path.footprint').length === 1000", timeout=120_000)
            draw_s = time.monotonic() - started
            started = time.monotonic()
            page.mouse.move(640, 400)
            page.mouse.down()
            page.mouse.move(500, 300, steps=10)
            page.mouse.up()
            page.locator("path.footprint").first.click(force=True)
            page.locator(".leaflet-popup-content").wait_for(timeout=30_000)
            interact_s = time.monotonic() - started
            browser.close()
    print(f"1,000 tiles: /api/tiles {api_s:.2f} s ({len(body) / 1e6:.2f} MB), drawn "
          f"{draw_s:.2f} s after load, pan + popup {interact_s:.2f} s")


def _change_row(**given) -> dict:
    """A ``changes`` row with every required column of the stream's schema filled."""
    from transforms.bq_schemas import CHANGE_SCHEMA

    sample = {"STRING": "x", "FLOAT64": 0.0, "TIMESTAMP": "2026-01-01T00:00:00Z",
              "INT64": 0, "BOOL": False}
    row = {f["name"]: sample[f["type"]] for f in CHANGE_SCHEMA["fields"]
           if f.get("mode") == "REQUIRED" and f["type"] in sample}
    return {**row, "role": "live", **given}
