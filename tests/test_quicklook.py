"""The demo's quicklook: a picture a user can read without the code."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import rasterio
from PIL import Image

from model.card import load_card
from pipeline.local.quicklook import TileFacts, figure, write_quicklook
from pipeline.ops.check import SAMPLE_TILE


@pytest.fixture()
def prediction(tmp_path, model_uri):
    """A class map of the sample tile's shape with every class of the card in it."""
    card = load_card(model_uri)
    with rasterio.open(SAMPLE_TILE) as src:
        profile = {"driver": "GTiff", "width": src.width, "height": src.height, "count": 1,
                   "dtype": "uint8", "crs": src.crs, "transform": src.transform}
    classes = np.arange(profile["width"] * profile["height"]) % len(card.classes)
    path = tmp_path / "prediction.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(classes.reshape(1, profile["height"], profile["width"]).astype(np.uint8))
    return card, str(path)


def test_title_and_legend_name_the_tile_the_model_and_every_class(prediction):
    card, path = prediction
    when = dt.datetime(2001, 7, 15, 12, 30, tzinfo=dt.UTC)
    fig = figure(str(SAMPLE_TILE), path, card, TileFacts("L7_ETMs", when, True, 0.71))
    title = fig._suptitle.get_text()
    assert "L7_ETMs" in title and card.model_id in title and "2001-07-15 12:30" in title
    assert "DRIFTED" in title and "0.71" in title
    [legend] = [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert [t.get_text() for t in legend.get_texts()] == [c.name for c in card.classes]
    panels = [ax.get_title() for ax in fig.axes]
    assert any("natural colour" in t for t in panels) and any("class colours" in t for t in panels)

    unknown = figure(str(SAMPLE_TILE), path, card, TileFacts("t1", None, False, 0.1))
    assert "acquisition time unknown" in unknown._suptitle.get_text()
    assert "no drift" in unknown._suptitle.get_text()


def test_the_png_shows_each_class_colour_in_its_legend(prediction, tmp_path):
    card, path = prediction
    png = write_quicklook(str(SAMPLE_TILE), path, card, str(tmp_path / "q.png"),
                          TileFacts("L7_ETMs"))
    rgb = np.asarray(Image.open(png).convert("RGB"))
    legend_area = rgb[:, int(rgb.shape[1] * 0.85):]  # right of the class map
    for c in card.classes:
        assert (legend_area == c.rgb).all(axis=-1).sum() >= 20, c.name
