"""Releasing the stream itself: is an in-place update safe, or does it need blue-green?

Dataflow's in-place update (``--update``) moves a running job's state to the new job only if
the new graph still reads it: every step of the old job has a step of the same name (or one the
``--transform_name_mapping`` names), and every step that keeps keyed state keeps the same state
and timer specs, side inputs and coders. The records that state holds are pickled, so a new
field of one needs a default. :func:`compare` applies those rules to two *update surfaces*
(``pipeline/ops/dry_run.py``: DataflowRunner's own ``--dry_run``, offline) and answers
``in-place`` (with the name mapping, where steps moved) or ``blue-green`` (with the reasons).

Each release's surface is recorded beside the template, ``templates/releases/<release>.json``,
with the verdict against the release before it (``tilestream release record``;
``tests/test_release.py`` fails when the graph changed and the record did not, so review sees
"this release needs blue-green"). ``templates/deploy.sh update`` runs :func:`check` against
the graph recorded at the running job's launch before it calls Dataflow, and refuses. The name
mapping it prints is gcloud's ``--transform-name-mappings`` list (``old=new,...``).

Blue-green (the verbs ``green``, ``cutover``, ``abort``) is in the registry's channels
document: see :mod:`model.channels` and docs/operations.md, "Releasing the stream". A record
also names its release's commit (``tilestream release tag``) and whether the release before
can be blue of it; ``release green`` refuses a trial the records rule out ("Releases and their
predecessors").
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from model.channels import Channels, retiring_release
from pipeline.options import CHANNELS_POLL_SECS, RELEASE

ROOT = Path(__file__).resolve().parents[2]
RELEASES = ROOT / "templates" / "releases"
# Not part of what update compatibility reads: the job's own description of itself.
SURFACE_KEYS = ("streaming", "job_type", "steps", "transforms", "records")
IN_PLACE, BLUE_GREEN = "in-place", "blue-green"
T = TypeVar("T")
# How far before a trial the handover looks for announcements (their event time bounds the
# partitions read): an announcement of an older acquisition is not checked.
HANDOVER_DAYS = 30
# The handover passes only once its answer held this long: nothing pending and no new entry
# row of green (streaming inserts, a worker's late shadow rows) on every poll in between.
ENTRY_SETTLE_SECS = 30.0
# Exit codes of the release verbs: refused (nothing changed, or nothing to check), not yet.
REFUSED, NOT_YET = 2, 4


@dataclass
class UpdateVerdict:
    """What replacing the ``old`` job with the ``new`` graph takes."""

    method: str  # "in-place" or "blue-green"
    reasons: list[str] = field(default_factory=list)  # why not in place
    mapping: dict[str, str] = field(default_factory=dict)  # old step name -> new step name
    added: list[str] = field(default_factory=list)  # new transforms (they start empty)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "reasons": self.reasons, "mapping": self.mapping,
                "added": len(self.added)}

    def text(self) -> str:
        if self.method == BLUE_GREEN:
            return ("refused: an in-place update would lose or misread the running job's "
                    "state:\n" + "\n".join(f"  - {r}" for r in self.reasons)
                    + "\nrelease it blue-green instead: templates/deploy.sh bluegreen "
                    "(docs/operations.md, \"Releasing the stream\")")
        mapped = (f"; steps moved, pass --transform_name_mapping='{json.dumps(self.mapping)}'"
                  if self.mapping else "")
        return f"compatible: an in-place update keeps the running job's state{mapped}"


def _leaf(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def _subtree(name: str, names: set[str]) -> frozenset[str]:
    return frozenset(n[len(name) + 1:] for n in names if n.startswith(name + "/"))


def _common_prefix(a: str, b: str) -> int:
    """How many leading path segments two step names share."""
    shared = 0
    for x, y in zip(a.split("/"), b.split("/"), strict=False):
        if x != y:
            break
        shared += 1
    return shared


def _moved(removed: set[str], added: set[str]) -> dict[str, str]:
    """Old -> new names of steps that moved whole: the topmost gone names, each matched to the
    one new step of the same leaf name whose sub-steps are the same (the nearest, where several
    are), as when a composite is wrapped in another."""
    mapping: dict[str, str] = {}
    taken: set[str] = set()
    tops = sorted(n for n in removed if n.rpartition("/")[0] not in removed)
    for name in tops:
        inner = _subtree(name, removed)
        candidates = [a for a in added if _leaf(a) == _leaf(name) and a not in taken
                      and _subtree(a, added) == inner]
        if candidates:
            best = max(candidates, key=lambda a: (_common_prefix(a, name), -len(a)))
            mapping[name] = best
            taken.add(best)
    return mapping


def compare(old: dict[str, Any], new: dict[str, Any]) -> UpdateVerdict:
    """The update verdict for replacing a job of surface ``old`` with one of ``new``."""
    reasons: list[str] = []
    if (old["streaming"], old["job_type"]) != (new["streaming"], new["job_type"]):
        reasons.append("the job type changes (streaming vs batch)")
    old_t, new_t = set(old["transforms"]), set(new["transforms"])
    removed, added = old_t - new_t, new_t - old_t
    mapping = _moved(removed, added)

    def renamed(name: str) -> str | None:
        if name in new_t:
            return name
        for old_name, new_name in mapping.items():
            if name == old_name or name.startswith(old_name + "/"):
                return new_name + name[len(old_name):]
        return None

    for name in sorted(removed):
        if renamed(name) is None and not any(name.startswith(r + "/") for r in removed):
            reasons.append(f"step {name!r} is gone and no new step takes its place (map it "
                           "with --transform_name_mapping, or it must keep its name)")
    for name, step in sorted(old["steps"].items()):
        target = renamed(name)
        new_step = new["steps"].get(target) if target else None
        if target is None:
            continue  # reported above as gone
        if new_step is None:
            reasons.append(f"step {name!r} no longer keeps state; its state "
                           f"({', '.join(step['state']) or 'timers'}) would be dropped")
            continue
        for label, before, after in (("state", step["state"], new_step["state"]),):
            for key in sorted(set(before) | set(after)):
                if before.get(key) != after.get(key):
                    reasons.append(f"step {name!r}: {label} {key!r} "
                                   f"{before.get(key, 'absent')} -> {after.get(key, 'absent')}")
        if step["timers"] != new_step["timers"]:
            reasons.append(f"step {name!r}: timers {step['timers']} -> {new_step['timers']}")
        if step["side_inputs"] != new_step["side_inputs"]:
            reasons.append(f"step {name!r}: side inputs {step['side_inputs']} -> "
                           f"{new_step['side_inputs']}")
        if step["input"] != new_step["input"]:
            reasons.append(f"step {name!r}: input coder {step['input']} -> {new_step['input']}")
    for record, fields in sorted(old["records"].items()):
        if record not in new["records"]:
            reasons.append(f"record {record} is gone: state holding one cannot be read")
            continue
        before = {f.rstrip("!") for f in fields}
        needed = [f.rstrip("!") for f in new["records"][record]
                  if f.endswith("!") and f.rstrip("!") not in before]
        if needed:
            reasons.append(f"record {record} gains {', '.join(needed)} without a default: "
                           "state pickled by the running job lacks them")
    return UpdateVerdict(BLUE_GREEN if reasons else IN_PLACE, reasons,
                         {} if reasons else dict(sorted(mapping.items())), sorted(added))


# --- surfaces: translated now, recorded per release --------------------------------------------

def surface(parameters: dict[str, str] | None = None) -> dict[str, Any]:
    """The update surface of this tree's job, translated offline with the template's example
    parameters (overridden by ``parameters``) and a registry (the production graph: the stream
    follows its channels)."""
    from model.registry import Registry
    from pipeline.ops.dry_run import translate
    from pipeline.ops.preflight import ARTIFACTS, example_parameters
    from pipeline.options import DEFAULT_MODEL_URI

    values = {**example_parameters(), **(parameters or {})}
    for key in ("model_uri", "model_registry", "sdk_container_image"):
        values.pop(key, None)  # places, not shape: the graph is translated from a local copy
    with tempfile.TemporaryDirectory() as tmp:
        registry = Registry(os.path.join(tmp, "registry"))
        ref, _ = registry.publish(DEFAULT_MODEL_URI if os.path.isdir(DEFAULT_MODEL_URI)
                                  else str(ARTIFACTS / "landcover-student" / "v1"))
        registry.promote(ref, by="release", why="translation only")
        graph = translate([*(f"--{k}={v}" for k, v in values.items()),
                           f"--model_registry={registry.prefix}"])
    return {key: graph[key] for key in SURFACE_KEYS}


def record_path(release: str) -> Path:
    return RELEASES / f"{release}.json"


def previous_release(release: str = RELEASE) -> str | None:
    """The newest recorded release before ``release`` (by version number)."""
    def key(name: str) -> tuple:
        return tuple(int(p) if p.isdigit() else p for p in name.split("."))

    older = [p.stem for p in RELEASES.glob("*.json") if key(p.stem) < key(release)]
    return max(older, key=key) if older else None


def read_record(release: str) -> dict[str, Any]:
    return json.loads(record_path(release).read_text())


class ReleaseError(Exception):
    """A release record or tag that cannot be written or used as asked."""


def _git(*argv: str) -> str:
    import subprocess

    done = subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, text=True)
    if done.returncode:
        raise ReleaseError(f"git {' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout.strip()


def release_commit(release: str) -> str:
    """The commit release ``release`` was built from, as its record says (tags may not travel
    with a clone; the record does). Refuses a release not tagged yet, or a commit this
    repository does not hold (a shallow clone: ``git fetch --unshallow``)."""
    commit = read_record(release).get("commit")
    if not commit:
        raise ReleaseError(f"release {release} is not tagged yet: its record has no commit "
                           f"(tilestream release tag --release {release})")
    try:
        _git("cat-file", "-e", f"{commit}^{{commit}}")
    except ReleaseError as exc:
        raise ReleaseError(f"commit {commit} of release {release} is not in this repository "
                           "(a shallow clone? git fetch --unshallow origin)") from exc
    return commit


def record(release: str = RELEASE) -> dict[str, Any]:
    """Write ``templates/releases/<release>.json``: this tree's surface, its verdict against
    the previous release, and the previous release's commit. What the record already holds and
    no translation can know stays: its own ``commit`` (written by :func:`tag`) and whether it
    can be blue-greened from the previous release (``previous``: a judgement, with how to
    cross it where not)."""
    current = surface()
    kept = read_record(release) if record_path(release).exists() else {}
    doc: dict[str, Any] = {"release": release, "commit": kept.get("commit"), "surface": current}
    previous = previous_release(release)
    if previous:
        old = read_record(previous)
        doc["update_from"] = {"release": previous, **compare(old["surface"], current).to_dict()}
        judged = kept.get("previous", {})
        doc["previous"] = {"release": previous, "commit": old.get("commit"),
                           "blue_green": judged.get("blue_green", True),
                           **{k: judged[k] for k in ("why", "cross") if k in judged}}
    RELEASES.mkdir(parents=True, exist_ok=True)
    record_path(release).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    return doc


def tag(release: str = RELEASE, revision: str = "HEAD") -> str:
    """Fill the record's ``commit`` with ``revision`` and tag it ``v<release>``. The commit
    must be the release's own: its setup.py names ``release`` as its version. The record then
    changes in a later commit (a commit cannot name itself)."""
    import re

    commit = _git("rev-parse", "--verify", f"{revision}^{{commit}}")
    setup = _git("show", f"{commit}:setup.py")
    version = re.search(r'version="([^"]+)"', setup)
    if not version or version.group(1) != release:
        raise ReleaseError(f"{commit[:12]} is release {version.group(1) if version else '?'} "
                           f"(its setup.py), not {release}")
    doc = read_record(release)
    if doc.get("commit") not in (None, commit):
        raise ReleaseError(f"release {release} is recorded at {doc['commit']} already")
    doc["commit"] = commit
    record_path(release).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    existing = _git("tag", "--list", f"v{release}")
    if not existing:
        _git("tag", f"v{release}", commit)
    elif _git("rev-parse", f"v{release}^{{commit}}") != commit:
        raise ReleaseError(f"tag v{release} names another commit")
    return commit


def blue_green_barrier(live: str, green: str) -> dict[str, Any] | None:
    """The first recorded release after ``live`` up to ``green`` that cannot be blue-greened
    from its predecessor (its ``previous`` judgement), or None: a running ``live`` job can be
    blue while ``green`` is on trial. Only releases this tree records are judged."""
    def key(name: str) -> tuple:
        return tuple(int(p) if p.isdigit() else p for p in name.split("."))

    between = sorted((p.stem for p in RELEASES.glob("*.json")
                      if key(live) < key(p.stem) <= key(green)), key=key)
    for name in between:
        judged = read_record(name).get("previous") or {}
        if judged.get("blue_green") is False:
            return {**judged, "from": judged.get("release"), "release": name}
    return None


def check(against: dict[str, Any], parameters: dict[str, str] | None = None) -> UpdateVerdict:
    """The verdict for updating a job launched with surface ``against`` to this tree."""
    return compare(against.get("surface", against), surface(parameters))


def parse_parameters(text: str) -> dict[str, str]:
    """``k=v,k=v`` as deploy.sh passes template parameters (values hold no commas)."""
    pairs = [p for p in text.split(",") if p]
    return dict(p.split("=", 1) for p in pairs)


# --- blue-green: the release channel in the registry's channels document ----------------------

def seek_to_now(subscriber, subscription: str) -> None:
    """Mark everything published to ``subscription`` so far as acknowledged: with no live
    release to take over from, an idle slot's backlog is nobody's work."""
    from google.protobuf import timestamp_pb2

    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    subscriber.seek(request={"subscription": subscription, "time": now})


def seed_from_live(subscriber, live_subscription: str, green_subscription: str,
                   release: str) -> str:
    """Seek green's slot to a Pub/Sub snapshot of the live slot: green then takes in every
    message the live job has not acknowledged (its backlog from before the trial included, and
    whatever an earlier trial left queued on the idle slot is replaced), so the handover,
    counted at green's entry, covers blue's backlog. The snapshot is deleted after the seek;
    the name of the one used is returned."""
    project = green_subscription.split("/")[1]
    slot = green_subscription.rsplit("/", 1)[-1]
    snapshot = (f"projects/{project}/snapshots/{slot}-seed-{release.replace('.', '-')}-"
                f"{uuid.uuid4().hex[:8]}")
    subscriber.create_snapshot(request={"name": snapshot, "subscription": live_subscription})
    try:
        subscriber.seek(request={"subscription": green_subscription, "snapshot": snapshot})
    finally:
        subscriber.delete_snapshot(request={"snapshot": snapshot})
    return snapshot


def _start_green(args: argparse.Namespace, registry, target):
    """Seed the idle slot, then record the trial; refused before the slot is touched when the
    channels would refuse the trial (one runs already, or the slot is the live one's)."""
    from model.channels import RegistryError

    channels, _ = registry.read_channels()
    live = channels.live_release
    if channels.green_release is not None:
        raise RegistryError(f"release {channels.green_release.release} is green already: cut "
                            "over or abort it first")
    if live is not None and live.subscription == args.subscription:
        raise RegistryError(f"{args.subscription} is the live release's subscription: green "
                            "needs a subscription of its own")
    subscriber = target.subscriber()
    if live is not None and live.subscription:
        seed_from_live(subscriber, live.subscription, args.subscription, args.release)
        print(f"{args.subscription} seeded from a snapshot of {live.subscription}: release "
              f"{args.release} takes in everything release {live.release} has not acknowledged")
    else:
        seek_to_now(subscriber, args.subscription)
    return registry.release_green(args.release, args.subscription, args.job, by=args.by,
                                  why=args.reason)


def _poll(attempt: Callable[[], T], done: Callable[[T], bool], deadline: float,
          every_s: float) -> T:
    """``attempt()`` until ``done`` accepts its value or the monotonic ``deadline`` passes;
    the last value."""
    import time

    while True:
        value = attempt()
        if done(value) or time.monotonic() >= deadline:
            return value
        time.sleep(every_s)


def wait_until_live(client, dataset: str, release: str, since: float, timeout_s: float,
                    every_s: float = 2.0) -> dt.datetime | None:
    """When the green job first reported taking the cut-over (its ``release R now live``
    event, written after ``since``), waiting up to ``timeout_s``; None if it did not."""
    import time

    from google.cloud import bigquery

    from transforms.routing import release_event

    sql = (f"SELECT MIN(time) AS at FROM `{dataset}.events` WHERE disposition = 'model' "
           "AND release = @release AND reason = @reason AND time >= TIMESTAMP_SECONDS(@since)")
    config = bigquery.QueryJobConfig(query_parameters=[
        bigquery.ScalarQueryParameter("release", "STRING", release),
        bigquery.ScalarQueryParameter("reason", "STRING", release_event(release, "live")),
        bigquery.ScalarQueryParameter("since", "INT64", int(since))])
    return _poll(lambda: next(iter(client.query(sql, job_config=config).result()))["at"],
                 lambda at: at is not None, time.monotonic() + timeout_s, every_s)


@dataclass
class Handover:
    """The messages green took in while its rows were shadow, and who answers each."""

    messages: int
    by_blue: int
    by_green: int
    pending: list[str]  # answered by nobody yet: blue must not be drained
    taken_in: frozenset[str] = frozenset()  # the message ids counted
    stable_secs: float | None = None  # how long the answer held (None: not waited for)

    def passed(self, settle_secs: float) -> bool:
        """Blue may be drained: nothing pending, and that held for ``settle_secs``."""
        return not self.pending and (self.stable_secs or 0.0) >= settle_secs

    def text(self, blue: str, green: str, settle_secs: float = 0.0) -> str:
        if self.pending:
            return (f"{len(self.pending)} of the {self.messages} messages release {green} took "
                    f"in before it answered live are not answered by {blue} yet (first: "
                    f"{', '.join(sorted(self.pending)[:5])}): do not drain the old job yet")
        if not self.passed(settle_secs):
            return (f"all {self.messages} messages release {green} took in so far are answered, "
                    f"but the answer has not held for {settle_secs:g}s yet (green's entry rows "
                    "still arriving): do not drain the old job yet")
        return (f"all {self.messages} messages release {green} took in before it answered live "
                f"are answered ({self.by_blue} by {blue}, {self.by_green} by {green} live), "
                f"unchanged for {self.stable_secs or 0.0:.0f}s: the old job can be drained")


def handover(client, dataset: str, blue: str, green: str, since: dt.datetime,
             until: dt.datetime) -> Handover:
    """Count at green's entry: every message green booked in from ``since`` until ``until``
    (when all of green answers live), and whether the live side has answered it."""
    from pipeline.ops.queries import OPERATIONS_FILE, run_query

    rows = run_query(client, "release_handover", dataset, OPERATIONS_FILE, blue=blue,
                     green=green, since=since, until=until, days=HANDOVER_DAYS)
    by = [r["answered_by"] for r in rows]
    return Handover(len(rows), by.count("blue"), by.count("green"),
                    [r["message_id"] for r in rows if r["answered_by"] is None],
                    frozenset(r["message_id"] for r in rows))


def wait_for_handover(client, dataset: str, blue: str, green: str, since: dt.datetime,
                      until: dt.datetime, deadline: float, every_s: float = 2.0,
                      settle_secs: float = ENTRY_SETTLE_SECS) -> Handover:
    """:func:`handover`, polled from when ``until`` is past until its answer is stable --
    nothing pending and the same messages taken in on every poll for ``settle_secs`` (entry
    rows are streaming inserts; a worker of green may write a late shadow row) -- or
    ``deadline`` (monotonic) passes: the last state, whose ``stable_secs`` says how long it
    held."""
    import time

    wait = (until - dt.datetime.now(dt.UTC)).total_seconds()
    if wait > 0:
        time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
    held_from: float | None = None
    seen: frozenset[str] | None = None
    while True:
        state = handover(client, dataset, blue, green, since, until)
        now = time.monotonic()
        if state.pending:
            held_from, seen = None, None
        elif state.taken_in != seen:
            held_from, seen = now, state.taken_in
        state = replace(state, stable_secs=None if held_from is None else now - held_from)
        if state.passed(settle_secs) or now >= deadline:
            return state
        time.sleep(max(0.0, min(every_s, deadline - now)))


def trial_start(channels: Channels) -> dt.datetime:
    """When the green trial in ``channels`` began: the last ``release-green`` change (another
    is refused while one runs), else a day ago."""
    for entry in reversed(channels.history):
        if entry.get("action") == "release-green" and entry.get("at"):
            return dt.datetime.fromisoformat(entry["at"])
    return dt.datetime.now(dt.UTC) - dt.timedelta(days=1)


@dataclass(frozen=True)
class CutOver:
    """The most recent cut-over to a release, as the channels history records it."""

    blue: str | None  # the release live before it (the retiring one)
    trial_began: dt.datetime
    at: dt.datetime


def last_cutover(channels: Channels, release: str) -> CutOver | None:
    """The cut-over that made ``release`` live, if it is live and no release change came
    after it (then the old job is the retiring one, whose drain the handover gates)."""
    if channels.live_release is None or channels.live_release.release != release:
        return None
    for i in range(len(channels.history) - 1, -1, -1):
        entry = channels.history[i]
        action = str(entry.get("action", ""))
        if action == "release-cutover":
            releases = (entry.get("before") or {}).get("releases") or {}
            if (releases.get("green") or {}).get("release") != release or not entry.get("at"):
                return None
            blue = (releases.get("live") or {}).get("release")
            earlier = replace(channels, history=channels.history[:i])
            return CutOver(blue, trial_start(earlier), dt.datetime.fromisoformat(entry["at"]))
        if action.startswith("release"):
            return None
    return None


def compare_since(channels: Channels, hours: float) -> dt.datetime:
    """Where a comparison of releases starts: ``hours`` ago, but never before the trial began
    (the last ``release-green``): blue's rows from before it have no green rows to compare."""
    window = dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours)
    began = [entry.get("at") for entry in channels.history
             if entry.get("action") == "release-green"]
    try:
        start = dt.datetime.fromisoformat(began[-1]) if began else None
    except (TypeError, ValueError):  # an odd history entry: compare the window asked for
        start = None
    if start is None or start.tzinfo is None:
        return window
    return max(window, start)


