"""Named queries of ``sql/queries.sql`` and ``sql/operations.sql``, run with the BigQuery client
(real or emulator)."""

from __future__ import annotations

import re
from pathlib import Path

QUERIES_FILE = Path(__file__).resolve().parent / "sql" / "queries.sql"
OPERATIONS_FILE = QUERIES_FILE.with_name("operations.sql")  # SLOs, live vs candidate


def load_queries(path: Path = QUERIES_FILE) -> dict[str, str]:
    """``-- name: x`` blocks -> {name: sql}; the SQL of a block runs up to the next name."""
    queries: dict[str, str] = {}
    for block in re.split(r"^-- name: ", path.read_text(), flags=re.MULTILINE)[1:]:
        name, _, body = block.partition("\n")
        sql = "\n".join(line for line in body.splitlines() if not line.startswith("--"))
        queries[name.strip()] = sql.strip().rstrip(";")
    return queries


_MISSING_TABLE = re.compile(r"Not found: Table ([\w.:-]+)")


def missing_table(exc: BaseException) -> str | None:
    """The table a BigQuery ``NotFound`` names, or None when it is about something else.

    A stream creates its tables when it starts, so a read-only verb that meets a missing table
    answers "nothing yet"; a missing dataset is a wrong ``--bq_dataset`` and stays an error.
    """
    found = _MISSING_TABLE.search(str(exc))
    return found.group(1) if found else None


def nothing_yet(table: str) -> str:
    """What a read-only verb says where no stream has written yet: one wording, every verb."""
    return (f"nothing yet: table {table} does not exist, no stream has written to this dataset "
            "(`tilestream run` creates its tables)")


# Parameters a query may leave to its caller: the shipped queries leave out answers the model
# flagged as untrustworthy unless asked (include_drifted=True).
DEFAULTS = {"include_drifted": False}


def run_query(client, name: str, dataset: str, path: Path = QUERIES_FILE, **params,
              ) -> list[dict]:
    """Run a named query of ``path`` against ``project.dataset`` with scalar @parameters
    (those of :data:`DEFAULTS` the query uses and the caller leaves out take their default)."""
    import datetime as dt

    from google.cloud import bigquery

    types = {bool: "BOOL", int: "INT64", float: "FLOAT64", str: "STRING",
             dt.datetime: "TIMESTAMP"}
    sql = load_queries(path)[name].replace("{dataset}", dataset)
    params = {**{k: v for k, v in DEFAULTS.items() if f"@{k}" in sql}, **params}
    config = bigquery.QueryJobConfig(query_parameters=[
        bigquery.ScalarQueryParameter(key, types[type(value)], value)
        for key, value in params.items()
    ])
    return [dict(row) for row in client.query(sql, job_config=config).result()]
