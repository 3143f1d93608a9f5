"""The model registry: versioned model directories under one prefix and one channels document.

Layout under a prefix (a local directory or ``gs://bucket/path``)::

    <name>/<version>/model_card.json   the card (written last: a version exists once it is there)
    <name>/<version>/<weights file>    the TorchScript file the card names
    channels.json                      live, candidate, mode, canary fraction, history

The channels document is the only thing an operator changes. Every change is a compare-and-swap
on the version that was read: on GCS an ``ifGenerationMatch`` precondition, locally a rename of a
temporary file under a lock, so a concurrent writer loses with :class:`ConflictError` instead of
silently overwriting. Each change appends the state it replaced to ``history`` (who, when, why).

Everything read from the registry or from a directory to publish is hostile until checked: names
and versions are single safe path segments, files have size limits, JSON must be UTF-8 and
well-formed, and a model enters the registry (or becomes live or candidate) only after its card
validates, its weights match the card's sha256 and :func:`model.contract.load_checked` scores a
chip with it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import getpass
import hashlib
import json
import math
import os
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from model.card import CARD_FILE, CardError, ModelCard, card_from_dict, load_card

CHANNELS_FILE = "channels.json"
CHANNELS_SCHEMA = "tilestream.channels/v1"
MODES = ("shadow", "canary")
MAX_CARD_BYTES = 1 << 20
MAX_CHANNELS_BYTES = 4 << 20
MAX_WEIGHTS_BYTES = 1 << 30
MAX_HISTORY = 200  # oldest entries are dropped beyond this, so the document stays small
MAX_TEXT = 500  # who / why
ABSENT = "0"  # the token of an object that does not exist (GCS's generation 0)
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class RegistryError(ValueError):
    """A registry operation that was refused; the message says what and why."""


class ConflictError(RegistryError):
    """The channels document changed between read and write: someone else got there first."""


def safe_segment(kind: str, value: object) -> str:
    """One path segment of letters, digits, ``.``, ``_``, ``-``; never ``..`` or a path."""
    if not isinstance(value, str) or not _SEGMENT.fullmatch(value) or ".." in value:
        shown = repr(value)[:80]
        raise RegistryError(f"{kind} {shown} is not allowed: use 1-64 letters, digits, '.', '_' "
                            "or '-', starting with a letter or digit, without '..'")
    return value


def _text(kind: str, value: str) -> str:
    if len(value) > MAX_TEXT or not value.isprintable():
        raise RegistryError(f"{kind} must be printable text of at most {MAX_TEXT} characters")
    return value


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def parse_json(raw: bytes, where: str) -> Any:
    """UTF-8 JSON or a RegistryError naming ``where`` (also for absurdly deep nesting)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RegistryError(f"{where} is not UTF-8 text (byte {exc.start})") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{where} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise RegistryError(f"{where} is nested too deeply to be a registry document") from exc


@dataclass(frozen=True, order=True)
class ModelRef:
    """``name/version`` of one model in the registry."""

    name: str
    version: str

    def __post_init__(self):
        safe_segment("model name", self.name)
        safe_segment("model version", self.version)

    @classmethod
    def parse(cls, text: object) -> ModelRef:
        if not isinstance(text, str) or text.count("/") != 1:
            raise RegistryError(f"model reference {repr(text)[:80]} is not 'name/version'")
        name, version = text.split("/")
        return cls(name, version)

    def __str__(self) -> str:
        return f"{self.name}/{self.version}"


