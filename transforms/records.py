"""The records that travel through the stream, one dataclass per thing.

Times are UNIX seconds (float) while in flight and become BigQuery TIMESTAMPs in the sinks.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

import numpy as np

# Type hint for (key, record) pairs fed to stateful DoFns: str keys have a deterministic coder.
KEYED = typing.Tuple[str, typing.Any]  # noqa: UP006 - Beam's type hints want typing.Tuple

# Class id written where a prediction raster or class map has no prediction (padding, nodata).
NODATA_CLASS = 255


@dataclass(frozen=True)
class TileRef:
    """A complete tile, ready to chip: one multi-band raster or one file per model band."""

    tile_id: str
    band_uris: tuple[str, ...]  # one URI (multi-band) or one per card band, in card order
    generation: str  # object generation, or a content hash for announcements and granules
    event_time: float  # notification eventTime / announcement time
    published: float  # Pub/Sub publish time (arrival, for latency)
    message_id: str = ""
    source: str = "gcs"  # gcs | announcement | granule | file
    acquired: str | None = None  # RFC 3339, from the announcement or the granule name
    sensor: str | None = None
    attributes: tuple[tuple[str, str], ...] = ()  # carried to output rows
    band_message_ids: tuple[str, ...] = ()  # a granule: every band file's message
    # Object generation of each band URI, in the same order, that the reads are pinned to:
    # from the notifications; () until the planner pins an announcement's URIs to their live
    # generations (transforms/storage.py).
    band_generations: tuple[str, ...] = ()
    # Set once per tile by transforms/routing.py: which version scores it and in what role, so
    # every chip of one assignment is scored by that version and assembled apart from others.
    model: str = ""  # name/version; "" with a fixed --model_uri
    role: str = ""  # live | shadow | canary; "" reads as live

    @property
    def message_ids(self) -> tuple[str, ...]:
        """Every Pub/Sub message this tile answers (the books count messages, not tiles)."""
        return self.band_message_ids or ((self.message_id,) if self.message_id else ())

    @property
    def key(self) -> str:
        """Identity of one version of a tile: stateful steps and dedup key on this."""
        return f"{self.tile_id}@{self.generation}"

    @property
    def assignment_key(self) -> str:
        """One tile version as scored by one model in one role: what assembly keys on."""
        return f"{self.key}|{self.model}|{self.role}" if self.model else self.key


@dataclass(frozen=True)
class BandObject:
    """One band file of a granule (HLS/Sentinel-2 deliver one COG per band)."""

    granule_id: str
    band: str  # card band name, after alias mapping
    uri: str
    generation: str  # the notification's object generation; a backfilled file's mtime
    event_time: float
    published: float
    message_id: str = ""
    source: str = "gcs"  # gcs | file


@dataclass(frozen=True)
class TileGrid:
    """A tile's geometry and chip grid, read once from its header by the planner."""

    height: int
    width: int
    transform: tuple[float, ...]  # affine (a, b, c, d, e, f) of the tile
    crs_wkt: str
    pixel_area_m2: float
    chip_size: int
    stride: int


@dataclass(frozen=True)
class StripTask:
    """Chip rows ``first_row .. stop_row`` of a tile: one unit of reading, on any worker."""

    tile: TileRef
    grid: TileGrid
    index: int  # of this task among the tile's
    count: int  # tasks of the tile, so their reports know when the tile is whole
    first_row: int  # chip-row numbers (chip row k starts at pixel row k * stride)
    stop_row: int


@dataclass(frozen=True)
class StripReport:
    """What reading one strip task found: the tile's manifest is the sum of its reports."""

    task: StripTask
    expected: tuple[int, ...]  # chips emitted from each chip row of the task
    skipped: int
    failed: int
    unreadable: tuple[str, ...] = ()  # "rows a..b: reason" for each chip row that failed
    band_counts: tuple[tuple[int, ...], ...] = ()  # drift bins of the task's fresh rows


@dataclass(frozen=True)
class TileManifest:
    """What the chipper knows about a tile that tile assembly needs to finish it."""

    tile: TileRef
    grid: TileGrid
    chips_total: int
    chips_skipped: int  # under the valid-pixel threshold
    chips_failed: int  # strips that could not be read (dead-lettered)
    chipped_at: float
    failures: str = ""  # why strips failed; dead-lettered by assembly beside the tile row
    expected_per_row: tuple[int, ...] = ()  # chips expected back from each chip row
    # Per card band, valid pixels in each bin of the card's drift reference (model/drift.py),
    # counted while the strips were read; () when the card has no reference.
    band_counts: tuple[tuple[int, ...], ...] = ()

    @property
    def chips_expected(self) -> int:
        """Chips that should come back from inference."""
        return self.chips_total - self.chips_skipped - self.chips_failed

    # The grid's fields, read as the manifest's own by assembly, STAC and drift.
    height = property(lambda self: self.grid.height)
    width = property(lambda self: self.grid.width)
    transform = property(lambda self: self.grid.transform)
    crs_wkt = property(lambda self: self.grid.crs_wkt)
    pixel_area_m2 = property(lambda self: self.grid.pixel_area_m2)
    chip_size = property(lambda self: self.grid.chip_size)
    stride = property(lambda self: self.grid.stride)


