"""What the stream accepts from outside, checked before anything is opened.

Every value a publisher controls is hostile until proven otherwise: ids become output paths, URIs
become reads from inside the VPC, times become timestamps that some library cannot represent.
These checks run at parse (and again before a raster is opened), so a refusal is a dead letter
with a sentence saying why, never an exception deeper in the stream.
"""

from __future__ import annotations

import datetime as dt
import math
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass

# Ids end up in object names and file paths: a conservative charset, no separators, no dot-only
# segments, bounded length.
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
MAX_ID_CHARS = 128
MAX_URI_CHARS = 1024
MAX_TEXT_CHARS = 256
MAX_ATTRIBUTES = 32
# Times outside this range are publisher errors (or attacks on datetime arithmetic).
EARLIEST = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
LATEST = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
RASTER_SUFFIXES = (".tif", ".tiff")
DEFAULT_MAX_TILE_PIXELS = 12_000 * 12_000  # --max_tile_pixels: one HLS tile is 3,660²


class Refused(ValueError):
    """An input the stream will not use; the message is the dead letter's reason."""


def safe_id(value: object, what: str) -> str:
    """A string usable as one path segment: ``[A-Za-z0-9][A-Za-z0-9_.-]*``, at most 128 chars."""
    if not isinstance(value, str):
        raise Refused(f"{what} must be a string, got {type(value).__name__}")
    if not _SAFE_ID.fullmatch(value) or set(value) == {"."}:
        raise Refused(f"{what} {_show(value)} is not 1-{MAX_ID_CHARS} characters of "
                      "[A-Za-z0-9_.-] starting with a letter or digit")
    return value


def bounded_text(value: object, what: str, limit: int = MAX_TEXT_CHARS) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise Refused(f"{what} must be a string, got {type(value).__name__}")
    text = str(value)
    if len(text) > limit:
        raise Refused(f"{what} is {len(text)} characters long, more than {limit}")
    if any(ord(ch) < 32 for ch in text):
        raise Refused(f"{what} contains control characters")
    return text


def time_in_range(value: object, what: str) -> float:
    """RFC 3339 string or epoch milliseconds -> UNIX seconds, within 1970..2100."""
    if isinstance(value, bool):
        raise Refused(f"{what} must be an RFC 3339 time, got a boolean")
    if isinstance(value, int | float):
        if not _finite(value) or not (EARLIEST.timestamp() * 1000 <= value
                                      <= LATEST.timestamp() * 1000):
            raise Refused(f"{what} {_show(value)} (epoch milliseconds) is outside "
                          f"{EARLIEST:%Y}-{LATEST:%Y}")
        return float(value) / 1000.0
    if not isinstance(value, str) or not value:
        raise Refused(f"{what} must be an RFC 3339 time, got {_show(value)}")
    if len(value) > 64:
        raise Refused(f"{what} is not an RFC 3339 time: {_show(value)}")
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        in_range = EARLIEST <= parsed <= LATEST
    except (ValueError, OverflowError) as exc:
        raise Refused(f"{what} is not an RFC 3339 time: {_show(value)}") from exc
    if not in_range:
        raise Refused(f"{what} {_show(value)} is outside {EARLIEST:%Y}-{LATEST:%Y}")
    return parsed.timestamp()


def bounded_number(value: object, what: str, low: float, high: float) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError as exc:
            raise Refused(f"{what} must be a number, got {_show(value)}") from exc
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Refused(f"{what} must be a number, got {type(value).__name__}")
    if not _finite(value) or not low <= value <= high:
        raise Refused(f"{what} {_show(value)} is outside [{low:g}, {high:g}]")
    return float(value)


