"""The BigQuery tables' schemas (kept here and as JSON in templates/bigquery/), partitioning and
clustering: what every writer, the launch's table creation and Terraform agree on.

Tables are partitioned by day of event time and clustered by tile id and model version, the two
filters almost every query has.
"""

from __future__ import annotations

import json


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


def table_parameters(kind: str) -> dict:
    """Partitioning and clustering, as Beam passes them to tables.insert."""
    params = {"timePartitioning": {"type": "DAY", "field": _PARTITION_FIELD[kind]}}
    if kind in ("chips", "tiles"):
        params["clustering"] = {"fields": ["tile_id", "model_version"]}
    if kind == "changes":
        params["clustering"] = {"fields": ["location_key", "model_version"]}
    return params


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