@dataclass
class Chip:
    """A window of a tile, as it travels to the model: small on purpose.

    ``raw`` is ``(C, S, S)`` in the source's own dtype (uint8 for 8-bit DN: a quarter of float32;
    float32 only when a per-source rescale applies), padded with 0; ``valid_bits`` is the packed
    ``(S, S)`` mask of pixels inside the tile and not nodata. Normalisation happens in the
    inference function, on the model's device. The window may be smaller than ``S`` at the
    tile's right and bottom edges; the rest of the chip is padding. ``crs`` is the short label
    (``EPSG:nnnn``); the tile's full CRS travels once, in its manifest.
    """

    tile: TileRef
    index: int
    row: int
    col: int
    height: int
    width: int
    size: int  # S
    stride: int  # of the chip grid: chip row = row // stride
    tile_height: int  # the tile's rows and columns: assembly knows the grid and its strips
    tile_width: int  # from any one chip
    transform: tuple[float, ...]  # affine of the chip's top-left pixel grid
    crs: str
    footprint_wkt: str  # EPSG:4326 polygon of the in-tile window
    pixel_area_m2: float
    valid_fraction: float
    valid_bits: np.ndarray  # np.packbits of the (S, S) valid mask
    chipped_at: float
    raw: np.ndarray | None = field(default=None, repr=False)

    @property
    def valid(self) -> np.ndarray:
        """The ``(S, S)`` bool mask (unpacked on demand)."""
        return np.unpackbits(self.valid_bits, count=self.size * self.size).reshape(
            self.size, self.size).astype(bool)


def pack_mask(mask: np.ndarray) -> np.ndarray:
    return np.packbits(np.asarray(mask, bool), axis=None)


@dataclass
class ChipBlock:
    """The chips one strip task cut, travelling as one element from the chipper to the model.

    A runner's cost per element (windowing, batching, a pickle on every hop) is paid once per
    strip instead of once per chip; the tile's fields travel once per block. The chips keep
    their own identity: rows and dead letters are still per chip. After scoring, the same
    record (chips without pixels) carries the chips the model failed on.
    """

    tile: TileRef
    task: int  # index of the strip task that cut it
    chips: tuple[Chip, ...]

    def __len__(self) -> int:
        return len(self.chips)


@dataclass
class ChipPrediction:
    """The model's answer for one chip, cropped to the chip's in-tile window."""

    chip: Chip  # without pixels
    class_map: np.ndarray  # (h, w) uint8, NODATA_CLASS where invalid
    probabilities: np.ndarray  # (K, h, w) uint8, probability * 255, for blending overlaps
    class_counts: tuple[int, ...]  # valid pixels per class
    mean_confidence: float
    model_name: str
    model_version: str
    scored_at: float


@dataclass
class PredictionBlock:
    """The model's answers for one :class:`ChipBlock` (the chips it did not fail on)."""

    tile: TileRef
    task: int
    predictions: tuple[ChipPrediction, ...]

    def __len__(self) -> int:
        return len(self.predictions)


DEAD_LETTER = "dead_letter"
FILTERED = "filtered"
DUPLICATE = "duplicate"
SUPERSEDED = "superseded"  # its object generation was replaced before it was read
DRAINED = "drained"  # the job's input ended (a drain) before its work on it was complete


@dataclass(frozen=True)
class PackedRows:
    """Rows ``first .. first + shape[-2]`` of an output strip, the tile's full width, as
    zlib-compressed bytes: class maps and sums are mostly runs, and these bytes are what a
    Streaming Engine job pays for."""

    first: int  # first row inside the strip
    shape: tuple[int, ...]  # (layers, rows, width)
    dtype: str
    data: bytes


@dataclass(frozen=True)
class StripPart:
    """What one block of scored (or failed) chips gives one output strip (transforms/blend.py).

    Rows only this block's chips cover travel blended (``final``: the class map, and the
    confidence when the raster has that band); rows that chips of a neighbouring block also
    cover travel as integer sums (``sums``: the K class sums and the weight), which the strip
    adds up, so the strip is pixel-identical to blending every chip at once. A block of failed
    chips gives counts without pixels: its strips still count them.
    """

    strip: int
    chips: int  # chips of the block that overlap the strip: what the strip waits for
    own: int  # ... counted in this strip (their first row falls in it), once each
    own_failed: int = 0  # ... of those, chips the model failed on
    final: PackedRows | None = None  # uint8 (1 or 2, rows, width): classes [, confidence %]
    sums: tuple[PackedRows, ...] = ()  # (K + 1, rows, width): class sums, then the weight


@dataclass(frozen=True)
class StripResult:
    """A finished output strip, as the tile sees it: counts only."""

    strip: int
    counts: tuple[int, ...]  # valid pixels per class in the strip
    scored: int  # chips of this chip row that were scored
    failed: int  # ... that the model failed on
    missing: int  # ... that never arrived (timeout)
    complete: bool
    written: bool = False  # its piece is on storage


@dataclass(frozen=True)
class DeadLetter:
    """A message or piece the stream did not score, with why.

    ``disposition`` ``dead_letter`` is an error (BigQuery ``dead_letters`` and JSON lines on GCS);
    ``filtered`` (not for this stream), ``duplicate`` (already taken) and ``superseded`` (a newer
    generation of its object was written before it was read) are set aside on purpose and land
    in the ``events`` table, so every message in leaves a queryable trace.
    """

    stage: str
    reason: str
    message_id: str = ""
    tile_id: str = ""
    payload: str = ""  # excerpt of the offending input
    time: float = 0.0
    disposition: str = DEAD_LETTER
    message_ids: tuple[str, ...] = ()  # every message it answers (a granule's band files)
