"""One torch for CI, model export and the worker images, and the shipped models proven to load
and score under exactly the images' torch (its CPU build, in the Makefile's ``.venv-image``).

TorchScript from a newer torch does not load in an older one: an image one version behind CI
fails every worker at its first model load. The model card records the exporting torch, and a
runtime older than that is refused by name at start-up and at publish.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.card import CardError, load_card
from model.contract import check_runtime, release
from pipeline.ops.preflight import torch_pins

ROOT = Path(__file__).resolve().parents[1]
IMAGE_VENV = ROOT / ".venv-image"
MODELS = sorted(p.parent for p in (ROOT / "model" / "artifacts").rglob("model_card.json"))


def _torch_requirements(command: str) -> list[str]:
    """The torch requirements a ``pip install`` command line names (none for other commands)."""
    words = shlex.split(command)
    if "install" not in words or not any(w == "pip" or w.endswith("/pip") for w in words):
        return []
    return [w for w in words if re.fullmatch(r"torch(\[[\w,]+\])?([=<>!~].*)?", w)]


def image_installs() -> dict[str, list[str]]:
    """Each image's torch as its ``RUN`` lines install it, ``ARG`` defaults filled in: what a
    build gets, not a variable the install line might not even use."""
    found = {}
    for dockerfile in sorted((ROOT / "templates").glob("Dockerfile*")):
        text = dockerfile.read_text().replace("\\\n", " ")
        args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
        text = re.sub(r"\$\{?(\w+)\}?", lambda m, a=args: a.get(m.group(1), m.group(0)), text)
        found[dockerfile.name] = [
            requirement for run in re.findall(r"^RUN (.*)$", text, re.M)
            for command in re.split(r"&&|;", run) for requirement in _torch_requirements(command)]
    return found


def make_installs() -> dict[str, list[str]]:
    """The torch each venv of ``make install`` gets, from make's own expansion of its recipes
    (``make -n``): CI's ``.venv`` and the images' ``.venv-image``."""
    done = subprocess.run(["make", "-n", "-B", "install"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True)
    found: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():
        requirements = _torch_requirements(line)
        if requirements:
            venv = line.split("/bin/", 1)[0]
            found.setdefault(venv, []).extend(requirements)
    return found


def image_torch() -> str:
    [requirement] = image_installs()["Dockerfile"]
    return requirement.removeprefix("torch==")


def test_ci_and_every_image_install_one_exact_torch():
    """The exact install lines, compared: the images' ``pip install torch==…`` and the one CI's
    venv and ``.venv-image`` run, each one exact pin of the same version as setup.py's."""
    installs = {**image_installs(), **make_installs()}
    assert set(installs) >= {"Dockerfile", "Dockerfile.cpu", ".venv", ".venv-image"}, installs
    pinned = {where: requirements for where, requirements in installs.items()
              if len(requirements) == 1 and re.fullmatch(r"torch==[\d.]+", requirements[0])}
    assert pinned == installs, f"each must install one exact torch: {installs}"
    versions = {where: requirement.removeprefix("torch==")
                for where, [requirement] in installs.items()}
    versions["setup.py"] = torch_pins()["setup.py"]
    assert len(set(versions.values())) == 1, versions
    assert release(torch.__version__) == release(image_torch())  # this venv: CI's torch


def test_every_shipped_card_names_a_torch_the_image_can_load():
    for model in MODELS:
        card = load_card(str(model))
        assert card.exported_with_torch, f"{model} does not record its exporting torch"
        check_runtime(card, image_torch())  # raises for a model the image cannot load


def _sample_chip(card) -> np.ndarray:
    """A real chip of the sample tile, normalised as the stream feeds it to the model."""
    from model.inference import model_input, normalise_batch
    from pipeline.ops.check import first_chip

    chip = first_chip(card)
    batch = torch.from_numpy(model_input(chip.raw, chip.valid))[None]
    return normalise_batch(batch, card.input).numpy()


def test_every_shipped_model_loads_and_scores_under_the_images_torch(tmp_path):
    python = IMAGE_VENV / "bin" / "python"
    assert python.exists(), "no .venv-image: `make install` builds it from templates/Dockerfile"
    script = (
        "import json, sys, numpy as np, torch\n"
        "out = {'torch': torch.__version__, 'models': {}}\n"
        "for name, weights, chip in json.loads(sys.argv[1]):\n"
        "    model = torch.jit.load(weights, map_location='cpu').eval()\n"
        "    with torch.inference_mode():\n"
        "        logits = model(torch.from_numpy(np.load(chip)))\n"
        "    np.save(chip + '.classes.npy', logits.argmax(1).numpy().astype('uint8'))\n"
        "    out['models'][name] = list(logits.shape)\n"
        "print(json.dumps(out))\n")
    jobs, expected = [], {}
    for model in MODELS:
        card = load_card(str(model))
        chip = _sample_chip(card)
        path = tmp_path / f"{card.name}-{card.version}.npy"
        np.save(path, chip)
        jobs.append((card.model_id, card.weights_uri, str(path)))
        here = torch.jit.load(card.weights_uri, map_location="cpu").eval()
        with torch.inference_mode():
            expected[card.model_id] = here(torch.from_numpy(chip)).argmax(1).numpy()
    done = subprocess.run([str(python), "-c", script, json.dumps(jobs)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert release(result["torch"]) == release(image_torch()), (
        f".venv-image has torch {result['torch']}, the images pin {image_torch()}: `make install`")
    assert set(result["models"]) == {j[0] for j in jobs} and len(jobs) == 3
    for model_id, _, path in jobs:  # the image scores the real chip as CI does
        np.testing.assert_array_equal(np.load(path + ".classes.npy"), expected[model_id])


@pytest.fixture()
def from_the_future(tmp_path) -> Path:
    """The shipped student, its card saying a newer torch exported it."""
    import shutil

    target = tmp_path / "future"
    shutil.copytree(ROOT / "model" / "artifacts" / "landcover-student" / "v1", target)
    card = json.loads((target / "model_card.json").read_text())
    card["exported_with"] = {"torch": "2.99.0"}
    (target / "model_card.json").write_text(json.dumps(card))
    return target


def test_a_model_from_a_newer_torch_is_refused_by_name_not_by_a_stack_trace(from_the_future,
                                                                          tmp_path):
    from model.contract import load_checked

    with pytest.raises(CardError, match=r"exported with torch 2\.99\.0; this runtime has torch "
                                        r"2\.13"):
        load_checked(load_card(str(from_the_future)))
    for verb in (["model", "publish", "--registry", str(tmp_path / "reg"),
                  str(from_the_future)],
                 ["run", f"--model_uri={from_the_future}", f"--input_glob={tmp_path}/*.tif",
                  "--bq_dataset=p:d", f"--output_prefix={tmp_path}/out",
                  "--chip_rows_load_secs=0"]):
        done = subprocess.run([sys.executable, "-m", "pipeline.ops.cli", *verb],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "exported with torch 2.99.0" in done.stderr and "torch 2.13" in done.stderr
        assert "Traceback" not in done.stderr
