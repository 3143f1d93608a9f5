"""Local mode only: who a call of this process is, as the stack's recording proxies see it.

GCP tells callers apart by their credentials; the emulators accept anything. So every anonymous
request of this process carries ``Authorization: Bearer local.<identity>`` (``TILESTREAM_IDENTITY``,
or :func:`acting_as` for a block), and the recording proxies (``pipeline/local/audit.py``) log
each call under it, for the least-privilege check (``pipeline/ops/iam.py``). The stack's own
clients (``stack.py``) and the client patches (``patches.py``) both sign their calls here.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

from transforms.process import Patch

IDENTITY_ENV = "TILESTREAM_IDENTITY"
ANONYMOUS = "anonymous"
LOCAL_TOKEN = "local."  # Bearer local.<identity>: what the recording proxies read
_acting = threading.local()


def current_identity() -> str:
    """Who this thread acts as: :func:`acting_as`, else ``TILESTREAM_IDENTITY``."""
    return getattr(_acting, "name", None) or os.environ.get(IDENTITY_ENV) or ANONYMOUS


@contextlib.contextmanager
def acting_as(identity: str) -> Iterator[None]:
    """Calls of this thread inside the block carry ``identity`` (e.g. the journal's replays,
    which exist only locally and are no identity's in production)."""
    before = getattr(_acting, "name", None)
    _acting.name = identity
    try:
        yield
    finally:
        _acting.name = before


def authorization(identity: str | None = None) -> str:
    return f"Bearer {LOCAL_TOKEN}{identity or current_identity()}"


def _with_identity(original):
    def before_request(self, request, method, url, headers):
        headers["authorization"] = authorization()

    before_request.__wrapped__ = original
    return before_request


IDENTITY = Patch(
    name="anonymous-credentials-carry-the-identity",
    target="google.auth.credentials:AnonymousCredentials.before_request",
    digest="c1bd148942ae0e0e",
    replacement=_with_identity,
    why="every client bound to an emulator is anonymous; the recording proxies attribute each "
        "call to the identity it names",
    required=True,
    package="google-auth",
    written_for=None,
)


def identity_channel(target: str, options: list | None = None, identity: str | None = None):
    """An insecure gRPC channel to an emulator whose calls carry ``identity``, else the calling
    thread's. A client that calls from threads of its own (the publisher's batch commits) needs
    the identity fixed here: those threads never entered :func:`acting_as`."""
    import collections

    import grpc

    class Details(collections.namedtuple("Details", ("method", "timeout", "metadata",
                                                     "credentials", "wait_for_ready",
                                                     "compression")),
                  grpc.ClientCallDetails):
        pass

    class Interceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                      grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
        @staticmethod
        def _signed(details):
            return Details(details.method, details.timeout,
                           [*(details.metadata or ()), ("authorization",
                                                        authorization(identity))],
                           details.credentials, details.wait_for_ready,
                           getattr(details, "compression", None))

        def intercept_unary_unary(self, continuation, details, request):
            return continuation(self._signed(details), request)

        def intercept_unary_stream(self, continuation, details, request):
            return continuation(self._signed(details), request)

        def intercept_stream_unary(self, continuation, details, requests):
            return continuation(self._signed(details), requests)

        def intercept_stream_stream(self, continuation, details, requests):
            return continuation(self._signed(details), requests)

    return grpc.intercept_channel(grpc.insecure_channel(target, options=options or []),
                                  Interceptor())
