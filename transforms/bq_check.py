"""Row validation: why BigQuery would refuse a row, before a load job fails on it as a whole
(``deadletter.CheckRows`` dead-letters such rows with this reason).
"""

from __future__ import annotations

import math

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
