"""BigQuery sinks: table schemas (kept here and as JSON in templates/bigquery/) and row builders.

Rows carry a deterministic ``row_id`` (model, tile version, chip) so a chip scored twice after a
retry is recognisable; Beam's own insertIds make the streaming insert itself retry-safe.
Tables are created when absent, partitioned by day of event time and clustered by tile id and
model version, the two filters almost every query has.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import math
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.io.gcp.bigquery_tools import RetryStrategy

from transforms import process  # noqa: F401 - installs the runtime's Beam patches (its docstring)
from transforms.location import location_key
from transforms.records import ChipPrediction, PredictionBlock, TileManifest, TileRef


def _field(name: str, type_: str, mode: str = "NULLABLE", description: str = "", fields=None):
    spec = {"name": name, "type": type_, "mode": mode}
    if description:
        spec["description"] = description
    if fields:
        spec["fields"] = fields
    return spec


_CLASS_FIELDS = [
    _field("class_id", "INT64", "REQUIRED"),
    _field("name", "STRING", "REQUIRED"),
    _field("pixels", "INT64", "REQUIRED", "valid pixels predicted as this class"),
    _field("area_m2", "FLOAT64", "REQUIRED"),
]
_ATTRIBUTE_FIELDS = [_field("key", "STRING", "REQUIRED"), _field("value", "STRING")]

_TILE_IDENTITY = [
    _field("row_id", "STRING", "REQUIRED", "deterministic id: model, tile version, chip"),
    _field("tile_id", "STRING", "REQUIRED"),
    _field("tile_generation", "STRING", "REQUIRED", "object generation or content hash"),
]
_PROVENANCE = [
    _field("acquired", "TIMESTAMP", description="acquisition time, when announced"),
    _field("event_time", "TIMESTAMP", "REQUIRED", "notification eventTime / announcement time"),
    _field("published", "TIMESTAMP", "REQUIRED", "Pub/Sub publish time"),
    _field("source", "STRING", "REQUIRED", "gcs | announcement | granule | file"),
    _field("source_uris", "STRING", "REPEATED"),
    _field("message_id", "STRING"),
    _field("source_message_ids", "STRING", "REPEATED",
           "every Pub/Sub message this tile answers (all band files of a granule)"),
    _field("sensor", "STRING"),
    _field("attributes", "RECORD", "REPEATED", "announcement attributes", _ATTRIBUTE_FIELDS),
    _field("model_name", "STRING", "REQUIRED"),
    _field("model_version", "STRING", "REQUIRED"),
    _field("role", "STRING", description="live | shadow | canary: the channel that scored it "
           "(NULL in rows written before channels existed: live)"),
]

# Every table: which release of the stream wrote the row (blue-green tells two jobs apart by it).
_RELEASE = _field("release", "STRING", description="the stream release that wrote the row "
                  "(--release; NULL in rows written before releases were recorded)")

# Per tile, against the card's drift_reference (model/drift.py); NULL without a reference.
_DRIFT = [
    _field("drift_band_psi", "RECORD", "REPEATED", "PSI of each band against the training "
           "pixels", [_field("band", "STRING", "REQUIRED"), _field("psi", "FLOAT64")]),
    _field("drift_class_psi", "FLOAT64", description="PSI of the predicted classes against "
           "the model's predictions on the training pixels"),
    _field("drift_max_band_psi", "FLOAT64"),
    _field("drifted", "BOOL", description="a band's or the classes' PSI is over the threshold"),
]

CHIP_SCHEMA = {
    "fields": [
        *_TILE_IDENTITY,
        _field("chip_index", "INT64", "REQUIRED"),
        _field("row_off", "INT64", "REQUIRED", "window in tile pixels"),
        _field("col_off", "INT64", "REQUIRED"),
        _field("height", "INT64", "REQUIRED"),
        _field("width", "INT64", "REQUIRED"),
        _field("crs", "STRING", "REQUIRED"),
        _field("footprint", "GEOGRAPHY", "REQUIRED", "chip window in EPSG:4326"),
        _field("valid_fraction", "FLOAT64", "REQUIRED"),
        _field("classes", "RECORD", "REPEATED", "per-class pixel counts and area", _CLASS_FIELDS),
        _field("dominant_class", "STRING", "REQUIRED"),
        _field("mean_confidence", "FLOAT64", "REQUIRED"),
        *_PROVENANCE,
        _field("chipped_at", "TIMESTAMP", "REQUIRED"),
        _field("scored_at", "TIMESTAMP", "REQUIRED"),
        _field("latency_s", "FLOAT64", "REQUIRED", "scored_at - published"),
        _RELEASE,
    ]
}

TILE_SCHEMA = {
    "fields": [
        *_TILE_IDENTITY,
        _field("complete", "BOOL", "REQUIRED", "false when written by the timeout"),
        _field("chips_total", "INT64", "REQUIRED"),
        _field("chips_scored", "INT64", "REQUIRED"),
        _field("chips_skipped", "INT64", "REQUIRED", "under the valid-pixel threshold"),
        _field("chips_failed", "INT64", "REQUIRED", "dead-lettered or never arrived"),
        _field("width", "INT64", "REQUIRED"),
        _field("height", "INT64", "REQUIRED"),
        _field("crs", "STRING", "REQUIRED"),
        _field("footprint", "GEOGRAPHY", "REQUIRED"),
        _field("classes", "RECORD", "REPEATED", "per-class pixels and area", _CLASS_FIELDS),
        _field("raster_uri", "STRING", "REQUIRED", "prediction COG"),
        _field("stac_uri", "STRING", description="STAC Item of the prediction COG"),
        _field("location_key", "STRING", description="the place across revisits: MGRS tile, "
               "WRS-2 path/row or footprint grid cell (transforms/location.py; NULL in rows "
               "written before it was recorded)"),
        *_PROVENANCE,
        _field("completed_at", "TIMESTAMP", "REQUIRED"),
        _field("latency_s", "FLOAT64", "REQUIRED", "completed_at - published (end to end)"),
        *_DRIFT,
        _RELEASE,
    ]
}

_SOURCE_IDS = _field("source_message_ids", "STRING", "REPEATED",
                     "every Pub/Sub message it is about (all band files of a granule)")

ERROR_SCHEMA = {
    "fields": [
        _field("stage", "STRING", "REQUIRED"),
        _field("reason", "STRING", "REQUIRED"),
        _field("message_id", "STRING"),
        _SOURCE_IDS,
        _field("tile_id", "STRING"),
        _field("payload", "STRING", description="excerpt of the offending input"),
        _field("time", "TIMESTAMP", "REQUIRED"),
        _RELEASE,
    ]
}

EVENT_SCHEMA = {
    "fields": [
        _field("disposition", "STRING", "REQUIRED",
               "filtered | duplicate | superseded | model (a registry version loaded or "
               "refused) | drift"),
        _field("stage", "STRING", "REQUIRED"),
        _field("reason", "STRING", "REQUIRED"),
        _field("message_id", "STRING"),
        _SOURCE_IDS,
        _field("tile_id", "STRING"),
        _field("time", "TIMESTAMP", "REQUIRED"),
        _RELEASE,
    ]
}

MESSAGE_SCHEMA = {
    "fields": [
        _field("message_id", "STRING", "REQUIRED", "as Pub/Sub delivered it (file:PATH for a "
               "backfilled file)"),
        _field("published", "TIMESTAMP", "REQUIRED", "first publish: a replay's original's"),
        _field("delivered", "TIMESTAMP", "REQUIRED", "publish time of this delivery"),
        _field("received_at", "TIMESTAMP", "REQUIRED", "when the stream took it in"),
        _field("replay_of", "STRING", description="the message this one was published again "
               "for (the local journal's replays)"),
        _field("kind", "STRING", "REQUIRED", "notification | message | file"),
        _RELEASE,
    ]
}

_CHANGE_CLASS_FIELDS = [
    _field("name", "STRING", "REQUIRED"),
    _field("before_area_m2", "FLOAT64", "REQUIRED"),
    _field("after_area_m2", "FLOAT64", "REQUIRED"),
    _field("before_share", "FLOAT64", "REQUIRED", "of the classified area, 0..1"),
    _field("after_share", "FLOAT64", "REQUIRED"),
]


def _acquisition_fields(side: str) -> list[dict]:
    return [_field(f"{side}_tile_id", "STRING", "REQUIRED"),
            _field(f"{side}_generation", "STRING", "REQUIRED"),
            _field(f"{side}_acquired", "TIMESTAMP", "REQUIRED"),
            _field(f"{side}_raster_uri", "STRING", "REQUIRED", "prediction COG"),
            _field(f"{side}_stac_uri", "STRING", description="STAC Item of the prediction")]


# One row per change rule fired between two acquisitions of a location (transforms/changes.py,
# docs/changes.md); each carries what a `changed` event needs.
CHANGE_SCHEMA = {
    "fields": [
        _field("change_id", "STRING", "REQUIRED", "sha1(location, both tile versions and "
               "model, rule): the same change found again has the same id"),
        _field("location_key", "STRING", "REQUIRED"),
        _field("rule", "STRING", "REQUIRED", "name of the change rule that fired"),
        _field("class_name", "STRING", "REQUIRED"),
        _field("direction", "STRING", "REQUIRED", "gain | loss"),
        _field("rule_min_points", "FLOAT64", "REQUIRED"),
        _field("rule_min_hectares", "FLOAT64", "REQUIRED"),
        _field("delta_points", "FLOAT64", "REQUIRED", "change of the class's area share, "
               "percentage points"),
        _field("delta_hectares", "FLOAT64", "REQUIRED"),
        _field("model_name", "STRING", "REQUIRED"),
        _field("model_version", "STRING", "REQUIRED", "both acquisitions were scored by it"),
        _field("role", "STRING", "REQUIRED", "live | canary: the after tile's row role"),
        *_acquisition_fields("before"),
        *_acquisition_fields("after"),
        _field("footprint", "GEOGRAPHY", description="the after tile's footprint"),
        _field("classes", "RECORD", "REPEATED", "every class before and after",
               _CHANGE_CLASS_FIELDS),
        _field("change_raster_uri", "STRING", description="from/to change COG; NULL when the "
               "predictions are not on one grid"),
        _field("change_stac_uri", "STRING"),
        _field("detected_at", "TIMESTAMP", "REQUIRED"),
        _RELEASE,
    ]
}

SCHEMAS = {"chips": CHIP_SCHEMA, "tiles": TILE_SCHEMA, "dead_letters": ERROR_SCHEMA,
           "events": EVENT_SCHEMA, "messages": MESSAGE_SCHEMA, "changes": CHANGE_SCHEMA}
_PARTITION_FIELD = {"chips": "event_time", "tiles": "event_time", "dead_letters": "time",
                    "events": "time", "messages": "received_at", "changes": "detected_at"}


@dataclass(frozen=True)
class BigQueryTables:
    """Fully qualified ``project:dataset.table`` names of the stream's tables."""

    chips: str
    tiles: str
    errors: str
    events: str
    messages: str
    changes: str

    @classmethod
    def in_dataset(cls, dataset: str, project: str | None = None) -> BigQueryTables:
        """Tables ``chips``, ``tiles``, ``dead_letters``, ``events``, ``messages`` and
        ``changes`` in ``[project:]dataset``."""
        full = ":".join(dataset_ref(dataset, project))
        return cls(f"{full}.chips", f"{full}.tiles", f"{full}.dead_letters", f"{full}.events",
                   f"{full}.messages", f"{full}.changes")

    def by_kind(self) -> dict[str, str]:
        return {"chips": self.chips, "tiles": self.tiles, "dead_letters": self.errors,
                "events": self.events, "messages": self.messages, "changes": self.changes}


