"""The model package: losses, the card contract, the committed student in Beam, training."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from model.card import CARD_FILE, CardError, InputSpec, card_from_dict, load_card, write_card
from model.inference import normalise, predict_logits, valid_mask
from model.training.architectures import UNetSpec, build, count_flops, count_parameters
from model.training.config import DistillConfig, TrainConfig
from model.training.losses import distillation_loss, kd_loss, masked_cross_entropy
from model.training.metrics import confusion, scores
from model.training.train import (
    ChipSampler,
    distil_student,
    seed_everything,
    train_teacher,
)

ROOT = Path(__file__).resolve().parents[1]
STUDENT = ROOT / "model" / "artifacts" / "landcover-student" / "v1"
TEACHER = ROOT / "model" / "artifacts" / "landcover-teacher" / "v1"
OLINDA = ROOT / "pipeline" / "ops" / "sample" / "L7_ETMs.tif"


@pytest.fixture(autouse=True)
def _restore_torch_flags():
    """Training switches torch to deterministic kernels; leave other tests as they found it."""
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(threads)


def _logits(seed: int, shape=(2, 7, 8, 8)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --- losses -------------------------------------------------------------------------------------


def test_kd_loss_is_zero_for_identical_logits_and_grows_with_disagreement():
    teacher = _logits(0)
    mask = torch.ones(2, 8, 8, dtype=torch.bool)
    assert kd_loss(teacher.clone(), teacher, mask).item() == pytest.approx(0, abs=1e-6)
    # a per-pixel constant shift leaves the softmax, hence the KL, unchanged
    assert kd_loss(teacher + 3.0, teacher, mask).item() == pytest.approx(0, abs=1e-5)
    noise = _logits(1)
    losses = [kd_loss(teacher + s * noise, teacher, mask).item() for s in (0.1, 0.5, 1.0, 3.0)]
    assert 0 < losses[0] < losses[1] < losses[2] < losses[3]


def test_kd_loss_temperature_scaling_and_gradient_only_reaches_the_student():
    teacher = _logits(0).requires_grad_()
    student = _logits(1).requires_grad_()
    mask = torch.ones(2, 8, 8, dtype=torch.bool)
    kd_loss(student, teacher, mask, temperature=4.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_masked_pixels_do_not_contribute():
    student, teacher = _logits(0), _logits(1)
    labels = torch.randint(0, 7, (2, 8, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[:, 2:6, 1:7] = True
    weights = torch.linspace(0.5, 2.0, 7)

    def all_losses(s, t, y):
        return [
            masked_cross_entropy(s, y, mask).item(),
            masked_cross_entropy(s, y, mask, weights).item(),
            kd_loss(s, t, mask, 2.0).item(),
            distillation_loss(s, t, y, mask, 0.7, 0.3, 3.0, weights).item(),
        ]

    before = all_losses(student, teacher, labels)
    # scramble everything outside the mask, including labels that are not valid classes
    s2, t2, y2 = student.clone(), teacher.clone(), labels.clone()
    s2[:, :, ~mask[0]] = 50.0
    t2[:, :, ~mask[0]] = -50.0
    y2[~mask] = 255
    assert all_losses(s2, t2, y2) == pytest.approx(before, rel=1e-6)
    nothing = torch.zeros_like(mask)
    assert masked_cross_entropy(student, labels, nothing).item() == 0
    assert kd_loss(student, teacher, nothing).item() == 0


def test_distillation_loss_weights_combine_ce_and_kd():
    student, teacher = _logits(0), _logits(1)
    labels = torch.randint(0, 7, (2, 8, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 8, 8, dtype=torch.bool)
    ce = masked_cross_entropy(student, labels, mask)
    kd = kd_loss(student, teacher, mask, 2.0)
    combined = distillation_loss(student, teacher, labels, mask, 0.25, 2.0, 2.0)
    assert combined.item() == pytest.approx((0.25 * ce + 2.0 * kd).item(), rel=1e-6)


def test_scores_count_only_masked_pixels_and_skip_absent_classes():
    labels = np.array([[0, 0, 1, 1], [2, 2, 2, 9]])
    pred = np.array([[0, 1, 1, 1], [2, 2, 0, 0]])
    mask = labels < 3
    result = scores(confusion(pred, labels, mask, 4), ["a", "b", "c", "d"])
    assert result["per_class_iou"] == {"a": pytest.approx(1 / 3, abs=1e-4),
                                       "b": pytest.approx(2 / 3, abs=1e-4),
                                       "c": pytest.approx(2 / 3, abs=1e-4), "d": None}
    assert result["pixel_accuracy"] == pytest.approx(5 / 7, abs=1e-4)


# --- the model card -----------------------------------------------------------------------------


def _card_dict() -> dict:
    return json.loads((STUDENT / CARD_FILE).read_text())


def test_committed_student_card_round_trips(tmp_path):
    card = load_card(str(STUDENT))
    assert card.model_id == "landcover-student/1"
    assert card.input.bands == ("blue", "green", "red", "nir", "swir1", "swir2")
    assert (card.input.chip_size, card.input.stride) == (64, 48)
    assert card.num_classes == 7 and card.classes[5].name == "water"
    assert card.teacher["name"] == "landcover-teacher"
    assert card.parameters * 10 <= card.teacher["parameters"]
    assert set(card.metrics["per_class_iou"]) == {c.name for c in card.classes}
    again = card_from_dict(json.loads(card.to_json()), uri=card.uri)
    assert again == card
    shutil.copy(STUDENT / "model.pt", tmp_path / "model.pt")
    write_card(card, str(tmp_path))
    assert load_card(str(tmp_path)) == replace(card, uri=str(tmp_path))


def test_teacher_card_points_at_the_teacher_weights():
    teacher = load_card(str(TEACHER))
    student = load_card(str(STUDENT), verify_weights=False)
    assert student.teacher["weights_sha256"] == teacher.weights_sha256
    assert student.input == teacher.input


@pytest.mark.parametrize(
    ("path", "field"),
    [(("weights",), "weights"), (("input", "bands"), "bands"), (("name",), "name"),
     (("classes", 0, "colour"), "colour"), (("weights", "sha256"), "sha256"),
     (("input", "chip_size"), "chip_size")],
)
def test_card_missing_field_is_a_clear_error(path, field):
    data = _card_dict()
    node = data
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    with pytest.raises(CardError, match=f"missing field '{field}'"):
        card_from_dict(data)


def test_card_rejects_inconsistent_values():
    data = _card_dict()
    data["input"]["mean"] = data["input"]["mean"][:-1]
    with pytest.raises(CardError, match="one value per band"):
        card_from_dict(data)
    data = _card_dict()
    data["weights"]["format"] = "onnx"
    with pytest.raises(CardError, match="torchscript"):
        card_from_dict(data)


def test_band_order_the_raster_cannot_satisfy():
    card = card_from_dict(_card_dict())
    shuffled = ["swir2", "nir", "red", "green", "blue", "swir1", "thermal"]
    assert card.band_indices(shuffled) == [4, 3, 2, 1, 5, 0]
    assert card.band_indices([None] * 6) == list(range(6))
    with pytest.raises(CardError, match="lack"):
        card.band_indices(["blue", "green", "red", "nir"])
    with pytest.raises(CardError, match="raster has 3 bands"):
        card.band_indices([None, None, None])


def test_sha256_mismatch_is_rejected(tmp_path):
    target = tmp_path / "student"
    shutil.copytree(STUDENT, target)
    with (target / "model.pt").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(CardError, match="sha256"):
        load_card(str(target))
    assert load_card(str(target), verify_weights=False).name == "landcover-student"
    (target / "model.pt").unlink()
    with pytest.raises(CardError, match="does not exist"):
        load_card(str(target))


def test_the_launch_check_scores_off_the_main_thread_and_still_refuses_a_bad_model(
        tmp_path, monkeypatch):
    """A forward pass on the main thread slows the local stream's Beam threads for good, so
    the check a launch runs goes to a thread of its own; its refusal still reaches the caller."""
    import threading

    from model import contract

    ran_on = []
    real = contract.check_model
    monkeypatch.setattr(contract, "check_model", lambda *args, **kwargs: (
        ran_on.append(threading.current_thread()), real(*args, **kwargs))[1])
    card = load_card(str(STUDENT))
    model = contract.load_checked(card)
    assert ran_on and ran_on[0] is not threading.main_thread()
    assert model(torch.zeros(1, len(card.input.bands), 64, 64)).shape[1] == card.num_classes
    target = tmp_path / "student"
    shutil.copytree(STUDENT, target)
    (target / "model.pt").write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(CardError, match="does not load as TorchScript"):
        contract.load_checked(load_card(str(target), verify_weights=False))


# --- the committed student in Beam --------------------------------------------------------------


def _olinda_chips(card, count: int = 3) -> list[torch.Tensor]:
    import rasterio

    with rasterio.open(OLINDA) as src:
        raw = src.read([i + 1 for i in card.band_indices(list(src.descriptions))])
    raw = raw.astype(np.float32)
    image = normalise(raw, valid_mask(raw, card.input.nodata), card.input)
    size = card.input.chip_size
    return [torch.from_numpy(image[:, 100 * i : 100 * i + size, 90 * i : 90 * i + size].copy())
            for i in range(count)]


def test_student_artifact_runs_in_beam_runinference_like_the_eager_model():
    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from apache_beam.ml.inference.pytorch_inference import PytorchModelHandlerTensor
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import BeamAssertException, assert_that

    card = load_card(str(STUDENT))
    scripted = torch.jit.load(card.weights_uri, map_location="cpu")
    eager = build(UNetSpec.from_dict(card.architecture))
    eager.load_state_dict(scripted.state_dict())
    eager.eval()
    assert count_parameters(eager) == card.parameters
    assert count_flops(eager, len(card.input.bands), card.input.chip_size) == card.flops_per_chip

    chips = _olinda_chips(card)
    with torch.no_grad():
        expected = {i: eager(c[None])[0].numpy() for i, c in enumerate(chips)}

    def check(results):
        got = dict(results)
        if sorted(got) != sorted(expected):
            raise BeamAssertException(f"keys {sorted(got)}")
        for key, prediction in got.items():
            out = prediction.inference
            if out.shape != (card.num_classes, card.input.chip_size, card.input.chip_size):
                raise BeamAssertException(f"shape {out.shape}")
            if not np.allclose(out, expected[key], atol=1e-4):
                raise BeamAssertException(f"chip {key} differs from the eager model")

    handler = KeyedModelHandler(
        PytorchModelHandlerTensor(torch_script_model_path=card.weights_uri, device="CPU"))
    with TestPipeline(argv=["--runner=BundleBasedDirectRunner"]) as pipeline:
        results = (
            pipeline
            | beam.Create(list(enumerate(chips)))
            | RunInference(handler)
        )
        assert_that(results, check)


def test_student_scores_odd_sized_chips_and_whole_rasters():
    card = load_card(str(STUDENT), verify_weights=False)
    scripted = torch.jit.load(card.weights_uri, map_location="cpu")
    out = scripted(torch.zeros(1, 6, 37, 50))
    assert out.shape == (1, 7, 37, 50)
    image = np.zeros((6, 70, 90), np.float32)
    assert predict_logits(scripted, image, 64, 48).shape == (7, 70, 90)


# --- training on a tiny synthetic scene ---------------------------------------------------------


def _synthetic_scene(size: int = 64):
    """Three classes in smooth blobs with distinct Landsat-like spectra, plus a nodata corner."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    field = np.sin(6 * xx) + np.cos(5 * yy + 2 * xx)
    labels = np.digitize(field, [-0.5, 0.6]).astype(np.uint8)  # 0, 1, 2
    spectra = np.array([[90, 77, 80, 67, 93, 68], [75, 60, 58, 95, 84, 52],
                        [71, 54, 50, 30, 40, 25]], np.float32)
    image = spectra[labels].transpose(2, 0, 1) + rng.normal(0, 4, (6, size, size))
    valid = (yy - xx) < 0.6  # bottom-left triangle without data
    image = np.where(valid, image, 0).astype(np.float32)
    labels = np.where(valid, labels, 255).astype(np.uint8)
    held_out = np.zeros_like(valid)
    held_out[:, 48:] = True
    return image, labels, valid, held_out


