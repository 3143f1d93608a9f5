"""Quicklook PNG: the input beside the prediction, with a title and the card's legend.

A picture a user reads without the code: which tile, which model, when acquired, whether the
model flagged the tile as unlike its training data, and what each colour of the class map means.
The input is shown in natural colour where the card has red, green and blue, so that vegetation
is green and water blue on both panels (a NIR false colour would paint vegetation red, the class
colour of *developed*); a card without them gets a labelled false colour.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.card import ModelCard
from model.training.render import colourise, stretch

MAX_SIDE = 1024
NATURAL_COLOUR = ("red", "green", "blue")
FALSE_COLOUR = ("nir", "red", "green")  # vegetation red, water dark, urban cyan-grey


@dataclass(frozen=True)
class TileFacts:
    """What the title says about the tile: from its ``tiles`` row."""

    tile_id: str
    acquired: dt.datetime | None = None
    drifted: bool | None = None  # None: the row carries no verdict
    drift_max_band_psi: float | None = None


def _read(path: str, indexes: Sequence[int], max_side: int):
    import rasterio
    from rasterio.enums import Resampling

    with rasterio.open(path) as src:
        scale = min(1.0, max_side / max(src.width, src.height))
        shape = (len(indexes), max(1, round(src.height * scale)), max(1, round(src.width * scale)))
        data = src.read(list(indexes), out_shape=shape, resampling=Resampling.nearest)
        nodata = src.nodata
    return data, nodata


def _composite(card: ModelCard) -> tuple[tuple[str, str, str], str]:
    """The three card bands the input panel shows, and how to read them."""
    if all(b in card.input.bands for b in NATURAL_COLOUR):
        return NATURAL_COLOUR, "input, natural colour (red, green, blue)"
    if all(b in card.input.bands for b in FALSE_COLOUR):
        return FALSE_COLOUR, "input, false colour (NIR, red, green): vegetation red"
    first = tuple(card.input.bands[:3])
    return first, f"input, bands {', '.join(first)} as red, green, blue"  # type: ignore[return-value]


def title(card: ModelCard, facts: TileFacts) -> str:
    """``tile · model · acquired · drift verdict``: the figure's title."""
    when = (f"acquired {facts.acquired:%Y-%m-%d %H:%M} UTC" if facts.acquired
            else "acquisition time unknown")
    psi = (f"max band PSI {facts.drift_max_band_psi:.2f}"
           if facts.drift_max_band_psi is not None else "")
    if facts.drifted is None:
        verdict = "drift not assessed"
    elif facts.drifted:
        verdict = f"DRIFTED: unlike the training data ({psi}); queries leave it out by default"
    else:
        verdict = f"no drift ({psi})" if psi else "no drift"
    return f"{facts.tile_id} · {card.model_id} · {when}\n{verdict}"


def figure(input_uri: str, prediction_uri: str, card: ModelCard, facts: TileFacts,
           max_side: int = MAX_SIDE) -> Any:
    """The matplotlib figure: input | prediction, a title, and the card's classes as legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import rasterio
    from matplotlib.patches import Patch

    with rasterio.open(input_uri) as src:
        positions = card.band_indices(src.descriptions)
    bands, caption = _composite(card)
    picked = [positions[card.input.bands.index(b)] + 1 for b in bands]
    image, nodata = _read(input_uri, picked, max_side)
    valid = np.ones(image.shape[1:], bool) if nodata is None else (image != nodata).all(axis=0)
    classes, _ = _read(prediction_uri, [1], max_side)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.6), dpi=90)
    axes[0].imshow(np.moveaxis(stretch(image, valid), 0, -1))
    axes[0].set_title(caption, fontsize=9)
    axes[1].imshow(np.moveaxis(colourise(classes[0], card.classes), 0, -1),
                   interpolation="nearest")
    axes[1].set_title("prediction, class colours of the model card", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    axes[1].legend(handles=[Patch(facecolor=c.colour, edgecolor="black", linewidth=0.4,
                                  label=c.name) for c in card.classes],
                   loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9, frameon=False)
    fig.suptitle(title(card, facts), fontsize=10)
    fig.tight_layout()
    return fig


def write_quicklook(input_uri: str, prediction_uri: str, card: ModelCard, png_path: str,
                    facts: TileFacts, max_side: int = MAX_SIDE) -> str:
    """Write the quicklook PNG; returns its path."""
    import matplotlib.pyplot as plt

    fig = figure(input_uri, prediction_uri, card, facts, max_side)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
