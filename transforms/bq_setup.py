"""The stream's tables made ready at launch: created when absent, widened when an earlier release
made them (blue-green: both releases write to one table while the old one is blue).
"""

from __future__ import annotations

import json

import apache_beam as beam

from transforms.bq_schemas import SCHEMAS, table_parameters
from transforms.bq_tables import BigQueryTables


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
