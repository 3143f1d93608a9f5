"""Reading announced objects from storage: GeoTIFF only, retried through transient faults, paused
behind a failing bucket.

- GDAL settings for COGs on object storage (no directory listing, bounded waits, a few retries
  of its own under ours) and the GeoTIFF-only open that refuses a VRT or anything else by name.
- Transient errors (5xx, 429, refused or reset connections, time-outs) are retried with
  exponential backoff and jitter within a read budget; GDAL's cached failure is forgotten
  between tries (it would otherwise answer every retry from its cache).
- A :class:`CircuitBreaker` per worker process (``transforms/process.py``) pauses reads from a
  bucket after consecutive failures instead of burning every tile on it.
- Reads are pinned to the announced object generation (:func:`pin`, :func:`check_generation`).
  GDAL's ``/vsigs/`` range requests cannot carry GCS's ``generation`` parameter, so the object's
  generation is checked before a tile is planned and again after every strip is read:
  generations only grow, so the same live generation before and after a read means every byte
  read in between was that generation's. A tile whose object was replaced first is
  :class:`Superseded` (an ``events`` row, not a scoring); GDAL's cache is cleared when a URI is
  read at another generation than last time, so stale blocks of an older one are never served.
"""

from __future__ import annotations

import functools
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from model.card import CardError
from transforms import process
from transforms.guards import Refused, describe

T = TypeVar("T")
# Only GeoTIFF (COGs included) is opened: VRT and other formats can point anywhere.
DRIVER = "GTiff"
# GDAL settings for reading COGs from object storage: no directory listing, bounded waits, a few
# retries of its own (the delay doubles each time) under ours.
GDAL_ENV = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff",
    "GDAL_HTTP_TIMEOUT": "30",
    "GDAL_HTTP_CONNECTTIMEOUT": "10",
    "GDAL_HTTP_LOW_SPEED_TIME": "15",
    "GDAL_HTTP_LOW_SPEED_LIMIT": "1",
    "GDAL_HTTP_MAX_RETRY": "2",
    "GDAL_HTTP_RETRY_DELAY": "0.5",
}
_TRANSIENT = re.compile(
    r"HTTP (?:response )?code:? ?(?:429|5\d\d)|couldn't connect|"
    r"connection (?:refused|reset)|timed? ?out|empty reply|failed to connect|"
    r"server returned nothing", re.IGNORECASE)


class TransientReadError(OSError):
    """Storage kept failing with errors that are usually temporary."""


class Superseded(Refused):
    """The announced generation of an object is no longer its live one: a newer upload (or a
    delete) replaced it before it was read. Not an error: the newer generation has its own
    notification and its own scoring."""


def is_transient(exc: BaseException) -> bool:
    """A storage error worth another try: GDAL's (by its message) or the JSON API client's
    (429, 5xx, a dropped connection)."""
    if isinstance(exc, Refused | CardError):
        return False
    from google.api_core import exceptions as api

    if isinstance(exc, api.TooManyRequests | api.ServerError | ConnectionError | TimeoutError):
        return True
    return bool(_TRANSIENT.search(str(exc)))


def bucket_of(uri: str) -> str:
    return uri[len("gs://"):].split("/", 1)[0] if uri.startswith("gs://") else "(local)"


def open_geotiff(uri: str):
    """Open as GeoTIFF only; anything else (a VRT named .tif, HTML, junk) is refused by name."""
    import rasterio

    try:
        return rasterio.open(uri, driver=DRIVER)
    except rasterio.errors.RasterioIOError as exc:
        if "not recognized as being in a supported file format" in str(exc):
            raise Refused(f"{uri} is not a GeoTIFF (only GeoTIFF/COG is read; VRT and other "
                          "formats are refused)") from exc
        if re.search(r"HTTP response code: 404|No such file", str(exc)):
            raise Refused(f"{uri} does not exist") from exc
        raise


@dataclass
class CircuitBreaker:
    """Per bucket: after ``threshold`` consecutive transient failures, pause reading from it.

    While open, readers wait (the stream slows down instead of dead-lettering every tile of an
    unhealthy bucket); after the cool-down one read is let through, and each failure of that
    probe doubles the cool-down up to ``max_cooldown``. One per worker process
    (:func:`breaker`), shared by every DoFn instance and bundle there.
    """

    threshold: int = 3
    cooldown: float = 5.0
    max_cooldown: float = 60.0
    _failures: dict[str, int] = field(default_factory=dict)
    _open_until: dict[str, float] = field(default_factory=dict)

    def wait(self, bucket: str, deadline: float) -> None:
        until = self._open_until.get(bucket, 0.0)
        now = time.monotonic()
        if until > now:
            time.sleep(max(0.0, min(until, deadline) - now))

    def is_open(self, bucket: str) -> bool:
        return self._open_until.get(bucket, 0.0) > time.monotonic()

    def success(self, bucket: str) -> None:
        self._failures.pop(bucket, None)
        self._open_until.pop(bucket, None)

    def failure(self, bucket: str) -> None:
        failures = self._failures.get(bucket, 0) + 1
        self._failures[bucket] = failures
        if failures >= self.threshold:
            pause = min(self.max_cooldown, self.cooldown * 2 ** (failures - self.threshold))
            self._open_until[bucket] = time.monotonic() + pause