def compare_releases(client, dataset: str, blue: str, green: str,
                     since: dt.datetime) -> list[dict]:
    from pipeline.ops.queries import OPERATIONS_FILE, run_query

    return run_query(client, "compare_releases", dataset, OPERATIONS_FILE, since=since,
                     blue=blue, green=green)


def check_handover(target, blue: str | None, green: str, trial_began: dt.datetime,
                   cut_at: float, args: argparse.Namespace) -> int:
    """May the old job (``blue``) be drained after the cut-over to ``green`` at ``cut_at``
    (epoch seconds)? Green reported the cut-over, and every message green took in while its
    rows were shadow is answered, stably (``release_handover``: blue's drain alone does not
    finish what blue had not pulled yet). 0 yes, 4 not yet."""
    import time

    deadline = time.monotonic() + args.wait_secs
    bq, dataset = target.bigquery(), target.need_dataset()
    live_at = wait_until_live(bq, dataset, green, cut_at, args.wait_secs)
    if live_at is None:
        print(f"release {green} has not reported the cut-over within {args.wait_secs:g}s (it "
              "sees channels as tiles pass: is traffic flowing?); do not drain the old job yet",
              file=sys.stderr)
        return NOT_YET
    print(f"release {green} took the cut-over at {live_at.isoformat()}")
    if blue is None:
        print("no live release was recorded before it: nothing to hand over")
        return 0
    until = live_at + dt.timedelta(seconds=args.green_poll_secs)
    state = wait_for_handover(bq, dataset, blue, green, trial_began, until, deadline,
                              settle_secs=args.settle_secs)
    passed = state.passed(args.settle_secs)
    print(state.text(blue, green, args.settle_secs), file=sys.stdout if passed else sys.stderr)
    if not passed:
        print(f"check again: tilestream release handover {green} --wait_secs N", file=sys.stderr)
    return 0 if passed else NOT_YET


