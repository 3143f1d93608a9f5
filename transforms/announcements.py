"""Stage 1: Pub/Sub messages (or matched files, for backfills) -> TileRef | BandObject.

Two message kinds are understood:

- **GCS notifications** (``payloadFormat=JSON_API_V1``): only ``OBJECT_FINALIZE`` of a GeoTIFF is
  used; other event types and other objects are acknowledged and counted as filtered. An object
  whose name matches the granule rule is one band of a granule, anything else one whole tile.
- **JSON announcements** (``"schema": "tilestream.announcement/v1"``, see docs/announcement.md):
  a tile id, acquisition time and either one multi-band ``uri`` or a ``bands`` map.

Anything else, or a malformed message, goes to the dead letters with the reason.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import posixpath
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms import stac
from transforms.deadletter import DEAD_LETTER_TAG, dead_letter
from transforms.presets import band_file_hint
from transforms.records import BandObject, TileRef

ANNOUNCEMENT_SCHEMA = "tilestream.announcement/v1"
TILES_TAG = "tiles"
BANDS_TAG = "bands"
RASTER_SUFFIXES = (".tif", ".tiff")
STAGE = "parse"

# HLS (HLS.S30.T17SLU.2024110T160000.v2.0.B04.tif), Landsat C2 (…_SR_B4.TIF) and similar.
DEFAULT_GRANULE_PATTERN = r"^(?P<granule>.+?)[._](?:SR_)?(?P<band>B\d{1,2}A?)\.tiff?$"
# HLS S30 / Sentinel-2 band names; override with --band_aliases for other collections.
DEFAULT_BAND_ALIASES = "B02=blue,B03=green,B04=red,B8A=nir,B11=swir1,B12=swir2"


class AnnouncementError(ValueError):
    """A message that claims to be an announcement but breaks the schema."""


def parse_time(value: object, what: str) -> float:
    """RFC 3339 string or epoch milliseconds -> UNIX seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) / 1000.0
    if not isinstance(value, str) or not value:
        raise AnnouncementError(f"{what} must be an RFC 3339 time, got {value!r}")
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise AnnouncementError(f"{what} is not an RFC 3339 time: {value!r}") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def rfc3339(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat().replace("+00:00", "Z")


def parse_aliases(spec: str) -> dict[str, str]:
    """``"B02=blue,B03=green"`` -> ``{"B02": "blue", "B03": "green"}`` (tokens upper-cased)."""
    aliases = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        token, sep, band = item.partition("=")
        if not sep or not token.strip() or not band.strip():
            raise ValueError(f"band alias '{item}' is not TOKEN=band")
        aliases[token.strip().upper()] = band.strip()
    return aliases


@dataclass(frozen=True)
class GranuleRule:
    """How a per-band object name maps to (granule id, card band)."""

    pattern: str = DEFAULT_GRANULE_PATTERN
    aliases: Mapping[str, str] = field(default_factory=lambda: parse_aliases(DEFAULT_BAND_ALIASES))

    def match(self, object_name: str) -> tuple[str, str] | None:
        found = re.match(self.pattern, posixpath.basename(object_name), re.IGNORECASE)
        if not found:
            return None
        token = found.group("band")
        return found.group("granule"), self.aliases.get(token.upper(), token)


def content_generation(*parts: object) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tile_id_of(uri: str) -> str:
    stem = posixpath.basename(uri)
    for suffix in RASTER_SUFFIXES:
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def route_object(
    uri: str,
    generation: str,
    event_time: float,
    published: float,
    message_id: str,
    rule: GranuleRule,
    bands: Sequence[str],
    source: str,
) -> TileRef | BandObject | str:
    """A stored object becomes a tile, a band of a granule, or a reason to filter it."""
    if not uri.lower().endswith(RASTER_SUFFIXES):
        return "not_a_raster"
    granule = rule.match(uri)
    if granule:
        granule_id, band = granule
        if band not in bands:
            hint = band_file_hint(posixpath.basename(uri), rule.pattern, bands)  # presets
            if hint:
                raise AnnouncementError(hint)
            return "band_not_used"
        return BandObject(granule_id, band, uri, generation, event_time, published, message_id)
    hint = band_file_hint(posixpath.basename(uri), rule.pattern, bands)  # presets
    if hint:  # another product's band file, not a whole tile
        raise AnnouncementError(hint)
    return TileRef(
        tile_id=tile_id_of(uri),
        band_uris=(uri,),
        generation=generation,
        event_time=event_time,
        published=published,
        message_id=message_id,
        source=source,
    )


def announcement_tile(
    payload: Mapping, bands: Sequence[str], published: float, message_id: str,
    event_time_attr: str | None = None,
) -> TileRef:
    """Validate a v1 announcement and build its TileRef, with band URIs in card order."""
    if payload.get("schema") != ANNOUNCEMENT_SCHEMA:
        raise AnnouncementError(f"schema must be '{ANNOUNCEMENT_SCHEMA}'")
    tile_id = payload.get("tile_id")
    if not isinstance(tile_id, str) or not re.fullmatch(r"[\w.\-:/]{1,256}", tile_id):
        raise AnnouncementError(f"tile_id must be 1-256 chars of [A-Za-z0-9_.-:/], got {tile_id!r}")
    acquired = rfc3339(parse_time(payload.get("acquired"), "acquired"))
    uri, band_map = payload.get("uri"), payload.get("bands")
    if (uri is None) == (band_map is None):
        raise AnnouncementError("give exactly one of 'uri' (multi-band) or 'bands' (band->uri)")
    if uri is not None:
        if not isinstance(uri, str) or not uri:
            raise AnnouncementError(f"uri must be a non-empty string, got {uri!r}")
        uris: tuple[str, ...] = (uri,)
    else:
        if not isinstance(band_map, Mapping):
            raise AnnouncementError("bands must be an object mapping band name to URI")
        missing = [b for b in bands if b not in band_map]
        if missing:
            raise AnnouncementError(f"bands lacks {missing} that the model needs")
        uris = tuple(str(band_map[b]) for b in bands)
    attributes = payload.get("attributes") or {}
    if not isinstance(attributes, Mapping):
        raise AnnouncementError("attributes must be an object of strings")
    sensor = payload.get("sensor")
    when = payload.get("event_time") or event_time_attr
    event_time = parse_time(when, "event_time") if when else published
    generation = str(payload.get("generation") or content_generation(tile_id, acquired, uris))
    return TileRef(
        tile_id=tile_id,
        band_uris=uris,
        generation=generation,
        event_time=event_time,
        published=published,
        message_id=message_id,
        source="announcement",
        acquired=acquired,
        sensor=str(sensor) if sensor is not None else None,
        attributes=tuple(sorted((str(k), str(v)) for k, v in attributes.items())),
    )


class _ParseFn(beam.DoFn):
    def __init__(self, bands: Sequence[str], rule: GranuleRule):
        self._bands = tuple(bands)
        self._rule = rule
        self.messages = Metrics.counter("tilestream", "messages_in")
        self.filtered = Metrics.counter("tilestream", "messages_filtered")
        self.tiles = Metrics.counter("tilestream", "tiles_parsed")
        self.bands = Metrics.counter("tilestream", "bands_parsed")

    def _filtered(self, reason: str) -> None:
        self.filtered.inc()
        Metrics.counter("tilestream", f"filtered_{reason}").inc()

    def process(self, message) -> Iterable:
        self.messages.inc()
        attributes = dict(message.attributes or {})
        message_id = message.message_id or ""
        published = (
            message.publish_time.timestamp() if message.publish_time is not None else time.time()
        )
        try:
            if "eventType" in attributes:
                yield from self._notification(attributes, message_id, published)
            else:
                yield from self._announcement(message.data, attributes, message_id, published)
        except (AnnouncementError, KeyError, ValueError, TypeError) as exc:
            yield dead_letter(STAGE, str(exc), message_id=message_id,
                              payload={"attributes": attributes, "data": _excerpt(message.data)})

    def _notification(self, attributes, message_id, published):
        if attributes["eventType"] != "OBJECT_FINALIZE":
            self._filtered("event_type")
            return
        uri = f"gs://{attributes['bucketId']}/{attributes['objectId']}"
        if "eventTime" not in attributes:
            raise AnnouncementError("GCS notification without eventTime")
        event_time = parse_time(attributes["eventTime"], "eventTime")
        routed = route_object(uri, attributes.get("objectGeneration", ""), event_time, published,
                              message_id, self._rule, self._bands, "gcs")
        yield from self._emit(routed, event_time)

    def _announcement(self, data: bytes, attributes, message_id, published):
        try:
            payload = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AnnouncementError(
                "neither a GCS notification (no eventType attribute) nor a JSON announcement "
                f"({exc.msg if hasattr(exc, 'msg') else exc})"
            ) from exc
        if not isinstance(payload, dict):
            raise AnnouncementError("announcement must be a JSON object")
        if stac.is_stac_item(payload):  # a STAC Item (transforms/stac.py)
            tile = stac.item_tile(payload, self._bands, self._rule.aliases, published, message_id,
                                  attributes.get("eventTime"))
            yield from self._emit(tile, tile.event_time)
            return
        tile = announcement_tile(payload, self._bands, published, message_id,
                                 attributes.get("eventTime"))
        yield from self._emit(tile, tile.event_time)

    def _emit(self, routed, event_time: float):
        if isinstance(routed, str):
            self._filtered(routed)
        elif isinstance(routed, BandObject):
            self.bands.inc()
            yield beam.pvalue.TaggedOutput(BANDS_TAG, beam.window.TimestampedValue(routed,
                                                                                    event_time))
        else:
            self.tiles.inc()
            yield beam.window.TimestampedValue(routed, event_time)


def _excerpt(data: bytes | None) -> str:
    return (data or b"")[:500].decode("utf-8", errors="replace")


class ParseAnnouncements(beam.PTransform):
    """PubsubMessage -> tagged outputs ``tiles`` (TileRef), ``bands`` (BandObject), dead letters.

    Elements are re-stamped with the event time (notification ``eventTime`` or the
    announcement's ``event_time``); filtered messages are counted by reason.
    """

    def __init__(self, bands: Sequence[str], rule: GranuleRule):
        super().__init__()
        self._bands = bands
        self._rule = rule

    def expand(self, messages):
        return messages | beam.ParDo(_ParseFn(self._bands, self._rule)).with_outputs(
            BANDS_TAG, DEAD_LETTER_TAG, main=TILES_TAG
        )


class _FileFn(_ParseFn):
    """Backfill: a matched file is routed exactly like a GCS notification of it."""

    def process(self, metadata):
        self.messages.inc()
        mtime = metadata.last_updated_in_seconds or time.time()
        try:
            routed = route_object(metadata.path, str(int(mtime * 1e6)), mtime, time.time(), "",
                                  self._rule, self._bands, "file")
        except AnnouncementError as exc:  # e.g. a band token no alias maps (presets hint)
            yield dead_letter(STAGE, str(exc), payload=metadata.path)
            return
        yield from self._emit(routed, mtime)


class FilesToRefs(beam.PTransform):
    """Matched files (``fileio.MatchFiles``) -> the same tagged outputs as ParseAnnouncements."""

    def __init__(self, bands: Sequence[str], rule: GranuleRule):
        super().__init__()
        self._bands = bands
        self._rule = rule

    def expand(self, files):
        return files | beam.ParDo(_FileFn(self._bands, self._rule)).with_outputs(
            BANDS_TAG, DEAD_LETTER_TAG, main=TILES_TAG
        )