def missing_columns(existing: list[dict], wanted: list[dict]) -> list[dict]:
    """The top-level columns of ``wanted`` a table of ``existing`` columns lacks, as they can
    be added: NULLABLE (or REPEATED), since the rows already there, and those the release before
    this one keeps writing while it is blue, have no value for them."""
    have = {f["name"] for f in existing}
    return [{**f, "mode": "REPEATED" if f.get("mode") == "REPEATED" else "NULLABLE"}
            for f in wanted if f["name"] not in have]


def _ddl_type(f: dict) -> str:
    """A schema field's type as DDL spells it."""
    kind = f["type"]
    if kind == "RECORD":
        kind = "STRUCT<" + ", ".join(f"`{g['name']}` {_ddl_type(g)}" for g in f["fields"]) + ">"
    return f"ARRAY<{kind}>" if f.get("mode") == "REPEATED" else kind


def _add_columns(wrapper, project: str, dataset: str, name: str, fields: list[dict],
                 added: list[dict]) -> None:
    """Add ``added`` to a table: the DDL, then the same columns in the table's schema.
    BigQuery does both with either; the local emulator keeps the stored table (DDL) apart from
    the schema its inserts are checked against (patch), so both are said."""
    from apache_beam.io.gcp import bigquery_tools
    from apache_beam.io.gcp.internal.clients import bigquery

    for f in added:  # one statement each: the emulator takes one ALTER per statement
        wrapper.gcp_bq_client.query(
            f"ALTER TABLE `{project}.{dataset}.{name}` ADD COLUMN IF NOT EXISTS `{f['name']}` "
            f"{_ddl_type(f)}", project=project).result()
    schema = bigquery_tools.parse_table_schema_from_json(json.dumps({"fields": fields + added}))
    wrapper.client.tables.Patch(bigquery.BigqueryTablesPatchRequest(
        projectId=project, datasetId=dataset, tableId=name, table=bigquery.Table(schema=schema)))