def _cutover(args: argparse.Namespace, registry, target) -> int:
    """Flip green to live; with ``--wait_secs``, say when the old job may be drained
    (:func:`check_handover`)."""
    import time

    before, _ = registry.read_channels()
    blue = before.live_release.release if before.live_release else None
    since = time.time() - 1
    change = registry.release_cutover(args.release, by=args.by, why=args.reason)
    print(change)
    if not args.wait_secs:
        return 0
    return check_handover(target, blue, args.release, trial_start(before), since, args)


def _handover(args: argparse.Namespace, registry, target) -> int:
    """The handover of the last cut-over to ``args.release``, checked again (after exit 4)."""
    channels, _ = registry.read_channels()
    cut = last_cutover(channels, args.release)
    if cut is None:
        live = channels.live_release.release if channels.live_release else "none"
        print(f"tilestream release handover: no cut-over to release {args.release} is the last "
              f"release change (live: {live}); nothing to check", file=sys.stderr)
        return REFUSED
    return check_handover(target, cut.blue, args.release, cut.trial_began, cut.at.timestamp(),
                          args)


def _green_refusal(registry, green: str) -> str | None:
    """Why ``green`` cannot go on trial beside the running job, if it cannot (fail closed):
    no live release recorded (the running job's release is unknown: 0.1.0 records none), or
    one the records say cannot be blue of ``green``."""
    channels, _ = registry.read_channels()
    if channels.live_release is None:
        return ("no live release is recorded, so nothing says the running job can be blue of "
                f"{green}. If it is 0.2.0 or later, record it first: tilestream release live "
                "<release> --subscription <its subscription> --job <its job>; a 0.1.0 job "
                "cannot be blue (docs/operations.md, \"Releases and their predecessors\")")
    live = channels.live_release.release
    barrier = blue_green_barrier(live, green)
    if barrier is None:
        return None
    return (f"release {live} is live and cannot be blue of {green}: release "
            f"{barrier['release']} cannot be blue-greened from {barrier['from']} "
            f"({barrier.get('why', 'its record says so')}). To cross it: "
            f"{barrier.get('cross', 'see docs/operations.md')}")


