"""The stream's side of the registry: follow ``channels.json``, validate what it names, keep the
last good snapshot, and load validated versions for scoring.

Beside ``model/registry.py`` (the operator's side) because it judges models by the same rules:
a version becomes servable only after :func:`model.registry.fetch_model` copied its card and
weights to a local cache and validated exactly those bytes (card schema, sha256, drift
reference, :func:`model.contract.load_checked` scoring a chip), and after
:func:`model.registry.compatible` finds it reads the very chips the stream cuts. Anything else
is refused: the follower keeps what it had and reports the refusal once per channels document.
The cache directory is the caller's (the worker process's, ``transforms/process.py``).

Nothing here raises about one document or one version: the channels document, registry entries
and model files are hostile input, and the stream must outlive every one of them.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from model.card import CARD_FILE, CardError, ModelCard, card_from_dict
from model.channels import Channels, ModelRef, RegistryError, assignments, parse_json
from model.registry import Registry, compatible, fetch_model

LOG = logging.getLogger(__name__)
DEFAULT_POLL_SECS = 30.0
_FETCH_LOCK = threading.RLock()


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
    """A version (or document) the stream would not take, and why."""

    subject: str
    reason: str


def fetch_validated(registry: Registry, ref: ModelRef, cache: Path) -> ModelCard:
    """Copy ``ref`` into ``cache`` and validate exactly those bytes (once per cache)."""
    target = cache / ref.name / ref.version
    done = target / ".validated"
    with _FETCH_LOCK:
        if not done.exists():
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            fetch_model(registry.store, f"{ref.name}/{ref.version}", target)  # raises on faults
            done.write_text("ok\n")
        return _local_card(target)


def _local_card(directory: Path) -> ModelCard:
    data = parse_json((directory / CARD_FILE).read_bytes(), str(directory / CARD_FILE))
    return card_from_dict(data, uri=str(directory))


@dataclass
class ChannelsFollower:
    """Re-reads the channels at most every ``poll_secs`` and keeps the last validated snapshot.

    ``running`` is the card the stream was started with (its chips are cut for it); ``start`` is
    the snapshot validated at start-up. A refused document leaves the last good snapshot in
    place.
    """

    registry_uri: str
    running: ModelCard
    start: Snapshot
    cache: Path
    poll_secs: float = DEFAULT_POLL_SECS
    snapshot: Snapshot = field(init=False)
    _registry: Registry | None = field(default=None, init=False, repr=False)
    _next_poll: float = field(default=0.0, init=False)
    _refused_tokens: set[str] = field(default_factory=set, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self):
        self.snapshot = self.start  # the first refresh reads the document again

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry(self.registry_uri)
        return self._registry

    def refresh(self, force: bool = False) -> list[Refusal]:
        """Poll when due; returns the refusals of a *new* document (reported once each)."""
        with self._lock:
            now = time.monotonic()
            if not force and now < self._next_poll:
                return []
            self._next_poll = now + self.poll_secs
            try:
                channels, token = self.registry.read_channels()
            except Exception as exc:  # unreadable, malformed, too large: keep what we have
                key = f"read:{exc}"
                if key in self._refused_tokens:
                    return []
                self._refused_tokens.add(key)
                return self._refuse([Refusal(self.registry_uri + "/channels.json",
                                             f"channels document refused: {exc}")])
            if token == self.snapshot.token or token in self._refused_tokens:
                return []
            accepted, refusals = self._validate(channels)
            if accepted is None:
                self._refused_tokens.add(token)
                return self._refuse(refusals)
            self.snapshot = Snapshot(accepted, token, time.time())
            LOG.info("model channels now %s", accepted.state())
            return self._refuse(refusals)

    def _validate(self, channels: Channels) -> tuple[Channels | None, list[Refusal]]:
        """The document as servable channels, dropping a refused candidate; None if live fails."""
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
                channels = Channels(live=channels.live, history=channels.history)
        return channels, refusals

    def _problem(self, ref: ModelRef) -> str | None:
        try:
            compatible(self.running, fetch_validated(self.registry, ref, self.cache))
        except (RegistryError, CardError) as exc:
            return str(exc)
        except Exception as exc:  # a storage fault, a torch crash: same verdict, with its name
            return f"{type(exc).__name__}: {exc}"
        return None

    @staticmethod
    def _refuse(refusals: list[Refusal]) -> list[Refusal]:
        for refusal in refusals:
            LOG.error("model refused: %s", refusal.reason)
        return refusals


def start_snapshot(registry_uri: str, cache: Path) -> tuple[ModelCard, Snapshot]:
    """At start-up: the live version (validated, or RegistryError) and the first snapshot.

    A candidate that fails validation here is dropped from the snapshot; the stream's first poll
    reports it as an event.
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
        channels = Channels(live=channels.live, history=channels.history)
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