def ensure_tables(tables: BigQueryTables) -> list[str]:
    """Create every table of the stream that does not exist yet, with its schema, partitioning
    and clustering (what Terraform creates on GCP): readers find them all from the first
    minute, whatever has been written. A table an earlier release created (it was blue first)
    gains the columns this release adds, as NULLABLE, so both can write to it. Returns the
    tables created or widened. Uses Beam's own BigQuery client, so it goes where the stream's
    writes go."""
    from apache_beam.io.gcp import bigquery_tools
    from apitools.base.py.exceptions import HttpError

    wrapper = bigquery_tools.BigQueryWrapper()
    created = []
    for kind, table in tables.by_kind().items():
        project, rest = table.split(":", 1)
        dataset, name = rest.split(".", 1)
        try:
            found = wrapper.get_table(project, dataset, name)
        except HttpError as exc:
            if exc.status_code != 404:
                raise
        else:
            fields = bigquery_tools.table_schema_to_dict(found.schema)["fields"]
            added = missing_columns(fields, SCHEMAS[kind]["fields"])
            if added:
                _add_columns(wrapper, project, dataset, name, fields, added)
                created.append(table)
            continue
        schema = bigquery_tools.parse_table_schema_from_json(json.dumps(SCHEMAS[kind]))
        wrapper.get_or_create_table(
            project, dataset, name, schema, beam.io.BigQueryDisposition.CREATE_IF_NEEDED,
            beam.io.BigQueryDisposition.WRITE_APPEND,
            additional_create_parameters=table_parameters(kind))
        created.append(table)
    return created


