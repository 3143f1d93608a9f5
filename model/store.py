"""Where a registry lives: a local directory or a ``gs://`` prefix, with compare-and-swap writes.

A write may name the token (sha256 locally, object generation on GCS) of the version it read;
it fails with :class:`ConflictError` when someone else wrote meanwhile: on GCS an
``ifGenerationMatch`` precondition, locally a rename of a temporary file under a lock. Reads are
size-limited and, on GCS, pinned to the generation whose size was checked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from model.channels import ConflictError, RegistryError

ABSENT = "0"  # the token of an object that does not exist (GCS's generation 0)


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
