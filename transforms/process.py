"""What one worker process holds across bundles, and the Beam workarounds it installs.

**Process state.** A runner may build a fresh DoFn for every bundle (Beam's in-process runner
does), so anything that must outlive a bundle (a loaded model, the follower of the model
channels, a storage circuit breaker, the chipper's pacing count, the cache of validated model
versions) is kept here, once per process, under one lock: :func:`shared` returns the object for
a ``(kind, key)``, building it on first use. On Dataflow a worker process serves many bundles;
one such object per process is what the stream's docs promise (e.g. "the breaker is per worker
process"). :func:`reset` exists for tests.

**Beam workarounds.** Every patch of a Beam (or Google client) internal is a :class:`Patch`:
it names its target, the Beam version it was written for and a digest of the source it relies
on, and its ``install()`` refuses (or, for an optional one, skips with a warning) when either
differs, so an upgrade that changes what a patch replaces can never apply it silently. The
runtime's patches are declared here (``RUNTIME_PATCHES``, installed when this module is
imported: every worker process imports it at start, see :class:`WorkerPatches`); the local
stack's, which never reach a worker, in ``pipeline/local/patches.py``. ``tests/test_process.py``
is the tripwire: it fails on an upgrade that changes a patched target.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import logging
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from apache_beam.utils.plugin import BeamPlugin

T = TypeVar("T")
LOG = logging.getLogger(__name__)
BEAM_VERSION = "2.77.0"  # what every patch was written against; setup.py pins the same

_LOCK = threading.RLock()
_SHARED: dict[tuple[str, str], Any] = {}


def shared(kind: str, key: str, build: Callable[[], T]) -> T:
    """This process's one ``kind`` object for ``key``, built by ``build()`` on first use."""
    with _LOCK:
        if (kind, key) not in _SHARED:
            _SHARED[(kind, key)] = build()
        return _SHARED[(kind, key)]


def reset() -> None:
    """Forget every shared object (tests: a fresh 'process')."""
    with _LOCK:
        _SHARED.clear()


def model_cache() -> Path:
    """This process's private copy of validated model versions (never shared, never seeded)."""
    return shared("model-cache", "", lambda: Path(tempfile.mkdtemp(prefix="tilestream-models-")))


class PatchError(RuntimeError):
    """A Beam internal is not what a workaround was written for."""


def source_digest(obj: Any) -> str:
    """sha256 of an object's source text: what a patch checks before it replaces the object."""
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


@dataclass
class Patch:
    """``owner.attribute = replacement(original)``, applied once per process, guarded.

    ``target`` is ``"module:Owner.attribute"`` (or ``"module:attribute"``); ``digest`` is
    :func:`source_digest` of the code the patch relies on as it was written: the original itself,
    or ``watch`` when the replaced attribute is not code (a module a class looks names up in).
    ``written_for``: the version of ``package`` (Beam, pinned in setup.py) the patch was written
    against; None for an unpinned library, whose digest alone decides. A ``required`` patch
    (the stream is wrong without it) raises :class:`PatchError` on a mismatch; an optional one
    (a speed-up) logs and leaves the library alone.
    """

    name: str
    target: str
    digest: str
    replacement: Callable[[Any], Any]
    why: str
    required: bool = False
    package: str = "apache-beam"
    written_for: str | None = BEAM_VERSION
    watch: str | None = None
    installed: bool = field(default=False, init=False)

    def resolve(self, target: str | None = None) -> tuple[Any, str, Any]:
        module, _, path = (target or self.target).partition(":")
        owner: Any = importlib.import_module(module)
        *parents, attribute = path.split(".")
        for part in parents:
            owner = getattr(owner, part)
        original = inspect.getattr_static(owner, attribute, None)
        if isinstance(original, staticmethod | classmethod):
            original = original.__func__
        return owner, attribute, original

    def problem(self) -> str | None:
        """Why this patch must not be applied here, or None."""
        if self.written_for is not None:
            found = metadata.version(self.package)
            if found != self.written_for:
                return (f"{self.name} was written for {self.package} {self.written_for}, this is "
                        f"{found}: re-read {self.watch or self.target} and update the patch")
        try:
            _, _, code = self.resolve(self.watch)
        except (ImportError, AttributeError) as exc:
            return f"{self.name}: {self.watch or self.target} is gone ({exc})"
        if code is None:
            return f"{self.name}: {self.watch or self.target} is gone"
        digest = source_digest(getattr(code, "__wrapped__", code))
        if digest != self.digest:
            return (f"{self.name}: {self.watch or self.target} changed (source digest {digest}, "
                    f"the patch was written against {self.digest}): re-read it and update the "
                    "patch")
        return None

    def install(self) -> bool:
        """Apply (once per patch object); True when applied."""
        with _LOCK:
            if self.installed:
                return True
            problem = self.problem()
            if problem:
                if self.required:
                    raise PatchError(problem)
                LOG.warning("not applied: %s (%s)", problem, self.why)
                return False
            owner, attribute, original = self.resolve()
            replacement = self.replacement(getattr(original, "__wrapped__", original))
            kind = inspect.getattr_static(owner, attribute)
            if isinstance(kind, staticmethod | classmethod):
                replacement = type(kind)(replacement)
            setattr(owner, attribute, replacement)
            self.installed = True
            return True


def _json_row_size(original):
    import json

    def _check_row_size(self, row_and_insert_id) -> tuple[int, str | None]:
        row_bytes = len(json.dumps(row_and_insert_id, default=str).encode())
        if row_bytes >= self._max_insert_payload_size:
            return row_bytes, (f"Received row with size {row_bytes / 1e6}MB that exceeds the "
                               f"maximum insert payload size set "
                               f"({self._max_insert_payload_size / 1e6}MB).")
        return row_bytes, None

    _check_row_size.__wrapped__ = original
    return _check_row_size


BIGQUERY_ROW_SIZE = Patch(
    name="bigquery-row-size",
    target="apache_beam.io.gcp.bigquery:BigQueryWriteFn._check_row_size",
    digest="d3cdf1bf0d0771a5",
    replacement=_json_row_size,
    why="Beam sizes every streamed row with objsize.get_deep_size, which walks the row's object "
        "graph (and module globals) at 0.2-0.7 ms a row, 8 % of the stream's CPU on a 3,660² "
        "tile; the JSON length is cheaper (about 0.015 ms) and is what the 10 MB insertAll "
        "limit applies to",
)

RUNTIME_PATCHES = (BIGQUERY_ROW_SIZE,)


def install_runtime_patches() -> None:
    """Apply the runtime's patches in this process."""
    for patch in RUNTIME_PATCHES:
        patch.install()


class WorkerPatches(BeamPlugin):
    """Installs ``RUNTIME_PATCHES`` in every SDK worker process, before any bundle.

    DataflowRunner puts every imported ``BeamPlugin`` subclass in ``--beam_plugins``, and each
    SDK worker process imports those at start; importing this module is what installs the
    patches (below), so a worker that only runs Beam's own BigQuery step still has them.
    """


install_runtime_patches()
