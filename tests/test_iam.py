"""Least privilege from needs: every Google API call the stream, its rollback rule and the model
verbs made on the local stack in this test session, evaluated against the grants the Terraform
declares for each identity (``pipeline/ops/iam.py``).

The stack's proxies record each call under the identity that made it. The tests here run last
(``tests/conftest.py``), so they judge every call the whole session made; the module's own
scenario makes sure each identity has acted even when this file runs alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pipeline.local.audit import read_calls
from pipeline.ops import announce, iam
from tests import tiles
from tests.streams import fresh_input, query, start_stream, stop_stream, wait_until

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.last]
ROOT = Path(__file__).resolve().parents[1]
STUDENT = ROOT / "model" / "artifacts" / "landcover-student"
NEEDS_OUT = "TILESTREAM_IAM_NEEDS"  # make iam: write the needs of this session there


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
    return {"registry": registry, "dataset": dataset}


@pytest.fixture(scope="module")
def report(stack, scenario):
    calls = read_calls(stack.run_dir)
    needs = iam.needs_of(calls)
    grants = iam.terraform_grants()
    verdict = iam.evaluate(needs + iam.platform_needs(), grants)
    out = os.environ.get(NEEDS_OUT)
    if out:  # make iam: the needs preflight checks, and docs/deploy.md's table, from this run
        iam.write_needs(needs, Path(out))
        iam.update_doc(ROOT / "docs" / "deploy.md", verdict, grants)
    return verdict, needs, calls


def test_every_call_an_identity_we_run_as_made_is_granted(report):
    verdict, _, calls = report
    assert {"worker", "rollback-rule", "model-operator"} <= {n.identity for n in verdict.needs}
    assert len(calls) > 100
    assert verdict.denied == [], "\n" + verdict.text()


def test_the_recorded_needs_are_the_committed_ones(report):
    """templates/iam/needs.json is what preflight checks offline: it must hold every need
    this session recorded (`make iam` rewrites it from a full run)."""
    _, needs, _ = report
    recorded = {iam.generalised(n) for n in needs if n.identity in iam.IDENTITIES}
    committed = set(iam.load_needs())
    assert recorded - committed == set(), "new needs: run `make iam` and review the grants"


def test_the_grants_hold_no_permission_nothing_needs(report):
    verdict, _, _ = report
    assert [g.address for g in verdict.unused] == []


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