def _channel_verb(args: argparse.Namespace) -> int:
    from model.channels import RegistryError
    from pipeline.ops import clients, model_cli

    target = clients.resolve(args)
    registry = model_cli._registry(args)
    try:
        if args.verb == "status":
            channels, _ = registry.read_channels()
            gone = retiring_release(channels)
            print(json.dumps({"this_tree": RELEASE, **channels.state(),
                              "retiring": gone.to_dict() if gone else None}, indent=2))
            return 0
        if args.verb == "compare":
            channels, _ = registry.read_channels()
            rows = compare_releases(target.bigquery(), target.need_dataset(), args.blue,
                                    args.green, compare_since(channels, args.hours))
            print(json.dumps(rows, indent=2, default=str))
            return 0
        kwargs = {"by": args.by, "why": args.reason}
        if args.verb == "live":
            change = registry.release_live(args.release, args.subscription, args.job, **kwargs)
        elif args.verb == "green":
            refusal = _green_refusal(registry, args.release)
            if refusal:
                print(f"tilestream release green: {refusal}", file=sys.stderr)
                return 2
            change = _start_green(args, registry, target)
        elif args.verb == "abort":
            change = registry.release_abort(args.release, **kwargs)
        elif args.verb == "handover":
            return _handover(args, registry, target)
        else:
            return _cutover(args, registry, target)
    except RegistryError as exc:
        print(f"tilestream release {args.verb}: {exc}", file=sys.stderr)
        return REFUSED
    print(change)
    return 0


