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
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

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


def install() -> None:
    """Route every upload through :func:`with_preconditions`, every object read through
    :func:`with_generations`, every ranged download through :func:`ranged`."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    wrapped = {objects.insert: with_preconditions(objects.insert),
               objects.get: with_generations(objects.get),
               objects.download: with_generations(ranged(objects.download))}
    objects.insert = wrapped[objects.insert]  # the server's fallback route looks it up
    for _regex, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler in wrapped:
                handlers[method] = wrapped[handler]


def main(argv: list[str] | None = None) -> None:
    from gcp_storage_emulator.__main__ import main as emulator_main

    install()
    emulator_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
