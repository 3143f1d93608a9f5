"""The channels document: which model version answers (``live``) and which is on trial.

``channels.json`` under a registry prefix names a ``live`` version and at most one
``candidate`` in a ``mode``: ``shadow`` (scores every tile beside live, consumers keep reading
live) or ``canary`` (answers a stable ``canary_fraction`` of tiles instead of live), plus the
history of changes. :func:`assignments` is the routing rule the stream applies per tile.

It also names the *stream's* releases during a blue-green replacement (``releases``): the
``live`` release and, while one is on trial, the ``green`` one, each with the subscription its
job reads. :func:`release_role` says whether a job's rows may answer: only the live release's
(and, after a cut-over, the retiring one's while it drains); every other job writes ``shadow``.
Cut-over makes green live in the same compare-and-swap as a promotion. The document's fields
are fixed: release 0.2.0's reader refuses unknown ones, so facts a newer release needs go into
history entries.
Everything here is pure: parsing refuses what is not a well-formed document.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

CHANNELS_FILE = "channels.json"
CHANNELS_SCHEMA = "tilestream.channels/v1"
MODES = ("shadow", "canary")
MAX_HISTORY = 200  # oldest entries are dropped beyond this, so the document stays small
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
class ReleaseRef:
    """A release of the stream, the subscription its job reads and the job's name."""

    release: str
    subscription: str = ""
    job: str = ""

    def __post_init__(self):
        safe_segment("release", self.release)
        for name in ("subscription", "job"):
            value = getattr(self, name)
            if not isinstance(value, str) or len(value) > 255:
                raise RegistryError(f"{name} {repr(value)[:80]} is not a name")

    def to_dict(self) -> dict[str, str]:
        return {"release": self.release, "subscription": self.subscription, "job": self.job}

    @classmethod
    def parse(cls, value: object) -> ReleaseRef | None:
        if value is None:
            return None
        if not isinstance(value, dict) or set(value) - {"release", "subscription", "job"}:
            raise RegistryError(f"release {repr(value)[:80]} is not "
                                "{release, subscription, job}")
        return cls(value.get("release"), value.get("subscription", ""), value.get("job", ""))


@dataclass(frozen=True)
class Channels:
    """Which version answers (``live``) and which is being tried (``candidate`` in ``mode``)."""

    live: ModelRef | None = None
    candidate: ModelRef | None = None
    mode: str | None = None  # shadow: scores beside live; canary: answers a fraction of tiles
    canary_fraction: float = 0.0
    history: tuple[dict[str, Any], ...] = ()
    live_release: ReleaseRef | None = None  # the stream release answering (blue-green)
    green_release: ReleaseRef | None = None  # a release on trial: its rows are shadow

    def __post_init__(self):
        if self.green_release is not None and self.live_release is not None and (
                self.green_release.release == self.live_release.release):
            raise RegistryError(f"release {self.green_release.release} is live already; it "
                                "cannot also be green")
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
        state = {"live": str(self.live) if self.live else None,
                 "candidate": str(self.candidate) if self.candidate else None,
                 "mode": self.mode, "canary_fraction": self.canary_fraction}
        if self.live_release or self.green_release:
            state["releases"] = {
                "live": self.live_release.to_dict() if self.live_release else None,
                "green": self.green_release.to_dict() if self.green_release else None}
        return state

    def to_bytes(self) -> bytes:
        doc = {"schema": CHANNELS_SCHEMA, **self.state(), "history": list(self.history)}
        return (json.dumps(doc, indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes, where: str) -> Channels:
        doc = parse_json(raw, where)
        if not isinstance(doc, dict) or doc.get("schema") != CHANNELS_SCHEMA:
            raise RegistryError(f"{where} is not a {CHANNELS_SCHEMA} document")
        unknown = set(doc) - {"schema", "live", "candidate", "mode", "canary_fraction",
                              "history", "releases"}
        if unknown:
            raise RegistryError(f"{where} has unknown fields {sorted(unknown)}")
        history = doc.get("history", [])
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise RegistryError(f"{where}: history must be a list of objects")
        releases = doc.get("releases") or {}
        if not isinstance(releases, dict) or set(releases) - {"live", "green"}:
            raise RegistryError(f"{where}: releases must be {{live, green}}")
        try:
            return cls(
                live_release=ReleaseRef.parse(releases.get("live")),
                green_release=ReleaseRef.parse(releases.get("green")),
                live=ModelRef.parse(doc["live"]) if doc.get("live") is not None else None,
                candidate=(ModelRef.parse(doc["candidate"])
                           if doc.get("candidate") is not None else None),
                mode=doc.get("mode"),
                canary_fraction=doc.get("canary_fraction", 0.0),
                history=tuple(history[-MAX_HISTORY:]),
            )
        except RegistryError as exc:
            raise RegistryError(f"{where}: {exc}") from exc


def canary_point(candidate: ModelRef, tile_id: str) -> float:
    """Where a tile falls in [0, 1) for a candidate: a sha256 of both, so the same tiles go to
    the same candidate on every worker and after every restart, and raising the fraction only
    adds tiles."""
    digest = hashlib.sha256(f"{candidate}|{tile_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


RELEASE_ACTION = "release"  # every release verb's history action starts with it
CUTOVER_ACTION = "release-cutover"


def retiring_release(channels: Channels) -> ReleaseRef | None:
    """The *retiring* release: the live one before the latest cut-over, as long as no other
    release change followed it (the old job draining its in-flight tiles). The one definition:
    the stream's roles and the operator's drain (``tilestream release``) both read it."""
    entries = [h for h in channels.history
               if str(h.get("action", "")).startswith(RELEASE_ACTION)]
    if not entries or entries[-1].get("action") != CUTOVER_ACTION:
        return None
    state = entries[-1].get("before")
    releases = state.get("releases") if isinstance(state, dict) else None
    live = releases.get("live") if isinstance(releases, dict) else None
    try:
        return ReleaseRef.parse(live) if isinstance(live, dict) else None
    except RegistryError:  # a malformed entry names nobody: any doubt is shadow
        return None


def release_role(channels: Channels, release: str) -> str:
    """``live`` or ``shadow`` for the rows of the job of ``release``; any doubt is ``shadow``.

    ``live``: a stream outside any blue-green (the document records no release at all), the
    live release, and the retiring one (:func:`retiring_release`). ``shadow``: the green release
    on trial, a green whose trial was aborted, any release the document does not name. A model
    refusal never changes this: it reads only ``releases`` and the history, which the stream's
    follower always keeps (``model/serving.py``).
    """
    if channels.live_release is not None and channels.live_release.release == release:
        return "live"
    if (channels.live_release is None and channels.green_release is None
            and not any(str(h.get("action", "")).startswith(RELEASE_ACTION)
                        for h in channels.history)):
        return "live"
    retiring = retiring_release(channels)
    return "live" if retiring is not None and retiring.release == release else "shadow"


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
