"""Publishing tiles into the stream: what a GCS bucket notification or an announcer would send.

The GCS emulator emits no Pub/Sub notifications, so locally ``tilestream announce`` uploads the
file and publishes the ``OBJECT_FINALIZE`` notification GCS itself would publish (same attributes,
``JSON_API_V1`` payload). JSON announcements follow docs/announcement.md.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
from collections.abc import Mapping

from transforms.announcements import ANNOUNCEMENT_SCHEMA, rfc3339
from transforms.guards import RASTER_SUFFIXES

# The first bytes of a classic TIFF or a BigTIFF, little- or big-endian (COGs are TIFFs).
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class AnnounceError(ValueError):
    """A file or object that must not be announced; refused before anything is uploaded."""


def check_raster(path: str) -> None:
    """Refuse up front what the stream would only filter: a notification of an object that is
    not a ``.tif``/``.tiff`` is acknowledged and counted as filtered, never scored, and a file
    that is not a TIFF inside would be dead-lettered after its upload."""
    if not path.lower().endswith(RASTER_SUFFIXES):
        raise AnnounceError(f"{path} is not a GeoTIFF (the stream reads "
                            f"{', '.join(RASTER_SUFFIXES)} files; anything else it filters "
                            "without scoring)")
    if path.startswith("gs://"):
        return
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise AnnounceError(f"{path}: no such file") from None
    except OSError as exc:
        raise AnnounceError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if head not in TIFF_MAGIC:
        raise AnnounceError(f"{path} is not a TIFF (it does not start with a TIFF header)")


def gcs_notification(bucket: str, name: str, generation: str | int, *,
                     event_type: str = "OBJECT_FINALIZE", size: int = 0,
                     event_time: float | None = None) -> tuple[bytes, dict[str, str]]:
    """(data, attributes) of a Cloud Storage Pub/Sub notification in JSON_API_V1 format."""
    when = rfc3339(time.time() if event_time is None else event_time)
    resource = {
        "kind": "storage#object",
        "id": f"{bucket}/{name}/{generation}",
        "name": name,
        "bucket": bucket,
        "generation": str(generation),
        "contentType": "image/tiff",
        "size": str(size),
        "timeCreated": when,
        "updated": when,
    }
    attributes = {
        "notificationConfig": f"projects/_/buckets/{bucket}/notificationConfigs/1",
        "eventType": event_type,
        "payloadFormat": "JSON_API_V1",
        "bucketId": bucket,
        "objectId": name,
        "objectGeneration": str(generation),
        "eventTime": when,
    }
    return json.dumps(resource).encode(), attributes


def json_announcement(tile_id: str, acquired: str, *, uri: str | None = None,
                      bands: Mapping[str, str] | None = None, sensor: str | None = None,
                      attributes: Mapping[str, str] | None = None,
                      event_time: float | None = None) -> tuple[bytes, dict[str, str]]:
    """(data, attributes) of a ``tilestream.announcement/v1`` message."""
    payload: dict = {"schema": ANNOUNCEMENT_SCHEMA, "tile_id": tile_id, "acquired": acquired}
    if uri is not None:
        payload["uri"] = uri
    if bands is not None:
        payload["bands"] = dict(bands)
    if sensor:
        payload["sensor"] = sensor
    if attributes:
        payload["attributes"] = dict(attributes)
    when = rfc3339(time.time() if event_time is None else event_time)
    payload["event_time"] = when
    return json.dumps(payload).encode(), {"eventTime": when}


def upload(storage_client, path: str, bucket: str, name: str) -> tuple[str, int]:
    """Upload a local file; returns (gs:// URI, object generation)."""
    blob = storage_client.bucket(bucket).blob(name)
    blob.upload_from_filename(path, content_type="image/tiff")
    blob.reload()
    return f"gs://{bucket}/{name}", int(blob.generation or time.time_ns() // 1000)


def object_name(prefix: str, path: str) -> str:
    return posixpath.join(prefix.strip("/"), os.path.basename(path))


def publish(publisher, topic: str, data: bytes, attributes: Mapping[str, str]) -> str:
    return publisher.publish(topic, data, **attributes).result(timeout=30)
