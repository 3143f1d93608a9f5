"""Per-tile drift against the card's training distribution, on real Landsat tiles."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.warp import Resampling, calculate_default_transform, reproject

from model.card import CardError, load_card
from model.drift import (
    PSI_THRESHOLD,
    band_counts,
    psi,
    reference_from_card,
    reference_from_pixels,
    tile_drift,
)
from model.inference import normalise, predict_logits, valid_mask
from pipeline.ops.check import SAMPLE_TILE

ROOT = Path(__file__).resolve().parents[1]
STUDENT = ROOT / "model" / "artifacts" / "landcover-student" / "v1"


@pytest.fixture(scope="module")
def card():
    return load_card(str(STUDENT))  # verifies the weights' sha256 against the card


@pytest.fixture(scope="module")
def student(card):
    return torch.jit.load(card.weights_uri, map_location="cpu").eval()


def scored(path: Path, card, student) -> tuple[np.ndarray, np.ndarray]:
    """(valid pixel values (C, N), predicted class per valid pixel), as the stream sees them."""
    with rasterio.open(path) as src:
        raw = src.read([i + 1 for i in card.band_indices(list(src.descriptions))])
        raw = raw.astype(np.float64)
        ok = valid_mask(raw, card.input.nodata)
        if src.nodata is not None:
            ok &= (raw != src.nodata).all(axis=0)
    logits = predict_logits(student, normalise(raw, ok, card.input), card.input.chip_size,
                            card.input.stride)
    return raw[:, ok], logits.argmax(axis=0)[ok]


def drift_of(path: Path, reference, card, student):
    values, predicted = scored(path, card, student)
    return tile_drift(reference, band_counts(reference, values),
                      np.bincount(predicted, minlength=card.num_classes))


def shifted(out: Path, gain: float, offset: float) -> Path:
    """The Olinda tile with a radiometric gain/offset on every band (fill value 0 kept)."""
    with rasterio.open(SAMPLE_TILE) as src:
        profile, data = src.profile, src.read().astype(np.float64)
    out_data = np.where(data == 0, 0, np.clip(data * gain + offset, 1, 255))
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(out_data.astype(profile["dtype"]))
    return out


def reprojected_bilinear(out: Path, crs: str) -> Path:
    """Olinda warped to another CRS with bilinear resampling: new grid, new pixel values."""
    with rasterio.open(SAMPLE_TILE) as src:
        transform, width, height = calculate_default_transform(src.crs, crs, src.width,
                                                               src.height, *src.bounds)
        profile = src.profile | {"crs": crs, "transform": transform, "width": width,
                                 "height": height, "nodata": 0}
        with rasterio.open(out, "w", **profile) as dst:
            for band in range(1, src.count + 1):
                reproject(rasterio.band(src, band), rasterio.band(dst, band),
                          resampling=Resampling.bilinear, dst_nodata=0)
    return out


def test_psi_is_the_stated_formula():
    assert psi([0.5, 0.5], [50, 50]) == 0.0
    expected = (0.8 - 0.5) * math.log(0.8 / 0.5) + (0.2 - 0.5) * math.log(0.2 / 0.5)
    assert psi([0.5, 0.5], [80, 20]) == pytest.approx(expected)
    assert psi([0.5, 0.5], [100, 0]) == pytest.approx(
        (1 - 0.5) * math.log(1 / 0.5) + (1e-4 - 0.5) * math.log(1e-4 / 0.5))  # floored, finite
    assert math.isnan(psi([0.5, 0.5], [0, 0]))


def test_shipped_card_carries_the_training_distribution(card):
    reference = reference_from_card(card)
    assert [b.name for b in reference.bands] == list(card.input.bands)
    assert reference.pixels == card.training_data["split"]["pixels"]["train"]
    for band in reference.bands:
        assert len(band.fractions) == len(band.edges) + 1 == 10
        assert sum(band.fractions) == pytest.approx(1, abs=1e-4)
        assert all(0.04 < f < 0.16 for f in band.fractions)  # deciles of DN with ties
    labels = dict(zip([c.name for c in card.classes], reference.labels, strict=True))
    train_counts = card.training_data["split"]["class_counts"]["train"]
    for name, share in labels.items():
        assert share == pytest.approx(train_counts[name] / reference.pixels, abs=1e-5)
    assert max(range(7), key=reference.classes.__getitem__) == 4  # forest, as in the labels


def test_training_like_pixels_are_not_flagged_against_the_card(card):
    """Pixels drawn from the card's own band bins and class shares: PSI near 0, no flag."""
    reference = reference_from_card(card)
    rng = np.random.default_rng(0)
    counts = [rng.multinomial(50_000, b.fractions) for b in reference.bands]
    classes = rng.multinomial(50_000, reference.classes)
    drift = tile_drift(reference, counts, classes)
    assert not drift.drifted and drift.max_band_psi < 0.01


def test_a_tile_from_another_region_is_flagged_against_the_card(card, student):
    """Olinda (Brazil) against the North Carolina training scene: bands and classes drift."""
    drift = drift_of(SAMPLE_TILE, reference_from_card(card), card, student)
    assert drift.drifted
    assert "swir2" in drift.drifted_bands and drift.class_psi > PSI_THRESHOLD
    assert drift.pixels == 122_848  # valid pixels of the 349 x 352 tile


