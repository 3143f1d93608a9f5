"""The radiometry guards judge a tile's values before it is scored: outside the model's range
(refused), a distribution nothing like the training data's (refused, naming the likely cause
and the fix), a moderate drift (scored, and flagged on its tile row).

The cases are the ones the card's threshold was chosen from (its ``refuse_evidence``): the
sample tile as 0-1 reflectance, as reflectance x 10,000, 60 DN brighter; the North Carolina
training granule in DN, and the sample tile itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio

from model.card import load_card
from model.drift import REFUSE_MEDIAN_BAND_PSI, reference_from_card
from pipeline.ops.check import SAMPLE_TILE
from pipeline.options import DEFAULT_MODEL_URI
from transforms.assemble import drift_columns
from transforms.chips import ChipSettings, ChipTileFn, chips_in
from transforms.records import TileManifest, TileRef


@pytest.fixture(scope="module")
def card():
    return load_card(DEFAULT_MODEL_URI)


def rewritten(out: Path, convert, dtype: str) -> Path:
    with rasterio.open(SAMPLE_TILE) as src:
        data, profile = src.read(), src.profile
    valid = (data != 0).all(axis=0)
    values = np.where(valid, convert(data.astype(np.float64)), 0).astype(dtype)
    with rasterio.open(out, "w", **(profile | {"dtype": dtype, "nodata": 0})) as dst:
        dst.write(values)
    return out


def chip(card, *paths: Path, tile_id: str = "t"):
    """The stream's planner and chipper on a tile: (dead-letter reasons, manifest, chips)."""
    fn = ChipTileFn(ChipSettings.from_card(card, min_valid_fraction=0.05))
    fn.setup()
    out = list(fn.process(TileRef(tile_id, tuple(str(p) for p in paths), "1", 0.0, 0.0)))
    letters = [o.value.reason for o in out if getattr(o, "tag", "") == "dead_letters"]
    manifests = [o.value for o in out if isinstance(getattr(o, "value", None), TileManifest)]
    return letters, (manifests[0] if manifests else None), list(chips_in(out))


def flagged(card, manifest) -> dict:
    """The tile row's drift columns, with predictions shared as on the training pixels (so
    only the bands can flag it)."""
    shares = np.asarray(reference_from_card(card).classes)
    return drift_columns(card, card, manifest, np.round(shares * 1_000_000).astype(np.int64))


def test_the_card_keeps_its_threshold_and_the_evidence_for_it(card):
    reference = reference_from_card(card)
    assert reference.refuse_median_band_psi == REFUSE_MEDIAN_BAND_PSI
    evidence = reference.refuse_evidence["median_band_psi"]
    assert evidence["training scene"] < 0.05 < evidence["sample tile (Olinda)"] < 1.0
    assert evidence["sample +20 DN"] < REFUSE_MEDIAN_BAND_PSI < evidence["sample +40 DN"]
    assert set(reference.refuse_evidence["refused"]) == {
        "sample +40 DN", "sample +60 DN", "sample as reflectance 0-1"}


def test_reflectance_0_to_1_is_refused_with_the_scale_that_fixes_it(card, tmp_path):
    path = rewritten(tmp_path / "reflectance.tif", lambda d: d / 255.0, "float32")
    [reason], manifest, chips = chip(card, path)
    assert manifest is None and chips == []
    assert "values unlike the model's training data" in reason
    assert "reflectance 0-1 for a digital-number model" in reason
    assert "--input_scale 255" in reason


def test_the_same_tile_with_its_scale_declared_scores(card, tmp_path):
    import dataclasses

    path = rewritten(tmp_path / "reflectance.tif", lambda d: d / 255.0, "float32")
    fn = ChipTileFn(ChipSettings.from_card(card, min_valid_fraction=0.05))
    fn.setup()
    tile = TileRef("t", (str(path),), "1", 0.0, 0.0, attributes=(("input_scale", "255"),))
    out = list(fn.process(dataclasses.replace(tile)))
    assert not [o for o in out if getattr(o, "tag", "") == "dead_letters"]
    assert list(chips_in(out))


def test_reflectance_x_10000_is_refused_by_the_range_guard(card, tmp_path):
    path = rewritten(tmp_path / "x10000.tif", lambda d: d / 255.0 * 10_000, "uint16")
    [reason], manifest, _ = chip(card, path)
    assert manifest is None and "valid input range" in reason


def test_a_tile_60_dn_brighter_is_refused_naming_the_shift(card, tmp_path):
    path = rewritten(tmp_path / "bright.tif", lambda d: np.clip(d + 60, 1, 255), "uint8")
    [reason], manifest, _ = chip(card, path)
    assert manifest is None
    assert "median band PSI" in reason and "another sensor calibration" in reason


def test_the_north_carolina_granule_in_dn_scores_and_is_not_drifted(card, tmp_path):
    from model.training import data

    directory = data.fetch_dataset()
    letters, manifest, chips = chip(card, *(directory / f for f in data.BAND_FILES))
    assert letters == [] and chips
    assert flagged(card, manifest)["drifted"] is False


def test_the_sample_tile_scores_and_is_flagged_out_of_distribution(card):
    letters, manifest, chips = chip(card, SAMPLE_TILE)
    assert letters == [] and len(chips) == 49
    columns = flagged(card, manifest)
    assert columns["drifted"] is True and columns["drift_max_band_psi"] < REFUSE_MEDIAN_BAND_PSI


def test_docs_give_the_cards_threshold_and_evidence(card):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "model.md").read_text()
    section = text[text.index("## The radiometry guard"):]
    reference = reference_from_card(card)
    assert f"**{reference.refuse_median_band_psi}**" in section
    for value in reference.refuse_evidence["median_band_psi"].values():
        assert f"| {value:.3f} |" in section, value
