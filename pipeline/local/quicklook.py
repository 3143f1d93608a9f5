"""Quicklook PNG: a false-colour view of the input beside the coloured prediction."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from model.card import ModelCard
from model.training.render import colourise, stretch

MAX_SIDE = 1024
FALSE_COLOUR = ("nir", "red", "green")  # vegetation red, water dark, urban cyan-grey


def _read(path: str, indexes: Sequence[int], max_side: int):
    import rasterio
    from rasterio.enums import Resampling

    with rasterio.open(path) as src:
        scale = min(1.0, max_side / max(src.width, src.height))
        shape = (len(indexes), max(1, round(src.height * scale)), max(1, round(src.width * scale)))
        data = src.read(list(indexes), out_shape=shape, resampling=Resampling.nearest)
        nodata = src.nodata
    return data, nodata


def write_quicklook(input_uri: str, prediction_uri: str, card: ModelCard, png_path: str,
                    max_side: int = MAX_SIDE) -> str:
    """Write ``[false-colour input | gap | prediction]`` as an RGB PNG; returns its path."""
    import rasterio

    with rasterio.open(input_uri) as src:
        positions = card.band_indices(src.descriptions)
    wanted = [card.input.bands.index(b) for b in FALSE_COLOUR if b in card.input.bands]
    picked = [positions[i] + 1 for i in (wanted if len(wanted) == 3 else [0, 1, 2])]
    image, nodata = _read(input_uri, picked, max_side)
    valid = np.ones(image.shape[1:], bool) if nodata is None else (image != nodata).all(axis=0)
    left = stretch(image, valid)
    classes, _ = _read(prediction_uri, [1], max_side)
    right = colourise(classes[0], card.classes)
    height = max(left.shape[1], right.shape[1])
    gap = 8
    canvas = np.full((3, height, left.shape[2] + gap + right.shape[2]), 255, np.uint8)
    canvas[:, : left.shape[1], : left.shape[2]] = left
    canvas[:, : right.shape[1], left.shape[2] + gap :] = right
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(png_path, "w", driver="PNG", width=canvas.shape[2],
                           height=canvas.shape[1], count=3, dtype="uint8") as dst:
            dst.write(canvas)
    return png_path
