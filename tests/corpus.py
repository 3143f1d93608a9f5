"""The hostile corpus: messages and files a bad publisher (or bad luck) sends the stream.

``python -m tests.corpus [DIR]`` writes the files to ``tests/data/bad/`` (or DIR) and prints the
inputs; the reliability tests build the same corpus in a temporary folder, publish it interleaved
with good tiles into one running local stream, and check every input's outcome. Each entry says
what it is, the stage that must refuse it and words its dead-letter reason must contain.

``{bucket}`` and ``{http}`` in messages are the stack's bucket and a loopback HTTP server the test
runs to prove that nothing is ever fetched from a URL a message names.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

from pipeline.ops import announce
from pipeline.ops.check import SAMPLE_TILE
from transforms.announcements import ANNOUNCEMENT_SCHEMA

ACQUIRED = "2001-07-15T12:30:00Z"


@dataclass
class BadInput:
    name: str
    what: str
    stage: str  # stage whose dead letter names it
    reason: str  # words the reason must contain
    data: bytes = b""
    attributes: dict[str, str] = field(default_factory=dict)
    upload: Path | None = None  # a file put in the allowed bucket, then notified
    partial: bool = False  # also a tile row, complete = false (some strips unreadable)
    messages: int = 1  # how many copies are published (several large ones fill one pull)


def _announcement(**fields) -> bytes:
    body = {"schema": ANNOUNCEMENT_SCHEMA, "tile_id": "hostile", "acquired": ACQUIRED,
            "uri": "gs://{bucket}/incoming/olinda.tif"}
    body.update(fields)
    return json.dumps(body).encode()


def _notification(bucket: str, name: str, generation: str = "1", drop: str = "") -> tuple:
    data, attributes = announce.gcs_notification(bucket, name, generation)
    attributes.pop(drop, None)
    return data, attributes


def _sparse(path: Path, size: int) -> Path:
    """A GeoTIFF whose header declares size x size x 6 but holds no data (a few KB)."""
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 6, "dtype": "uint8",
               "crs": "EPSG:32625", "transform": from_origin(500000, 9000000, 30, 30),
               "tiled": True, "blockxsize": 4096, "blockysize": 4096, "SPARSE_OK": True,
               "BIGTIFF": "YES"}
    with rasterio.open(path, "w", **profile):
        pass
    return path


def _rewritten(path: Path, transform_data, **profile_updates) -> Path:
    with rasterio.open(SAMPLE_TILE) as src:
        data, profile = src.read(), src.profile
    profile.update(profile_updates)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(transform_data(data))
    return path


def _truncated(path: Path) -> Path:
    """The sample as uncompressed 8-row strips, cut at 60 %: the last rows cannot be read."""
    whole = _rewritten(path.with_suffix(".whole.tif"), lambda d: d, tiled=False, blockysize=8,
                       compress=None)
    raw = whole.read_bytes()
    path.write_bytes(raw[: len(raw) * 6 // 10])
    whole.unlink()
    return path


def _vrt(path: Path, source: str) -> Path:
    """A VRT (XML) under a .tif name whose band reads ``source`` (a local file or a URL)."""
    path.write_text(
        '<VRTDataset rasterXSize="64" rasterYSize="64">'
        '<SRS>EPSG:32625</SRS><GeoTransform>500000, 30, 0, 9000000, 0, -30</GeoTransform>'
        + "".join(f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource>'
                  f'<SourceFilename relativeToVRT="0">{source}</SourceFilename>'
                  "<SourceBand>1</SourceBand></SimpleSource></VRTRasterBand>"
                  for b in range(1, 7))
        + "</VRTDataset>")
    return path


def build(directory: Path, bucket: str = "{bucket}", http: str = "{http}") -> list[BadInput]:
    """The corpus, its files written under ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    big = json.dumps({"schema": ANNOUNCEMENT_SCHEMA, "pad": "x" * (5 << 20)}).encode()
    one_mb = json.dumps({"schema": ANNOUNCEMENT_SCHEMA, "pad": "x" * (1 << 20)}).encode()
    deep = b"[" * 100_000 + b"]" * 100_000

    def sub(text: bytes) -> bytes:
        return text.replace(b"{bucket}", bucket.encode()).replace(b"{http}", http.encode())

    corpus = [
        BadInput("acquired_1e20", "announcement, acquired 1e20 (epoch ms)", "parse",
                 "outside 1970-2100", _announcement(acquired=1e20)),
        BadInput("acquired_infinity", "announcement, acquired Infinity", "parse",
                 "outside 1970-2100", _announcement(acquired="X").replace(b'"X"', b"Infinity")),
        BadInput("acquired_10e400", "announcement, acquired 10**400", "parse",
                 "outside 1970-2100",
                 _announcement(acquired="X").replace(b'"X"', b"1" + b"0" * 400)),
        BadInput("event_time_plus_1e20", "announcement, event_time +1e20", "parse",
                 "event_time", _announcement(event_time=1e20)),
        BadInput("event_time_minus_1e20", "announcement, event_time -1e20", "parse",
                 "event_time", _announcement(event_time=-1e20)),
        BadInput("event_time_year_1", "announcement, event_time 0001-01-01T00:00:00+01:00",
                 "parse", "outside 1970-2100",
                 _announcement(event_time="0001-01-01T00:00:00+01:00")),
        BadInput("nested_100k", "100,000-deep nested JSON body (200 kB)", "parse",
                 "byte limit", deep),
        BadInput("nested_30k", "30,000-deep nested JSON body (60 kB, under the size cap)",
                 "parse", "nested too deeply", b"[" * 30_000 + b"]" * 30_000),
        BadInput("invalid_utf8", "body that is not UTF-8", "parse", "not valid UTF-8",
                 b"\xff\xfe{\"schema\": 1}"),
        BadInput("oversized_5mb", "a 5 MB announcement (over gRPC's 4 MB pull limit)", "parse",
                 "byte limit", big),
        BadInput("five_1mb_in_one_pull", "five 1 MB messages (one pull over 4 MB)", "parse",
                 "byte limit", one_mb, messages=5),
        BadInput("too_many_attributes", "announcement with 100 attributes", "parse",
                 "at most 32", _announcement(attributes={f"k{i}": "v" for i in range(100)})),
        BadInput("tile_id_traversal", "announcement, tile_id ../../x", "parse", "tile_id",
                 _announcement(tile_id="../../x")),
        BadInput("generation_traversal", "announcement, generation ../x", "parse",
                 "generation", _announcement(generation="../x")),
        BadInput("uri_http", "announcement, uri http://127.0.0.1/…", "parse",
                 "not a gs:// object", _announcement(uri=f"{http}/tile.tif")),
        BadInput("uri_vsicurl", "announcement, uri /vsicurl/http://…", "parse",
                 "not a gs:// object", _announcement(uri=f"/vsicurl/{http}/tile.tif")),
        BadInput("uri_local_file", "announcement, uri /etc/hostname", "parse",
                 "not a .tif", _announcement(uri="/etc/hostname")),
        BadInput("uri_proc_environ", "announcement, uri /proc/self/environ", "parse",
                 "not a .tif", _announcement(uri="/proc/self/environ")),
        BadInput("uri_local_tif", "announcement, uri /tmp/x.tif (a local path)", "parse",
                 "not a gs:// object", _announcement(uri="/tmp/x.tif")),
        BadInput("uri_other_bucket", "announcement, uri in another bucket", "parse",
                 "outside the input allow-list",
                 _announcement(uri="gs://someone-elses-bucket/x.tif")),
        BadInput("uri_metadata_hash", "announcement, …/computeMetadata/v1/token#.tif", "parse",
                 "contains '#'",
                 _announcement(uri=f"{http}/computeMetadata/v1/instance/service-accounts/"
                                   "default/token#.tif")),
        BadInput("uri_hash_in_bucket", "announcement, gs://allowed/…token#.tif", "parse",
                 "contains '#'", _announcement(uri="gs://{bucket}/computeMetadata/v1/token#.tif")),
        BadInput("band_uri_dotdot", "announcement, band URI with '..' segments", "parse",
                 "'..' path segments",
                 _announcement(uri=None, bands={b: "gs://{bucket}/incoming/../../etc/x.tif"
                                                for b in ("blue", "green", "red", "nir",
                                                          "swir1", "swir2")})),
    ]
    for what, drop in (("bucketId", "bucketId"), ("objectGeneration", "objectGeneration")):
        data, attributes = _notification(bucket, "incoming/olinda.tif", drop=drop)
        corpus.append(BadInput(f"notification_without_{what}",
                               f"GCS notification without {what}", "parse",
                               f"lacks the {what} attribute", data, attributes))
    data, attributes = _notification(bucket, "incoming/x/.tif")
    corpus.append(BadInput("object_empty_tile_id", "GCS notification of incoming/x/.tif",
                           "parse", "tile id", data, attributes))
    data, attributes = _notification(bucket, "incoming/olinda.tif", generation="abc")
    corpus.append(BadInput("object_bad_generation", "GCS notification, objectGeneration abc",
                           "parse", "not a generation number", data, attributes))
    data, attributes = _notification("someone-elses-bucket", "x.tif")
    corpus.append(BadInput("notification_other_bucket", "GCS notification from another bucket",
                           "parse", "outside the input allow-list", data, attributes))
    files = [
        ("vrt_local_file", "a VRT named .tif in the bucket, reading /etc/hostname",
         "not a GeoTIFF", _vrt(directory / "vrt_local_file.tif", "/etc/hostname"), False),
        ("vrt_url", "a VRT named .tif in the bucket, reading http://127.0.0.1/…",
         "not a GeoTIFF", _vrt(directory / "vrt_url.tif", f"/vsicurl/{http}/src.tif"), False),
        ("not_a_tiff", "random bytes named .tif", "not a GeoTIFF",
         _write(directory / "not_a_tiff.tif", np.random.default_rng(1).bytes(4096)), False),
        ("header_200000", "a sparse GeoTIFF whose header declares 200,000 x 200,000 x 6",
         "max_tile_pixels",
         _sparse(directory / "header_200000.tif", 200_000), False),
        ("header_20000", "header declaring 20,000 x 20,000 x 6", "max_tile_pixels",
         _sparse(directory / "header_20000.tif", 20_000), False),
        ("uint16_dn_x40", "uint16 DN x 40 fed to the 8-bit DN model", "valid input range",
         _rewritten(directory / "uint16_dn_x40.tif", lambda d: d.astype(np.uint16) * 40,
                    dtype="uint16"), False),
        ("complex64", "complex64 bands", "complex band types",
         _rewritten(directory / "complex64.tif", lambda d: d.astype(np.complex64),
                    dtype="complex64", compress=None), False),
        ("truncated", "the sample cut at 60 % of its bytes", "TIFFReadEncodedStrip",
         _truncated(directory / "truncated.tif"), True),
    ]
    for name, what, reason, path, partial in files:
        corpus.append(BadInput(name, what, "chips", reason, upload=path, partial=partial))
    corpus.append(BadInput("missing_object", "GCS notification of an object that is not there",
                           "chips", "does not exist",
                           *_notification(bucket, "incoming/missing-object.tif", "7")))
    for entry in corpus:
        entry.data = sub(entry.data)
        entry.attributes = {k: sub(v.encode()).decode() for k, v in entry.attributes.items()}
    return corpus


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "data" / "bad"
    for item in build(out):
        print(f"{item.name:28} {item.stage:6} {item.what}")