def test_two_training_steps_lower_the_loss_for_teacher_and_student():
    image, labels, valid, held_out = _synthetic_scene()
    train_mask = valid & ~held_out
    mean = image[:, train_mask].mean(axis=1)
    std = image[:, train_mask].std(axis=1)
    spec = InputSpec(bands=("b", "g", "r", "n", "s1", "s2"), chip_size=32, stride=24,
                     mean=tuple(mean.tolist()), std=tuple(std.tolist()))
    config = TrainConfig(steps=2, batch_size=4, lr=0.05, eval_every=100, seed=3, threads=1,
                         class_weighting="none")
    net = UNetSpec(in_channels=6, num_classes=3, widths=(4, 8))
    sampler = ChipSampler(image, labels, train_mask, held_out, spec, 3, config)
    assert (sampler.origins[:, 1] + 32 <= 48).all()  # no chip reaches the held-out columns
    x, y, m = sampler.batch()
    assert m.any() and not m.all()  # the nodata corner is masked
    sampler.batch = lambda: (x, y, m)  # both steps see the same chips, so the loss must drop

    seed_everything(config.seed, config.threads)
    teacher, history = train_teacher(net, sampler, config, weights=None)
    assert len(history.loss) == 2 and history.loss[1] < history.loss[0]

    student_cfg = DistillConfig(**{**vars(config), "seed": 4}, temperature=2.0)
    student, history = distil_student(replace(net, widths=(4, 4)), teacher, sampler, student_cfg,
                                      weights=None)
    assert len(history.loss) == 2 and history.loss[1] < history.loss[0]
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        assert student(x).shape == (4, 3, 32, 32)


def test_cli_passes_loss_options_to_the_distillation_config():
    from model.training.commands import configs
    from pipeline.ops.cli import parser

    args = parser().parse_args(["model", "distill", "--ce_weight", "0.5", "--kd_weight", "2",
                                "--temperature", "4", "--student_steps", "7", "--seed", "5"])
    teacher, student = configs(args)
    assert (student.ce_weight, student.kd_weight, student.temperature) == (0.5, 2.0, 4.0)
    assert (student.steps, student.seed, teacher.seed) == (7, 5, 5)
    assert teacher.steps == TrainConfig.steps and student.lr == DistillConfig.lr
    with pytest.raises(SystemExit):
        parser().parse_args(["model", "fly"])
