"""Which BigQuery tables the stream writes: their names, read from ``--bq_dataset``.

Every verb and the stream read the flag through :func:`dataset_ref`, so one spelling means one
dataset everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass


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
