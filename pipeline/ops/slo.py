"""``tilestream slo``: the SLIs from the BigQuery rows over a window, attainment and error budget.

The SLOs (docs/operations.md):

- **latency**: ``LATENCY_TARGET`` of tiles have their row within ``LATENCY_SLO_S`` of the Pub/Sub
  publish time; an incomplete tile (a chip failed or timed out) counts as slow too. A tile is
  counted as users read it (``sql/answered.sql``): its answer, once, never a shadow's row.
- **errors**: at most ``1 - ERROR_TARGET`` of messages are dead-lettered. Messages are counted as
  tiles answered + dead letters (a per-band granule is several messages but one tile, so
  this undercounts messages and the ratio errs on the pessimistic side).
- **freshness** (checked, not budgeted): the newest tile row is at most ``FRESHNESS_S`` old at
  the end of the window. Rows cannot show a tile that never arrived; on Dataflow the watermark-age
  alert covers that.

Error budget: ``allowed = (1 - target) * events``; ``left = 1 - bad / allowed`` (negative: spent
more than the budget). Burn rate = observed bad ratio / allowed bad ratio.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.ops.queries import OPERATIONS_FILE, missing_table, nothing_yet, run_query
from pipeline.options import LATENCY_SLO_S

LATENCY_TARGET = 0.95
ERROR_TARGET = 0.995
FRESHNESS_S = 900.0
DEFAULT_WINDOW = "28d"
_WINDOW = re.compile(r"^(\d+)([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class SloError(ValueError):
    """A window or target that cannot be evaluated."""


def parse_window(text: str) -> dt.timedelta:
    """``90s``, ``30m``, ``6h``, ``28d``: at most 400 days."""
    match = _WINDOW.fullmatch(text.strip())
    if not match:
        raise SloError(f"window {text!r} is not N followed by s, m, h or d (e.g. 28d)")
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)]
    if not 0 < seconds <= 400 * 86400:
        raise SloError(f"window {text!r} must be between 1 s and 400 days")
    return dt.timedelta(seconds=seconds)


@dataclass(frozen=True)
class SloResult:
    """One SLO over the window: good and total events, attainment, budget left, burn rate."""

    name: str
    objective: str
    target: float
    good: int
    total: int

    @property
    def attainment(self) -> float | None:
        return self.good / self.total if self.total else None

    @property
    def budget_left(self) -> float | None:
        """Share of the error budget still unspent (1 = untouched, <0 = overspent)."""
        if not self.total:
            return None
        allowed = (1.0 - self.target) * self.total
        return 1.0 - (self.total - self.good) / allowed

    @property
    def burn_rate(self) -> float | None:
        if not self.total:
            return None
        return ((self.total - self.good) / self.total) / (1.0 - self.target)

    @property
    def met(self) -> bool | None:
        return None if self.attainment is None else self.attainment >= self.target

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "attainment": self.attainment, "budget_left": self.budget_left,
                "burn_rate": self.burn_rate, "met": self.met}


@dataclass(frozen=True)
class SloReport:
    start: dt.datetime
    end: dt.datetime
    slos: tuple[SloResult, ...]
    slis: dict[str, Any]
    note: str | None = None  # e.g. no stream has written yet

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start.isoformat(), "end": self.end.isoformat(),
                "slis": self.slis, "slos": [s.to_dict() for s in self.slos], "note": self.note}

    def text(self) -> str:
        hours = (self.end - self.start).total_seconds() / 3600
        lines = [f"SLOs from {self.start:%Y-%m-%d %H:%M:%S} to {self.end:%Y-%m-%d %H:%M:%S} UTC "
                 f"({hours:g} h)"]
        if self.note:
            lines.append(f"  {self.note}")
        for s in self.slos:
            if s.total == 0:
                lines.append(f"  {s.name:<10} {s.objective}: no events in the window")
                continue
            verdict = "met" if s.met else "MISSED"
            lines.append(
                f"  {s.name:<10} {s.objective}: {s.attainment:.2%} of {s.total} "
                f"(target {s.target:.1%}) {verdict}; error budget left {s.budget_left:.0%}, "
                f"burn rate {s.burn_rate:.2f}")
        x = self.slis
        p95 = x["latency_p95_s"]
        lines.append(
            f"  SLIs: {x['tiles']} tiles, {x['chips_scored']} chips, "
            f"{x['dead_letters']} dead letters ({x['error_ratio']:.2%} of messages), "
            f"{x['tiles_per_hour']:.1f} tiles/h; latency p50/p95/p99 "
            + ("n/a" if p95 is None else
               f"{x['latency_p50_s']:.1f}/{p95:.1f}/{x['latency_p99_s']:.1f} s")
            + "; freshness " + ("n/a (no tile rows)" if x["freshness_s"] is None else
                                f"{x['freshness_s']:.0f} s "
                                f"({'ok' if x['fresh'] else 'STALE'}, limit "
                                f"{x['freshness_limit_s']:.0f} s)"))
        return "\n".join(lines)


def compute(client, dataset: str, window: dt.timedelta, end: dt.datetime | None = None,
            latency_s: float = LATENCY_SLO_S, latency_target: float = LATENCY_TARGET,
            error_target: float = ERROR_TARGET, freshness_s: float = FRESHNESS_S) -> SloReport:
    """Run the SLO queries of ``sql/operations.sql`` against ``project.dataset`` (or emulator)."""
    for name, target in (("latency", latency_target), ("error", error_target)):
        if not 0.0 < target < 1.0:
            raise SloError(f"{name} target {target} must be strictly between 0 and 1")
    end = end or dt.datetime.now(dt.UTC)
    start = end - window
    from google.api_core.exceptions import NotFound

    note = None
    try:
        [tiles] = run_query(client, "slo_tiles", dataset, OPERATIONS_FILE, start=start, end=end,
                            latency_s=float(latency_s))
        letters = {r["stage"]: r["letters"] for r in run_query(
            client, "slo_dead_letters", dataset, OPERATIONS_FILE, start=start, end=end)}
    except NotFound as exc:  # a stream creates every table at its start: none has run yet
        table = missing_table(exc)
        if table is None:
            raise
        note, letters = nothing_yet(table), {}
        tiles = dict.fromkeys(("tiles", "tiles_fast", "tiles_incomplete", "tiles_good",
                               "chips_scored", "last_completed_at", "latency_p50_s",
                               "latency_p95_s", "latency_p99_s"))
    n_tiles, dead = int(tiles["tiles"] or 0), sum(letters.values())
    last = tiles["last_completed_at"]
    freshness = (end - last).total_seconds() if last else None
    messages = n_tiles + dead
    slis = {
        "tiles": n_tiles,
        "tiles_fast": int(tiles["tiles_fast"] or 0),
        "tiles_incomplete": int(tiles["tiles_incomplete"] or 0),
        "chips_scored": int(tiles["chips_scored"] or 0),
        "dead_letters": dead,
        "dead_letters_by_stage": letters,
        "error_ratio": dead / messages if messages else 0.0,
        "tiles_per_hour": n_tiles / (window.total_seconds() / 3600),
        "chips_per_s": int(tiles["chips_scored"] or 0) / window.total_seconds(),
        "latency_p50_s": tiles["latency_p50_s"],
        "latency_p95_s": tiles["latency_p95_s"],
        "latency_p99_s": tiles["latency_p99_s"],
        "freshness_s": freshness,
        "freshness_limit_s": freshness_s,
        "fresh": None if freshness is None else freshness <= freshness_s,
    }
    slos = (
        SloResult("latency", f"tile row within {latency_s:g} s of publish, complete",
                  latency_target, int(tiles["tiles_good"] or 0), n_tiles),
        SloResult("errors", "message not dead-lettered", error_target, n_tiles, messages),
    )
    return SloReport(start, end, slos, slis, note)