def _seconds(text: str) -> float:
    """A duration: a bound below zero would shrink the handover and let blue go early."""
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration in seconds (>= 0)")
    return value


def parser() -> argparse.ArgumentParser:
    from pipeline.ops import clients

    top = argparse.ArgumentParser(
        prog="tilestream release", description="Release the stream itself: can a running job "
        "be updated in place to this tree, or does it need blue-green (a second job on a second "
        "subscription, then a cut-over)? See docs/operations.md, \"Releasing the stream\".")
    verbs = top.add_subparsers(dest="verb", required=True, metavar="VERB")
    rec = verbs.add_parser("record", help="write templates/releases/<release>.json")
    rec.add_argument("--release", default=RELEASE, help="release to record (default %(default)s)")
    tg = verbs.add_parser("tag", help="write the release's commit into its record and tag it "
                          "v<release> (commit the record afterwards)")
    tg.add_argument("--release", default=RELEASE, help="release to tag (default %(default)s)")
    tg.add_argument("--commit", default="HEAD", help="the release's commit (default: HEAD)")
    chk = verbs.add_parser("check", help="can a job launched with AGAINST be updated in place "
                           "to this tree? exit 0 yes (the name mapping on the last line), 3 no")
    chk.add_argument("against", help="a release record or surface JSON (the running job's)")
    chk.add_argument("--parameters", default="", help="template parameters k=v,k=v")
    sur = verbs.add_parser("surface", help="this tree's update surface as JSON (what deploy.sh "
                           "records at each launch)")
    sur.add_argument("--parameters", default="", help="template parameters k=v,k=v")

    def channel(name: str, help_text: str, release: bool = True,
                changes: bool = True) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=help_text)
        if release:
            p.add_argument("release", help="the stream's release, e.g. 0.2.0")
        clients.add_registry_argument(p)
        clients.add_arguments(p)
        if changes:
            p.add_argument("--by", default=None, help="who (default: the login name)")
            p.add_argument("--reason", default="", help="why; kept in the history")
        return p

    for name, help_text in (
            ("live", "record the release answering, its subscription and job (a first launch, "
                     "an in-place update)"),
            ("green", "start a blue-green trial: RELEASE's job, on SUBSCRIPTION (sought first "
                      "to a snapshot of the live release's: it takes in all the live job has "
                      "not acknowledged), writes its rows as shadow")):
        p = channel(name, help_text)
        p.add_argument("--subscription", required=True,
                       help="the subscription path the release's job reads")
        p.add_argument("--job", default="", help="the Dataflow job's name (drained later)")
    def waits(p: argparse.ArgumentParser, default_wait: float) -> None:
        p.add_argument("--wait_secs", type=_seconds, default=default_wait,
                       help="wait this long for the green job to report the cut-over and for "
                       "every message it took in as shadow to be answered; exit 0 when the old "
                       "job can be drained, 4 when not yet (needs --bq_dataset)")
        p.add_argument("--green_poll_secs", type=_seconds, default=CHANNELS_POLL_SECS,
                       help="the green job's --channels_poll_secs: its workers see the cut-over "
                       "within this long of the first (default: %(default)s, the stream's)")
        p.add_argument("--settle_secs", type=_seconds, default=ENTRY_SETTLE_SECS,
                       help="the answer must hold this long (nothing pending, no new entry row "
                       "of green) before it passes (default: %(default)s)")

    waits(channel("cutover", "the green RELEASE answers from now on"), 0)
    waits(channel("handover", "check again whether the old job may be drained after the "
                  "cut-over to RELEASE (its trial start and cut-over read from the channels "
                  "history): exit 0 yes, 4 not yet, 2 no such cut-over"), 60)
    channel("abort", "end RELEASE's green trial")
    channel("status", "the live and green releases", release=False, changes=False)
    cmp = channel("compare", "green against blue: messages, tiles, dead-letter rate, latency, "
                  "chip agreement", release=False, changes=False)
    cmp.add_argument("--blue", required=True, help="the live release")
    cmp.add_argument("--green", required=True, help="the release on trial")
    cmp.add_argument("--hours", type=float, default=1.0,
                     help="window, hours back from now, never before the trial began "
                     "(default %(default)s)")
    from pipeline.ops.cli import describe

    describe(top)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.verb == "record":
        doc = record(args.release)
        print(json.dumps(doc.get("update_from", {"release": args.release}), indent=1))
        return 0
    if args.verb == "tag":
        try:
            commit = tag(args.release, args.commit)
        except ReleaseError as exc:
            print(f"tilestream release tag: {exc}", file=sys.stderr)
            return 2
        print(f"release {args.release} = {commit} (tag v{args.release}); commit "
              f"{record_path(args.release).relative_to(ROOT)}")
        return 0
    if args.verb == "surface":
        print(json.dumps({"release": RELEASE,
                          "surface": surface(parse_parameters(args.parameters))}))
        return 0
    if args.verb == "check":
        verdict = check(json.loads(Path(args.against).read_text()),
                        parse_parameters(args.parameters))
        print(verdict.text(), file=sys.stderr)
        print(",".join(f"{old}={new}" for old, new in verdict.mapping.items()))
        return 0 if verdict.method == IN_PLACE else 3
    return _channel_verb(args)


if __name__ == "__main__":
    sys.exit(main())
