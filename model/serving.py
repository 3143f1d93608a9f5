"""The stream's side of the registry: follow ``channels.json``, validate what it names, keep the
last good snapshot, and load validated versions for scoring.

Beside ``model/registry.py`` (the operator's side) because it judges models by the same rules:
a version becomes servable only after :func:`model.registry.fetch_model` copied its card and
weights to a local cache and validated exactly those bytes (card schema, sha256, drift
reference, :func:`model.contract.load_checked` scoring a chip), and after
:func:`model.registry.compatible` finds it reads the very chips the stream cuts. Anything else
is refused: the follower keeps what it had and reports the refusal once per channels document;
a storage fault is no verdict, and the document is read again at the next poll.
The cache directory is the caller's (the worker process's, ``transforms/process.py``).

Nothing here raises about one document or one version: the channels document, registry entries
and model files are hostile input, and the stream must outlive every one of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from model.card import CARD_FILE, CardError, ModelCard, card_from_dict
from model.channels import (
    Channels,
    ConflictError,
    ModelRef,
    RegistryError,
    assignments,
    parse_json,
)
from model.registry import Registry, compatible, fetch_model

LOG = logging.getLogger(__name__)
DEFAULT_POLL_SECS = 30.0
MAX_BACKOFF_SECS = 300.0  # the longest wait between tries after repeated transient faults
_FETCH_LOCKS: dict[Path, threading.Lock] = {}
_FETCH_LOCKS_GUARD = threading.Lock()
# Versions a process keeps validated on local disk; the least recently used beyond these are
# dropped (fetched and validated again if asked for). A stream uses live and candidate, and a
# few recent ones for the tiles still in flight when the channels change.
MAX_CACHED_VERSIONS = 8


@dataclass(frozen=True)
class Snapshot:
    """The channels the stream routes by, every version in it validated."""

    channels: Channels
    token: str  # content hash / generation of the document it came from
    read_at: float

    def assign(self, tile_id: str) -> tuple[tuple[str, str], ...]:
        """``((model_id, role), ...)`` for a tile: exactly one answers, a shadow scores beside."""
        return tuple((str(ref), role) for ref, role in assignments(self.channels, tile_id))


@dataclass
class Refusal:
    """A version (or document) the stream would not take, and why.

    ``transient``: a storage fault or a race, not a verdict on the bytes: the document is read
    again at the next poll (with backoff) rather than refused for good.
    """

    subject: str
    reason: str
    transient: bool = False


@dataclass(frozen=True)
class Switch:
    """The follower moved from one snapshot to the next (the stream reports it as events)."""

    before: Snapshot
    after: Snapshot


@dataclass(frozen=True)
class Update:
    """What happened since the last :meth:`ChannelsFollower.take`, and the snapshot now."""

    refusals: tuple[Refusal, ...]
    switches: tuple[Switch, ...]
    snapshot: Snapshot


def is_transient(exc: BaseException) -> bool:
    """A fault of the storage or the network (retry later), not a verdict on what was read."""
    if isinstance(exc, ConflictError):  # the object changed while it was read
        return True
    if isinstance(exc, RegistryError | CardError):
        return False
    transient: tuple[type[BaseException], ...] = (OSError,)  # incl. ConnectionError, timeouts
    with contextlib.suppress(ImportError):
        from google.api_core import exceptions as api

        transient += (api.ServerError, api.TooManyRequests, api.RetryError)
    with contextlib.suppress(ImportError):
        from google.auth.exceptions import TransportError

        transient += (TransportError,)
    with contextlib.suppress(ImportError):
        from requests.exceptions import RequestException

        transient += (RequestException,)
    return isinstance(exc, transient)


def _fetch_lock(target: Path) -> threading.Lock:
    with _FETCH_LOCKS_GUARD:
        return _FETCH_LOCKS.setdefault(target, threading.Lock())


def fetch_validated(registry: Registry, ref: ModelRef, cache: Path) -> ModelCard:
    """Copy ``ref`` into ``cache`` and validate exactly those bytes (once per cache while it is
    among the :data:`MAX_CACHED_VERSIONS` most recently used).

    One lock per version, so fetching one never stalls a thread that needs another.
    """
    target = cache / ref.name / ref.version
    done = target / ".validated"
    with _fetch_lock(target):
        if not done.exists():
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            fetch_model(registry.store, f"{ref.name}/{ref.version}", target)  # raises on faults
            done.write_text("ok\n")
        # Its last use, what eviction orders by: set from the fine clock, since a plain touch
        # takes the kernel's coarse one and two uses within a few ms would tie.
        now = time.time_ns()
        os.utime(done, ns=(now, now))
        card = _local_card(target)
    _evict(cache)
    return card


def _last_used(marker: Path) -> int:
    try:
        return marker.stat().st_mtime_ns
    except FileNotFoundError:  # evicted meanwhile
        return 0


def _evict(cache: Path) -> None:
    """Drop the least recently used versions beyond :data:`MAX_CACHED_VERSIONS`: the cache is
    per process and would otherwise grow with every version the stream ever saw."""
    markers = sorted(cache.glob("*/*/.validated"), key=_last_used, reverse=True)
    for marker in markers[MAX_CACHED_VERSIONS:]:
        with _fetch_lock(marker.parent):
            shutil.rmtree(marker.parent, ignore_errors=True)


def _local_card(directory: Path) -> ModelCard:
    data = parse_json((directory / CARD_FILE).read_bytes(), str(directory / CARD_FILE))
    return card_from_dict(data, uri=str(directory))


def without_candidate(channels: Channels) -> Channels:
    """The document with its candidate dropped and everything else (releases, history) kept."""
    return replace(channels, candidate=None, mode=None, canary_fraction=0.0)


def with_releases(models: Channels, document: Channels) -> Channels:
    """The validated model channels of ``models`` under the releases and history of
    ``document``: which release answers needs no model validated, so a refused or not yet
    fetched model never leaves a job in a role the newest readable document took from it."""
    return replace(models, live_release=document.live_release,
                   green_release=document.green_release, history=document.history)


@dataclass
class ChannelsFollower:
    """Re-reads the channels every ``poll_secs`` and keeps the last validated snapshot.

    ``running`` is the card the stream was started with (its chips are cut for it); ``start`` is
    the snapshot validated at start-up. A refused document leaves the last good models in place
    (its releases are taken: :func:`with_releases`); an unreadable one leaves everything.

    Fetching and validating happen off the hot path: :meth:`start_background` runs
    :meth:`refresh` in one daemon thread, and the stream's threads only read :attr:`snapshot`
    and :meth:`take` what happened, neither of which waits on I/O. A transient fault (storage,
    network) is retried at the next poll, the wait doubling up to :data:`MAX_BACKOFF_SECS`;
    a verdict on the bytes (bad sha256, an incompatible card) is reported once per document.
    """

    registry_uri: str
    running: ModelCard
    start: Snapshot
    cache: Path
    poll_secs: float = DEFAULT_POLL_SECS
    snapshot: Snapshot = field(init=False)
    _registry: Registry | None = field(default=None, init=False, repr=False)
    _next_poll: float = field(default=0.0, init=False)
    _failures: int = field(default=0, init=False)  # consecutive transient faults
    _refused_tokens: set[str] = field(default_factory=set, init=False)
    _reported: set[str] = field(default_factory=set, init=False)  # transient faults, once each
    _pending: list[Refusal] = field(default_factory=list, init=False)
    _switches: list[Switch] = field(default_factory=list, init=False)
    _poll_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _start_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    def __post_init__(self):
        self.snapshot = self.start  # the first refresh reads the document again

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry(self.registry_uri)
        return self._registry

    def start_background(self) -> None:
        """Read the channels once now, then follow them from a daemon thread (once per
        follower; later calls return at once). The first read happens here, before any tile,
        because the start-up snapshot was read when the job was launched, maybe long ago."""
        if self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None:
                self._poll()
                self._thread = threading.Thread(target=self._follow, daemon=True,
                                                name="tilestream-channels")
                self._thread.start()

    def stop(self) -> None:
        """End the background thread after its current poll (tests; a process just exits)."""
        self._stop.set()

    def _follow(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(max(self._next_poll - time.monotonic(), 0.05))

    def _poll(self) -> None:
        try:
            self.refresh()
        except Exception as exc:  # the follower must outlive every fault
            with self._poll_lock:
                self._backoff()
            self._transient("channels", "reading the model channels failed", exc)

    def take(self) -> Update:
        """Refusals and switches since the last call (each handed out once), without I/O."""
        with self._lock:
            update = Update(tuple(self._pending), tuple(self._switches), self.snapshot)
            self._pending.clear()
            self._switches.clear()
        return update

    def refresh(self, force: bool = False) -> list[Refusal]:
        """Poll when due (blocking on the registry); returns the refusals this poll reported.

        The background thread's step; tests call it directly with ``poll_secs=0``.
        """
        with self._poll_lock:
            now = time.monotonic()
            if not force and now < self._next_poll:
                return []
            self._next_poll = now + self.poll_secs
            where = self.registry_uri + "/channels.json"
            try:
                channels, token = self.registry.read_channels()
            except Exception as exc:  # unreadable, malformed, too large: keep what we have
                if is_transient(exc):
                    self._backoff()
                    return self._transient(where, "channels document not read", exc)
                key = f"read:{exc}"
                if key in self._refused_tokens:
                    return []
                self._refused_tokens.add(key)
                return self._refuse([Refusal(where, f"channels document refused: {exc}")])
            if token == self.snapshot.token or token in self._refused_tokens:
                self._failures = 0
                return []
            return self._take(channels, token)

    def _take(self, channels: Channels, token: str) -> list[Refusal]:
        """Validate a new document and move to it (or to its releases alone)."""
        current = self.snapshot
        try:
            accepted, refusals = self._validate(channels)
        except Exception as exc:  # transient: retried from scratch at the next poll
            self._backoff()
            if with_releases(current.channels, channels) != current.channels:
                self._switch(Snapshot(with_releases(current.channels, channels), current.token,
                                      time.time()))
            return self._transient(f"channels {token}", "channels document not taken yet", exc)
        self._failures = 0
        if accepted is None:
            self._refused_tokens.add(token)
            accepted = with_releases(current.channels, channels)
        else:
            LOG.info("model channels now %s", accepted.state())
        self._switch(Snapshot(accepted, token, time.time()))
        return self._refuse(refusals)

    def _validate(self, channels: Channels) -> tuple[Channels | None, list[Refusal]]:
        """The document as servable channels, dropping a refused candidate; None if live fails.

        Raises what :func:`is_transient` calls transient: such a document is not judged yet.
        """
        if channels.live is None:
            return None, [Refusal("channels", "channels document names no live model; "
                                  f"keeping {self.snapshot.channels.live}")]
        refusals: list[Refusal] = []
        live_problem = self._problem(channels.live)
        if live_problem:
            keep = self.snapshot.channels.live
            return None, [Refusal(str(channels.live),
                                  f"model {channels.live} refused as live: {live_problem}; "
                                  f"keeping {keep}")]
        if channels.candidate is not None:
            problem = self._problem(channels.candidate)
            if problem:
                refusals.append(Refusal(str(channels.candidate),
                                        f"model {channels.candidate} refused as "
                                        f"{channels.mode} candidate: {problem}; live "
                                        f"{channels.live} answers alone"))
                channels = without_candidate(channels)
        return channels, refusals

    def _problem(self, ref: ModelRef) -> str | None:
        try:
            compatible(self.running, fetch_validated(self.registry, ref, self.cache))
        except Exception as exc:
            if is_transient(exc):
                raise
            if isinstance(exc, RegistryError | CardError):
                return str(exc)
            return f"{type(exc).__name__}: {exc}"  # a torch crash: same verdict, with its name
        return None

    def _backoff(self) -> None:
        """The next poll after a transient fault: ``poll_secs``, then doubling, bounded."""
        self._failures += 1
        wait = min(self.poll_secs * 2 ** min(self._failures - 1, 16), MAX_BACKOFF_SECS)
        self._next_poll = time.monotonic() + max(wait, self.poll_secs)

    def _switch(self, after: Snapshot) -> None:
        with self._lock:
            self._switches.append(Switch(self.snapshot, after))
            self.snapshot = after

    def _transient(self, subject: str, what: str, exc: BaseException) -> list[Refusal]:
        """Logged at every try; reported once per subject and fault (no event per poll)."""
        reason = (f"{what}: {type(exc).__name__}: {exc}; retrying, keeping "
                  f"{self.snapshot.channels.live}")
        LOG.warning("model channels: %s", reason)
        key = f"{subject}|{type(exc).__name__}: {exc}"
        if key in self._reported:
            return []
        self._reported.add(key)
        refusal = Refusal(subject, reason, transient=True)
        with self._lock:
            self._pending.append(refusal)
        return [refusal]

    def _refuse(self, refusals: list[Refusal]) -> list[Refusal]:
        for refusal in refusals:
            LOG.error("model refused: %s", refusal.reason)
        with self._lock:
            self._pending.extend(refusals)
        return refusals


def start_snapshot(registry_uri: str, cache: Path) -> tuple[ModelCard, Snapshot]:
    """At start-up: the live version (validated, or RegistryError) and the first snapshot.

    A candidate that fails validation here is dropped from the snapshot (releases and history
    kept); the stream's first poll tries it again and reports a refusal as an event.
    """
    registry = Registry(registry_uri)
    channels, token = registry.read_channels()
    if channels.live is None:
        raise RegistryError(f"{registry.channels_uri} names no live model: promote one first")
    card = fetch_validated(registry, channels.live, cache)
    candidate_ok = False
    if channels.candidate is not None:
        try:
            compatible(card, fetch_validated(registry, channels.candidate, cache))
            candidate_ok = True
        except Exception as exc:
            LOG.error("candidate %s refused at start-up: %s", channels.candidate, exc)
    if channels.candidate is not None and not candidate_ok:
        channels = without_candidate(channels)
        token = f"start:{token}"  # differs from the document's, so the first poll reports it
    return card, Snapshot(channels, token, time.time())


class CardBook:
    """Cards of the versions the stream serves, by ``name/version`` (versions are immutable)."""

    def __init__(self, running: ModelCard, registry_uri: str | None, cache: Path):
        self._cards: dict[str, ModelCard] = {running.model_id: running}
        self._registry_uri = registry_uri
        self._cache = cache

    def get(self, model_id: str) -> ModelCard:
        card = self._cards.get(model_id)
        if card is None:
            if not self._registry_uri:
                raise CardError(f"no card for {model_id}: the stream runs a fixed model")
            card = fetch_validated(Registry(self._registry_uri), ModelRef.parse(model_id),
                                   self._cache)
            self._cards[model_id] = card
        return card

