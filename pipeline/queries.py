"""Named queries from docs/queries.sql, run with the BigQuery client (real or emulator)."""

from __future__ import annotations

import re
from pathlib import Path

QUERIES_FILE = Path(__file__).resolve().parents[1] / "docs" / "queries.sql"
OPERATIONS_FILE = QUERIES_FILE.with_name("operations.sql")  # SLOs, live vs candidate


def load_queries(path: Path = QUERIES_FILE) -> dict[str, str]:
    """``-- name: x`` blocks -> {name: sql}; the SQL of a block runs up to the next name."""
    queries: dict[str, str] = {}
    for block in re.split(r"^-- name: ", path.read_text(), flags=re.MULTILINE)[1:]:
        name, _, body = block.partition("\n")
        sql = "\n".join(line for line in body.splitlines() if not line.startswith("--"))
        queries[name.strip()] = sql.strip().rstrip(";")
    return queries


def run_query(client, name: str, dataset: str, path: Path = QUERIES_FILE, **params,
              ) -> list[dict]:
    """Run a named query of ``path`` against ``project.dataset`` with scalar @parameters."""
    import datetime as dt

    from google.cloud import bigquery

    types = {bool: "BOOL", int: "INT64", float: "FLOAT64", str: "STRING",
             dt.datetime: "TIMESTAMP"}
    config = bigquery.QueryJobConfig(query_parameters=[
        bigquery.ScalarQueryParameter(key, types[type(value)], value)
        for key, value in params.items()
    ])
    sql = load_queries(path)[name].replace("{dataset}", dataset)
    return [dict(row) for row in client.query(sql, job_config=config).result()]
