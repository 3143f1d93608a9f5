"""Least privilege from needs: every Google API call the stream, its rollback rule and the model
verbs made on the local stack in this test session, evaluated against the grants the Terraform
declares for each identity (``pipeline/ops/iam.py``).

The stack's proxies record each call under the identity that made it. The tests here run last
(``tests/conftest.py``), so they judge every call the whole session made; the module's own
scenario makes sure each identity has acted even when this file runs alone. Verdicts that must
not depend on which tests ran (a grant nothing needs, a need nothing grants) judge the committed
needs (``templates/iam/needs.json``, written by `make iam` from a full run that passed), not the
calls of this selection.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
import urllib.request
import uuid
from importlib import metadata
from pathlib import Path
from unittest import mock
from urllib.parse import quote

import pytest
import setuptools
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipeline.local.audit import read_calls
from pipeline.ops import announce, iam
from tests import tiles
from tests.conftest import IAM_NEEDS, IAM_PENDING
from tests.streams import (
    fresh_input,
    map_server,
    query,
    start_stream,
    stop_stream,
    wait_until,
)

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.last]
ROOT = Path(__file__).resolve().parents[1]
STUDENT = ROOT / "model" / "artifacts" / "landcover-student"


def tilestream(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.ops.cli", *args],
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def scenario(stack, tmp_path_factory):
    """Each identity acts once: the model operator publishes and starts a canary, the worker
    scores tiles (a registry stream, load jobs, a dead letter), the rollback rule judges."""
    work = tmp_path_factory.mktemp("iam")
    registry = f"{stack.registry_prefix}/iam-{uuid.uuid4().hex[:6]}"
    local = ("--local", f"--stack_dir={stack.run_dir}")
    for args in (("publish", "--registry", registry, *local, str(STUDENT / "v1")),
                 ("publish", "--registry", registry, *local, str(STUDENT / "v2")),
                 ("promote", "landcover-student/1", "--registry", registry, *local),
                 ("canary", "landcover-student/2", "--fraction", "0.5", "--registry",
                  registry, *local), ("list", "--registry", registry, *local)):
        done = tilestream("model", *args)
        assert done.returncode == 0, done.stderr[-2000:]
    topic, subscription, dataset = fresh_input(stack, "iam")
    crop = tiles.crop(work / "crop.tif", 0, 0, 100, 100)
    names = [f"iam-{i}" for i in range(3)]
    for name in names:
        _, generation = announce.upload(stack.storage(), str(crop), stack.bucket,
                                        f"incoming/iam/{name}.tif")
        announce.publish(stack.publisher(), topic, *announce.gcs_notification(
            stack.bucket, f"incoming/iam/{name}.tif", generation))
    announce.publish(stack.publisher(), topic, b"{not json", {})
    log = work / "stream.log"
    child = start_stream(stack, str(STUDENT / "v1"), log, f"--model_registry={registry}",
                         f"--subscription={subscription}",
                         f"--bq_dataset={stack.project}:{dataset}",
                         f"--output_prefix={stack.output_prefix}/{dataset}",
                         "--channels_poll_secs=1", "--window_secs=1")
    try:
        done = wait_until(lambda: len(query(stack, f"SELECT tile_id FROM `{dataset}.tiles`"))
                          >= len(names) and query(stack, f"SELECT stage FROM "
                                                         f"`{dataset}.dead_letters`"), 180, child)
    finally:
        stop_stream(child)
    assert done, log.read_text(errors="replace")[-3000:]
    watch = tilestream("model", "watch", "--registry", registry, *local,
                       f"--bq_dataset={stack.project}:{dataset}", "--min_tiles=1")
    assert watch.returncode == 0, watch.stderr[-2000:]
    [row] = query(stack, f"SELECT raster_uri FROM `{dataset}.tiles` LIMIT 1")
    with map_server(stack, dataset, f"{stack.output_prefix}/{dataset}", work / "map.log") as url:
        for path in ("api/tiles", f"cog/info?url={quote(row['raster_uri'])}"):
            with urllib.request.urlopen(url + path, timeout=60) as answer:
                assert answer.status == 200, path
    return {"registry": registry, "dataset": dataset}


@pytest.fixture(scope="module")
def report(stack, scenario):
    calls = read_calls(stack.run_dir)
    needs = iam.needs_of(calls)
    grants = iam.terraform_grants()
    verdict = iam.evaluate(needs + iam.platform_needs(), grants)
    if os.environ.get(IAM_NEEDS):  # make iam: written at the end, if the whole run passed
        IAM_PENDING.update(needs=needs, verdict=verdict, grants=grants)
    return verdict, needs, calls


def test_every_call_an_identity_we_run_as_made_is_granted(report):
    verdict, _, calls = report
    acted = {identity: sum(1 for c in calls if c.get("identity") == identity)
             for identity in iam.IDENTITIES}
    assert all(acted.values()), acted  # each identity's calls were recorded and judged
    assert set(iam.IDENTITIES) <= {n.identity for n in verdict.needs}
    assert verdict.denied == [], "\n" + verdict.text()


def test_the_recorded_needs_are_the_committed_ones(report):
    """templates/iam/needs.json is what preflight checks offline: it must hold every need
    this session recorded (`make iam` rewrites it from a full run)."""
    _, needs, _ = report
    recorded = {iam.generalised(n) for n in needs if n.identity in iam.IDENTITIES}
    committed = set(iam.load_needs())
    assert recorded - committed == set(), "new needs: run `make iam` and review the grants"


def committed_verdict() -> iam.Report:
    return iam.evaluate(iam.load_needs() + iam.platform_needs(), iam.terraform_grants())


def test_the_grants_hold_no_permission_nothing_needs():
    """Judged against the committed needs of a full run: a selection of tests makes fewer calls
    and would call a needed grant unused."""
    assert [g.address for g in committed_verdict().unused] == []


def test_every_committed_need_is_granted():
    """The other direction: nothing the stream needs is missing from the Terraform."""
    verdict = committed_verdict()
    assert set(iam.IDENTITIES) <= {n.identity for n in verdict.needs}
    assert verdict.denied == [], "\n" + verdict.text()


def test_widening_a_table_an_earlier_release_made_needs_update_on_it():
    """A release that adds columns to a table its predecessor created (blue-green: both write
    to it) says ALTER TABLE and patches the schema; BigQuery checks ``tables.update`` for both,
    not the read a SELECT needs."""
    table = "tilestream-local.tilestream.tiles"
    calls = [{"service": "bigquery", "identity": "worker", "method": "POST", "status": 200,
              "path": "/bigquery/v2/projects/tilestream-local/queries",
              "job": {"type": "query",
                      "sql": f"ALTER TABLE `{table}` ADD COLUMN IF NOT EXISTS `location` STRING"}},
             {"service": "bigquery", "identity": "worker", "method": "PATCH", "status": 200,
              "path": "/bigquery/v2/projects/tilestream-local/datasets/tilestream/tables/tiles"}]
    resource = "projects/tilestream-local/datasets/tilestream/tables/tiles"
    update = iam.Need("worker", "bigquery.tables.update", resource)
    needs = iam.needs_of(calls)
    assert needs.count(update) == 2
    assert iam.Need("worker", "bigquery.tables.getData", resource) not in needs
    assert iam.evaluate(needs, iam.terraform_grants()).denied == []


def test_a_call_outside_the_grants_is_denied():
    """The evaluator itself: the worker deleting an input object, listing a bucket through a
    prefix condition, or loading rows without a job grant would fail on GCP."""
    grants = iam.terraform_grants()
    tiles_bucket = "projects/_/buckets/tilestream-local-tilestream-tiles"
    needs = [iam.Need("worker", "storage.objects.delete", f"{tiles_bucket}/objects/incoming/a.tif"),
             iam.Need("worker", "storage.objects.list", tiles_bucket),
             iam.Need("worker", "storage.objects.delete", f"{tiles_bucket}/objects/output/a.tif"),
             iam.Need("rollback-rule", "storage.objects.create",
                      f"{tiles_bucket}/objects/output/x.tif")]
    verdict = iam.evaluate(needs, grants)
    assert set(verdict.denied) == {needs[0], needs[1], needs[3]}
    without_jobs = [g for g in grants if g.address != "google_project_iam_member."
                                                      "worker_runs_load_jobs"]
    load = iam.Need("worker", "bigquery.jobs.create", "projects/tilestream-local")
    assert iam.evaluate([load], without_jobs).denied == [load]


def test_the_local_stack_uses_the_terraforms_names(stack):
    tf = iam.Terraform(variables={"project": stack.project})
    assert tf.attribute("google_storage_bucket.tiles", "name") == stack.bucket
    assert tf.attribute("google_storage_bucket.models", "name") == stack.models_bucket
    assert tf.attribute("google_storage_bucket.dataflow", "name") == stack.dataflow_bucket
    assert tf.attribute("google_pubsub_subscription.tiles", "id") == stack.subscription_path
    assert tf.attribute("google_pubsub_subscription.tiles_b", "id") == stack.subscription_b_path
    assert tf.attribute("google_pubsub_topic.tiles", "id") == stack.topic_path
    assert tf.attribute("google_pubsub_topic.results", "id") == stack.results_topic_path
    assert tf.attribute("google_bigquery_dataset.tilestream", "dataset_id") == stack.dataset
    assert stack.output_prefix.endswith("/" + tf.values["output_prefix"].rstrip("/"))
    assert stack.registry_prefix.endswith("/" + tf.values["registry_prefix"].rstrip("/"))


# --- `tilestream iam` as the image installs it ------------------------------------------------

def _setup_kwargs() -> dict:
    """What setup.py declares (its ``setup()`` call's arguments, nothing built)."""
    declared: dict = {}
    with mock.patch.object(setuptools, "setup", lambda **kwargs: declared.update(kwargs)):
        runpy.run_path(str(ROOT / "setup.py"))
    return declared


def image_requirements(dockerfile: Path) -> list[str]:
    """The requirements the image's ``pip install`` lines name, its build args at their
    defaults, the project's own install (``./[extras]``) read from setup.py."""
    text = dockerfile.read_text().replace("\\\n", " ")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    declared = _setup_kwargs()
    found: list[str] = []
    for line in re.findall(r"pip install ([^&\n]+)", text):
        for word in line.split():
            word = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], word.strip('"'))
            if word.startswith("-") or "://" in word or word in args.values():
                continue
            own = re.fullmatch(r"\./(?:\[([\w,]+)\])?", word)
            if own:
                found += declared["install_requires"]
                for extra in filter(None, (own.group(1) or "").split(",")):
                    found += declared["extras_require"][extra]
            elif not word.startswith("pip=="):
                found.append(word)
    return found


def installed_closure(requirements: list[str]) -> set[str]:
    """The distributions those requirements install, as this environment resolved them."""
    seen: set[tuple[str, frozenset]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.distribution(req.name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e})
                                         for e in (req.extras or {""})):
                todo.append(dep)
    return {name for name, _ in seen}


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cpu"])
def test_tilestream_iam_runs_with_only_what_the_image_installs(dockerfile):
    """`tilestream iam` (and preflight's iam check) in the image: every module of a
    distribution the image does not install is made unimportable, the rest is this venv's."""
    image = installed_closure(image_requirements(ROOT / "templates" / dockerfile))
    assert {"apache-beam", "torch", "python-hcl2"} <= image
    absent = sorted({module for module, dists in metadata.packages_distributions().items()
                     if not {canonicalize_name(d) for d in dists} & (image | {"tilestream"})})
    code = (
        "import json, sys\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    sys.modules[name] = None  # not in the image: importing it raises ImportError\n"
        "from pipeline.ops.cli import main\n"
        "sys.exit(main(['iam']))\n")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(absent)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert " 0 denied" in done.stdout
