"""Stage 6: chip predictions -> one prediction COG per tile on GCS plus one BigQuery tile row.

A stateful step keyed by tile version collects the tile's manifest (from the chipper: how many
chips to expect) and its chip predictions. When every expected chip has been scored or has
failed, it writes the raster; a tile still incomplete at the timeout is written as partial (the
missing chips are nodata) and reported in the dead letters.

The raster has exactly the input's CRS, transform and size: a uint8 class map with the card's
colour table and nodata 255, optionally a second band with confidence in percent. Where chips
overlap (stride < chip size) their class probabilities are averaged, then arg-maxed. The
accumulation walks the tile one chip row at a time so memory follows a strip, not the tile.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from itertools import groupby

import apache_beam as beam
import numpy as np
from apache_beam.coders import PickleCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.combiners import CountCombineFn
from apache_beam.transforms.userstate import (
    BagStateSpec,
    CombiningValueStateSpec,
    ReadModifyWriteStateSpec,
    on_timer,
)

from model.card import ModelCard, join_uri
from model.serving import CardBook
from transforms import stac, timeouts
from transforms.chips import chip_starts, footprint_wkt
from transforms.deadletter import DEAD_LETTER_TAG, dead_letter
from transforms.guards import describe, safe_id
from transforms.records import KEYED, NODATA_CLASS, Chip, ChipPrediction, TileManifest
from transforms.sinks import tile_row

STAGE = "assemble"
NODATA_CONFIDENCE = 255


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


def _blend_strips(manifest: TileManifest, predictions: list[ChipPrediction],
                  num_classes: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(row, probabilities (K, n, W) float32, weight (n, W))`` strips, top to bottom."""
    size, width = manifest.chip_size, manifest.width
    by_row = {row: list(group) for row, group in
              groupby(sorted(predictions, key=lambda p: p.chip.row), key=lambda p: p.chip.row)}
    starts = chip_starts(manifest.height, size, manifest.stride)
    acc = np.zeros((num_classes, size, width), np.float32)
    weight = np.zeros((size, width), np.float32)
    for i, row in enumerate(starts):
        for pred in by_row.get(row, ()):
            chip = pred.chip
            h, w = chip.height, chip.width
            valid = chip.valid[:h, :w]
            acc[:, :h, chip.col : chip.col + w] += pred.probabilities * valid
            weight[:h, chip.col : chip.col + w] += valid
        end = starts[i + 1] if i + 1 < len(starts) else manifest.height
        done = min(end, manifest.height) - row
        yield row, acc[:, :done].copy(), weight[:done].copy()
        # Slide the buffer down to the next chip row: finished rows leave, zeros come in.
        acc = np.concatenate([acc[:, done:], np.zeros((num_classes, done, width), np.float32)], 1)
        weight = np.concatenate([weight[done:], np.zeros((done, width), np.float32)], 0)


def write_prediction_raster(manifest: TileManifest, predictions: list[ChipPrediction],
                            card: ModelCard, uri: str,
                            confidence_band: bool = False, scratch: str | None = None,
                            ) -> np.ndarray:
    """Write the tile's prediction COG to ``uri``; returns valid pixels per class."""
    import rasterio
    import rasterio.shutil
    from affine import Affine
    from apache_beam.io.filesystems import FileSystems
    from rasterio.windows import Window

    counts = np.zeros(card.num_classes, np.int64)
    with tempfile.TemporaryDirectory(prefix="tile-", dir=scratch) as tmp:
        strips_path = os.path.join(tmp, "strips.tif")
        profile = {
            "driver": "GTiff", "width": manifest.width, "height": manifest.height,
            "count": 2 if confidence_band else 1, "dtype": "uint8", "nodata": NODATA_CLASS,
            "crs": rasterio.crs.CRS.from_wkt(manifest.crs_wkt),
            "transform": Affine(*manifest.transform), "tiled": True,
            "blockxsize": 256, "blockysize": 256, "compress": "DEFLATE",
        }
        with rasterio.open(strips_path, "w", **profile) as dst:
            dst.write_colormap(1, {c.id: (*c.rgb, 255) for c in card.classes})
            dst.set_band_description(1, "class")
            for row, acc, weight in _blend_strips(manifest, predictions, card.num_classes):
                covered = weight > 0
                classes = np.full(weight.shape, NODATA_CLASS, np.uint8)
                classes[covered] = acc[:, covered].argmax(axis=0)
                counts += np.bincount(classes[covered], minlength=card.num_classes)
                window = Window(0, row, manifest.width, weight.shape[0])
                dst.write(classes, 1, window=window)
                if confidence_band:
                    confidence = np.full(weight.shape, NODATA_CONFIDENCE, np.uint8)
                    confidence[covered] = np.round(
                        acc[:, covered].max(axis=0) / weight[covered] / 255.0 * 100.0)
                    dst.write(confidence, 2, window=window)
            if confidence_band:
                dst.set_band_description(2, "confidence_percent")
            dst.update_tags(model=card.model_id, tile_id=manifest.tile.tile_id,
                            classes=",".join(c.name for c in card.classes))
        cog_path = os.path.join(tmp, "prediction.tif")
        rasterio.shutil.copy(strips_path, cog_path, driver="COG", compress="DEFLATE",
                             overview_resampling="nearest")
        with open(cog_path, "rb") as src, FileSystems.create(uri, mime_type="image/tiff") as out:
            while block := src.read(8 << 20):
                out.write(block)
    return counts


