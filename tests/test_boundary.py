"""The deployment boundary, read from the code: what ships to workers is the runtime, and the
runtime never reaches operator verbs, the local stack or training.

Floors, lowest first: ``model`` (the runtime model contract), ``transforms`` (the stages),
``pipeline`` (the job: graph, options, launcher entry). An import may only go down a floor.
Above them, in rooms of their own that nothing in the runtime imports: ``pipeline/ops``,
``pipeline/local``, ``pipeline/map``, ``model/training``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = ("pipeline.ops", "pipeline.local", "pipeline.map", "model.training", "bench",
           "tests")
FLOOR = {"model": 1, "transforms": 2, "pipeline": 3}


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def runtime_files() -> list[Path]:
    files = []
    for top in FLOOR:
        for path in sorted((ROOT / top).rglob("*.py")):
            if not module_of(path).startswith(OUTSIDE):
                files.append(path)
    return files


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_the_runtime_never_imports_ops_local_or_training():
    crossings = [(module_of(path), name) for path in runtime_files()
                 for name in imports_of(path) if name.startswith(OUTSIDE)]
    assert len(runtime_files()) > 30
    assert crossings == []


def test_no_import_runs_up_a_floor():
    upward = []
    for path in runtime_files():
        mine = FLOOR[module_of(path).split(".")[0]]
        for name in imports_of(path):
            top = name.split(".")[0]
            if top in FLOOR and FLOOR[top] > mine:
                upward.append((module_of(path), name))
    assert upward == []


def test_training_reaches_only_the_model_contract():
    reached = sorted({name for path in (ROOT / "model" / "training").rglob("*.py")
                      for name in imports_of(path)
                      if name.split(".")[0] in FLOOR and not name.startswith("model")})
    assert reached == []


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> list[str]:
    """What Dataflow stages for ``--setup_file``: Beam runs ``setup.py sdist`` and every worker
    installs the result. Built from a clean copy of the tracked tree, as CI has it."""
    import shutil
    import tarfile

    tree = tmp_path_factory.mktemp("tree")
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.split()
    for name in listed + [str(p.relative_to(ROOT)) for p in runtime_files()]:
        if (ROOT / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, tree / name)
    out = tmp_path_factory.mktemp("sdist")
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(out)],
                   cwd=tree, check=True, capture_output=True, timeout=300)
    [built] = out.glob("tilestream-*.tar.gz")
    with tarfile.open(built) as archive:
        return [name.split("/", 1)[1] for name in archive.getnames() if "/" in name]


def test_setup_py_ships_exactly_the_runtime_to_workers(staged):
    shipped = {name for name in staged if name.endswith(".py") and name != "setup.py"}
    expected = {str(path.relative_to(ROOT)) for path in runtime_files()}
    assert shipped == expected
    assert not [n for n in staged if n.startswith(("pipeline/ops/", "pipeline/local/",
                                                  "pipeline/map/", "model/training/", "tests/",
                                                  "bench/"))]
    cards = {n for n in staged if n.endswith("model_card.json")}
    assert {str(p.relative_to(ROOT)) for p in (ROOT / "model" / "artifacts").rglob(
        "model_card.json")} == cards
    # The one definition of "answered" ships: the results publisher composes its check from it.
    assert "transforms/sql/answered.sql" in staged


def test_model_verbs_work_without_the_train_extra(tmp_path):
    """An operator's install without matplotlib and tqdm (the ``train`` extra) publishes,
    promotes, lists, shows and rolls back models, and never loads training code."""
    student = ROOT / "model" / "artifacts" / "landcover-student"
    registry = tmp_path / "registry"
    code = (
        "import json, sys\n"
        "for extra in ('tqdm', 'matplotlib'):\n"
        "    sys.modules[extra] = None  # absent: importing it raises ImportError\n"
        "from pipeline.ops.cli import main\n"
        "codes = [main(argv) for argv in json.loads(sys.argv[1])]\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('model.training'))\n"
        "print(json.dumps({'codes': codes, 'training_modules': loaded}))\n")
    reg = ["--registry", str(registry)]
    verbs = [["model", "publish", *reg, str(student / "v1")],
             ["model", "publish", *reg, str(student / "v2")],
             ["model", "promote", *reg, "landcover-student/1", "--by", "ci"],
             ["model", "promote", *reg, "landcover-student/2", "--by", "ci"],
             ["model", "list", *reg], ["model", "status", *reg],
             ["model", "rollback", *reg, "--by", "ci"]]
    done = subprocess.run([sys.executable, "-c", code, json.dumps(verbs)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0] * len(verbs)
    # the parser reads the training defaults (a dataclass, no imports); nothing else of it
    assert set(result["training_modules"]) <= {"model.training", "model.training.config"}
    channels = json.loads((registry / "channels.json").read_text())
    assert channels["live"] == "landcover-student/1"  # rolled back from 2


def test_model_help_lists_every_verb():
    done = subprocess.run([sys.executable, "-m", "pipeline.ops.cli", "model", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for verb in ("train-teacher", "distill", "evaluate", "export", "build", "robust-student",
                 "publish", "list", "status", "promote", "canary", "shadow", "rollback",
                 "watch", "drift"):
        assert verb in done.stdout, verb
