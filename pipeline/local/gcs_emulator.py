"""``gcp-storage-emulator`` with GCS's object-generation preconditions on uploads.

The emulator ignores ``ifGenerationMatch``, so a compare-and-swap that is safe on GCS (the model
registry's channels document) would silently let the last writer win locally. Real GCS answers an
upload whose ``ifGenerationMatch`` differs from the object's live generation (``0``: the object
must not exist) with 412 Precondition Failed; this launcher adds exactly that check in front of the
emulator's own upload handler and changes nothing else. The stack starts the emulator through it.
"""

from __future__ import annotations

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
                response.status = HTTPStatus.PRECONDITION_FAILED
                message = (f"At least one of the pre-conditions you specified did not hold "
                           f"(ifGenerationMatch={wanted[0]}, live generation {live})")
                response.json({"error": {"code": 412, "message": message, "errors": [
                    {"message": message, "domain": "global", "reason": "conditionNotMet"}]}})
                return None
            return insert(request, response, storage, *args, **kwargs)

    return guarded


def install() -> None:
    """Route every upload the emulator serves through :func:`with_preconditions`."""
    from gcp_storage_emulator import server
    from gcp_storage_emulator.handlers import objects

    original = objects.insert
    guarded = with_preconditions(original)
    objects.insert = guarded  # the server's fallback route looks it up at request time
    for _regex, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is original:
                handlers[method] = guarded


def main(argv: list[str] | None = None) -> None:
    from gcp_storage_emulator.__main__ import main as emulator_main

    install()
    emulator_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
