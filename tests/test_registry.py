"""The model registry and its channels document, on a local directory and on the GCS emulator."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from model.card import CARD_FILE
from model.channels import CHANNELS_FILE, ConflictError, ModelRef, RegistryError
from model.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
STUDENT = ROOT / "model" / "artifacts" / "landcover-student" / "v1"
V1, V2, V3 = (ModelRef("landcover-student", v) for v in ("1", "2", "3"))


def variant(tmp_path: Path, version: str, edit=None, weights: bytes | None = None) -> Path:
    """A copy of the shipped student with another version and, optionally, a broken part."""
    target = tmp_path / f"src-{version}-{uuid.uuid4().hex[:6]}"
    shutil.copytree(STUDENT, target)
    card = json.loads((target / CARD_FILE).read_text())
    card["version"] = version
    if edit:
        edit(card)
    (target / CARD_FILE).write_text(json.dumps(card))
    if weights is not None:
        (target / "model.pt").write_bytes(weights)
    return target


@pytest.fixture(params=["local", pytest.param("gcs", marks=pytest.mark.stack)])
def registry(request, tmp_path) -> Registry:
    if request.param == "local":
        return Registry(str(tmp_path / "registry"))
    stack = request.getfixturevalue("stack")
    return Registry(f"{stack.registry_prefix}/{uuid.uuid4().hex[:8]}",
                    gcs_client=stack.storage())


@pytest.fixture()
def with_v1_v2(registry, tmp_path) -> Registry:
    registry.publish(str(STUDENT))
    registry.publish(str(variant(tmp_path, "2")))
    return registry


def test_publish_lists_versions_and_never_overwrites_one(registry, tmp_path):
    ref, card = registry.publish(str(STUDENT))
    assert ref == V1 and card.uri == registry.model_uri(V1)
    assert registry.versions() == [V1]
    with pytest.raises(RegistryError, match="already in the registry; versions are immutable"):
        registry.publish(str(variant(tmp_path, "1")))
    registry.publish(str(variant(tmp_path, "2")))
    assert registry.versions() == [V1, V2]
    assert registry.verify(V2).weights_sha256 == card.weights_sha256


def test_promote_canary_shadow_rollback_keep_history(with_v1_v2):
    reg = with_v1_v2
    first = reg.promote(V1, by="ana", why="first model")
    assert "live none -> live landcover-student/1" in str(first) and "ana" in str(first)
    change = reg.canary(V2, 0.5, by="bo", why="try v2")
    assert "candidate landcover-student/2 (canary 50%)" in str(change)
    channels, _ = reg.read_channels()
    assert (channels.live, channels.candidate, channels.mode, channels.canary_fraction) == (
        V1, V2, "canary", 0.5)
    rolled = reg.rollback(by="bo", why="agreement too low")
    assert str(rolled).startswith("rollback: live landcover-student/1, candidate")
    reg.shadow(V2, by="bo")
    reg.promote(V2, by="bo", why="shadow looked fine")
    channels, _ = reg.read_channels()
    assert (channels.live, channels.candidate, channels.mode) == (V2, None, None)
    reg.rollback(by="cy", why="users complain")  # no candidate: back to the previous live
    channels, _ = reg.read_channels()
    assert channels.live == V1
    actions = [(h["action"], h["by"], h["before"]["live"]) for h in channels.history]
    assert actions == [("promote", "ana", None), ("canary", "bo", str(V1)),
                       ("rollback", "bo", str(V1)), ("shadow", "bo", str(V1)),
                       ("promote", "bo", str(V1)), ("rollback", "cy", str(V2))]
    assert all(h["at"].endswith("+00:00") for h in channels.history)
    assert reg.status()["live_uri"] == reg.model_uri(V1)


def test_a_concurrent_writer_loses_with_a_clear_error(with_v1_v2):
    reg = with_v1_v2
    reg.promote(V1, by="ana")
    stale, token = reg.read_channels()  # an operator reads ...
    other = Registry(reg.prefix, gcs_client=getattr(reg, "_client", None))
    other.canary(V2, 0.25, by="bo")  # ... someone else writes first ...
    with pytest.raises(ConflictError, match="changed since it was read"):
        reg.store.write(CHANNELS_FILE, stale.to_bytes(), token)  # ... and the stale write loses
    channels, _ = reg.read_channels()
    assert channels.candidate == V2 and len(channels.history) == 2


def _set_classes(n: int):
    def edit(card):
        card["classes"] = card["classes"][:n]
        card.pop("drift_reference", None)
    return edit


def _set_bands(card):
    for key in ("bands", "mean", "std"):
        card["input"][key] = card["input"][key][:5]
    card.pop("drift_reference", None)


@pytest.mark.parametrize(("edit", "weights", "message"), [
    (lambda c: c.update(name="../x"), None, "name '../x' must be 1-64 characters"),
    (lambda c: c.update(version="1/../../etc"), None, "version '1/../../etc' must be"),
    (lambda c: c["weights"].update(file="../../model.pt"), None, "weights file"),
    (None, b"not torchscript", "sha256 of"),
    (lambda c: c["weights"].update(sha256="ab" * 32), None, "sha256 of"),
    (_set_classes(6), None, "card promises (1, 6, 64, 64)"),
    (_set_bands, None, "does not score a (5, 64, 64) chip"),
    (lambda c: c["drift_reference"]["classes"].update(fractions=[1.5]), None, "drift_reference"),
])
def test_publish_refuses_a_broken_model(registry, tmp_path, edit, weights, message):
    source = variant(tmp_path, "9", edit, weights)
    with pytest.raises(RegistryError, match=message.replace("(", r"\(").replace(")", r"\)")):
        registry.publish(str(source))
    assert registry.versions() == []


@pytest.mark.parametrize(("raw", "message"), [
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"name": ', "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply|not valid JSON"),
])
def test_publish_refuses_unreadable_cards(registry, tmp_path, raw, message):
    source = variant(tmp_path, "9")
    (source / CARD_FILE).write_bytes(raw)
    with pytest.raises(RegistryError, match=message):
        registry.publish(str(source))


def test_publish_refuses_huge_files_without_reading_them(tmp_path):
    source = variant(tmp_path, "9")
    with open(source / CARD_FILE, "r+b") as handle:
        handle.truncate(5 << 20)  # sparse: 5 MiB of card
    with pytest.raises(RegistryError, match="over the limit of 1,048,576"):
        Registry(str(tmp_path / "r")).publish(str(source))


def test_hostile_channels_documents_are_refused(registry, tmp_path):
    registry.publish(str(STUDENT))
    registry.promote(V1)
    for raw, message in [
        (b"\xc3\x28", "not UTF-8"),
        (b"{", "not valid JSON"),
        (json.dumps({"schema": "tilestream.channels/v1", "live": "../../etc/passwd"}).encode(),
         "not 'name/version'"),
        (json.dumps({"schema": "tilestream.channels/v1", "live": str(V1), "candidate": str(V2),
                     "mode": "canary", "canary_fraction": 7}).encode(), "not a number in"),
        (json.dumps({"schema": "tilestream.channels/v1", "live": str(V1), "candidate": str(V2),
                     "mode": "blue-green"}).encode(), "mode 'blue-green'"),
    ]:
        registry.store.write(CHANNELS_FILE, raw, None)
        with pytest.raises(RegistryError, match=message):
            registry.read_channels()
        with pytest.raises(RegistryError, match=message):
            registry.rollback()


def test_refused_changes_leave_channels_as_they_were(with_v1_v2, tmp_path):
    reg = with_v1_v2
    with pytest.raises(RegistryError, match="no live model yet"):
        reg.canary(V2, 0.1)
    reg.promote(V1)
    before = reg.read_channels()
    for fraction in (-0.1, 0.0, 1.5, float("nan"), float("inf")):
        with pytest.raises(RegistryError, match="canary fraction"):
            reg.canary(V2, fraction)
    with pytest.raises(RegistryError, match="not in the registry"):
        reg.promote(V3)
    with pytest.raises(RegistryError, match="is live already"):
        reg.promote(V1)
    with pytest.raises(RegistryError, match="reason must be printable"):
        reg.promote(V2, why="x" * 600)
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        reg.rollback()
    assert reg.read_channels() == before


def test_a_version_broken_after_publish_is_refused_at_promote(with_v1_v2):
    reg = with_v1_v2
    reg.store.write("landcover-student/2/model.pt", b"tampered", None)
    with pytest.raises(RegistryError, match="sha256 of"):
        reg.promote(V2)
    assert reg.read_channels()[0].live is None


def _tilestream(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.ops.cli", "model", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_publish_promote_canary_status_rollback(tmp_path):
    reg = ["--registry", str(tmp_path / "reg")]
    assert _tilestream("publish", str(STUDENT), *reg).returncode == 0
    done = _tilestream("publish", str(variant(tmp_path, "2")), *reg)
    assert done.returncode == 0 and "published landcover-student/2" in done.stdout
    done = _tilestream("promote", "landcover-student/1", *reg, "--by", "ana", "--reason", "go")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("promote: live none -> live landcover-student/1; by ana")
    done = _tilestream("canary", "landcover-student/2", "--fraction", "1.5", *reg)
    assert done.returncode == 2 and "canary fraction 1.5" in done.stderr
    done = _tilestream("canary", "landcover-student/2", "--fraction", "0.5", *reg)
    assert done.returncode == 0 and "(canary 50%)" in done.stdout
    status = json.loads(_tilestream("status", *reg).stdout)
    assert (status["live"], status["candidate"], status["mode"]) == (
        "landcover-student/1", "landcover-student/2", "canary")
    assert _tilestream("list", *reg).stdout.split() == ["landcover-student/1",
                                                        "landcover-student/2"]
    done = _tilestream("rollback", *reg, "--reason", "agreement 0.41 < 0.9")
    assert done.returncode == 0 and "-> live landcover-student/1;" in done.stdout
    done = _tilestream("promote", "../../etc/passwd", *reg)
    assert done.returncode == 2 and "is not 'name/version'" in done.stderr


@pytest.mark.stack
def test_cli_reaches_a_gs_registry_on_the_local_stack(stack):
    reg = ["--registry", f"{stack.registry_prefix}/cli-{uuid.uuid4().hex[:6]}", "--local",
           f"--stack_dir={stack.run_dir}"]
    assert _tilestream("publish", str(STUDENT), *reg).returncode == 0
    done = _tilestream("promote", "landcover-student/1", *reg)
    assert done.returncode == 0, done.stderr
    assert "channels.json" in done.stdout and done.stdout.split("written to ")[1].startswith(
        f"{stack.registry_prefix}/cli-")
    blob = stack.storage().bucket(stack.models_bucket).get_blob(
        reg[1][len(f"gs://{stack.models_bucket}/"):] + "/channels.json")
    assert json.loads(blob.download_as_bytes())["live"] == "landcover-student/1"


def test_canary_routing_is_stable_proportional_and_monotone():
    from model.channels import Channels, assignments, canary_point

    # A pinned value: the same tile goes to the same side on every worker, after every restart.
    assert canary_point(V2, "olinda") == pytest.approx(0.9881882, abs=1e-6)
    ids = [f"tile-{i}" for i in range(10_000)]

    def canary_tiles(fraction: float) -> set[str]:
        c = Channels(live=V1, candidate=V2, mode="canary", canary_fraction=fraction)
        routed = {t: assignments(c, t) for t in ids}
        assert all(len(a) == 1 for a in routed.values())  # one answer per tile
        return {t for t, a in routed.items() if a == ((V2, "canary"),)}

    small, half = canary_tiles(0.1), canary_tiles(0.5)
    assert abs(len(small) / len(ids) - 0.1) < 0.015 and abs(len(half) / len(ids) - 0.5) < 0.02
    assert small <= half  # raising the fraction only adds tiles
    shadow = Channels(live=V1, candidate=V2, mode="shadow")
    assert assignments(shadow, "x") == ((V1, "live"), (V2, "shadow"))
    assert assignments(Channels(live=V1), "x") == ((V1, "live"),)


def test_the_second_student_is_a_valid_candidate_for_the_first(tmp_path):
    """Both shipped students load, validate and can be compared; v2 is really another model."""
    v2_dir = STUDENT.parent / "v2"
    reg = Registry(str(tmp_path / "registry"))
    _, v1 = reg.publish(str(STUDENT))
    _, v2 = reg.publish(str(v2_dir))
    assert v2.model_id == "landcover-student/2" and v2.weights_sha256 != v1.weights_sha256
    assert v2.input == v1.input and v2.architecture == v1.architecture
    shifts = v2.metrics["radiometric_shift_test"]
    assert set(shifts) == {"v1", "v2"} and shifts["v1"]["gain 1, offset +0"]["miou"] == \
        pytest.approx(v1.metrics["miou"], abs=1e-4)  # v1 re-scored on the same test blocks
    assert v2.training_data["recipe"]["offset_jitter"] == 15.0
    assert v2.drift_reference["pixels"] == v1.drift_reference["pixels"]
    reg.promote(V1, by="ana")
    change = reg.canary(V2, 0.5, by="bo", why="v2 transfers better?")
    assert "candidate landcover-student/2 (canary 50%)" in str(change)


def _new_statistics(card):
    card["input"]["mean"] = [m + 10 for m in card["input"]["mean"]]
    card["input"]["std"] = [s * 1.5 for s in card["input"]["std"]]


def test_a_candidate_on_new_statistics_is_taken_and_scores_with_its_own(tmp_path):
    """Normalisation statistics are part of a model, not of the chips (docs/operations.md §7):
    a version retrained on other mean/std reads the very chips the stream cuts, so the CLI
    takes it as a candidate, and the stream normalises its chips with its card, not live's."""
    import dataclasses

    import numpy as np
    import torch

    from model.card import load_card
    from model.contract import load_checked
    from model.inference import model_input, normalise
    from pipeline.ops.check import SAMPLE_TILE
    from tests.test_stages import chip_tile
    from transforms.chips import ChipSettings
    from transforms.model_handlers import VersionedModelHandler
    from transforms.records import TileRef

    reg = ["--registry", str(tmp_path / "reg")]
    assert _tilestream("publish", str(STUDENT), *reg).returncode == 0
    assert _tilestream("publish", str(variant(tmp_path, "3", _new_statistics)), *reg
                       ).returncode == 0
    assert _tilestream("promote", "landcover-student/1", *reg).returncode == 0
    done = _tilestream("canary", "landcover-student/3", "--fraction", "0.5", *reg)
    assert done.returncode == 0 and "(canary 50%)" in done.stdout, done.stderr

    live = load_card(str(STUDENT))
    chips, _ = chip_tile(SAMPLE_TILE, ChipSettings.from_card(live))
    chips = chips[:3]
    tile = TileRef("t", (str(SAMPLE_TILE),), "1", 0.0, 0.0)
    batch = [(dataclasses.replace(c, tile=dataclasses.replace(tile, model=model), raw=None),
              torch.from_numpy(model_input(c.raw, c.valid)))
             for model in ("landcover-student/1", "landcover-student/3") for c in chips]
    handler = VersionedModelHandler(str(tmp_path / "reg"))
    scored = {}
    for chip, result in handler.run_inference(batch, handler.load_model()):
        scored.setdefault(chip.tile.model, []).append(result.inference.astype(int))

    network = load_checked(live)  # both versions share these weights
    candidate = Registry(str(tmp_path / "reg")).verify(V3)

    def expected(spec) -> list[np.ndarray]:
        x = torch.from_numpy(np.stack([normalise(c.raw, c.valid, spec) for c in chips]))
        with torch.inference_mode():
            probs = torch.softmax(network(x).float(), dim=1)
        return list(probs.mul(255.0).round().to(torch.uint8).numpy().astype(int))

    for model, spec in (("landcover-student/1", live.input),
                        ("landcover-student/3", candidate.input)):
        assert all(np.abs(got - want).max() <= 1
                   for got, want in zip(scored[model], expected(spec), strict=True)), model
    assert any(np.abs(a - b).max() > 1 for a, b in zip(*scored.values(), strict=True))
