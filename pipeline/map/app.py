"""The map's web app: the page, its data (``/api/tiles``, ``/api/legend``) and TiTiler's COG
endpoints under ``/cog`` (only COGs under the output prefix, in the model card's class colours).

Everything the page loads is served here (Leaflet is vendored, ``make vendor``): nothing comes
from the internet unless ``--basemap`` names a tile URL.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from titiler.core.errors import DEFAULT_STATUS_CODES, add_exception_handlers
from titiler.core.factory import TilerFactory

from model.card import ModelCard
from pipeline.map import data
from pipeline.map.allow import CogAllowList
from transforms.guards import Refused

STATIC = Path(__file__).resolve().parent / "static"
VENDOR = STATIC / "vendor" / "leaflet"
NODATA_CLASS = 255  # transforms.assemble writes it where no chip answered: transparent


class VendorMissing(RuntimeError):
    """The web map library is not vendored into the package (``make vendor``)."""


@dataclass(frozen=True)
class MapConfig:
    """What one map serves: the stream's dataset and output prefix, its window and legend."""

    dataset: str  # project.dataset
    output_prefix: str  # gs://bucket/prefix, the only place COGs are read from
    card: ModelCard  # classes, colours and names of the legend and the map tiles
    hours: float = 24.0
    basemap: str | None = None  # an XYZ tile URL template, e.g. where the network allows one
    poll_s: float = 5.0


def colormap(card: ModelCard) -> dict[int, tuple[int, int, int, int]]:
    """Class id -> RGBA of the card; every other value (nodata) transparent."""
    return {c.id: (*c.rgb, 255) for c in card.classes} | {NODATA_CLASS: (0, 0, 0, 0)}


def create_app(config: MapConfig, bigquery: Callable[[], Any],
               gdal_env: dict[str, str] | None = None) -> FastAPI:
    """The app; ``bigquery()`` gives a client (of the stack or of GCP), ``gdal_env`` the GDAL
    settings that reach the rasters (the emulator's endpoint locally, none on GCP)."""
    if not (VENDOR / "leaflet.js").is_file():
        raise VendorMissing(f"{VENDOR} has no leaflet.js: run `make vendor` (npm pack of the "
                            "pinned Leaflet) before serving the map")
    allow = CogAllowList(config.output_prefix)
    cmap = colormap(config.card)
    env = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif",
           "GDAL_HTTP_MAX_RETRY": "2", "GDAL_HTTP_TIMEOUT": "20", **(gdal_env or {})}

    def allowed_cog(url: str = Query(description="gs:// URI of a prediction COG under the "
                                     "stream's output prefix")) -> str:
        try:
            return allow.check(url)
        except Refused as exc:
            raise HTTPException(status_code=403, detail=str(exc)) from exc

    cog = TilerFactory(path_dependency=allowed_cog, colormap_dependency=lambda: cmap,
                       environment_dependency=lambda: env, router_prefix="/cog",
                       add_viewer=False, add_ogc_maps=False)
    app = FastAPI(title="TileStream map", docs_url=None, redoc_url=None, openapi_url=None)
    app.include_router(cog.router, prefix="/cog", tags=["prediction COGs"])
    add_exception_handlers(app, DEFAULT_STATUS_CODES)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        settings = {"poll_ms": int(config.poll_s * 1000), "basemap": config.basemap,
                    "hours": config.hours, "tile_template": "cog/tiles/WebMercatorQuad/{z}/{x}/"
                    "{y}.png?bidx=1&url="}
        return (STATIC / "index.html").read_text().replace(
            "{{SETTINGS}}", json.dumps(settings).replace("</", "<\\/"))

    @app.get("/api/legend")
    def legend() -> dict:
        return {"model": config.card.model_id,
                "classes": [{"id": c.id, "name": c.name, "colour": c.colour}
                            for c in config.card.classes]}

    # One BigQuery read per poll period, whoever asks: every open page polls, and each read
    # scans the window's rows (chip rows included, for "whole").
    latest: dict[str, Any] = {"at": float("-inf"), "body": None}
    reading = threading.Lock()

    @app.get("/api/tiles")
    def tiles() -> JSONResponse:
        with reading:
            if time.monotonic() - latest["at"] >= config.poll_s:
                found = data.recent_tiles(bigquery(), config.dataset, config.hours)
                latest.update(at=time.monotonic(), body=data.feature_collection(found))
            body = latest["body"]
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    return app
