"""Named queries of ``sql/queries.sql`` and ``sql/operations.sql``, run with the BigQuery client
(real or emulator)."""

from __future__ import annotations

import re
from pathlib import Path

QUERIES_FILE = Path(__file__).resolve().parent / "sql" / "queries.sql"
OPERATIONS_FILE = QUERIES_FILE.with_name("operations.sql")  # SLOs, live vs candidate


def strip_comments(sql: str) -> str:
    """SQL without its ``--`` comments (outside string literals and quoted names). The BigQuery
    emulator counts an ``@name`` inside a comment as a parameter to bind, so every query is sent
    without them; BigQuery itself does not mind either way."""
    out: list[str] = []
    for line in sql.splitlines():
        quote, escaped, kept = "", False, line
        for i, char in enumerate(line):
            if quote:
                escaped, quote = (not escaped and char == "\\",
                                  "" if char == quote and not escaped else quote)
            elif char in "'\"`":
                quote = char
            elif line.startswith("--", i):
                kept = line[:i].rstrip()
                break
        if kept.strip():
            out.append(kept)
    return "\n".join(out)


def load_queries(path: Path = QUERIES_FILE) -> dict[str, str]:
    """``-- name: x`` blocks -> {name: sql}; the SQL of a block runs up to the next name."""
    queries: dict[str, str] = {}
    for block in re.split(r"^-- name: ", path.read_text(), flags=re.MULTILINE)[1:]:
        name, _, body = block.partition("\n")
        queries[name.strip()] = strip_comments(body).strip().rstrip(";")
    return queries


def describe(path: Path = QUERIES_FILE) -> dict[str, str]:
    """{name: the first sentence of its comment}, for ``tilestream query --list``."""
    about: dict[str, str] = {}
    for block in re.split(r"^-- name: ", path.read_text(), flags=re.MULTILINE)[1:]:
        name, _, body = block.partition("\n")
        comment = " ".join(line[2:].strip() for line in body.splitlines()
                           if line.startswith("--"))
        about[name.strip()] = re.split(r"(?<=[.:;]) ", comment)[0].rstrip(":;")
    return about


def parameters(sql: str) -> list[str]:
    """The ``@names`` a query binds, in order of first use (not those inside quotes)."""
    unquoted = re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|`[^`]*`", "''", sql)
    return list(dict.fromkeys(re.findall(r"@(\w+)", unquoted)))


def parse_param(text: str) -> tuple[str, object]:
    """``k=v`` of the command line -> (k, typed v): true/false, integers, numbers, ISO 8601
    times (as UTC when they carry no zone), else the string itself."""
    import datetime as dt

    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--param takes NAME=VALUE, not {text!r}")
    if raw.lower() in ("true", "false"):
        return key, raw.lower() == "true"
    for kind in (int, float):
        try:
            return key, kind(raw)
        except ValueError:
            pass
    if re.fullmatch(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d.*", raw):
        when = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
        return key, when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    return key, raw


# Parameters a query may leave to its caller: the shipped queries leave out answers the model
# flagged as untrustworthy unless asked (include_drifted=True).
DEFAULTS = {"include_drifted": False}


def run_query(client, name: str, dataset: str, path: Path = QUERIES_FILE, **params,
              ) -> list[dict]:
    """Run a named query of ``path`` against ``project.dataset`` with scalar @parameters
    (those of :data:`DEFAULTS` the query uses and the caller leaves out take their default)."""
    return run_sql(client, load_queries(path)[name], dataset, **params)


def run_sql(client, sql: str, dataset: str, **params) -> list[dict]:
    """:func:`run_query` for SQL text of the same form (``{dataset}``, ``@parameters``)."""
    import datetime as dt

    from google.cloud import bigquery

    types = {bool: "BOOL", int: "INT64", float: "FLOAT64", str: "STRING",
             dt.datetime: "TIMESTAMP"}
    sql = strip_comments(sql).replace("{dataset}", dataset)
    params = {**{k: v for k, v in DEFAULTS.items() if f"@{k}" in sql}, **params}
    config = bigquery.QueryJobConfig(query_parameters=[
        bigquery.ScalarQueryParameter(key, types[type(value)], value)
        for key, value in params.items()
    ])
    return [dict(row) for row in client.query(sql, job_config=config).result()]