class _AssembleTileFn(beam.DoFn):
    WALL_CLOCK, END_OF_INPUT = timeouts.timer_specs()
    MANIFEST = ReadModifyWriteStateSpec("manifest", PickleCoder())
    PREDICTIONS = BagStateSpec("predictions", PickleCoder())
    ARRIVED = CombiningValueStateSpec("arrived", VarIntCoder(), CountCombineFn())
    FAILED = CombiningValueStateSpec("failed", VarIntCoder(), CountCombineFn())

    def __init__(self, card: ModelCard, output_prefix: str, timeout_secs: float,
                 streaming: bool, confidence_band: bool, registry_uri: str | None = None):
        self._card = card
        self._registry_uri = registry_uri
        self._cards: CardBook | None = None
        self._prefix = output_prefix
        self._timeout = timeout_secs
        self._streaming = streaming
        self._confidence = confidence_band
        self._scratch: str | None = None
        self.written = Metrics.counter("tilestream", "tiles_written")
        self.partial = Metrics.counter("tilestream", "tiles_partial")
        self.drifted = Metrics.counter("tilestream", "tiles_drifted")
        self.write_ms = Metrics.distribution("tilestream", "tile_write_ms")

    def setup(self):
        self._scratch = scratch_dir()
        self._cards = CardBook(self._card, self._registry_uri)

    def card_of(self, manifest: TileManifest) -> ModelCard:
        """The card of the version this tile was assigned (the stream's own without a registry)."""
        if not manifest.tile.model or self._cards is None:
            return self._card
        return self._cards.get(manifest.tile.model)

    def teardown(self):
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def process(
        self,
        element: tuple[str, TileManifest | ChipPrediction | Chip],
        manifest_state=beam.DoFn.StateParam(MANIFEST),
        predictions=beam.DoFn.StateParam(PREDICTIONS),
        arrived=beam.DoFn.StateParam(ARRIVED),
        failed=beam.DoFn.StateParam(FAILED),
        wall=beam.DoFn.TimerParam(WALL_CLOCK),
        end=beam.DoFn.TimerParam(END_OF_INPUT),
    ):
        _, item = element
        manifest = manifest_state.read()
        if manifest is None and arrived.read() == 0 and failed.read() == 0:
            timeouts.arm(wall, end, self._streaming, self._timeout)
        if isinstance(item, TileManifest):
            manifest = item
            manifest_state.write(item)
        elif isinstance(item, ChipPrediction):
            predictions.add(item)
            arrived.add(item)
        else:
            failed.add(item)
        if manifest is not None and arrived.read() + failed.read() >= manifest.chips_expected:
            n_failed = failed.read()
            yield from self._finish(manifest, list(predictions.read()), n_failed,
                                    complete=n_failed == 0 and manifest.chips_failed == 0)
            for state in (manifest_state, predictions, arrived, failed):
                state.clear()
            wall.clear()
            end.clear()

    @on_timer(WALL_CLOCK)
    def on_wall_clock(self, key=beam.DoFn.KeyParam,
                      manifest_state=beam.DoFn.StateParam(MANIFEST),
                      predictions=beam.DoFn.StateParam(PREDICTIONS),
                      arrived=beam.DoFn.StateParam(ARRIVED),
                      failed=beam.DoFn.StateParam(FAILED)):
        yield from self._timed_out(key, manifest_state, predictions, arrived, failed)

    @on_timer(END_OF_INPUT)
    def on_end_of_input(self, key=beam.DoFn.KeyParam,
                        manifest_state=beam.DoFn.StateParam(MANIFEST),
                        predictions=beam.DoFn.StateParam(PREDICTIONS),
                        arrived=beam.DoFn.StateParam(ARRIVED),
                        failed=beam.DoFn.StateParam(FAILED)):
        yield from self._timed_out(key, manifest_state, predictions, arrived, failed)

    def _timed_out(self, key, manifest_state, predictions, arrived, failed):
        manifest = manifest_state.read()
        held = list(predictions.read())
        n_failed = failed.read()
        for state in (manifest_state, predictions, arrived, failed):
            state.clear()
        if manifest is None:
            if held:
                tile = held[0].chip.tile
                yield dead_letter(STAGE, f"{len(held)} chip predictions of {key} arrived but "
                                         "the tile's manifest never did",
                                  message_id=tile.message_id, tile_id=tile.tile_id)
            return
        missing = manifest.chips_expected - len(held) - n_failed
        yield dead_letter(
            STAGE,
            f"tile {key} incomplete after {self._timeout:.0f}s: {len(held)} of "
            f"{manifest.chips_expected} chips scored, {n_failed} failed, {missing} never "
            "arrived; written as partial",
            message_id=manifest.tile.message_id, tile_id=manifest.tile.tile_id)
        yield from self._finish(manifest, held, n_failed + missing, complete=False)

    def _finish(self, manifest: TileManifest, held: list[ChipPrediction], n_failed: int,
                complete: bool):
        started = time.perf_counter()
        uri = "(no path)"
        try:
            card = self.card_of(manifest)
            uri = raster_uri(self._prefix, card, manifest)
            counts = write_prediction_raster(manifest, held, card, uri, self._confidence,
                                             self._scratch)
            row = self._tile_row(manifest, held, n_failed, complete, counts, uri, card)
            row.update(drift_columns(card, manifest, counts))
            if row["drifted"]:
                self.drifted.inc()
            # STAC out: the prediction's STAC Item beside the COG (transforms/stac.py).
            row["stac_uri"], problem = stac.write_prediction_item(row, manifest, card,
                                                                  self._confidence)
        except Exception as exc:  # one tile's fault must not kill the stream
            yield dead_letter(STAGE, f"writing {uri} failed: {describe(exc)}",
                              message_id=manifest.tile.message_id,
                              tile_id=manifest.tile.tile_id)
            return
        self.write_ms.update(int((time.perf_counter() - started) * 1000))
        (self.written if complete else self.partial).inc()
        if problem:
            yield dead_letter(STAGE, problem, message_id=manifest.tile.message_id,
                              tile_id=manifest.tile.tile_id)
        if manifest.failures:  # beside the row, so a restart never sees one without the other
            yield dead_letter("chips", manifest.failures[:2000],
                              message_id=manifest.tile.message_id,
                              tile_id=manifest.tile.tile_id)
        yield row

    def _tile_row(self, manifest: TileManifest, held: list[ChipPrediction], n_failed: int,
                  complete: bool, counts: np.ndarray, uri: str, card: ModelCard) -> dict:
        import rasterio
        from affine import Affine

        transform, crs = Affine(*manifest.transform), rasterio.crs.CRS.from_wkt(manifest.crs_wkt)
        return tile_row(
            manifest,
            complete=complete,
            chips_scored=len(held),
            chips_failed=manifest.chips_failed + n_failed,
            class_counts=counts,
            class_names=tuple(c.name for c in card.classes),
            pixel_area_m2=manifest.pixel_area_m2,
            footprint_wkt=footprint_wkt(transform, crs, 0, 0, manifest.height, manifest.width,
                                        points_per_edge=16),
            raster_uri=uri,
            model_name=card.name,
            model_version=card.version,
            completed_at=time.time(),
        )


