"""The previous release's real code as blue, this tree as green: the documented release, end to
end, on the local stack with traffic flowing.

The previous release is built from git: the commit its record names
(``templates/releases/<release>.json``; tags may not travel with a clone, the record does),
``git archive``-d into ``.tilestream/releases/<commit>/`` with an environment of its own: a venv
whose ``.pth`` reaches this environment's third-party packages (checked against the old
release's own ``install_requires``) and the old tree installed non-editable. Its operator verbs
run from its own tree on ``PYTHONPATH``, as its image runs them (``PYTHONPATH=/template``), never
from this one. A change of this tree that the previous release cannot read (the channels
document, a table's schema, the stack's run directory) fails here, not in an operator's hands.
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from model.registry import Registry
from pipeline.ops import release
from pipeline.ops.queries import run_query
from pipeline.options import RELEASE
from tests import tiles
from tests.conftest import REPORT
from tests.streams import (
    TilePublisher,
    cli,
    fresh_input,
    query,
    start_stream,
    stop_stream,
    wait_until,
)
from tests.test_registry import STUDENT

ROOT = Path(__file__).resolve().parents[1]
PREVIOUS = release.previous_release(RELEASE)
# What the old environment reports about itself: its release, where its CLI and its installed
# runtime come from, and which of its requirements this environment does not meet.
_SELF_REPORT = """
import importlib.metadata as m, json, sys
from packaging.requirements import Requirement
import pipeline.ops.cli as cli
from pipeline.options import RELEASE
unmet = []
for text in m.distribution("tilestream").requires or []:
    need = Requirement(text)
    if need.marker and not need.marker.evaluate({"extra": ""}):
        continue
    try:
        have = m.version(need.name)
    except m.PackageNotFoundError:
        unmet.append(f"{need} (missing)")
        continue
    if not need.specifier.contains(have, prereleases=True):
        unmet.append(f"{need} (have {have})")
dist = m.distribution("tilestream")
print(json.dumps({"release": RELEASE, "cli": cli.__file__, "unmet": unmet,
                  "installed": dist.version, "dist": str(dist.locate_file(""))}))
"""


@dataclass(frozen=True)
class OldRelease:
    """A previous release, built from its commit: its tree and its environment."""

    name: str
    commit: str
    home: Path

    @property
    def tree(self) -> Path:
        return self.home / "src"

    @property
    def python(self) -> Path:
        return self.home / "venv" / "bin" / "python"

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.tree)}

    def run(self, *argv: str, **kwargs) -> subprocess.CompletedProcess:
        """``python ARGV`` in the old environment, outside this tree."""
        return subprocess.run([str(self.python), *argv], cwd=self.home, env=self.env(),
                              capture_output=True, text=True, **kwargs)

    def cli(self, stack, *argv: str) -> subprocess.CompletedProcess:
        """The old release's ``tilestream ARGV --local`` on the test stack."""
        return self.run("-m", "pipeline.ops.cli", *argv, "--local",
                        f"--stack_dir={stack.run_dir}", timeout=180)

    def stream(self, stack, log: Path, *args: str) -> subprocess.Popen:
        """The old release's stream, launched as it launches itself (its own ``--release``)."""
        with open(log, "ab") as out:
            return subprocess.Popen(
                [str(self.python), "-m", "pipeline.ops.cli", "run", "--local",
                 f"--stack_dir={stack.run_dir}", *args],
                cwd=self.home, env=self.env(), stdout=out, stderr=subprocess.STDOUT)


def _shared_site_packages() -> list[str]:
    import site

    return [str(Path(p).resolve()) for p in site.getsitepackages()]


def build(name: str) -> OldRelease:
    """Release ``name`` from its recorded commit, built once per commit (a second run reuses
    it). Fails, never skips, when the commit is missing: a shallow clone cannot test this."""
    try:
        commit = release.release_commit(name)
    except release.ReleaseError as exc:
        pytest.fail(str(exc))
    cache = ROOT / ".tilestream" / "releases"
    home = cache / commit
    if (home / "built").exists():
        return OldRelease(name, commit, home)
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{commit[:12]}-", dir=cache))
    try:
        (work / "src").mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(work / "src")], input=archive, check=True)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(work / "venv")],
                       check=True)
        python = work / "venv" / "bin" / "python"
        purelib = subprocess.run([str(python), "-c", "import sysconfig; "
                                  "print(sysconfig.get_paths()['purelib'])"], check=True,
                                 capture_output=True, text=True).stdout.strip()
        # Third-party packages from this environment, after the venv's own site-packages.
        Path(purelib, "tilestream-shared.pth").write_text("\n".join(_shared_site_packages())
                                                         + "\n")
        installed = subprocess.run(
            [str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation",
             "--no-index", "--no-warn-script-location", "--quiet", str(work / "src")],
            cwd=work, capture_output=True, text=True)
        assert installed.returncode == 0, installed.stderr[-3000:]
        (work / "built").write_text(commit + "\n")
        shutil.rmtree(home, ignore_errors=True)
        work.rename(home)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return OldRelease(name, commit, home)


