"""transforms/process.py: one object per worker process, and the tripwire of every patch.

A Beam (or Google client) upgrade that changes what a patch replaces must fail here, in review,
not quietly on a worker: each patch's target must still exist, read as it did when the patch
was written (source digest), and the Beam version must be the one the patches were written for.
"""

from __future__ import annotations

import threading

import apache_beam as beam
import pytest

from pipeline.local import patches as local_patches
from pipeline.local.stack import LocalStack
from transforms import process, storage
from transforms.chips import ChipSettings, ChipTileFn


def every_patch() -> list[process.Patch]:
    return [*process.RUNTIME_PATCHES, *local_patches.all_patches(LocalStack(run_dir="/nowhere"))]


@pytest.mark.parametrize("patch", every_patch(), ids=lambda p: p.name)
def test_every_patch_still_fits_what_it_patches(patch):
    assert patch.problem() is None, patch.problem()


def test_a_patch_refuses_a_target_that_changed(monkeypatch):
    changed = process.Patch("changed", process.BIGQUERY_ROW_SIZE.target, "0" * 16,
                            process.BIGQUERY_ROW_SIZE.replacement, "test", required=True)
    with pytest.raises(process.PatchError, match=r"changed .*source digest"):
        changed.install()
    other_beam = process.Patch("old", process.BIGQUERY_ROW_SIZE.target,
                               process.BIGQUERY_ROW_SIZE.digest,
                               process.BIGQUERY_ROW_SIZE.replacement, "test",
                               written_for="2.60.0")
    assert not other_beam.install()  # optional: left alone, with a warning
    assert "written for apache-beam 2.60.0" in other_beam.problem()


def test_the_runtime_patch_is_in_place_wherever_the_sinks_are():
    from apache_beam.io.gcp.bigquery import BigQueryWriteFn

    import transforms.sinks  # noqa: F401 - what a worker imports with the graph

    assert process.BIGQUERY_ROW_SIZE.installed
    assert getattr(BigQueryWriteFn._check_row_size, "__wrapped__", None) is not None


def test_shared_objects_are_one_per_process_whatever_the_thread():
    process.reset()
    seen = []

    def ask():
        seen.append(process.shared("kind", "key", object))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(o) for o in seen}) == 1
    assert process.shared("kind", "other", object) is not seen[0]


def test_the_circuit_breaker_belongs_to_the_process_not_to_a_dofn(model_uri):
    """Two DoFn instances (a runner builds one per bundle) see one breaker: a bucket that
    failed under one is paused for the other, as the docs promise."""
    from model.card import load_card

    process.reset()
    settings = ChipSettings.from_card(load_card(model_uri))
    first, second = ChipTileFn(settings), ChipTileFn(settings)
    for _ in range(3):
        storage.breaker().failure("flaky-bucket")
    assert first is not second and storage.breaker().is_open("flaky-bucket")
    import time

    calls = []

    def read():
        calls.append(time.monotonic())
        return "read"

    deadline = time.monotonic() + 0.3
    assert storage.with_retries(read, ("gs://flaky-bucket/a.tif",), deadline, 1.0) == "read"
    assert len(calls) == 1 and calls[0] >= deadline  # waited behind the open breaker, not before
    assert not storage.breaker().is_open("flaky-bucket")  # the probe closed it


class _Bundles(beam.DoFn):
    """Counts the bundles it is started on (one process: the in-process runner)."""

    started = 0

    def start_bundle(self):
        type(self).started += 1

    def process(self, element):
        yield element


def _started_bundles() -> int:
    """Bundles a step after a filter is started on, in a streaming pipeline of 40 one-element
    bundles of which 4 pass; the step must still receive exactly those 4."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.testing.util import assert_that, equal_to

    stream = TestStream()
    for i in range(40):
        stream = stream.add_elements([i])
    options = PipelineOptions(runner="BundleBasedDirectRunner")
    options.view_as(StandardOptions).streaming = True
    _Bundles.started = 0
    with beam.Pipeline(options=options) as p:
        kept = (p | stream | beam.Filter(lambda i: i % 10 == 0)
                | beam.ParDo(_Bundles()))
        assert_that(kept, equal_to([0, 10, 20, 30]))
    return _Bundles.started


def test_the_local_runner_starts_no_step_on_an_empty_bundle(monkeypatch):
    """The local runner fix: a step after a filter that empties most bundles is started only on
    the bundles that hold elements, and still receives every element that passed (a stream's
    dead-letter branches see an empty bundle after nearly every bundle upstream). Patched for
    this test only, so other in-process tests keep the runner as they found it."""
    from apache_beam.runners.direct import executor

    owner = executor._ExecutorServiceParallelExecutor
    [fix] = [p for p in local_patches.RUNNER_FIXES if p.name == "consumers-of-elements"]
    assert _started_bundles() > 4  # the runner as Beam ships it
    monkeypatch.setattr(owner, "schedule_consumers",
                        fix.replacement(owner.schedule_consumers))
    assert 1 <= _started_bundles() <= 4