@dataclass(frozen=True)
class InputAllowList:
    """Where rasters may be read from: ``gs://bucket[/prefix]`` entries, plus local files.

    Local files are allowed only for ``--input_glob`` backfills (``local_roots``); Pub/Sub input
    reaches only the listed buckets. Nothing else (http, /vsi*, other buckets, paths) is opened.
    """

    prefixes: tuple[str, ...]
    local_roots: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str | Iterable[str], local_roots: Iterable[str] = ()) -> InputAllowList:
        items = spec.split(",") if isinstance(spec, str) else list(spec)
        prefixes = []
        for item in filter(None, (i.strip() for i in items)):
            if not item.startswith("gs://") or len(item) <= len("gs://"):
                raise ValueError(f"--input_buckets entries are gs://bucket[/prefix], got {item!r}")
            bucket, _, prefix = item[len("gs://"):].partition("/")
            if not re.fullmatch(r"[a-z0-9][a-z0-9_.\-]{1,221}[a-z0-9]", bucket):
                raise ValueError(f"--input_buckets: {bucket!r} is not a bucket name")
            prefixes.append(f"gs://{bucket}/{prefix.strip('/')}".rstrip("/") + "/")
        return cls(tuple(prefixes), tuple(posixpath.normpath(r) + "/" for r in local_roots))

    def check(self, uri: object, what: str = "uri") -> str:
        """The URI when it may be read, else :class:`Refused` naming the rule it breaks."""
        if not isinstance(uri, str) or not uri:
            raise Refused(f"{what} must be a non-empty string, got {_show(uri)}")
        if len(uri) > MAX_URI_CHARS:
            raise Refused(f"{what} is {len(uri)} characters long, more than {MAX_URI_CHARS}")
        if any(ord(ch) < 32 or ch in "#?\\" for ch in uri):
            raise Refused(f"{what} {_show(uri)} contains '#', '?', '\\' or control characters")
        if not uri.lower().endswith(RASTER_SUFFIXES):
            raise Refused(f"{what} {_show(uri)} is not a .tif/.tiff object")
        if uri.startswith("gs://"):
            path = uri[len("gs://"):]
            if "%" in path:  # GDAL passes it on undecoded: %2e%2e is '..' to the server
                raise Refused(f"{what} {_show(uri)} contains '%' (a percent-encoded name)")
            if any(seg in ("", ".", "..") for seg in path.split("/")[1:]):
                raise Refused(f"{what} {_show(uri)} has empty, '.' or '..' path segments")
            if not any(uri.startswith(p) for p in self.prefixes):
                raise Refused(f"{what} {_show(uri)} is outside the input allow-list "
                              f"({', '.join(self.prefixes) or 'empty'})")
            return uri
        if uri.startswith("/") and self.local_roots and "/vsi" not in uri:
            normal = posixpath.normpath(uri)
            if normal == uri and any(normal.startswith(r) for r in self.local_roots):
                return uri
        raise Refused(f"{what} {_show(uri)} is not a gs:// object in the input allow-list "
                      f"({', '.join(self.prefixes) or 'empty'})")


def describe(exc: BaseException) -> str:
    """An exception as one readable sentence (its type and last meaningful line)."""
    if isinstance(exc, Refused):
        return str(exc)
    if isinstance(exc, KeyError) and exc.args:
        return f"missing field {exc.args[0]!r}"
    if isinstance(exc, RecursionError):
        return "input nested too deeply to parse"
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid UTF-8 (byte {exc.start})"
    messages = []
    link: BaseException | None = exc
    while link is not None and len(messages) < 4:  # GDAL's own cause sits deeper in the chain
        text = " ".join(line.strip() for line in str(link).splitlines()[-1:] if line.strip())
        if text and "see previous exception" not in text.lower() and not any(
                text in m for m in messages):
            messages.append(text)
        link = link.__cause__ or link.__context__
    detail = "; ".join(messages)
    if len(detail) > 400:
        detail = detail[:400] + "…"
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _finite(value: float | int) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def _show(value: object, limit: int = 80) -> str:
    text = repr(value) if not isinstance(value, float | int) or isinstance(value, bool) \
        else _number(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _number(value: float | int) -> str:
    if isinstance(value, int) and abs(value) > 10**18:
        return f"an integer of about {int(value.bit_length() * math.log10(2))} digits"
    return repr(value)