@pytest.fixture(scope="module")
def olinda_reference(card, student):
    """A reference built by the card's own function from the Olinda tile."""
    values, predicted = scored(SAMPLE_TILE, card, student)
    return reference_from_pixels(values, card.input.bands, predicted, card.num_classes)


@pytest.mark.parametrize("crs", ["EPSG:4326", "EPSG:3857"])
def test_the_same_scene_reprojected_is_not_flagged(tmp_path, card, student, olinda_reference,
                                                  crs):
    drift = drift_of(reprojected_bilinear(tmp_path / "warped.tif", crs), olinda_reference,
                     card, student)
    assert not drift.drifted, drift.to_dict()
    assert drift.max_band_psi < 0.1 and drift.class_psi < 0.1


@pytest.mark.parametrize(("gain", "offset"), [(1.0, 10.0), (1.2, 0.0), (0.8, 0.0)])
def test_a_radiometric_shift_is_flagged(tmp_path, card, student, olinda_reference, gain,
                                        offset):
    drift = drift_of(shifted(tmp_path / "shifted.tif", gain, offset), olinda_reference, card,
                     student)
    assert drift.drifted
    assert len(drift.drifted_bands) >= 3, drift.to_dict()


def test_band_counts_add_up_over_strips(card):
    """The chipper can accumulate counts strip by strip: no second read of the tile."""
    reference = reference_from_card(card)
    with rasterio.open(SAMPLE_TILE) as src:
        raw = src.read().astype(np.float64)
    whole = band_counts(reference, raw.reshape(6, -1))
    strips = [band_counts(reference, raw[:, r : r + 48].reshape(6, -1)) for r in range(0, 352,
                                                                                       48)]
    for band, counts in enumerate(whole):
        assert (sum(s[band] for s in strips) == counts).all()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r["bands"].pop("blue"), "one entry per card band"),
    (lambda r: r["bands"]["red"].update(edges=[3, 2, 1]), "strictly ascending"),
    (lambda r: r["bands"]["red"].update(fractions=[0.5] * 10), "sum to"),
    (lambda r: r["classes"].update(fractions=[1.0]), "expected 7 shares"),
])
def test_malformed_references_are_refused(card, edit, message):
    from dataclasses import replace

    data = json.loads(json.dumps(card.drift_reference))
    edit(data)
    with pytest.raises(CardError, match=message):
        reference_from_card(replace(card, drift_reference=data))


def test_cli_reports_psi_of_a_raster(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeline.ops.cli", "model", "drift",
                           str(SAMPLE_TILE)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["drifted"] is True and report["threshold"] == PSI_THRESHOLD
    assert set(report["band_psi"]) == {"blue", "green", "red", "nir", "swir1", "swir2"}


@pytest.mark.parametrize(("gain", "flagged"), [(1.0, False), (1.2, True)])
def test_the_chipper_counts_drift_while_reading_and_the_tile_row_flags_it(
        tmp_path, card, student, olinda_reference, gain, flagged):
    """The stream's own path: counts summed over strips (overlaps once) -> tile row columns."""
    import dataclasses

    from transforms.assemble import drift_columns
    from transforms.chips import ChipSettings, ChipTileFn
    from transforms.records import TileManifest, TileRef

    path = shifted(tmp_path / "tile.tif", gain, 0.0) if gain != 1.0 else SAMPLE_TILE
    reference_card = dataclasses.replace(card, drift_reference=olinda_reference.to_dict())
    fn = ChipTileFn(ChipSettings.from_card(reference_card))
    fn.setup()
    [manifest] = [o.value for o in fn.process(TileRef("t", (str(path),), "1", 0.0, 0.0))
                  if isinstance(getattr(o, "value", None), TileManifest)]
    values, predicted = scored(path, card, student)
    whole = band_counts(olinda_reference, values)  # one read of the whole raster
    assert [list(c) for c in manifest.band_counts] == [list(c) for c in whole]
    columns = drift_columns(reference_card, reference_card, manifest,
                            np.bincount(predicted, minlength=card.num_classes))
    assert columns["drifted"] is flagged, columns
    assert [b["band"] for b in columns["drift_band_psi"]] == list(card.input.bands)
    assert (columns["drift_max_band_psi"] > PSI_THRESHOLD) is flagged


@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16"])
def test_integer_rasters_are_binned_per_value_with_the_same_counts(card, dtype):
    """The chipper bins 8/16-bit strips by distinct value (a fast path): every scaling and
    nodata mask must give exactly the counts of binning each pixel."""
    from transforms.radiometry import strip_band_counts

    reference = reference_from_card(card)
    rng = np.random.default_rng(7)
    low = -2000 if dtype == "int16" else 0
    high = 256 if dtype == "uint8" else 4000
    strip = rng.integers(low, high, (len(card.input.bands), 40, 90)).astype(dtype)
    invalid = rng.random((40, 90)) < 0.1
    for scale, offset in ((1.0, 0.0), (0.0001, 0.0), (2.5, -7.0)):
        fast = strip_band_counts(reference, strip, invalid, card, scale, offset)
        values = strip[:, ~invalid].astype(np.float64) * scale + offset
        each = band_counts(reference, values * card.input.scale + card.input.offset)
        assert [c.tolist() for c in fast] == [c.tolist() for c in each]
        assert all(c.sum() == (~invalid).sum() for c in fast)