def drift_columns(card: ModelCard, manifest: TileManifest, class_counts: np.ndarray) -> dict:
    """The tile row's drift columns: bands from the chipper's counts, classes from the raster."""
    from model.drift import reference_from_card, tile_drift

    reference = reference_from_card(card)
    if reference is None or not manifest.band_counts or not sum(manifest.band_counts[0]):
        return {"drift_band_psi": [], "drift_class_psi": None, "drift_max_band_psi": None,
                "drifted": None}
    drift = tile_drift(reference, [np.asarray(c) for c in manifest.band_counts],
                       [int(n) for n in class_counts])
    return {"drift_band_psi": [{"band": b, "psi": v} for b, v in drift.band_psi.items()],
            "drift_class_psi": drift.class_psi, "drift_max_band_psi": drift.max_band_psi,
            "drifted": drift.drifted}


@beam.typehints.with_output_types(KEYED)
def _by_tile(item: TileManifest | ChipPrediction | Chip):
    tile = item.chip.tile if isinstance(item, ChipPrediction) else item.tile
    return tile.assignment_key, item


class AssembleTiles(beam.PTransform):
    """(manifests, predictions, failed chips) -> tile rows (main) + dead letters."""

    def __init__(self, card: ModelCard, output_prefix: str, timeout_secs: float,
                 streaming: bool, confidence_band: bool = False,
                 registry_uri: str | None = None):
        super().__init__()
        self._fn = _AssembleTileFn(card, output_prefix, timeout_secs, streaming,
                                   confidence_band, registry_uri)

    def expand(self, pcolls):
        manifests, predictions, failed = pcolls
        # Inputs arrive in the global window (ScoreChips leaves its batch windows).
        keyed = (
            (
                manifests | "KeyManifest" >> beam.Map(_by_tile),
                predictions | "KeyPrediction" >> beam.Map(_by_tile),
                failed | "KeyFailed" >> beam.Map(_by_tile),
            )
            | "Merge" >> beam.Flatten()
        )
        return keyed | "Assemble" >> beam.ParDo(self._fn).with_outputs(DEAD_LETTER_TAG,
                                                                       main="tiles")