@dataclass(frozen=True)
class Channels:
    """Which version answers (``live``) and which is being tried (``candidate`` in ``mode``)."""

    live: ModelRef | None = None
    candidate: ModelRef | None = None
    mode: str | None = None  # shadow: scores beside live; canary: answers a fraction of tiles
    canary_fraction: float = 0.0
    history: tuple[dict[str, Any], ...] = ()

    def __post_init__(self):
        if (self.candidate is None) != (self.mode is None):
            raise RegistryError("a candidate needs a mode (shadow or canary) and a mode needs "
                                "a candidate")
        if self.mode is not None and self.mode not in MODES:
            raise RegistryError(f"mode {self.mode!r} is not one of {MODES}")
        fraction = self.canary_fraction
        if (isinstance(fraction, bool) or not isinstance(fraction, int | float)
                or not math.isfinite(fraction) or not 0.0 <= fraction <= 1.0):
            raise RegistryError(f"canary fraction {fraction!r} is not a number in [0, 1]")
        if self.mode != "canary" and fraction != 0.0:
            raise RegistryError("a canary fraction is only meaningful in canary mode")
        if self.candidate is not None and self.candidate == self.live:
            raise RegistryError(f"{self.candidate} is live already; it cannot also be candidate")

    def state(self) -> dict[str, Any]:
        return {"live": str(self.live) if self.live else None,
                "candidate": str(self.candidate) if self.candidate else None,
                "mode": self.mode, "canary_fraction": self.canary_fraction}

    def to_bytes(self) -> bytes:
        doc = {"schema": CHANNELS_SCHEMA, **self.state(), "history": list(self.history)}
        return (json.dumps(doc, indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes, where: str) -> Channels:
        doc = parse_json(raw, where)
        if not isinstance(doc, dict) or doc.get("schema") != CHANNELS_SCHEMA:
            raise RegistryError(f"{where} is not a {CHANNELS_SCHEMA} document")
        unknown = set(doc) - {"schema", "live", "candidate", "mode", "canary_fraction",
                              "history"}
        if unknown:
            raise RegistryError(f"{where} has unknown fields {sorted(unknown)}")
        history = doc.get("history", [])
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise RegistryError(f"{where}: history must be a list of objects")
        try:
            return cls(
                live=ModelRef.parse(doc["live"]) if doc.get("live") is not None else None,
                candidate=(ModelRef.parse(doc["candidate"])
                           if doc.get("candidate") is not None else None),
                mode=doc.get("mode"),
                canary_fraction=doc.get("canary_fraction", 0.0),
                history=tuple(history[-MAX_HISTORY:]),
            )
        except RegistryError as exc:
            raise RegistryError(f"{where}: {exc}") from exc


# --- storage: a local directory or a GCS prefix -------------------------------------------------


class Store(Protocol):
    def uri(self, key: str) -> str: ...
    def read(self, key: str, limit: int) -> tuple[bytes, str] | None: ...
    def write(self, key: str, data: bytes, expected: str | None) -> str: ...
    def keys(self) -> list[str]: ...


class LocalStore:
    """Files under a directory; writes go to a temporary file that ``os.replace`` swaps in."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def uri(self, key: str) -> str:
        return str(self.root / key)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def read(self, key: str, limit: int) -> tuple[bytes, str] | None:
        path = self._path(key)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return None
        if size > limit:
            raise RegistryError(f"{path} is {size:,} bytes, over the limit of {limit:,}")
        with open(path, "rb") as handle:  # never more than the limit, even if it grew
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise RegistryError(f"{path} grew over the limit of {limit:,} bytes while read")
        return data, hashlib.sha256(data).hexdigest()

    @contextlib.contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        with open(path.with_name(f".{path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def write(self, key: str, data: bytes, expected: str | None) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked(path):
            if expected is not None:
                try:
                    live = hashlib.sha256(path.read_bytes()).hexdigest()
                except FileNotFoundError:
                    live = ABSENT
                if live != expected:
                    raise ConflictError(f"{path} changed since it was read (someone else wrote "
                                        "it); read it again and retry")
            temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
            try:
                with open(temp, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(temp, path)
            finally:
                temp.unlink(missing_ok=True)
        return hashlib.sha256(data).hexdigest()

    def keys(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                      if p.is_file() and not p.name.startswith("."))


class GcsStore:
    """Objects under ``gs://bucket/prefix``; writes carry ``ifGenerationMatch`` when asked to."""

    def __init__(self, uri: str, client: Any = None):
        from google.cloud import storage

        bucket, _, prefix = uri[len("gs://"):].partition("/")
        if not bucket:
            raise RegistryError(f"registry {uri!r} names no bucket")
        self.bucket_name, self.prefix = bucket, prefix.strip("/")
        self.bucket = (client or storage.Client()).bucket(bucket)

    def _name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"gs://{self.bucket_name}/{self._name(key)}"

    def read(self, key: str, limit: int) -> tuple[bytes, str] | None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        blob = self.bucket.get_blob(self._name(key))
        if blob is None:
            return None
        if (blob.size or 0) > limit:
            raise RegistryError(f"{self.uri(key)} is {blob.size:,} bytes, over the limit of "
                                f"{limit:,}")
        generation = blob.generation  # the download refreshes (and may clear) the properties
        try:  # exactly the generation whose size was checked
            data = blob.download_as_bytes(if_generation_match=generation)
        except (NotFound, PreconditionFailed) as exc:
            raise ConflictError(f"{self.uri(key)} changed while it was read; retry") from exc
        if len(data) > limit:
            raise RegistryError(f"{self.uri(key)} is over the limit of {limit:,} bytes")
        return data, str(generation)

    def write(self, key: str, data: bytes, expected: str | None) -> str:
        from google.api_core.exceptions import PreconditionFailed

        blob = self.bucket.blob(self._name(key))
        condition = {} if expected is None else {"if_generation_match": int(expected)}
        try:
            blob.upload_from_string(data, content_type="application/octet-stream", **condition)
        except PreconditionFailed as exc:
            raise ConflictError(f"{self.uri(key)} changed since it was read (generation "
                                f"{expected} is no longer live: someone else wrote it); read "
                                "it again and retry") from exc
        return str(blob.generation)

    def keys(self) -> list[str]:
        start = f"{self.prefix}/" if self.prefix else ""
        return sorted(b.name[len(start):] for b in self.bucket.client.list_blobs(
            self.bucket_name, prefix=start))


def open_store(uri: str, gcs_client: Any = None) -> Store:
    """A local directory or ``gs://`` prefix; any other scheme is refused."""
    if uri.startswith("gs://"):
        return GcsStore(uri, gcs_client)
    if "://" in uri or uri.startswith("/vsi"):
        raise RegistryError(f"{uri!r}: a registry or model is a local directory or gs:// prefix")
    return LocalStore(uri)


# --- validation: the one path by which a model is judged ----------------------------------------


def fetch_model(source: Store, base: str, into: Path) -> ModelCard:
    """Copy a model directory (card + weights) from ``source`` into ``into`` and validate it.

    What is validated is exactly what was copied, so the registry never holds bytes that were
    not checked.
    """
    key = f"{base}/{CARD_FILE}" if base else CARD_FILE
    got = source.read(key, MAX_CARD_BYTES)
    if got is None:
        raise RegistryError(f"no {CARD_FILE} at {source.uri(key)}")
    data = parse_json(got[0], source.uri(key))
    try:
        card = card_from_dict(data, uri=str(into))
    except (CardError, TypeError, ValueError, AttributeError) as exc:
        raise RegistryError(f"{source.uri(key)}: {exc}") from exc
    safe_segment("model name", card.name)
    safe_segment("model version", card.version)
    safe_segment("weights file", card.weights_file)
    if card.weights_file == CARD_FILE:
        raise RegistryError(f"{source.uri(key)}: weights file cannot be the card itself")
    weights_key = f"{base}/{card.weights_file}" if base else card.weights_file
    weights = source.read(weights_key, MAX_WEIGHTS_BYTES)
    if weights is None:
        raise RegistryError(f"{source.uri(key)}: weights file {source.uri(weights_key)} does "
                            "not exist")
    (into / CARD_FILE).write_bytes(got[0])
    (into / card.weights_file).write_bytes(weights[0])
    return validate_directory(str(into))


def validate_directory(directory: str) -> ModelCard:
    """Card schema, weights sha256, drift reference, and one chip scored by the network."""
    from model.contract import load_checked
    from model.drift import reference_from_card

    try:
        card = load_card(directory, verify_weights=True)
        reference_from_card(card)  # a malformed reference is refused here, not in the stream
        load_checked(card)
    except CardError as exc:
        raise RegistryError(str(exc)) from exc
    return card


def compatible(live: ModelCard, candidate: ModelCard) -> None:
    """A candidate scores the live model's chips, so it needs the same input and classes."""
    mine, theirs = candidate.input, live.input
    if (mine.bands, mine.chip_size, mine.stride) != (theirs.bands, theirs.chip_size,
                                                     theirs.stride):
        raise RegistryError(
            f"{candidate.model_id} reads bands {list(mine.bands)} in {mine.chip_size}px chips "
            f"(stride {mine.stride}); live {live.model_id} reads {list(theirs.bands)} in "
            f"{theirs.chip_size}px (stride {theirs.stride}): it cannot score the same chips")
    if [c.name for c in candidate.classes] != [c.name for c in live.classes]:
        raise RegistryError(f"{candidate.model_id} has classes "
                            f"{[c.name for c in candidate.classes]}, live {live.model_id} has "
                            f"{[c.name for c in live.classes]}: they cannot be compared")


# --- the registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """What one channels operation did; ``str()`` is the line the CLI prints."""

    action: str
    before: Channels
    after: Channels
    uri: str
    by: str
    why: str

    def __str__(self) -> str:
        def show(c: Channels) -> str:
            text = f"live {c.live or 'none'}"
            if c.candidate:
                extra = f" {c.canary_fraction:.0%}" if c.mode == "canary" else ""
                text += f", candidate {c.candidate} ({c.mode}{extra})"
            return text

        why = f' because "{self.why}"' if self.why else ""
        return (f"{self.action}: {show(self.before)} -> {show(self.after)}; by {self.by}{why}; "
                f"written to {self.uri} (previous state kept in its history)")


class Registry:
    """A prefix of ``<name>/<version>/`` model directories and one ``channels.json``."""

    def __init__(self, prefix: str, gcs_client: Any = None):
        self.prefix = prefix.rstrip("/")
        self._client = gcs_client
        self.store = open_store(self.prefix, gcs_client)

    @property
    def channels_uri(self) -> str:
        return self.store.uri(CHANNELS_FILE)

    def model_uri(self, ref: ModelRef) -> str:
        """Directory of a version, as ``tilestream run --model_uri`` takes it."""
        return self.store.uri(f"{ref.name}/{ref.version}")

    def versions(self) -> list[ModelRef]:
        """Published versions: directories that hold a card (the last file publish writes)."""
        found = []
        for key in self.store.keys():
            parts = key.split("/")
            if len(parts) == 3 and parts[2] == CARD_FILE:
                with contextlib.suppress(RegistryError):
                    found.append(ModelRef(parts[0], parts[1]))
        return sorted(found)

    def exists(self, ref: ModelRef) -> bool:
        return self.store.read(f"{ref.name}/{ref.version}/{CARD_FILE}", MAX_CARD_BYTES) is not None

    def verify(self, ref: ModelRef) -> ModelCard:
        """Re-validate a registered version from the registry's own bytes."""
        if not self.exists(ref):
            raise RegistryError(f"{ref} is not in the registry {self.prefix} (publish it first)")
        with tempfile.TemporaryDirectory(prefix="tilestream-verify-") as tmp:
            card = fetch_model(self.store, f"{ref.name}/{ref.version}", Path(tmp))
        return replace(card, uri=self.model_uri(ref))

    def publish(self, source_dir: str) -> tuple[ModelRef, ModelCard]:
        """Validate a model directory and copy it in as ``<name>/<version>/`` (never over one)."""
        source = open_store(source_dir.rstrip("/"), self._client)
        with tempfile.TemporaryDirectory(prefix="tilestream-publish-") as tmp:
            card = fetch_model(source, "", Path(tmp))
            ref = ModelRef(card.name, card.version)
            base = f"{ref.name}/{ref.version}"
            if self.exists(ref):
                raise RegistryError(f"{ref} is already in the registry; versions are immutable, "
                                    "publish a new version")
            weights = (Path(tmp) / card.weights_file).read_bytes()
            self.store.write(f"{base}/{card.weights_file}", weights, None)
            try:  # the card last, and only if no one published this version meanwhile
                self.store.write(f"{base}/{CARD_FILE}", (Path(tmp) / CARD_FILE).read_bytes(),
                                 ABSENT)
            except ConflictError as exc:
                raise ConflictError(f"{ref} was published by someone else meanwhile") from exc
        return ref, replace(card, uri=self.model_uri(ref))

    def read_channels(self) -> tuple[Channels, str]:
        got = self.store.read(CHANNELS_FILE, MAX_CHANNELS_BYTES)
        if got is None:
            return Channels(), ABSENT
        return Channels.from_bytes(got[0], self.channels_uri), got[1]

    def _change(self, action: str, by: str | None, why: str,
                decide: Callable[[Channels], Channels]) -> Change:
        by = _text("who", by or _default_user())
        why = _text("reason", why)
        before, token = self.read_channels()
        after = decide(before)
        if after.state() == before.state():
            raise RegistryError(f"{action}: nothing to change ({before.state()})")
        entry = {"at": _now(), "by": by, "why": why, "action": action, "before": before.state()}
        after = replace(after, history=(*before.history, entry)[-MAX_HISTORY:])
        self.store.write(CHANNELS_FILE, after.to_bytes(), token)
        return Change(action, before, after, self.channels_uri, by, why)

    def promote(self, ref: ModelRef, by: str | None = None, why: str = "") -> Change:
        """Make ``ref`` live; if it was the candidate, the trial is over."""
        card = self.verify(ref)

        def decide(c: Channels) -> Channels:
            if c.live == ref:
                raise RegistryError(f"{ref} is live already")
            candidate = None if c.candidate == ref else c.candidate
            if candidate is not None:
                compatible(card, self.verify(candidate))
            return Channels(live=ref, candidate=candidate,
                            mode=c.mode if candidate else None,
                            canary_fraction=c.canary_fraction if candidate else 0.0)

        return self._change("promote", by, why, decide)

    def _trial(self, mode: str, ref: ModelRef, fraction: float, by: str | None,
               why: str) -> Change:
        card = self.verify(ref)

        def decide(c: Channels) -> Channels:
            if c.live is None:
                raise RegistryError(f"no live model yet: promote one before a {mode}")
            compatible(self.verify(c.live), card)
            return Channels(live=c.live, candidate=ref, mode=mode, canary_fraction=fraction)

        return self._change(mode, by, why, decide)

    def canary(self, ref: ModelRef, fraction: float, by: str | None = None,
               why: str = "") -> Change:
        """``ref`` answers a stable ``fraction`` of tiles instead of live."""
        if (isinstance(fraction, bool) or not isinstance(fraction, int | float)
                or not math.isfinite(fraction) or not 0.0 < fraction <= 1.0):
            raise RegistryError(f"canary fraction {fraction!r} must be a number in (0, 1]")
        return self._trial("canary", ref, float(fraction), by, why)

    def shadow(self, ref: ModelRef, by: str | None = None, why: str = "") -> Change:
        """``ref`` scores every tile beside live; consumers keep reading live."""
        return self._trial("shadow", ref, 0.0, by, why)

    def rollback(self, by: str | None = None, why: str = "",
                 expected_candidate: ModelRef | None = None) -> Change:
        """End a trial (drop the candidate); without one, return to the previous live version.

        ``expected_candidate``: refuse unless that is still the candidate (an automatic rule must
        not end a trial other than the one it judged).
        """
        def decide(c: Channels) -> Channels:
            if expected_candidate is not None and c.candidate != expected_candidate:
                raise RegistryError(f"the candidate is now {c.candidate or 'none'}, not "
                                    f"{expected_candidate}: nothing rolled back")
            if c.candidate is not None:
                return Channels(live=c.live)
            for entry in reversed(c.history):
                before = entry.get("before")
                previous = before.get("live") if isinstance(before, dict) else None
                if previous and previous != (str(c.live) if c.live else None):
                    ref = ModelRef.parse(previous)
                    self.verify(ref)
                    return Channels(live=ref)
            raise RegistryError("nothing to roll back to: no candidate and no earlier live "
                                "version in the history")

        return self._change("rollback", by, why, decide)

    def status(self) -> dict[str, Any]:
        channels, token = self.read_channels()
        return {
            "registry": self.prefix,
            "channels": self.channels_uri,
            "token": token,
            **channels.state(),
            "live_uri": self.model_uri(channels.live) if channels.live else None,
            "candidate_uri": self.model_uri(channels.candidate) if channels.candidate else None,
            "versions": [str(r) for r in self.versions()],
            "last_change": channels.history[-1] if channels.history else None,
        }


def _default_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def canary_point(candidate: ModelRef, tile_id: str) -> float:
    """Where a tile falls in [0, 1) for a candidate: a sha256 of both, so the same tiles go to
    the same candidate on every worker and after every restart, and raising the fraction only
    adds tiles."""
    digest = hashlib.sha256(f"{candidate}|{tile_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assignments(channels: Channels, tile_id: str) -> tuple[tuple[ModelRef, str], ...]:
    """Which versions score a tile, each with its row role (``live``, ``shadow``, ``canary``).

    Exactly one of them answers the tile (``live`` or ``canary``); a shadow scores beside it.
    """
    if channels.live is None:
        raise RegistryError("no live model in the channels document")
    if channels.candidate is None:
        return ((channels.live, "live"),)
    if channels.mode == "shadow":
        return ((channels.live, "live"), (channels.candidate, "shadow"))
    if canary_point(channels.candidate, tile_id) < channels.canary_fraction:
        return ((channels.candidate, "canary"),)
    return ((channels.live, "live"),)
