"""Named queries of ``sql/queries.sql`` and ``sql/operations.sql``, run with the BigQuery client
(real or emulator).

What "answered" means is written once, in ``sql/answered.sql``; a query that needs it says
``WITH {answered since EXPR}`` and :func:`compose` writes the definition there, bounded by EXPR.
A loader rather than a BigQuery view: a view cannot take the query's window (each query prunes
partitions by its own bound, and the answer of a tile is a window function a bound outside a view
cannot be pushed through), and the readers must work on a dataset no stream of this release has
touched yet (docs/operations.md, "What 'answered' means").
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from transforms.answer_sql import ANSWERED_FILE, compose, strip_comments  # noqa: F401
from transforms.answer_sql import load_queries as _load_queries

QUERIES_FILE = Path(__file__).resolve().parent / "sql" / "queries.sql"
OPERATIONS_FILE = QUERIES_FILE.with_name("operations.sql")  # SLOs, live vs candidate
# The earliest rows a query that has no window of its own looks at: all of them.
ALL_TIME = "TIMESTAMP '1970-01-01 00:00:00+00'"


def load_queries(path: Path = QUERIES_FILE) -> dict[str, str]:
    """``-- name: x`` blocks of ``path`` (this module's queries by default) -> {name: sql}."""
    return _load_queries(path)


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
    sql = compose(strip_comments(sql), dataset)
    params = {**{k: v for k, v in DEFAULTS.items() if f"@{k}" in sql}, **params}
    config = bigquery.QueryJobConfig(query_parameters=[
        bigquery.ScalarQueryParameter(key, types[type(value)], value)
        for key, value in params.items()
    ])
    return [dict(row) for row in client.query(sql, job_config=config).result()]


def main(argv: list[str]) -> int:
    """``python -m pipeline.ops.queries NAME PROJECT.DATASET``: a shipped query as it runs, to
    paste into the BigQuery console (bind its @parameters there)."""
    if len(argv) != 2:
        print("usage: python -m pipeline.ops.queries NAME PROJECT.DATASET", file=sys.stderr)
        return 2
    name, dataset = argv
    for path in (QUERIES_FILE, OPERATIONS_FILE):
        if name in (queries := load_queries(path)):
            print(compose(queries[name], dataset) + ";")
            return 0
    print(f"no query named {name!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
