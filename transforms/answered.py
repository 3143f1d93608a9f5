"""What "answered" means, written once (``sql/answered.sql``) and composed into the queries that
read it: the operator verbs (``pipeline/ops/queries.py``) and the stream's own results publisher
(``transforms/results.py``), which runs on the workers, so the definition ships with the runtime.

A query that needs it says ``WITH {answered since EXPR}``; :func:`compose` writes there the blocks
it reads, bounded by EXPR. A loader rather than a BigQuery view: a view cannot take the query's
window (each query prunes partitions by its own bound, and the answer of a tile is a window
function a bound outside a view cannot be pushed through), and the readers must work on a dataset
no stream of this release has touched yet (docs/operations.md, "What 'answered' means").
"""

from __future__ import annotations

import re
from pathlib import Path

ANSWERED_FILE = Path(__file__).resolve().parent / "sql" / "answered.sql"
# The roles whose rows are answers, as sql/answered.sql's tile_answers reads them (a NULL role reads
# as live): a shadow row never answers, so it publishes nothing and fires no change.
ANSWER_ROLES = ("live", "canary")
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
