"""`templates/deploy.sh preflight`: offline, one line per check, non-zero on any failure."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def preflight(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "templates/deploy.sh", "preflight", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/local/bin:/usr/bin:/bin"})


def test_preflight_passes_offline():
    done = preflight()
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [
        ["ok", "torch"], ["ok", "graph"], ["ok", "metadata"], ["ok", "iam"], ["ok", "terraform"]]


def test_preflight_fails_on_a_model_the_image_cannot_load(tmp_path):
    model = tmp_path / "future"
    shutil.copytree(ROOT / "model" / "artifacts" / "landcover-student" / "v1", model)
    card = json.loads((model / "model_card.json").read_text())
    card["exported_with"] = {"torch": "2.99.0"}
    (model / "model_card.json").write_text(json.dumps(card))
    done = preflight(f"--model_dir={model}")
    assert done.returncode == 1
    [torch_line] = [line for line in done.stdout.splitlines() if " torch " in line]
    assert torch_line.startswith("FAIL") and "exported with torch 2.99.0" in torch_line
    assert sum(line.startswith("ok") for line in done.stdout.splitlines()) == 4
