"""The model registry: versioned model directories under one prefix and one channels document.

Layout under a prefix (a local directory or ``gs://bucket/path``, ``model/store.py``)::

    <name>/<version>/model_card.json   the card (written last: a version exists once it is there)
    <name>/<version>/<weights file>    the TorchScript file the card names
    channels.json                      live, candidate, mode, canary fraction, history
                                       (``model/channels.py``)

The channels document is the only thing an operator changes. Every change is a compare-and-swap
on the version that was read, so a concurrent writer loses with :class:`ConflictError` instead of
silently overwriting. Each change appends the state it replaced to ``history`` (who, when, why).

Everything read from the registry or from a directory to publish is hostile until checked: names
and versions are single safe path segments, files have size limits, JSON must be UTF-8 and
well-formed, and a model enters the registry (or becomes live or candidate) only after its card
validates, its weights match the card's sha256 and :func:`model.contract.load_checked` scores a
chip with it. :func:`compatible` is the one rule for whether a candidate can score the chips the
stream cuts for the live model: the CLI and the stream both apply it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from model.card import CARD_FILE, CardError, ModelCard, card_from_dict, load_card
from model.channels import (
    CHANNELS_FILE,
    MAX_HISTORY,
    Channels,
    ConflictError,
    ModelRef,
    RegistryError,
    ReleaseRef,
    parse_json,
    safe_segment,
)
from model.store import ABSENT, Store, open_store

MAX_CARD_BYTES = 1 << 20
MAX_CHANNELS_BYTES = 4 << 20
MAX_WEIGHTS_BYTES = 1 << 30
MAX_TEXT = 500  # who / why


def _text(kind: str, value: str) -> str:
    if len(value) > MAX_TEXT or not value.isprintable():
        raise RegistryError(f"{kind} must be printable text of at most {MAX_TEXT} characters")
    return value


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


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


def compatible(running: ModelCard, candidate: ModelCard) -> None:
    """The one rule for a candidate (canary, shadow, a promotion beside a trial): it must score
    the chips the stream cuts for ``running``, or RegistryError says why.

    Chips are cut once, for the running card: its bands in its order, chip size and stride, its
    nodata (the valid mask) and valid range (the radiometry guard). A candidate must read
    exactly those, and write the same classes (rows and rasters are per class). Its
    normalisation (scale, offset, mean, std) may differ: every version normalises the raw chips
    with its own card. ``tilestream model canary|shadow|promote`` and the stream's channel
    follower (``model/serving.py``) both apply this rule, so neither accepts what the other
    refuses.
    """
    mine, theirs = candidate.input, running.input
    cut = ("bands", "chip_size", "stride", "nodata", "valid_range")
    differ = [f for f in cut if getattr(mine, f) != getattr(theirs, f)]
    if differ:
        raise RegistryError(
            f"{candidate.model_id} reads chips unlike those cut for {running.model_id} "
            f"({', '.join(f'{f} {getattr(mine, f)!r} vs {getattr(theirs, f)!r}' for f in differ)})"
            ": it cannot score the same chips")
    if [c.name for c in candidate.classes] != [c.name for c in running.classes]:
        raise RegistryError(f"{candidate.model_id} has classes "
                            f"{[c.name for c in candidate.classes]}, {running.model_id} has "
                            f"{[c.name for c in running.classes]}: they cannot be compared")


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
            if c.live_release or c.green_release:
                text += f", release {c.live_release.release if c.live_release else 'unrecorded'}"
                text += f" (green {c.green_release.release})" if c.green_release else ""
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
            return _models(c, ref, candidate, c.mode if candidate else None,
                           c.canary_fraction if candidate else 0.0)

        return self._change("promote", by, why, decide)

    def _trial(self, mode: str, ref: ModelRef, fraction: float, by: str | None,
               why: str) -> Change:
        card = self.verify(ref)

        def decide(c: Channels) -> Channels:
            if c.live is None:
                raise RegistryError(f"no live model yet: promote one before a {mode}")
            compatible(self.verify(c.live), card)
            return _models(c, c.live, ref, mode, fraction)

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
                return _models(c, c.live)
            for entry in reversed(c.history):
                before = entry.get("before")
                previous = before.get("live") if isinstance(before, dict) else None
                if previous and previous != (str(c.live) if c.live else None):
                    ref = ModelRef.parse(previous)
                    self.verify(ref)
                    return _models(c, ref)
            raise RegistryError("nothing to roll back to: no candidate and no earlier live "
                                "version in the history")

        return self._change("rollback", by, why, decide)

    # --- the stream's own releases (blue-green; docs/operations.md) ---------------------------

    def release_live(self, release: str, subscription: str, job: str = "",
                     by: str | None = None, why: str = "") -> Change:
        """Record which release answers, the subscription its job reads and the job (a first
        launch, an in-place update), when no blue-green replacement is under way."""
        ref = ReleaseRef(release, subscription, job)

        def decide(c: Channels) -> Channels:
            if c.green_release is not None:
                raise RegistryError(f"release {c.green_release.release} is green: cut over or "
                                    "abort first")
            return replace(c, live_release=ref)

        return self._change("release", by, why, decide)

    def release_green(self, release: str, subscription: str, job: str = "",
                      by: str | None = None, why: str = "") -> Change:
        """Start a blue-green trial: ``release``'s job (on ``subscription``) writes every row
        as shadow until :meth:`release_cutover`."""
        ref = ReleaseRef(release, subscription, job)

        def decide(c: Channels) -> Channels:
            if c.green_release is not None:
                raise RegistryError(f"release {c.green_release.release} is green already: cut "
                                    "over or abort it first")
            if c.live_release is not None and c.live_release.subscription == subscription:
                raise RegistryError(f"{subscription} is the live release's subscription: green "
                                    "needs a subscription of its own")
            return replace(c, green_release=ref)

        return self._change("release-green", by, why, decide)

    def release_cutover(self, release: str, by: str | None = None, why: str = "") -> Change:
        """The green ``release`` answers from now on; the live one's job may be drained."""
        def decide(c: Channels) -> Channels:
            if c.green_release is None or c.green_release.release != release:
                raise RegistryError(f"release {release} is not green (green: "
                                    f"{c.green_release.release if c.green_release else 'none'})")
            return replace(c, live_release=c.green_release, green_release=None)

        return self._change("release-cutover", by, why, decide)

    def release_abort(self, release: str, by: str | None = None, why: str = "") -> Change:
        """End the green trial of ``release``; the live release never stopped answering."""
        def decide(c: Channels) -> Channels:
            if c.green_release is None or c.green_release.release != release:
                raise RegistryError(f"release {release} is not green: nothing to abort")
            return replace(c, green_release=None)

        return self._change("release-abort", by, why, decide)

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


def _models(c: Channels, live: ModelRef | None, candidate: ModelRef | None = None,
            mode: str | None = None, fraction: float = 0.0) -> Channels:
    """``c`` with its model channels changed and its releases kept."""
    return replace(c, live=live, candidate=candidate, mode=mode, canary_fraction=fraction)


def _default_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
