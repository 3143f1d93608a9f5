"""``gcp-storage-emulator`` with GCS's object-generation rules, which the emulator ignores.

The stream relies on two of them, so the local stack enforces both, in front of the emulator's
own handlers (nothing else changes; the stack starts the emulator through this launcher):

- **Preconditions.** An upload or read whose ``ifGenerationMatch`` differs from the object's live
  generation (``0``: the object must not exist) is answered 412 Precondition Failed. Without
  it, a compare-and-swap that is safe on GCS (the registry's channels document) would silently
  let the last writer win locally.
- **Generations.** A read that names a ``generation`` other than the live one is answered 404,
  as GCS does for a superseded generation of a bucket without versioning (the stream's buckets):
  the emulator served the newest bytes under whatever generation was asked for, so a read pinned
  to an announced generation could not be tested here.

And one cost that GCS does not have: the emulator reads a whole object from disk to answer each
byte range, and GDAL reads a tile in hundreds of ranges, so a 7,320² tile (178 MB) cost three
times as much per chip to read as a 3,660² one. :func:`ranged` reads the range alone.

All of it reaches into the emulator's private internals, so each wrap, and each internal the
wraps read, is a :class:`transforms.process.Patch` (:func:`patches`), checked like the Beam
patches before anything is wrapped: the emulator version they were written for (setup.py's
``[local]`` pin) and a digest of the source they rely on. An upgrade that changes either stops
the emulator at start with a :class:`transforms.process.PatchError` naming what to re-read,
instead of serving generations wrongly.
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from transforms.process import Patch, PatchError

EMULATOR = "gcp-storage-emulator"
WRITTEN_FOR = "2026.7.19"  # the version every wrap below was written against (setup.py pins it)
_lock = threading.Lock()


def _live_generation(storage: Any, bucket: str, name: str) -> str:
    from gcp_storage_emulator.exceptions import NotFound

    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return "0"


def _object_name(request: Any) -> str | None:
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data
    if isinstance(data, dict) and isinstance(data.get("meta"), dict):
        return data["meta"].get("name")
    return None


def _refusal(response, status: HTTPStatus, message: str, reason: str) -> None:
    response.status = status
    response.json({"error": {"code": int(status), "message": message,
                             "errors": [{"message": message, "domain": "global",
                                         "reason": reason}]}})


def with_preconditions(insert: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap the emulator's object insert: 412 when ``ifGenerationMatch`` does not hold."""

    def guarded(request, response, storage, *args, **kwargs):
        wanted = request.query.get("ifGenerationMatch")
        name = _object_name(request)
        if not wanted or name is None:
            return insert(request, response, storage, *args, **kwargs)
        with _lock:  # check and write as one step, as GCS does
            live = _live_generation(storage, request.params["bucket_name"], name)
            if wanted[0] != live:
                return _not_met(response, wanted[0], live)
            return insert(request, response, storage, *args, **kwargs)

    return guarded


def _not_met(response, wanted: str, live: str | None) -> None:
    """GCS's 412 for an ``ifGenerationMatch`` that does not hold."""
    _refusal(response, HTTPStatus.PRECONDITION_FAILED,
             f"At least one of the pre-conditions you specified did not hold "
             f"(ifGenerationMatch={wanted}, live generation {live})", "conditionNotMet")


