"""The release protocol as a state machine: registry and release verbs against what consumers see.

Hypothesis drives the real operator verbs (:class:`model.registry.Registry`: publish, promote,
canary, shadow, rollback, release green / cutover / abort) on a registry directory, and
simulated jobs whose workers each follow ``channels.json`` with their own
:class:`model.serving.ChannelsFollower` (a worker polls when a rule says so: some poll late).
A job that reads a message writes the rows the stream would write, with the role its worker's
snapshot gives (:func:`model.channels.release_role`, :meth:`model.serving.Snapshot.assign`), into
real emulator tables; sometimes a tile's chip rows land later (a load job). After every step the
shipped SQL, read by name, is held to the protocol (docs/operations.md §9):

- no row of a green release is anything but shadow before its cut-over (also when a candidate
  is refused or the trial is aborted);
- each tile appears once in ``tiles_ready`` and in ``class_area_per_tile_and_day``, and only
  with a whole, non-shadow answer of its newest generation;
- when ``release_handover`` finds nothing pending, every message the green job took in is
  answered as consumers read (a whole non-shadow tile row, an events or a dead_letters row).

``make test`` runs a bounded number of examples; ``TILESTREAM_PROTOCOL_EXAMPLES`` (and
``TILESTREAM_PROTOCOL_STEPS``) run it longer.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from model.channels import ModelRef, RegistryError, release_role
from model.registry import Registry
from model.serving import ChannelsFollower, fetch_validated, start_snapshot
from pipeline.ops import release as release_ops
from pipeline.ops.queries import run_query
from tests.streams import empty_dataset
from tests.test_registry import STUDENT, variant
from transforms.sinks import SCHEMAS, row_id

pytestmark = pytest.mark.stack

# Bounded and derandomized in `make test` (the same examples every run: it passes or fails for
# the code, not the draw), printing a failing sequence as found (shrinking it takes minutes on
# the emulators); set either variable for a longer, random exploration that shrinks.
LONG = "TILESTREAM_PROTOCOL_EXAMPLES" in os.environ or "TILESTREAM_PROTOCOL_STEPS" in os.environ
EXAMPLES = int(os.environ.get("TILESTREAM_PROTOCOL_EXAMPLES", "15"))
STEPS = int(os.environ.get("TILESTREAM_PROTOCOL_STEPS", "20"))
NAME = "landcover-student"
NAMES = ("developed", "forest", "water")
CHIPS = 2  # chip rows per tile row
DAYS = 30  # every row here is minutes old
NEVER = 1e9  # workers poll only when a rule says so: lateness is the rules' to choose
GENERATION0 = 1_700_000_000_000_000  # object generations: same width, so any order agrees
ARRIVALS = ("new", "new", "generation", "copy", "bad")  # what a message on the topic is
STATS = {"examples": 0, "steps": 0}  # what a run covered, printed at its end


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A registry with versions 1 and 2 published (1 live) and a worker cache holding both
    validated, copied for each example so no example pays for their validation again."""
    root = tmp_path_factory.mktemp("protocol")
    registry = Registry(str(root / "registry"))
    registry.publish(str(STUDENT))
    registry.publish(str(variant(root, "2")))
    registry.promote(ModelRef(NAME, "1"), by="test")
    for version in ("1", "2"):
        fetch_validated(registry, ModelRef(NAME, version), root / "cache")
    return root


# --- what the simulated jobs wrote (the oracle) -----------------------------------------------


@dataclass(frozen=True)
class Message:
    id: str
    tile_id: str
    generation: int
    bad: bool = False


@dataclass
class TileRow:
    """One tile row a job wrote, and which of its chip rows have landed."""

    release: str
    role: str
    model: ModelRef
    message: Message
    written: dt.datetime
    landed: set[int] = field(default_factory=set)

    @property
    def key(self) -> tuple[str, int, str, str]:
        return (self.message.tile_id, self.message.generation, self.model.version, self.role)


@dataclass
class Job:
    """A job of one release: its workers (each following the channels) and what it has not
    read yet from its subscription."""

    release: str
    workers: list[ChannelsFollower]
    backlog: list[Message] = field(default_factory=list)
    seen: set[tuple[str, int]] = field(default_factory=set)  # dedup memory: tile versions
    running: bool = True
    lagging: bool = False  # reads only when it catches up


@dataclass
class Handover:
    """The latest cut-over: blue, green, when the trial began and (once every worker of green
    reads the cut-over) when green answers live."""

    blue: str
    green: str
    since: dt.datetime
    until: dt.datetime | None = None
    passed: bool = False


