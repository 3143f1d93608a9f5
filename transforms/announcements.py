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

from transforms import stac_read
from transforms.deadletter import DEAD_LETTER_TAG, dead_letter, filtered
from transforms.guards import (
    MAX_ATTRIBUTES,
    RASTER_SUFFIXES,
    InputAllowList,
    Refused,
    bounded_number,
    bounded_text,
    describe,
    safe_id,
    time_in_range,
)
from transforms.presets import (
    DEFAULT_BAND_ALIASES,
    DEFAULT_GRANULE_PATTERN,
    band_file_hint,
    parse_aliases,
)
from transforms.records import BandObject, TileRef

ANNOUNCEMENT_SCHEMA = "tilestream.announcement/v1"
TILES_TAG = "tiles"
BANDS_TAG = "bands"
ENTRIES_TAG = "entries"  # one row per message in: the books count what came in here
# A message published again for one that was delivered but not finished (the local journal
# replays those after a restart): which message it stands for, and when that one was first
# published, so latency runs from the first publish.
REPLAY_OF, FIRST_PUBLISHED = "tilestream_replay_of", "tilestream_first_published"
STAGE = "parse"
# A tile announcement is a few hundred bytes; anything this large is not one.
MAX_MESSAGE_BYTES = 64 * 1024
# Announcement attributes that rescale a source's raw values before the card's normalisation.
RADIOMETRY_ATTRIBUTES = {"input_scale": (1e-6, 1e6), "input_offset": (-1e9, 1e9)}



class AnnouncementError(Refused):
    """A message that claims to be an announcement but breaks the schema."""


def parse_time(value: object, what: str) -> float:
    """RFC 3339 string or epoch milliseconds -> UNIX seconds, within 1970..2100."""
    return time_in_range(value, what)


def rfc3339(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat().replace("+00:00", "Z")


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
    allow: InputAllowList,
) -> TileRef | BandObject | str:
    """A stored object becomes a tile, a band of a granule, or a reason to filter it.

    Objects that are not rasters, and bands the card does not use, are filtered (a reason
    string); an object outside the allow-list or with an unusable name raises Refused.
    """
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
        allow.check(uri, "object")
        safe_id(granule_id, f"granule id of {posixpath.basename(uri)!r}")
        return BandObject(granule_id, band, uri, generation, event_time, published, message_id,
                          "file" if source == "file" else "gcs")
    hint = band_file_hint(posixpath.basename(uri), rule.pattern, bands)  # presets
    if hint:  # another product's band file, not a whole tile
        raise AnnouncementError(hint)
    allow.check(uri, "object")
    return TileRef(
        tile_id=safe_id(tile_id_of(uri), f"tile id of {posixpath.basename(uri)!r}"),
        band_uris=(uri,),
        generation=generation,
        band_generations=(generation,) if source == "gcs" else (),
        event_time=event_time,
        published=published,
        message_id=message_id,
        source=source,
    )


def announcement_tile(
    payload: Mapping, bands: Sequence[str], published: float, message_id: str,
    allow: InputAllowList, event_time_attr: str | None = None,
) -> TileRef:
    """Validate a v1 announcement and build its TileRef, with band URIs in card order."""
    if payload.get("schema") != ANNOUNCEMENT_SCHEMA:
        raise AnnouncementError(f"schema must be '{ANNOUNCEMENT_SCHEMA}'")
    tile_id = safe_id(payload.get("tile_id"), "tile_id")
    acquired = rfc3339(parse_time(payload.get("acquired"), "acquired"))
    uri, band_map = payload.get("uri"), payload.get("bands")
    if (uri is None) == (band_map is None):
        raise AnnouncementError("give exactly one of 'uri' (multi-band) or 'bands' (band->uri)")
    if uri is not None:
        uris: tuple[str, ...] = (allow.check(uri, "uri"),)
    else:
        if not isinstance(band_map, Mapping) or len(band_map) > MAX_ATTRIBUTES:
            raise AnnouncementError(f"bands must be an object of at most {MAX_ATTRIBUTES} "
                                    "band names mapping to URIs")
        missing = [b for b in bands if b not in band_map]
        if missing:
            raise AnnouncementError(f"bands lacks {missing} that the model needs")
        uris = tuple(allow.check(band_map[b], f"band {b}") for b in bands)
    attributes = payload.get("attributes") or {}
    if not isinstance(attributes, Mapping) or len(attributes) > MAX_ATTRIBUTES:
        raise AnnouncementError(f"attributes must be an object of at most {MAX_ATTRIBUTES} "
                                "strings")
    attributes = {bounded_text(k, "attribute name", 64): bounded_text(v, f"attribute {k}")
                  for k, v in attributes.items()}
    for name, (low, high) in RADIOMETRY_ATTRIBUTES.items():
        if name in attributes:
            bounded_number(attributes[name], f"attribute {name}", low, high)
    sensor = payload.get("sensor")
    when = payload.get("event_time") or event_time_attr
    event_time = parse_time(when, "event_time") if when else published
    generation = payload.get("generation")
    generation = (safe_id(str(generation), "generation") if generation
                  else content_generation(tile_id, acquired, uris))
    return TileRef(
        tile_id=tile_id,
        band_uris=uris,
        generation=generation,
        event_time=event_time,
        published=published,
        message_id=message_id,
        source="announcement",
        acquired=acquired,
        sensor=bounded_text(sensor, "sensor", 64) if sensor is not None else None,
        attributes=tuple(sorted(attributes.items())),
    )


