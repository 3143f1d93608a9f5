"""What every assembly step shares: its stage name, and the card of the version a tile was
assigned (with a registry, each tile names its own; without one, the stream's card)."""

from __future__ import annotations

import shutil

import apache_beam as beam

from model.card import ModelCard
from model.serving import CardBook
from transforms import cog, process
from transforms.records import TileManifest

STAGE = "assemble"


class WithCards(beam.DoFn):
    """A DoFn that needs the card of the version each tile was assigned (with a registry)."""

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

    def setup(self):
        self._scratch = cog.scratch_dir()
        self._cards = CardBook(self._card, self._registry_uri, process.model_cache())

    def teardown(self):
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def card_of(self, manifest: TileManifest) -> ModelCard:
        """The card of the version this tile was assigned (the stream's own without a registry)."""
        if not manifest.tile.model or self._cards is None:
            return self._card
        return self._cards.get(manifest.tile.model)