def dataset_ref(spec: str, project: str | None = None) -> tuple[str, str]:
    """``--bq_dataset`` -> ``(project, dataset)``: the one spelling is ``PROJECT:DATASET``;
    ``PROJECT.DATASET`` (how SQL names it) is read the same way, and a bare ``DATASET`` takes
    ``project``. Every verb and the stream read the flag through this."""
    if ":" in spec or "." in spec:
        name_project, _, name = spec.replace(":", ".", 1).partition(".")
    else:
        name_project, name = project or "", spec
    if not name_project or not name or "." in name or ":" in name:
        raise ValueError(f"--bq_dataset {spec!r} is not PROJECT:DATASET"
                         + ("" if name_project else " (or give --project)"))
    return name_project, name


def table_parameters(kind: str) -> dict:
    """Partitioning and clustering, as Beam passes them to tables.insert."""
    params = {"timePartitioning": {"type": "DAY", "field": _PARTITION_FIELD[kind]}}
    if kind in ("chips", "tiles"):
        params["clustering"] = {"fields": ["tile_id", "model_version"]}
    if kind == "changes":
        params["clustering"] = {"fields": ["location_key", "model_version"]}
    return params


def stamped(row: dict, release: str) -> dict:
    return {**row, "release": release}


# BigQuery's quota on load jobs into one table per day, failed ones included
# (cloud.google.com/bigquery/quotas, "Load jobs per table per day"). Copy jobs into the table
# count against the same table-operations limit.
LOAD_JOBS_PER_TABLE_DAY = 1500
# Beam's file loads put at most this many files in one load job (``_MAXIMUM_SOURCE_URIS``); a
# bounded job with more makes one load per partition into temporary tables and one copy job per
# partition into the table.
FILES_PER_LOAD_JOB = 10_000