def _iso(t: dt.datetime) -> str:
    return t.isoformat()


class ReleaseProtocol(RuleBasedStateMachine):
    """See the module docstring. Every example has its own registry, cache and dataset."""

    stack = None  # set by the test: the session's emulators
    template: Path | None = None

    def __init__(self):
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="tilestream-protocol-"))
        self.bq = self.stack.bigquery()
        self.dataset = ""
        self.registry: Registry | None = None
        self.versions: list[ModelRef] = []  # published and intact
        self.published = 2
        self.refused: set[ModelRef] = set()  # damaged after their trial began
        self.jobs: list[Job] = []
        self.green: str | None = None  # the release on trial, as the model sees it
        self.live_release: str | None = None
        self.ever_green: set[str] = set()
        self.cut_over_at: dict[str, dt.datetime] = {}
        self.handover: Handover | None = None
        self.messages: list[Message] = []
        self.intake: list[tuple[str, Message, dt.datetime]] = []  # (release, message, at)
        self.rows: list[TileRow] = []
        self.settled: set[str] = set()  # messages with an events or dead_letters row
        self.outbox: dict[str, list[dict]] = {t: [] for t in SCHEMAS}
        self.dirty: set[str] = set()  # which checks have new rows to judge
        self._last = dt.datetime.now(dt.UTC)
        self._n = 0

    def teardown(self):
        """Leave the session's emulator as small as it was: other tests share it."""
        STATS["examples"] += 1
        shutil.rmtree(self.root, ignore_errors=True)
        if self.dataset:
            self.bq.delete_dataset(self.dataset, delete_contents=True, not_found_ok=True)

    # --- plumbing -----------------------------------------------------------------------------

    def now(self) -> dt.datetime:
        """Wall-clock time, strictly increasing, so every write has its own instant."""
        self._last = max(dt.datetime.now(dt.UTC), self._last + dt.timedelta(milliseconds=1))
        return self._last

    def fresh(self, kind: str) -> str:
        self._n += 1
        return f"{kind}{self._n}"

    def follower(self) -> ChannelsFollower:
        card, start = start_snapshot(self.registry.prefix, self.root / "cache")
        return ChannelsFollower(self.registry.prefix, card, start, self.root / "cache",
                                poll_secs=NEVER)

    def start_job(self, release: str, workers: int) -> None:
        self.jobs.append(Job(release, [self.follower() for _ in range(workers)]))

    def verb(self, do) -> bool:
        """Run an operator verb; a refusal must leave the channels document as it was."""
        before = self.registry.read_channels()[1]
        try:
            do()
        except RegistryError:
            assert self.registry.read_channels()[1] == before, "a refused change changed channels"
            return False
        return True

    def write(self, table: str, row: dict) -> None:
        self.outbox[table].append(row)

    def flush(self) -> None:
        for table, rows in self.outbox.items():
            if rows:
                errors = self.bq.insert_rows_json(f"{self.dataset}.{table}", rows)
                assert errors == [], errors
                rows.clear()
                self.dirty |= {"answers", "handover"} if table in ("tiles", "chips") else {
                    "handover"}

    def running(self) -> list[Job]:
        return [job for job in self.jobs if job.running]

    # --- the rules ----------------------------------------------------------------------------

    @initialize(recorded=st.booleans(), workers=st.integers(1, 3))
    def start(self, recorded: bool, workers: int):
        """Version 1 live, 2 published; a stream running release r0 (recorded as the live
        release, or a stream that never took part in a blue-green)."""
        shutil.copytree(self.template / "registry", self.root / "registry")
        shutil.copytree(self.template / "cache", self.root / "cache")
        self.registry = Registry(str(self.root / "registry"))
        self.versions = [ModelRef(NAME, "1"), ModelRef(NAME, "2")]
        self.dataset = f"{self.stack.project}.{empty_dataset(self.stack, 'protocol')}"
        if recorded:
            self.registry.release_live("r0", "sub-r0", "job-r0", by="test")
            self.live_release = "r0"
        self.start_job("r0", workers)

    @rule()
    def publish(self):
        self.published += 1
        ref, _ = self.registry.publish(str(variant(self.root, str(self.published))))
        self.versions.append(ref)

    @rule(pick=st.integers(0, 9))
    def promote(self, pick: int):
        ref = self.versions[pick % len(self.versions)]
        self.verb(lambda: self.registry.promote(ref, by="test"))

    @rule(pick=st.integers(0, 9), canary=st.sampled_from([0.0, 0.5, 1.0]))
    def trial(self, pick: int, canary: float):
        """A shadow (0.0) or a canary of half or all tiles."""
        ref = self.versions[pick % len(self.versions)]
        if canary:
            self.verb(lambda: self.registry.canary(ref, canary, by="test"))
        else:
            self.verb(lambda: self.registry.shadow(ref, by="test"))

    @rule(canary=st.sampled_from([0.0, 0.5, 1.0]))
    def refused_candidate(self, canary: float):
        """A candidate whose weights are damaged once its trial began: the workers that fetch
        it refuse it, and live answers alone."""
        self.publish()
        ref = self.versions[-1]
        started = self.verb(lambda: self.registry.canary(ref, canary, by="test") if canary
                            else self.registry.shadow(ref, by="test"))
        (self.root / "registry" / ref.name / ref.version / "model.pt").write_bytes(b"damaged")
        self.versions.remove(ref)
        if started:
            self.refused.add(ref)

    @rule()
    def rollback(self):
        self.verb(lambda: self.registry.rollback(by="test"))

    @rule(workers=st.integers(1, 3))
    def release_green(self, workers: int):
        """A new release on its own subscription, with its job; refused while one is green."""
        release = self.fresh("r")
        ok = self.verb(lambda: self.registry.release_green(release, f"sub-{release}",
                                                           f"job-{release}", by="test"))
        assert ok == (self.green is None), f"release green {release} with {self.green} green"
        if ok:
            self.green = release
            self.ever_green.add(release)
            self.start_job(release, workers)

    @precondition(lambda self: self.green is not None)
    @rule()
    def cutover(self):
        green, blue = self.green, self.live_release
        since = release_ops.trial_start(self.registry.read_channels()[0])
        done = self.verb(lambda: self.registry.release_cutover(green, by="test"))
        assert done, f"cut-over of green {green} refused"
        self.cut_over_at[green] = self.now()
        self.green, self.live_release = None, green
        self.handover = Handover(blue, green, since) if blue else None
        self._green_switched()

    @precondition(lambda self: self.green is not None)
    @rule()
    def abort(self):
        """End the trial; its job drains later (a rule of its own), its rows stay shadow."""
        done = self.verb(lambda: self.registry.release_abort(self.green, by="test"))
        assert done, f"abort of green {self.green} refused"
        self.green = None

    @rule(job=st.integers(0, 9), worker=st.integers(0, 9), everyone=st.booleans())
    def poll(self, job: int, worker: int, everyone: bool):
        """Every worker of a job reads channels.json, or one of them (the others stay as late
        as they are)."""
        jobs = self.running()
        if jobs:
            chosen = jobs[job % len(jobs)]
            for follower in (chosen.workers if everyone else
                             [chosen.workers[worker % len(chosen.workers)]]):
                follower.refresh(force=True)
            self._green_switched()

    @rule(messages=st.lists(st.tuples(st.integers(0, 9), st.sampled_from(ARRIVALS)),
                            min_size=1, max_size=3),
          worker=st.integers(0, 9), whole=st.sampled_from([True, True, False]),
          due=st.booleans())
    def messages_arrive(self, messages: list[tuple[int, str]], worker: int, whole: bool,
                        due: bool):
        """Messages on the topic, each a new tile, a new generation of a tile seen before, a
        second message for a tile version (dedup's) or one that is not an announcement. Every
        running job receives them; those that keep up read them at once, with one of their
        workers (all of a tile's chip rows at once, or the first now and the rest later), which
        first reads channels.json if its poll is ``due`` (as the stream's routing step does)."""
        for pick, kind in messages:
            seen = sorted({m.tile_id for m in self.messages if not m.bad})
            if kind == "bad":
                message = Message(self.fresh("m"), "", 0, bad=True)
            elif kind == "new" or not seen:
                message = Message(self.fresh("m"), self.fresh("tile"), GENERATION0 + 1)
            else:
                tile_id = seen[pick % len(seen)]
                generation = max(m.generation for m in self.messages if m.tile_id == tile_id)
                message = Message(self.fresh("m"), tile_id,
                                  generation + (kind == "generation"))
            self.deliver(message, worker, whole, due)

    def deliver(self, message: Message, worker: int, whole: bool, due: bool) -> None:
        self.messages.append(message)
        for job in self.running():
            job.backlog.append(message)
            if not job.lagging:
                self.read_backlog(job, worker, len(job.backlog), whole, due)

    @rule(job=st.integers(0, 9))
    def lag(self, job: int):
        """A job falls behind its subscription (or keeps up again from now on)."""
        jobs = self.running()
        if jobs:
            chosen = jobs[job % len(jobs)]
            chosen.lagging = not chosen.lagging

    @rule(job=st.integers(0, 9), worker=st.integers(0, 9), count=st.integers(1, 3),
          whole=st.booleans(), due=st.booleans())
    def catch_up(self, job: int, worker: int, count: int, whole: bool, due: bool):
        """A job that fell behind reads its next messages."""
        jobs = [j for j in self.running() if j.backlog]
        if jobs:
            self.read_backlog(jobs[job % len(jobs)], worker, count, whole, due)

    def read_backlog(self, job: Job, worker: int, count: int, whole: bool, due: bool) -> None:
        """A worker of a job takes in messages and writes what the stream would: a dead letter,
        a duplicate event, or a tile row per assignment with its chip rows (all of them, or the
        first now and the rest by a later load job)."""
        follower = job.workers[worker % len(job.workers)]
        if due:
            follower.refresh(force=True)
            self._green_switched()
        for message in job.backlog[:count]:
            self.take(job, follower, message, whole)
        del job.backlog[:count]

    def take(self, job: Job, follower: ChannelsFollower, message: Message, whole: bool) -> None:
        at = self.now()
        self.intake.append((job.release, message, at))
        self.write("messages", {"message_id": message.id, "published": _iso(at),
                                "delivered": _iso(at), "received_at": _iso(at),
                                "kind": "notification", "release": job.release})
        common = {"message_id": message.id, "source_message_ids": [message.id],
                  "tile_id": message.tile_id or None, "time": _iso(at), "release": job.release}
        if message.bad:
            self.write("dead_letters", {"stage": "parse", "reason": "not JSON", **common})
            self.settled.add(message.id)
            return
        version = (message.tile_id, message.generation)
        if version in job.seen:
            self.write("events", {"disposition": "duplicate", "stage": "dedup",
                                  "reason": "tile version seen", **common})
            self.settled.add(message.id)
            return
        job.seen.add(version)
        snapshot = follower.snapshot
        role = release_role(snapshot.channels, job.release)  # as transforms/routing.py
        for model, model_role in snapshot.assign(message.tile_id):
            row = TileRow(job.release, "shadow" if role == "shadow" else model_role,
                          ModelRef.parse(model), message, self.now())
            self.rows.append(row)
            self.write("tiles", self.tile_row(row))
            for index in range(CHIPS if whole else 1):
                self.land(row, index)

    def land(self, row: TileRow, index: int) -> None:
        row.landed.add(index)
        self.write("chips", self.chip_row(row, index))

    @rule()
    def load_job(self):
        """Chip rows still due land (the load job of every running job, and of drained ones:
        a drain finishes what a job had read)."""
        for row in self.rows:
            for index in set(range(CHIPS)) - row.landed:
                self.land(row, index)

    @rule(job=st.integers(0, 9))
    def drain(self, job: int):
        """Stop a job that does not answer live: an aborted green any time, the old release
        only once the handover passed (as ``deploy.sh cutover`` does). What it had not read
        yet it never answers."""
        candidates = [j for j in self.running() if j.release not in (self.live_release,
                                                                     self.green)]
        if self.handover and not self.handover.passed:
            candidates = [j for j in candidates if j.release != self.handover.blue]
        if candidates:
            candidates[job % len(candidates)].running = False

    # --- row shapes (the sinks', transforms/sinks.py) ------------------------------------------

    def tile_row(self, row: TileRow) -> dict:
        m, t = row.message, _iso(row.written)
        key = f"{m.tile_id}@{m.generation}"
        return {"row_id": row_id(row.model.name, row.model.version, key), "tile_id": m.tile_id,
                "tile_generation": str(m.generation), "complete": True, "chips_total": CHIPS,
                "chips_scored": CHIPS, "chips_skipped": 0, "chips_failed": 0, "width": 10,
                "height": 10, "crs": "EPSG:4326", "footprint": "POINT(0 0)",
                "classes": [{"class_id": i, "name": n, "pixels": 10, "area_m2": 9000.0}
                            for i, n in enumerate(NAMES)],
                "raster_uri": f"gs://b/{row.release}/{key}.tif", "event_time": t,
                "published": t, "source": "gcs", "source_uris": [], "attributes": [],
                "message_id": m.id, "source_message_ids": [m.id], "model_name": row.model.name,
                "model_version": row.model.version, "role": row.role, "completed_at": t,
                "latency_s": 1.0, "release": row.release}

    def chip_row(self, row: TileRow, index: int) -> dict:
        m, t = row.message, _iso(row.written)
        key = f"{m.tile_id}@{m.generation}"
        return {"row_id": row_id(row.model.name, row.model.version, key, index),
                "tile_id": m.tile_id, "tile_generation": str(m.generation), "chip_index": index,
                "row_off": 0, "col_off": 0, "height": 10, "width": 10, "crs": "EPSG:4326",
                "footprint": "POINT(0 0)", "valid_fraction": 1.0,
                "classes": [{"class_id": i, "name": n, "pixels": 10, "area_m2": 3000.0}
                            for i, n in enumerate(NAMES)],
                "dominant_class": NAMES[0], "mean_confidence": 0.9, "event_time": t,
                "published": t, "source": "gcs", "source_uris": [], "attributes": [],
                "message_id": m.id, "source_message_ids": [m.id], "model_name": row.model.name,
                "model_version": row.model.version, "role": row.role, "chipped_at": t,
                "scored_at": t, "latency_s": 1.0, "release": row.release}

    # --- what consumers should see -------------------------------------------------------------

    def _green_switched(self) -> None:
        """Note when every worker of the cut-over green reads it: the handover's bound."""
        h = self.handover
        if h is None or h.until is not None:
            return
        job = next(j for j in self.jobs if j.release == h.green)
        if all(release_role(w.snapshot.channels, h.green) != "shadow" for w in job.workers):
            h.until = self.now()
            self.dirty.add("handover")

    def newest(self) -> dict[str, int]:
        newest: dict[str, int] = {}
        for m in self.messages:
            if not m.bad:
                newest[m.tile_id] = max(newest.get(m.tile_id, 0), m.generation)
        return newest

    def whole(self, strict: bool) -> set[tuple[str, int, str]]:
        """(tile, generation, version) with a whole non-shadow answer: ``strict``, one job's
        row with all its chip rows; else every chip row of that version and role is in,
        whichever job wrote it (chip rows of one version share their row ids)."""
        landed: dict[tuple, set[int]] = {}
        for row in self.rows:
            landed.setdefault(row.key, set()).update(row.landed)
        return {row.key[:3] for row in self.rows if row.role != "shadow"
                and len(row.landed if strict else landed[row.key]) == CHIPS}

    def answered(self, message: Message) -> bool:
        """As consumers read: a whole non-shadow tile row, an events or dead_letters row, or a
        newer generation of its tile (superseded)."""
        if message.id in self.settled or message.generation < self.newest().get(
                message.tile_id, 0):
            return True
        whole = self.whole(False)
        return any(row.message.id == message.id and row.key[:3] in whole for row in self.rows)

    @invariant()
    def no_green_answers_before_its_cutover(self):
        STATS["steps"] += 1
        for row in self.rows:
            cut = self.cut_over_at.get(row.release)
            if row.release in self.ever_green and (cut is None or row.written < cut):
                assert row.role == "shadow", (
                    f"release {row.release} wrote a {row.role} row for {row.message.tile_id} "
                    f"({row.model}) before its cut-over; green {self.green}, refused "
                    f"{sorted(map(str, self.refused))}")

    @invariant()
    def each_tile_answered_once(self):
        if self.dataset == "":
            return
        self.flush()
        if "answers" not in self.dirty:
            return
        self.dirty.discard("answers")
        ready = run_query(self.bq, "tiles_ready", self.dataset, days=DAYS)
        area = run_query(self.bq, "class_area_per_tile_and_day", self.dataset)
        may, must, newest = self.whole(False), self.whole(True), self.newest()
        shown: dict[str, list] = {}
        for r in ready:
            shown.setdefault(r["tile_id"], []).append(
                (r["tile_id"], int(r["tile_generation"]), r["model_version"]))
        for tile_id, answers in shown.items():
            assert len(answers) == 1, f"tiles_ready shows {tile_id} {len(answers)} times: {answers}"
            assert answers[0] in may, f"tiles_ready shows {answers[0]}, not a whole live answer"
            assert not any(w[0] == tile_id and w[1] > answers[0][1] for w in must), (
                f"tiles_ready shows {answers[0]}, a generation superseded by a whole answer")
        for tile_id, generation in newest.items():
            if any(w[:2] == (tile_id, generation) for w in must):
                assert tile_id in shown, f"{tile_id}@{generation} is answered, tiles_ready " \
                                         "misses it"
        areas: dict[str, set] = {}
        for r in area:
            areas.setdefault(r["tile_id"], set()).add((r["day"], r["model_version"]))
        for tile_id, versions in areas.items():
            assert len(versions) == 1, f"class area counts {tile_id} as {sorted(versions)}"
        assert set(areas) == set(shown), (
            f"class area and tiles_ready disagree on the answered tiles: "
            f"{sorted(set(areas) ^ set(shown))}")

    @invariant()
    def handover_passes_only_when_all_is_answered(self):
        h = self.handover
        if h is None or h.until is None or self.dataset == "":
            return
        self.flush()
        if "handover" not in self.dirty:
            return
        self.dirty.discard("handover")
        state = release_ops.handover(self.bq, self.dataset, h.blue, h.green, h.since, h.until)
        if state.pending:
            return
        h.passed = True
        taken = {m.id: m for release, m, at in self.intake
                 if release == h.green and h.since <= at < h.until}
        taken |= {row.message.id: row.message for row in self.rows
                  if row.release == h.green and row.role == "shadow"}
        unanswered = sorted(i for i, m in taken.items() if not self.answered(m))
        assert not unanswered, (f"the handover from {h.blue} to {h.green} passed with "
                                f"{unanswered} unanswered")


