"""Prediction rasters on storage: where a tile's COG goes, its strips written as pieces beside
it, and the pieces stitched into one Cloud Optimized GeoTIFF.

Every path is built from checked segments (no id can climb out of the output prefix) and is a
function of the tile version and model: writing a piece or the COG twice (a retried bundle, a
replayed message) leaves the same object, and :func:`stitch` of a tile whose pieces are already
gone but whose COG is written is a no-op, so a retry after the pieces were removed is safe.
The raster has exactly the input's CRS, transform and size: a uint8 class map with the card's
colour table and nodata 255, optionally a second band with confidence in percent.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from xml.sax.saxutils import escape

import numpy as np

from model.card import ModelCard, join_uri
from transforms.geometry import strip_bounds
from transforms.guards import safe_id
from transforms.records import NODATA_CLASS, TileManifest

LOG = logging.getLogger(__name__)


def raster_uri(output_prefix: str, card: ModelCard, manifest: TileManifest) -> str:
    """Where a tile version's COG goes; every segment is checked, so no id can climb out."""
    tile = manifest.tile
    segments = [safe_id(card.name, "model name"), safe_id(card.version, "model version"),
                safe_id(tile.tile_id, "tile_id"), safe_id(tile.generation, "generation")]
    return join_uri(output_prefix, "predictions/{}/{}/{}/{}.tif".format(*segments))


def scratch_dir() -> str:
    """This process's scratch folder for assembly; folders of dead processes are removed.

    A stream stopped mid-write (SIGKILL, preemption) leaves its half-written strips behind; the
    next assembler on the machine sweeps them, so scratch never accumulates.
    """
    root = os.path.join(tempfile.gettempdir(), "tilestream-assemble")
    os.makedirs(root, exist_ok=True)
    for name in os.listdir(root):
        pid = int(name) if name.isdigit() else None
        if pid is not None and pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    mine = os.path.join(root, str(os.getpid()))
    os.makedirs(mine, exist_ok=True)
    return mine


def piece_uri(raster: str, strip: int) -> str:
    """Where strip ``strip`` of a tile's COG waits to be stitched (deleted once it is)."""
    return raster[: -len(".tif")] + f".strips/{strip:05d}.tif"


def write_piece(manifest: TileManifest, strip: int, classes: np.ndarray,
                confidence: np.ndarray | None, uri: str, scratch: str | None) -> None:
    """One blended output strip as a small tiled GeoTIFF at ``uri`` (its piece of the COG)."""
    import rasterio
    from affine import Affine

    start, stop = strip_bounds(manifest.height, manifest.width, manifest.chip_size,
                               manifest.stride)[strip]
    transform = Affine(*manifest.transform) * Affine.translation(0, start)
    path = os.path.join(scratch or tempfile.gettempdir(),
                        f"piece-{os.getpid()}-{strip}-{time.monotonic_ns()}.tif")
    try:
        with rasterio.open(path, "w", driver="GTiff", width=manifest.width, height=stop - start,
                           count=1 if confidence is None else 2, dtype="uint8",
                           nodata=NODATA_CLASS, crs=rasterio.crs.CRS.from_wkt(manifest.crs_wkt),
                           transform=transform, tiled=True, blockxsize=256, blockysize=256,
                           compress="DEFLATE") as dst:
            dst.write(classes, 1)
            if confidence is not None:
                dst.write(confidence, 2)
        upload(path, uri)
    finally:
        if os.path.exists(path):
            os.remove(path)