@pytest.fixture(scope="module")
def previous() -> OldRelease:
    """The previous release's environment, checked to be its own code and complete."""
    assert PREVIOUS, "no release recorded before this one"
    old = build(PREVIOUS)
    done = old.run("-c", _SELF_REPORT, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert not report["unmet"], (
        f"release {PREVIOUS}'s install_requires differ from this environment: "
        f"{report['unmet']}; build it a full environment of its own")
    assert report["release"] == report["installed"] == PREVIOUS, report
    for where in (report["cli"], report["dist"]):  # its own code and install, not this tree's
        assert Path(where).resolve().is_relative_to(old.home.resolve()), report
    return old


# --- the records: fast, no stack -----------------------------------------------------------------

def test_each_release_records_its_commit_and_whether_it_can_be_blue_of_the_one_before():
    first, second = release.read_record("0.1.0"), release.read_record("0.2.0")
    assert first["commit"].startswith("0e05c3a") and second["commit"].startswith("7007bda")
    this = release.read_record(RELEASE)
    assert this["previous"]["release"] == PREVIOUS
    assert this["previous"]["commit"] == release.read_record(PREVIOUS)["commit"]
    # 0.1.0 cannot be blue of 0.2.0 or anything later; 0.2.0 can be blue of this release.
    barrier = release.blue_green_barrier("0.1.0", RELEASE)
    assert barrier["release"] == "0.2.0" and barrier["from"] == "0.1.0"
    assert "drain" in barrier["cross"] and "release live 0.2.0" in barrier["cross"]
    assert release.blue_green_barrier(PREVIOUS, RELEASE) is None


def test_tag_refuses_a_commit_of_another_release():
    with pytest.raises(release.ReleaseError, match=r"is release 0\.1\.0"):
        release.tag("0.2.0", release.read_record("0.1.0")["commit"])


def test_a_release_whose_commit_the_clone_lacks_fails_the_build_clearly(monkeypatch, tmp_path):
    doc = {**release.read_record(PREVIOUS), "commit": "f" * 40}
    (tmp_path / f"{PREVIOUS}.json").write_text(json.dumps(doc))
    monkeypatch.setattr(release, "RELEASES", tmp_path)
    with pytest.raises(pytest.fail.Exception, match=r"not in this repository.*shallow clone"):
        build(PREVIOUS)


# --- release green against the records, on the stack ---------------------------------------------

@pytest.mark.stack
def test_release_green_refuses_a_live_release_that_cannot_be_blue_of_it(stack):
    registry_uri = f"{stack.registry_prefix}/refuse-{uuid.uuid4().hex[:6]}"
    registry = Registry(registry_uri, gcs_client=stack.storage())
    registry.promote(registry.publish(str(STUDENT))[0], by="test")
    topic, subscription, _ = fresh_input(stack, "refuse")
    stack.subscriber().create_subscription(
        request={"name": f"{subscription}-b", "topic": topic, "ack_deadline_seconds": 10})

    def green() -> subprocess.CompletedProcess:
        return cli(stack, "release", "green", RELEASE, f"--subscription={subscription}-b",
                   f"--registry={registry_uri}")

    unknown = green()  # nothing says which release the running job is
    assert unknown.returncode == 2 and "no live release is recorded" in unknown.stderr
    registry.release_live("0.1.0", subscription, "old")
    refused = green()
    assert refused.returncode == 2, refused.stdout
    assert "release 0.1.0 is live and cannot be blue" in refused.stderr
    assert "To cross it: stop 0.1.0" in refused.stderr
    assert registry.read_channels()[0].green_release is None  # nothing changed
    registry.release_live(PREVIOUS, subscription, "blue")
    assert green().returncode == 0


@pytest.mark.stack
def test_a_table_the_release_before_created_gains_this_releases_columns(adapted):
    """Blue created the tables first, with its columns; this release's rows carry more
    (here ``release`` and ``source_message_ids``, which 0.1.0's tables lack). The stream's start
    adds them, NULLABLE / REPEATED, and this release's rows then land beside the older ones."""
    from google.api_core.retry import Retry
    from google.cloud import bigquery

    from pipeline.local.identity import acting_as
    from transforms.sinks import SCHEMAS, BigQueryTables, ensure_tables

    client, dataset = adapted.bigquery(), f"older_{uuid.uuid4().hex[:6]}"
    client.create_dataset(dataset)
    newer = {"release", "source_message_ids"}
    older = [bigquery.SchemaField.from_api_repr(f) for f in SCHEMAS["events"]["fields"]
             if f["name"] not in newer]
    name = f"{adapted.project}.{dataset}.events"
    client.create_table(bigquery.Table(name, schema=older))
    row = {"disposition": "filtered", "stage": "parse", "reason": "older", "time": "2026-01-01"}
    assert client.insert_rows_json(name, [row]) == []  # the release before writes its rows
    tables = BigQueryTables.in_dataset(f"{adapted.project}:{dataset}")
    with acting_as("worker"):  # the stream's own call at its start
        changed = ensure_tables(tables)
    assert tables.events in changed
    modes = {f.name: f.mode for f in client.get_table(name).schema}
    assert modes["release"] == "NULLABLE" and modes["source_message_ids"] == "REPEATED"
    assert client.insert_rows_json(name, [{**row, "reason": "newer", "release": RELEASE,
                                           "source_message_ids": ["m1"]}],
                                   retry=Retry(deadline=30)) == []
    assert wait_until(lambda: len(query(adapted, f"SELECT reason FROM `{dataset}.events`")) == 2,
                      30)
    assert query(adapted, f"SELECT reason, release FROM `{dataset}.events` ORDER BY reason") == [
        {"reason": "newer", "release": RELEASE}, {"reason": "older", "release": None}]
    with acting_as("worker"):
        assert ensure_tables(tables) == []  # once widened, nothing more to do


# --- the previous release as blue, end to end ---------------------------------------------------

def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    return done.stdout


@pytest.mark.stack
@pytest.mark.slow
def test_previous_release_as_blue_hands_over_to_this_tree_losing_nothing(
        stack, model_uri, previous, tmp_path):
    blue_release, green_release = PREVIOUS, RELEASE
    registry_uri = f"{stack.registry_prefix}/previous-{uuid.uuid4().hex[:6]}"
    registry = Registry(registry_uri, gcs_client=stack.storage())
    registry.promote(registry.publish(str(STUDENT))[0], by="test")
    topic, blue_sub, dataset = fresh_input(stack, "previous")
    green_sub = f"{blue_sub}-b"  # the second slot (terraform/releases.tf)
    stack.subscriber().create_subscription(
        request={"name": green_sub, "topic": topic, "ack_deadline_seconds": 10})
    target = (f"--registry={registry_uri}", f"--bq_dataset={stack.project}:{dataset}")
    common = (f"--bq_dataset={stack.project}:{dataset}",
              f"--output_prefix={stack.output_prefix}/{dataset}",
              f"--model_registry={registry_uri}", "--channels_poll_secs=1", "--window_secs=1")
    crop = tiles.crop(tmp_path / "crop.tif", 0, 0, 100, 100)
    dataset_sql = f"{stack.project}.{dataset}"

    def rows(where: str) -> list[dict]:
        return query(stack, f"SELECT tile_id, release, role FROM `{dataset}.tiles` "
                            f"WHERE {where}")

    def ready() -> list[dict]:  # the sample tile is out of the model's distribution
        return run_query(stack.bigquery(), "tiles_ready", dataset_sql, days=1,
                         include_drifted=True)

    def log(name: str) -> str:
        return (tmp_path / name).read_text()[-3000:]

    # Blue: the previous release, recorded live and launched by its own verbs.
    _ok(previous.cli(stack, "release", "live", blue_release, f"--subscription={blue_sub}",
                     "--job=blue", *target))
    started = time.monotonic()
    blue = previous.stream(stack, tmp_path / "blue.log", f"--model_uri={model_uri}", *common,
                           f"--subscription={blue_sub}")
    green = None
    try:
        # A tile every 2.5 s: two streams and the emulators share a loaded machine here, and
        # a backlog only delays the last answers (the final wait), it loses none.
        with TilePublisher(stack, topic, crop, "pr", every_s=2.5) as traffic:
            assert wait_until(lambda: len(rows(f"release = '{blue_release}'")) >= 3, 240,
                              blue, 2), log("blue.log")
            # Green: this tree, by this tree's verbs.
            _ok(cli(stack, "release", "green", green_release, f"--subscription={green_sub}",
                    "--job=green", *target))
            green = start_stream(stack, model_uri, tmp_path / "green.log", *common,
                                 f"--subscription={green_sub}")
            assert wait_until(lambda: len(rows(f"release = '{green_release}'")) >= 3, 240,
                              green, 2), log("green.log")
            # Blue follows the registry through the trial: it read the channels green wrote
            # (0.2.0 logs each document it accepts; one it refuses leaves it deaf to changes).
            followed = f"'green': {{'release': '{green_release}'"
            assert wait_until(lambda: followed in (tmp_path / "blue.log").read_text(), 60, blue,
                              1), log("blue.log")
            compared: dict = {}

            def compare() -> bool:
                compared.update({r["side"]: r for r in json.loads(_ok(cli(
                    stack, "release", "compare", f"--blue={blue_release}",
                    f"--green={green_release}", *target)))})
                return compared.get("green", {}).get("chips_compared", 0) >= 4
            assert wait_until(compare, 120, green, 2), compared
            live_before = rows(f"release = '{green_release}' AND role = 'live'")
            cutover_at = time.time()
            cut = cli(stack, "release", "cutover", green_release, "--wait_secs=180",
                      "--green_poll_secs=1", *target, timeout_s=300)
            blue_exit = stop_stream(blue)
            stopped_at = time.time()
            assert wait_until(lambda: len(traffic.since(stopped_at)) >= 3, 60)
        published = dict(traffic.sent)
        assert wait_until(lambda: {r["tile_id"] for r in ready()} >= set(published), 600,
                          green, 5), (len(published), sorted(
                              set(published) - {r["tile_id"] for r in ready()})[:10])
    finally:
        for child in (blue, green):
            if child is not None:
                stop_stream(child)
    seconds = time.monotonic() - started
    answered = collections.Counter(r["tile_id"] for r in ready())
    lost = sorted(set(published) - set(answered))
    twice = sorted(t for t, n in answered.items() if n > 1)
    handed = re.search(r"all (\d+) messages .* answered \((\d+) by .*?, (\d+) by", cut.stdout)
    messages, by_blue, by_green = (int(g) for g in handed.groups()) if handed else (-1,) * 3
    figures = (f"release {blue_release} (built from {previous.commit[:12]}) as blue, "
               f"{green_release} as green: {len(published)} tiles published, {len(lost)} lost, "
               f"{len(twice)} counted twice; handover: {messages} messages green took in as "
               f"shadow, {by_blue} answered by blue, {by_green} by green live, pending "
               f"{0 if cut.returncode == 0 else 'some'}; cut-over to blue stopped "
               f"{stopped_at - cutover_at:.1f} s, {seconds:.0f} s in all; blue exit {blue_exit}")
    print(figures)
    assert cut.returncode == 0, (cut.stdout[-2000:], cut.stderr[-2000:])  # handover pending 0
    assert "took the cut-over" in cut.stdout
    assert not live_before  # green answered nothing live before the cut-over
    assert blue_exit == 0, log("blue.log")  # the old stream stops cleanly
    assert not lost and not twice, (lost, twice)
    refused = query(stack, f"SELECT release, reason FROM `{dataset}.events` "
                           "WHERE reason LIKE '%refused%'")
    assert not refused, refused  # neither release refused a document the other wrote
    assert set(answered) == set(published)
    # Blue's answers really were the previous release's rows; green's after the cut-over live.
    assert rows(f"release = '{blue_release}' AND role = 'live'")
    live_after = {r["tile_id"] for r in rows(f"release = '{green_release}' AND role = 'live'")}
    assert set(traffic.since(stopped_at)) <= live_after
    channels, _ = registry.read_channels()
    assert channels.live_release.release == green_release and channels.green_release is None
    REPORT["releases"].append((
        f"the previous release's real code ({blue_release}, built from git) as blue, this tree "
        f"as green, tiles published every 2.5 s throughout", "0 lost, 0 counted twice, "
        "handover pending 0", figures))
