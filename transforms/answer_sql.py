"""What "answered" means, as SQL: ``pipeline/ops/sql/answered.sql`` composed into a query
(``WITH {answered since EXPR}``). In the runtime because the results publisher checks its waiting
answers with it; it composes its query when the pipeline is built, on the launcher, so workers
(which get no ``pipeline/ops``: MANIFEST.in) never read the file. ``pipeline.ops.queries`` runs
the operator's queries with the same functions.
"""

from __future__ import annotations

import re
from pathlib import Path

ANSWERED_FILE = (Path(__file__).resolve().parents[1] / "pipeline" / "ops" / "sql"
                 / "answered.sql")  # the one definition of "answered"
_ANSWERED = re.compile(r"\{answered since ([^{}]+)\}")


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


def load_queries(path: Path) -> dict[str, str]:
    """``-- name: x`` blocks -> {name: sql}; the SQL of a block runs up to the next name."""
    queries: dict[str, str] = {}
    for block in re.split(r"^-- name: ", path.read_text(), flags=re.MULTILINE)[1:]:
        name, _, body = block.partition("\n")
        queries[name.strip()] = strip_comments(body).strip().rstrip(";")
    return queries


def compose(sql: str, dataset: str) -> str:
    """``sql`` with every ``{answered since EXPR}`` replaced by the definitions of
    ``sql/answered.sql`` that ``sql`` reads (and those they read), bounded by EXPR, and
    ``{dataset}`` by ``dataset`` (``project.dataset``)."""
    blocks = load_queries(ANSWERED_FILE)  # in file order: a block reads only those above it
    needed: set[str] = set()
    for name in reversed(blocks):
        if name in needed or re.search(rf"\b{name}\b", sql):
            needed |= {name} | {n for n in blocks if re.search(rf"\b{n}\b", blocks[name])}

    def definitions(match: re.Match) -> str:
        since = f"({match.group(1).strip()})"
        return ",\n".join(f"{name} AS (\n{body.replace('{since}', since)}\n)"
                           for name, body in blocks.items() if name in needed)

    return _ANSWERED.sub(definitions, sql).replace("{dataset}", dataset)
