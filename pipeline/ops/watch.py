"""The automatic rollback rule: judge the candidate on its BigQuery rows, roll back when it fails.

Over a window, from ``compare_versions`` and ``compare_agreement`` (``sql/operations.sql``):

- the candidate's dead-letter rate (inference/assembly dead letters per tile) exceeds live's by
  more than ``max_dead_letter_excess``, or
- in shadow mode, the share of chips whose dominant class agrees with live is under
  ``min_agreement`` (a canary scores other tiles than live, so it has no agreement to judge),

and the candidate has at least ``min_tiles`` tiles in the window (fewer is no evidence either
way). A rollback goes through :meth:`Registry.rollback` with ``expected_candidate``, so it ends
only the trial that was judged, and its reason (the numbers) lands in the channels history.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from model.registry import Change, ModelRef, Registry

WATCHER = "tilestream-model-watch"


@dataclass(frozen=True)
class RollbackRule:
    hours: int = 24
    min_tiles: int = 20
    max_dead_letter_excess: float = 0.02
    min_agreement: float = 0.6


@dataclass(frozen=True)
class Verdict:
    candidate: ModelRef | None
    action: str  # "none" (nothing to judge), "wait" (too few tiles), "keep", "rollback"
    reason: str
    evidence: dict[str, Any]
    change: Change | None = None

    def __str__(self) -> str:
        return f"{self.action}: {self.reason}" + (f"\n{self.change}" if self.change else "")


def judge(registry: Registry, client: Any, dataset: str, rule: RollbackRule = RollbackRule(),
          ) -> Verdict:
    """Evaluate the rule once against ``project.dataset`` and roll back if it fails."""
    from pipeline.ops.queries import OPERATIONS_FILE, run_query

    channels, _ = registry.read_channels()
    if channels.candidate is None or channels.live is None:
        return Verdict(None, "none", "no candidate on trial", {})
    live, candidate = channels.live, channels.candidate
    if live.name != candidate.name:
        return Verdict(candidate, "none", "live and candidate have different model names; "
                       "compare them by hand", {})
    from google.api_core.exceptions import NotFound

    params = {"window_hours": rule.hours, "model_name": live.name,
              "live_version": live.version, "candidate_version": candidate.version}
    try:
        rows = {(r["model_version"], r["role"]): r
                for r in run_query(client, "compare_versions", dataset, OPERATIONS_FILE,
                                   **params)}
    except NotFound as exc:  # no stream has created the tables yet: no evidence either way
        return Verdict(candidate, "wait", f"{dataset} has no rows to judge yet "
                       f"({str(exc)[:120]})", {})
    cand = rows.get((candidate.version, channels.mode)) or {}
    base = rows.get((live.version, "live")) or {}
    tiles = int(cand.get("tiles") or 0)
    evidence: dict[str, Any] = {"candidate_tiles": tiles, "live_tiles": int(base.get("tiles")
                                                                             or 0),
                                "candidate_dead_letter_rate": cand.get("dead_letter_rate"),
                                "live_dead_letter_rate": base.get("dead_letter_rate")}
    window = f"over {rule.hours} h"
    if tiles < rule.min_tiles:
        return Verdict(candidate, "wait", f"{candidate} has {tiles} tiles {window}, fewer than "
                       f"{rule.min_tiles}: no decision", evidence)
    failures = []
    cand_rate = float(cand.get("dead_letter_rate") or 0.0)
    live_rate = float(base.get("dead_letter_rate") or 0.0)
    if cand_rate > live_rate + rule.max_dead_letter_excess:
        failures.append(f"dead-letter rate {cand_rate:.3f} > live {live_rate:.3f} + "
                        f"{rule.max_dead_letter_excess:g}")
    if channels.mode == "shadow":
        [agreement] = run_query(client, "compare_agreement", dataset, OPERATIONS_FILE, **params)
        evidence["chip_agreement"] = agreement["chip_agreement"]
        evidence["chips_compared"] = agreement["chips"]
        if agreement["chips"] and agreement["chip_agreement"] < rule.min_agreement:
            failures.append(f"chip agreement {agreement['chip_agreement']:.3f} < "
                            f"{rule.min_agreement:g} on {agreement['chips']} chips")
    if not failures:
        return Verdict(candidate, "keep", f"{candidate} ({channels.mode}) passes {window} on "
                       f"{tiles} tiles", evidence)
    reason = f"automatic rollback of {candidate} ({channels.mode}) {window}, {tiles} tiles: " \
             + "; ".join(failures)
    change = registry.rollback(by=WATCHER, why=reason[:500], expected_candidate=candidate)
    return Verdict(candidate, "rollback", reason, evidence, change)