def upload(path: str, uri: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    with open(path, "rb") as src, FileSystems.create(uri, mime_type="image/tiff") as out:
        while block := src.read(8 << 20):
            out.write(block)


def stitch(manifest: TileManifest, card: ModelCard, uri: str, written: list[int],
           confidence_band: bool, scratch: str | None) -> None:
    """The written strip pieces -> one COG at ``uri``, through a VRT (windowed reads only).

    Pieces are fetched whole first (one sequential read each): GDAL's block-by-block range
    requests against object storage were most of the stitching time on big tiles. Run again
    after its pieces were removed (a retried bundle), it finds the COG written and does nothing.
    """
    import rasterio.shutil
    from apache_beam.io.filesystems import FileSystems

    pieces = [piece_uri(uri, j) for j in written]
    if pieces and not all(FileSystems.exists(p) for p in pieces) and FileSystems.exists(uri):
        return  # a retry after the pieces were removed: they are removed only once it is written
    bounds = strip_bounds(manifest.height, manifest.width, manifest.chip_size,
                          manifest.stride)
    count = 2 if confidence_band else 1
    with tempfile.TemporaryDirectory(prefix="tile-", dir=scratch) as tmp:
        local = {}
        for j in written:
            local[j] = os.path.join(tmp, f"strip-{j:05d}.tif")
            with FileSystems.open(piece_uri(uri, j)) as src, open(local[j], "wb") as out:
                shutil.copyfileobj(src, out, 8 << 20)
        bands = []
        for band in range(1, count + 1):
            sources = "".join(
                f"<SimpleSource><SourceFilename relativeToVRT=\"0\">"
                f"{escape(local[j])}</SourceFilename>"
                f"<SourceBand>{band}</SourceBand>"
                f"<SrcRect xOff=\"0\" yOff=\"0\" xSize=\"{manifest.width}\" "
                f"ySize=\"{bounds[j][1] - bounds[j][0]}\"/>"
                f"<DstRect xOff=\"0\" yOff=\"{bounds[j][0]}\" xSize=\"{manifest.width}\" "
                f"ySize=\"{bounds[j][1] - bounds[j][0]}\"/></SimpleSource>" for j in written)
            extra = ("<ColorInterp>Palette</ColorInterp><ColorTable>"
                     + "".join(f'<Entry c1="{c.rgb[0]}" c2="{c.rgb[1]}" c3="{c.rgb[2]}" c4="255"/>'
                               for c in card.classes) + "</ColorTable>") if band == 1 else ""
            name = "class" if band == 1 else "confidence_percent"
            bands.append(f'<VRTRasterBand dataType="Byte" band="{band}">'
                         f"<Description>{name}</Description>"
                         f"<NoDataValue>{NODATA_CLASS}</NoDataValue>{extra}{sources}"
                         "</VRTRasterBand>")
        tags = {"model": card.model_id, "tile_id": manifest.tile.tile_id,
                "classes": ",".join(c.name for c in card.classes)}
        vrt = (f'<VRTDataset rasterXSize="{manifest.width}" rasterYSize="{manifest.height}">'
               f"<SRS>{escape(manifest.crs_wkt)}</SRS>"
               f"<GeoTransform>{', '.join(repr(v) for v in _gdal_transform(manifest.transform))}"
               "</GeoTransform><Metadata>"
               + "".join(f'<MDI key="{k}">{escape(v)}</MDI>' for k, v in tags.items())
               + "</Metadata>" + "".join(bands) + "</VRTDataset>")
        vrt_path, cog_path = os.path.join(tmp, "tile.vrt"), os.path.join(tmp, "tile.tif")
        with open(vrt_path, "w") as out:
            out.write(vrt)
        rasterio.shutil.copy(vrt_path, cog_path, driver="COG", compress="DEFLATE",
                             overview_resampling="nearest")
        upload(cog_path, uri)


def _gdal_transform(affine: tuple[float, ...]) -> tuple[float, ...]:
    a, b, c, d, e, f = affine[:6]
    return (c, a, b, f, d, e)


def remove_pieces(uri: str, strips: Iterable[int]) -> None:
    from apache_beam.io.filesystems import FileSystems

    try:
        FileSystems.delete([piece_uri(uri, j) for j in strips])
    except Exception as exc:  # leftovers cost storage, not correctness
        logging.getLogger(__name__).warning("could not delete strip pieces of %s: %s", uri, exc)
