"""Reading announced objects from storage: GeoTIFF only, retried through transient faults, paused
behind a failing bucket.

- GDAL settings for COGs on object storage (no directory listing, bounded waits, a few retries
  of its own under ours) and the GeoTIFF-only open that refuses a VRT or anything else by name.
- Transient errors (5xx, 429, refused or reset connections, time-outs) are retried by
  ``google.api_core.retry`` (truncated exponential backoff with full jitter) within a read budget.
- GDAL's ``/vsigs/`` cache lives as long as an open handle and no longer
  (``CPL_VSIL_CURL_NON_CACHED``, in :data:`GDAL_ENV`): a handle that closes, a failed open
  included, takes its cached answers with it, so a retry reaches the server again (GDAL would
  otherwise answer it with the failure it remembers) and an object read again at a newer
  generation is never served stale blocks of the older one. No per-process record of what was
  read is needed for that.
- A :class:`CircuitBreaker` per worker process (``transforms/process.py``) pauses reads from a
  bucket after consecutive failures instead of burning every tile on it. Dataflow runs many
  threads per process, so its state changes under one lock, and after a cool-down exactly one
  read probes the bucket while the others keep waiting.
- Reads are pinned to the announced object generation (:func:`pin`, :func:`check_generation`).
  GDAL's ``/vsigs/`` range requests cannot carry GCS's ``generation`` parameter, so the object's
  generation is checked before a tile is planned and again after every strip is read:
  generations only grow, so the same live generation before and after a read means every byte
  read in between was that generation's. A tile whose object was replaced first is
  :class:`Superseded` (an ``events`` row, not a scoring).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from google.api_core.retry import RetryFailureReason, exponential_sleep_generator, retry_target

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
    # What GDAL caches of an object lives only as long as the handle that read it (see above).
    "CPL_VSIL_CURL_NON_CACHED": "/vsigs/",
}
# Our backoff between tries of a read: full jitter under a ceiling that doubles from the first
# to the last (seconds).
BACKOFF_FIRST_SECS, BACKOFF_MAX_SECS = 0.5, 8.0
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
    unhealthy bucket); after the cool-down one reader is let through as the probe while the
    others keep waiting for its outcome, and each failure of a probe doubles the cool-down up to
    ``max_cooldown``. One per worker process (:func:`breaker`), shared by every DoFn instance,
    bundle and thread there: all its state is read and changed under one lock.
    """

    threshold: int = 3
    cooldown: float = 5.0
    max_cooldown: float = 60.0
    _failures: dict[str, int] = field(default_factory=dict, repr=False)
    _open_until: dict[str, float] = field(default_factory=dict, repr=False)
    _probing: set[str] = field(default_factory=set, repr=False)
    _changed: threading.Condition = field(default_factory=threading.Condition, repr=False,
                                          compare=False)

    def wait(self, bucket: str, deadline: float) -> None:
        """Return when this caller may read ``bucket``: it is closed, or this caller is the one
        probe of a cooled-down open breaker, or ``deadline`` (``time.monotonic()``) came first
        (the caller then reads anyway and fails on its own budget)."""
        with self._changed:
            while True:
                now = time.monotonic()
                until = self._open_until.get(bucket)
                if until is None:
                    return
                if until <= now and bucket not in self._probing:
                    self._probing.add(bucket)
                    return
                if now >= deadline:
                    return
                wake = until if until > now else deadline  # a probe's outcome also wakes us
                self._changed.wait(max(0.0, min(wake, deadline) - now))

    def is_open(self, bucket: str) -> bool:
        with self._changed:
            return self._open_until.get(bucket, 0.0) > time.monotonic()

    def success(self, bucket: str) -> None:
        with self._changed:
            self._failures.pop(bucket, None)
            self._open_until.pop(bucket, None)
            self._probing.discard(bucket)
            self._changed.notify_all()

    def failure(self, bucket: str) -> None:
        with self._changed:
            failures = self._failures.get(bucket, 0) + 1
            self._failures[bucket] = failures
            if failures >= self.threshold:
                pause = min(self.max_cooldown, self.cooldown * 2 ** (failures - self.threshold))
                self._open_until[bucket] = time.monotonic() + pause
            self._probing.discard(bucket)
            self._changed.notify_all()

    def settled(self, bucket: str) -> None:
        """A read answered with a verdict on the object, not the bucket's health (a 404, not
        a GeoTIFF): the breaker stays as it is, and a probe in flight is over."""
        with self._changed:
            self._probing.discard(bucket)
            self._changed.notify_all()


def breaker() -> CircuitBreaker:
    """This worker process's circuit breaker."""
    return process.shared("circuit-breaker", "", CircuitBreaker)


def with_retries(read: Callable[[], T], uris: tuple[str, ...], deadline: float,
                 budget_secs: float, on_retry: Callable[[], None] = lambda: None) -> T:
    """``read()``, retried on transient storage errors until ``deadline``
    (``time.monotonic()``) with ``google.api_core.retry``'s backoff and jitter, each try
    waiting while the bucket's breaker is open; ``on_retry()`` before every try but the first.
    Runs out as :class:`TransientReadError`, naming the last error and the bucket's state."""
    bucket = bucket_of(uris[0])
    gate = breaker()
    tries = 0

    def attempt() -> T:
        nonlocal tries
        gate.wait(bucket, deadline)
        if tries:
            on_retry()
        tries += 1
        try:
            result = read()
        except BaseException as exc:
            transient = isinstance(exc, Exception) and is_transient(exc)
            (gate.failure if transient else gate.settled)(bucket)
            raise
        gate.success(bucket)
        return result

    def give_up(errors: list[Exception], reason: RetryFailureReason, _timeout: float | None):
        last = errors[-1]
        if reason is RetryFailureReason.NON_RETRYABLE_ERROR:
            return last, last.__cause__
        return TransientReadError(
            f"{describe(last)} (still failing after {tries} attempt(s) over "
            f"{budget_secs:.0f}s; bucket {bucket} "
            f"{'paused' if gate.is_open(bucket) else 'flaky'})"), last

    return retry_target(attempt, is_transient,
                        exponential_sleep_generator(BACKOFF_FIRST_SECS, BACKOFF_MAX_SECS),
                        timeout=max(0.0, deadline - time.monotonic()),
                        exception_factory=give_up)


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
    return tuple(pinned)