def stream_load_jobs_per_day(every_secs: float) -> int:
    """Load jobs one streaming job makes into the chips table per day, at most: Beam fires the
    load once per ``every_secs`` while rows arrive (one partition: a firing's files are far
    fewer than :data:`FILES_PER_LOAD_JOB`)."""
    return math.ceil(86_400 / every_secs)


def batch_load_jobs(files: int) -> int:
    """Load (or copy) jobs into the table of a bounded job that stages ``files`` files: it loads
    once, at the end, one job per partition."""
    return max(1, math.ceil(files / FILES_PER_LOAD_JOB))


class WriteRows(beam.PTransform):
    """Rows -> ``table``, each stamped with the ``release`` of the job that wrote it: streaming
    inserts, or with ``load_jobs`` load jobs of the rows gathered over ``every_secs`` (a
    streaming pipeline; a batch one loads once at the end). Returns Beam's ``WriteResult``.

    Load jobs are for the chip rows, thousands per tile: the insertAll path costs per row (Beam
    sizes each row; the API bills by the byte; the local emulator spent 5 CPU-seconds on 5,776
    rows, against 0.14 s for one load job of the same rows). A load job fails as a whole on one
    bad row, so rows go through ``deadletter.CheckRows`` first.
    """

    def __init__(self, table: str, schema: dict, release: str, *, load_jobs: bool = False,
                 every_secs: int | None = None, temp_location: str | None = None):
        super().__init__()
        self._table, self._schema, self._release = table, schema, release
        self._load_jobs, self._every_secs = load_jobs, every_secs
        self._temp_location = temp_location

    def expand(self, rows):
        kind = next(k for k, s in SCHEMAS.items() if s is self._schema)
        common = dict(schema=self._schema,
                      create_disposition=beam.io.BigQueryDisposition.CREATE_IF_NEEDED,
                      write_disposition=beam.io.BigQueryDisposition.WRITE_APPEND,
                      additional_bq_parameters=table_parameters(kind))
        if self._load_jobs:
            write = beam.io.WriteToBigQuery(
                self._table, method=beam.io.WriteToBigQuery.Method.FILE_LOADS,
                triggering_frequency=self._every_secs,
                custom_gcs_temp_location=self._temp_location, **common)
        else:
            write = beam.io.WriteToBigQuery(
                self._table, method=beam.io.WriteToBigQuery.Method.STREAMING_INSERTS,
                insert_retry_strategy=RetryStrategy.RETRY_ON_TRANSIENT_ERROR, **common)
        return rows | "Release" >> beam.Map(stamped, self._release) | "Write" >> write


_JSON_TYPES = {"STRING": str, "GEOGRAPHY": str, "TIMESTAMP": str, "BOOL": bool,
               "INT64": int, "FLOAT64": (int, float)}


def row_problem(row: dict, fields: list[dict], path: str = "") -> str | None:
    """Why BigQuery would refuse ``row`` under ``fields`` (None when it would load): required
    values present, JSON types right, floats finite, no unknown columns."""
    unknown = set(row) - {f["name"] for f in fields}
    if unknown:
        return f"unknown column(s) {sorted(unknown)[:3]}"
    for f in fields:
        name, value = f["name"], row.get(f["name"])
        where = f"{path}{name}"
        if value is None:
            if f["mode"] == "REQUIRED":
                return f"{where} is required"
            continue
        values = value if f["mode"] == "REPEATED" else [value]
        if f["mode"] == "REPEATED" and not isinstance(value, list):
            return f"{where} must be a list"
        for v in values:
            if f["type"] == "RECORD":
                problem = (row_problem(v, f["fields"], f"{where}.") if isinstance(v, dict)
                           else f"{where} must be a record")
                if problem:
                    return problem
                continue
            kind = _JSON_TYPES[f["type"]]
            if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                return f"{where} must be {f['type']}, not {type(v).__name__}"
            if isinstance(v, float) and not math.isfinite(v):
                return f"{where} is {v}"
    return None


def bq_timestamp(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="microseconds")


def row_id(*parts: object) -> str:
    return hashlib.sha1("|".join(str(p) for p in parts).encode()).hexdigest()