def _required(attributes: Mapping[str, str], name: str) -> str:
    value = attributes.get(name)
    if not value:
        raise AnnouncementError(f"notification lacks the {name} attribute")
    return value


class _ParseFn(beam.DoFn):
    """Every exception about one message becomes its dead letter; the bundle never fails."""

    def __init__(self, bands: Sequence[str], rule: GranuleRule, allow: InputAllowList):
        self._bands = tuple(bands)
        self._rule = rule
        self._allow = allow
        self.messages = Metrics.counter("tilestream", "messages_in")
        self.tiles = Metrics.counter("tilestream", "tiles_parsed")
        self.bands = Metrics.counter("tilestream", "bands_parsed")

    def process(self, message) -> Iterable:
        self.messages.inc()
        message_id = str(getattr(message, "message_id", "") or "")[:128]
        data = getattr(message, "data", b"") or b""
        attributes: dict = {}
        delivered = getattr(message, "publish_time", None)
        delivered = delivered.timestamp() if delivered is not None else time.time()
        published, replay_of = delivered, None
        try:
            attributes = dict(message.attributes or {})
            published, replay_of = first_publish(attributes, delivered)
        except Exception:  # the entry is booked whatever the message is; parsing says why
            pass
        yield beam.pvalue.TaggedOutput(ENTRIES_TAG, entry_row(
            message_id, published, delivered, replay_of,
            "notification" if "eventType" in attributes else "message"))
        try:
            if len(data) > MAX_MESSAGE_BYTES:
                raise AnnouncementError(f"message of {len(data):,} bytes is over the "
                                        f"{MAX_MESSAGE_BYTES:,}-byte limit")
            if "eventType" in attributes:
                yield from self._notification(attributes, message_id, published)
            else:
                yield from self._announcement(data, attributes, message_id, published)
        except Exception as exc:  # the stage boundary: one message, one letter
            yield dead_letter(STAGE, describe(exc), message_id=message_id,
                              payload={"attributes": attributes, "data": _excerpt(data)})

    def _notification(self, attributes, message_id, published):
        if attributes["eventType"] != "OBJECT_FINALIZE":
            yield filtered(STAGE, f"event_type {attributes['eventType'][:64]}",
                           message_id=message_id)
            return
        bucket = _required(attributes, "bucketId")
        name = _required(attributes, "objectId")
        generation = _required(attributes, "objectGeneration")
        if not generation.isdigit() or len(generation) > 20:
            raise AnnouncementError(f"objectGeneration {generation[:40]!r} is not a generation "
                                    "number")
        event_time = parse_time(_required(attributes, "eventTime"), "eventTime")
        routed = route_object(f"gs://{bucket}/{name}", generation, event_time, published,
                              message_id, self._rule, self._bands, "gcs", self._allow)
        yield from self._emit(routed, event_time, message_id)

    def _announcement(self, data: bytes, attributes, message_id, published):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise AnnouncementError(
                "neither a GCS notification (no eventType attribute) nor a JSON announcement "
                f"(not valid UTF-8 at byte {exc.start})") from exc
        try:
            payload = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise AnnouncementError(
                "neither a GCS notification (no eventType attribute) nor a JSON announcement "
                f"({detail})") from exc
        if not isinstance(payload, dict):
            raise AnnouncementError("announcement must be a JSON object")
        if stac_read.is_stac_item(payload):  # a STAC Item (transforms/stac_read.py)
            tile = stac_read.item_tile(payload, self._bands, self._rule.aliases, published,
                                       message_id, attributes.get("eventTime"))
            for uri in tile.band_uris:
                self._allow.check(uri, "asset")
            yield from self._emit(tile, tile.event_time, message_id)
            return
        tile = announcement_tile(payload, self._bands, published, message_id, self._allow,
                                 attributes.get("eventTime"))
        yield from self._emit(tile, tile.event_time, message_id)

    def _emit(self, routed, event_time: float, message_id: str):
        if isinstance(routed, str):
            yield filtered(STAGE, routed, message_id=message_id)
        elif isinstance(routed, BandObject):
            self.bands.inc()
            yield beam.pvalue.TaggedOutput(BANDS_TAG, beam.window.TimestampedValue(routed,
                                                                                    event_time))
        else:
            self.tiles.inc()
            yield beam.window.TimestampedValue(routed, event_time)