def with_generations(read: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an object read (metadata or media): a ``generation`` that is not the live one is
    404 (gone, as on a bucket without versioning); ``ifGenerationMatch`` that does not hold,
    412."""

    def pinned(request, response, storage, *args, **kwargs):
        if request.query.get("softDeleted"):
            return read(request, response, storage, *args, **kwargs)
        generation = (request.query.get("generation") or [None])[0]
        wanted = ((request.query.get("ifGenerationMatch") or [None])[0]
                  or request.get_header("x-goog-if-generation-match", None))
        if generation or wanted:
            bucket, name = request.params["bucket_name"], request.params["object_id"]
            live = _live_generation(storage, bucket, name)
            if generation and generation != live:
                _refusal(response, HTTPStatus.NOT_FOUND,
                         f"No such object: {bucket}/{name}#{generation} (live generation "
                         f"{live})", "notFound")
                return None
            if wanted and wanted != live:
                return _not_met(response, wanted, live)
        return read(request, response, storage, *args, **kwargs)

    return pinned


_RANGE = re.compile(r"^\s*bytes=(?P<start>[0-9]+)-(?P<end>[0-9]*)$")


def ranged(download: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap the media download: a byte range of an object on disk is read as that range (the
    emulator's own handler reads the whole file and slices it)."""
    from gcp_storage_emulator.exceptions import NotFound

    def handler(request, response, storage, *args, **kwargs):
        found = _RANGE.fullmatch(request.get_header("range", None) or "")
        store = storage._store
        if not found or getattr(store, "_use_memory", True):
            return download(request, response, storage, *args, **kwargs)
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        try:
            meta = storage.get_file_obj(bucket, name)
            path = store._disk_path(storage._object_path(bucket, name))
            size = path.stat().st_size
        except (NotFound, OSError):  # the emulator's own answer (404)
            return download(request, response, storage, *args, **kwargs)
        start = int(found["start"])
        if start >= size:  # GCS: 416, never an empty or inverted range
            _refusal(response, HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                     f"The requested range cannot be satisfied: bytes={start}- of {size}",
                     "requestedRangeNotSatisfiable")
            return None
        end = min(size, int(found["end"]) + 1) if found["end"] else size
        with open(path, "rb") as handle:
            handle.seek(start)
            data = handle.read(max(0, end - start))
        response["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        response.status = HTTPStatus.PARTIAL_CONTENT
        response.write_file(data, content_type=meta.get("contentType"))
        return None

    return handler


def _unchanged(original: Any) -> Any:
    return original


def patches() -> list[Patch]:
    """The three wraps, then the private internals they read (kept as they are: each is here
    for its version and source check alone)."""
    import gcp_storage_emulator.server  # noqa: F401 - the watched module, as its package's name

    def wrap(name: str, target: str, digest: str, replacement, why: str,
             watch: str | None = None) -> Patch:
        return Patch(name, f"gcp_storage_emulator.{target}", digest, replacement, why,
                     required=True, package=EMULATOR, written_for=WRITTEN_FOR, watch=watch)

    return [
        wrap("gcs-preconditions", "handlers.objects:insert", "16e455c35509cbfe",
             with_preconditions, "ifGenerationMatch on uploads (412)"),
        wrap("gcs-generations", "handlers.objects:get", "e61fed7c25662114", with_generations,
             "a superseded generation is 404; ifGenerationMatch on reads"),
        wrap("gcs-ranged-download", "handlers.objects:download", "7a02a7cb00a2c99f",
             lambda download: with_generations(ranged(download)),
             "generations on media reads; a byte range read alone"),
        wrap("gcs-handler-table", "server:HANDLERS", "b0227517548e0c34", _unchanged,
             "install() rewires the routes of server.HANDLERS (a table: its module is watched)",
             watch="gcp_storage_emulator:server"),
        wrap("gcs-object-meta", "storage:Storage.get_file_obj", "e3409b11ce14c70c", _unchanged,
             "an object's metadata and live generation"),
        wrap("gcs-object-path", "storage:Storage._object_path", "3da57ac87063ce1a", _unchanged,
             "where ranged() finds an object"),
        wrap("gcs-storage-root", "storage:Storage.__init__", "4832303987f96ce2", _unchanged,
             "Storage._store, the file store ranged() reads"),
        wrap("gcs-store-disk", "storage:_FileStore.__init__", "466e7204bc3cf965", _unchanged,
             "_FileStore._use_memory: on disk or in memory"),
        wrap("gcs-store-path", "storage:_FileStore._disk_path", "b2d5e496c4ba6e51", _unchanged,
             "an object's file on disk"),
    ]


def install() -> None:
    """Check every patch (:class:`transforms.process.PatchError` on a version or source the
    wraps were not written for), then route every upload through :func:`with_preconditions`,
    every object read through :func:`with_generations`, every ranged download through
    :func:`ranged`."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    every = patches()
    for patch in every:  # all checked before anything changes
        problem = patch.problem()
        if problem:
            raise PatchError(problem)
    originals = {name: getattr(objects, name) for name in ("insert", "get", "download")}
    for patch in every:
        patch.install()
    wrapped = {original: getattr(objects, name) for name, original in originals.items()}
    for _regex, handlers in server.HANDLERS:  # the routes hold the originals
        for method, handler in list(handlers.items()):
            if handler in wrapped:
                handlers[method] = wrapped[handler]


def main(argv: list[str] | None = None) -> None:
    from gcp_storage_emulator.__main__ import main as emulator_main

    install()
    emulator_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