def breaker() -> CircuitBreaker:
    """This worker process's circuit breaker."""
    return process.shared("circuit-breaker", "", CircuitBreaker)


@functools.lru_cache(maxsize=1)
def _gdal_library():
    """The GDAL shared library rasterio runs on (its wheel bundles one), for cache control."""
    import ctypes
    import ctypes.util
    import glob
    import os

    import rasterio

    bundled = glob.glob(os.path.join(os.path.dirname(rasterio.__file__), os.pardir,
                                     "rasterio.libs", "libgdal*"))
    path = bundled[0] if bundled else ctypes.util.find_library("gdal")
    return ctypes.CDLL(path) if path else None


def forget_cached_reads(uris: tuple[str, ...]) -> None:
    """Make GDAL forget what it cached about these objects (a failed answer included).

    GDAL remembers a failed request for an object, so without this a retry never reaches the
    server again and a transient error becomes permanent.
    """
    gdal = _gdal_library()
    if gdal is None:
        return
    for uri in uris:
        if uri.startswith("gs://"):
            gdal.VSICurlPartialClearCache(("/vsigs/" + uri[len("gs://"):]).encode())


def with_retries(read: Callable[[], T], uris: tuple[str, ...], deadline: float,
                 budget_secs: float, on_retry: Callable[[], None] = lambda: None) -> T:
    """``read()``, retried on transient storage errors with backoff and jitter until
    ``deadline`` (``time.monotonic()``), pausing while the bucket's breaker is open."""
    bucket = bucket_of(uris[0])
    gate = breaker()
    attempt = 0
    while True:
        gate.wait(bucket, deadline)
        try:
            result = read()
        except Exception as exc:
            if not is_transient(exc):
                raise
            gate.failure(bucket)
            attempt += 1
            delay = min(8.0, 0.25 * 2 ** attempt) * random.uniform(0.5, 1.5)
            if time.monotonic() + delay > deadline:
                raise TransientReadError(
                    f"{describe(exc)} (still failing after {attempt} attempt(s) over "
                    f"{budget_secs:.0f}s; bucket {bucket} "
                    f"{'paused' if gate.is_open(bucket) else 'flaky'})") from exc
            on_retry()
            time.sleep(delay)
            forget_cached_reads(uris)
            continue
        gate.success(bucket)
        return result


def gcs_client():
    """This worker process's Cloud Storage client (the emulator's under the local stack)."""
    from google.cloud import storage as gcs

    return process.shared("gcs-client", "", gcs.Client)


def _split(uri: str) -> tuple[str, str]:
    bucket, _, name = uri[len("gs://"):].partition("/")
    return bucket, name


# The generation checks are retried by :func:`with_retries` (the read budget, the breaker), so
# not by the client too: its default policy retries a 503 for 120 s whatever the budget.
_ONE_TRY = {"retry": None, "timeout": 30}


def live_generation(uri: str) -> str | None:
    """The live generation of a gs:// object, or None when there is no such object."""
    bucket, name = _split(uri)
    blob = gcs_client().bucket(bucket).get_blob(name, **_ONE_TRY)
    return None if blob is None else str(blob.generation)


def check_generation(uri: str, generation: str) -> None:
    """Raise :class:`Superseded` unless ``generation`` is still the live one of ``uri``
    (asked with GCS's ``generation`` parameter: a superseded one is a 404 on a bucket without
    versioning, which is what the stream reads from)."""
    if not uri.startswith("gs://") or not generation:
        return
    bucket, name = _split(uri)
    if gcs_client().bucket(bucket).get_blob(name, generation=int(generation),
                                            **_ONE_TRY) is not None:
        return
    live = live_generation(uri)
    if live is None:  # deleted, or never written: nothing newer will be scored in its place
        raise Refused(f"{uri} does not exist (generation {generation} was announced)")
    raise Superseded(f"{uri}: generation {generation} was superseded by generation {live} "
                     "before it was read")


def pin(uris: tuple[str, ...], generations: tuple[str, ...]) -> tuple[str, ...]:
    """The generation each gs:// URI is read at: the announced one, checked to be live
    (:class:`Superseded` otherwise), or, where none was announced (a JSON announcement, a STAC
    Item), the live one now, so that every strip of the tile reads the same bytes."""
    pinned = []
    for i, uri in enumerate(uris):
        if not uri.startswith("gs://"):
            pinned.append("")
            continue
        announced = generations[i] if i < len(generations) else ""
        if announced:
            check_generation(uri, announced)
            pinned.append(announced)
        else:
            live = live_generation(uri)
            if live is None:
                raise Refused(f"{uri} does not exist")
            pinned.append(live)
    last = process.shared("read-generations", "", dict)  # uri -> generation GDAL last read
    for uri, generation in zip(uris, pinned, strict=True):
        if generation and last.get(uri) not in (None, generation):
            forget_cached_reads((uri,))
        last[uri] = generation
    return tuple(pinned)