def first_publish(attributes: dict, delivered: float) -> tuple[float, str | None]:
    """(first publish time, message replayed) of a delivery: a replay's own attributes when
    they are sane (bounded id, a time not after this delivery), else this delivery's."""
    replay_of = attributes.get(REPLAY_OF)
    if not replay_of:
        return delivered, None
    replay_of = bounded_text(replay_of, REPLAY_OF, 128)
    first = attributes.get(FIRST_PUBLISHED)
    when = parse_time(first, FIRST_PUBLISHED) if first else delivered
    return min(when, delivered), replay_of


def entry_row(message_id: str, published: float, delivered: float, replay_of: str | None,
              kind: str) -> dict:
    """The ``messages`` row of one message in (transforms/sinks.py: MESSAGE_SCHEMA)."""
    from transforms.sinks import bq_timestamp

    return {"message_id": message_id or "(none)", "published": bq_timestamp(published),
            "delivered": bq_timestamp(delivered), "received_at": bq_timestamp(time.time()),
            "replay_of": replay_of, "kind": kind}


def file_message_id(path: str) -> str:
    """A backfilled file's stand-in for a message id, so its books balance too."""
    return "file:" + (path if len(path) <= 120 else hashlib.sha1(path.encode()).hexdigest())


def _excerpt(data: bytes | None) -> str:
    return (data or b"")[:500].decode("utf-8", errors="replace")


class ParseAnnouncements(beam.PTransform):
    """PubsubMessage -> tagged outputs ``tiles`` (TileRef), ``bands`` (BandObject), dead letters.

    Elements are re-stamped with the event time (notification ``eventTime`` or the
    announcement's ``event_time``); filtered messages are counted by reason.
    """

    def __init__(self, bands: Sequence[str], rule: GranuleRule, allow: InputAllowList):
        super().__init__()
        self._bands = bands
        self._rule = rule
        self._allow = allow

    def expand(self, messages):
        return messages | beam.ParDo(_ParseFn(self._bands, self._rule, self._allow)).with_outputs(
            BANDS_TAG, DEAD_LETTER_TAG, ENTRIES_TAG, main=TILES_TAG
        )


class _FileFn(_ParseFn):
    """Backfill: a matched file is routed exactly like a GCS notification of it."""

    def process(self, metadata):
        self.messages.inc()
        message_id = file_message_id(metadata.path)
        now = time.time()
        yield beam.pvalue.TaggedOutput(ENTRIES_TAG, entry_row(message_id, now, now, None,
                                                              "file"))
        try:
            mtime = metadata.last_updated_in_seconds or now
            routed = route_object(metadata.path, str(int(mtime * 1e6)), mtime, now, message_id,
                                  self._rule, self._bands, "file", self._allow)
            yield from self._emit(routed, mtime, message_id)
        except Exception as exc:  # the stage boundary
            yield dead_letter(STAGE, describe(exc), message_id=message_id,
                              payload=metadata.path)


class FilesToRefs(beam.PTransform):
    """Matched files (``fileio.MatchFiles``) -> the same tagged outputs as ParseAnnouncements."""

    def __init__(self, bands: Sequence[str], rule: GranuleRule, allow: InputAllowList):
        super().__init__()
        self._bands = bands
        self._rule = rule
        self._allow = allow

    def expand(self, files):
        return files | beam.ParDo(_FileFn(self._bands, self._rule, self._allow)).with_outputs(
            BANDS_TAG, DEAD_LETTER_TAG, ENTRIES_TAG, main=TILES_TAG
        )