def test_the_release_protocol_holds_at_every_step(stack, template):
    """Hypothesis drives the verbs, the workers and the messages; the invariants above judge
    every step. A failure prints the steps that broke one (shrunk to the fewest in a long run)."""
    ReleaseProtocol.stack, ReleaseProtocol.template = stack, template
    began = time.monotonic()
    try:
        run_state_machine_as_test(ReleaseProtocol, settings=settings(
            max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
            derandomize=not LONG, database=None,
            phases=list(Phase) if LONG else [Phase.explicit, Phase.generate],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                   HealthCheck.data_too_large]))
    finally:
        print(f"release protocol: {STATS['examples']} examples, {STATS['steps']} steps "
              f"checked in {time.monotonic() - began:.0f}s")


# The hazards the protocol exists for, each as the steps that reach it, pinned as tests of their
# own so every run checks them, whatever the bounded exploration above happens to draw.
NEW = {"messages": [(0, "new")], "worker": 0, "whole": True, "due": False}
SCENARIOS = {
    "a refused candidate, then a green release": [
        ("refused_candidate", {"canary": 0.0}), ("release_green", {"workers": 1}),
        ("messages_arrive", NEW)],
    "an aborted green whose job still runs": [
        ("release_green", {"workers": 1}), ("abort", {}),
        ("poll", {"job": 1, "worker": 0, "everyone": True}), ("messages_arrive", NEW)],
    "a new generation of a tile": [
        ("messages_arrive", NEW),
        ("messages_arrive", NEW | {"messages": [(0, "generation")]})],
    "a tile whose chip rows are not all in": [
        ("messages_arrive", NEW | {"whole": False})],
    "a promotion in the cut-over overlap": [
        ("release_green", {"workers": 1}), ("cutover", {}),
        ("poll", {"job": 1, "worker": 0, "everyone": True}), ("promote", {"pick": 1}),
        ("poll", {"job": 1, "worker": 0, "everyone": True}), ("messages_arrive", NEW)],
    "blue lags behind green, catches up, is drained": [
        ("release_green", {"workers": 2}), ("lag", {"job": 0}), ("messages_arrive", NEW),
        ("cutover", {}), ("poll", {"job": 1, "worker": 0, "everyone": True}),
        ("catch_up", {"job": 0, "worker": 0, "count": 3, "whole": True, "due": True}),
        ("drain", {"job": 0})],
}


@pytest.mark.parametrize("steps", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_the_release_protocol_holds_in_known_hazards(stack, template, steps):
    """The same machine and invariants, on a fixed sequence of steps."""
    ReleaseProtocol.stack, ReleaseProtocol.template = stack, template
    machine = ReleaseProtocol()
    try:
        machine.start(recorded=True, workers=1)
        for name, args in steps:
            getattr(machine, name)(**args)
            machine.no_green_answers_before_its_cutover()
            machine.each_tile_answered_once()
            machine.handover_passes_only_when_all_is_answered()
        if steps[-1][0] == "drain":  # the old job may go only once the handover passed
            assert machine.handover.passed and not machine.jobs[0].running
    finally:
        machine.teardown()