@functools.lru_cache(maxsize=64)
def crs_label(crs_wkt: str) -> str:
    """``EPSG:nnnn`` when the CRS has a code, else its WKT (cached: every chip row asks)."""
    from rasterio.crs import CRS

    crs = CRS.from_wkt(crs_wkt)
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs_wkt


def class_records(counts, names, pixel_area_m2: float) -> list[dict]:
    return [
        {"class_id": i, "name": name, "pixels": int(n), "area_m2": float(n) * pixel_area_m2}
        for i, (name, n) in enumerate(zip(names, counts, strict=True))
    ]


def provenance(tile: TileRef, model_name: str, model_version: str, role: str = "live") -> dict:
    return {
        "acquired": tile.acquired,
        "event_time": bq_timestamp(tile.event_time),
        "published": bq_timestamp(tile.published),
        "source": tile.source,
        "source_uris": list(tile.band_uris),
        "message_id": tile.message_id or None,
        "source_message_ids": list(tile.message_ids),
        "sensor": tile.sensor,
        "attributes": [{"key": k, "value": v} for k, v in tile.attributes],
        "model_name": model_name,
        "model_version": model_version,
        "role": role,
    }


def chip_rows(block: PredictionBlock, class_names: tuple[str, ...]) -> list[dict]:
    """One BigQuery row per chip of a block: blocks become rows only here, at the sink."""
    return [chip_row(pred, class_names) for pred in block.predictions]


def chip_row(pred: ChipPrediction, class_names: tuple[str, ...]) -> dict:
    chip = pred.chip
    counts = pred.class_counts
    dominant = max(range(len(counts)), key=counts.__getitem__)
    return {
        "row_id": row_id(pred.model_name, pred.model_version, chip.tile.key, chip.index),
        "tile_id": chip.tile.tile_id,
        "tile_generation": chip.tile.generation,
        "chip_index": chip.index,
        "row_off": chip.row,
        "col_off": chip.col,
        "height": chip.height,
        "width": chip.width,
        "crs": chip.crs,
        "footprint": chip.footprint_wkt,
        "valid_fraction": chip.valid_fraction,
        "classes": class_records(counts, class_names, chip.pixel_area_m2),
        "dominant_class": class_names[dominant],
        "mean_confidence": pred.mean_confidence,
        **provenance(chip.tile, pred.model_name, pred.model_version, chip.tile.role or "live"),
        "chipped_at": bq_timestamp(chip.chipped_at),
        "scored_at": bq_timestamp(pred.scored_at),
        "latency_s": pred.scored_at - chip.tile.published,
    }


def tile_row(
    manifest: TileManifest,
    *,
    complete: bool,
    chips_scored: int,
    chips_failed: int,
    class_counts,
    class_names: tuple[str, ...],
    pixel_area_m2: float,
    footprint_wkt: str,
    raster_uri: str,
    model_name: str,
    model_version: str,
    completed_at: float,
) -> dict:
    tile = manifest.tile
    return {
        "row_id": row_id(model_name, model_version, tile.key),
        "tile_id": tile.tile_id,
        "tile_generation": tile.generation,
        "complete": complete,
        "chips_total": manifest.chips_total,
        "chips_scored": chips_scored,
        "chips_skipped": manifest.chips_skipped,
        "chips_failed": chips_failed,
        "width": manifest.width,
        "height": manifest.height,
        "crs": crs_label(manifest.crs_wkt),
        "footprint": footprint_wkt,
        "classes": class_records(class_counts, class_names, pixel_area_m2),
        "raster_uri": raster_uri,
        "location_key": location_key(tile.tile_id, footprint_wkt, dict(tile.attributes)),
        **provenance(tile, model_name, model_version, tile.role or "live"),
        "completed_at": bq_timestamp(completed_at),
        "latency_s": completed_at - tile.published,
    }


def write_schema_files(directory: str) -> list[str]:
    """The schemas as BigQuery JSON (``bq mk --schema`` / Terraform), one file per table."""
    import os

    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, schema in SCHEMAS.items():
        path = os.path.join(directory, f"{name}.json")
        with open(path, "w") as out:
            out.write(json.dumps(schema["fields"], indent=2) + "\n")
        paths.append(path)
    return paths
