"""``templates/deploy.sh preflight``: will a launch work? Answered offline, before it is made.

One line per check, exit 1 if any fails:

- **torch**: every place that pins torch names one version; the images' torch (its CPU build in
  ``.venv-image``) loads every model the deployment would serve and scores a chip with it; no
  card names a newer exporting torch.
- **graph**: the job translates for Dataflow (DataflowRunner ``--dry_run``, the template's
  example parameters) and the launcher imports nothing but the runtime.
- **metadata**: ``templates/metadata.json`` lists exactly the pipeline options a template takes,
  and each example value passes its parameter's regex.
- **iam**: every need recorded on the local stack (``templates/iam/needs.json``) is allowed by
  the grants ``templates/terraform`` declares (``pipeline/ops/iam.py``).
- **terraform**: formatted (``terraform fmt -check``, where the CLI is installed) and every
  reference resolves.

What only a real project can verify is in docs/deploy.md, "First launch".
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "templates"
IMAGE_VENV = ROOT / ".venv-image"
ARTIFACTS = ROOT / "model" / "artifacts"


class CheckFailed(Exception):
    """A check's verdict; the message is its line."""


def torch_pins() -> dict[str, str]:
    """Every place that names the torch version, and the version it names."""
    found = {
        "setup.py": re.search(r'TORCH_VERSION = "([\d.]+)"', (ROOT / "setup.py").read_text()),
    }
    for dockerfile in sorted(TEMPLATES.glob("Dockerfile*")):
        found[dockerfile.name] = re.search(r"ARG TORCH_VERSION=([\d.]+)", dockerfile.read_text())
    missing = [k for k, v in found.items() if v is None]
    if missing:
        raise CheckFailed(f"no torch version found in {', '.join(missing)}")
    return {k: v.group(1) for k, v in found.items()}


IMAGE_SCRIPT = """
import json, sys, torch
out = {"torch": torch.__version__, "models": {}}
for name, weights, shape in json.loads(sys.argv[1]):
    model = torch.jit.load(weights, map_location="cpu").eval()
    with torch.inference_mode():
        out["models"][name] = list(model(torch.zeros(shape)).shape)
print(json.dumps(out))
"""


def check_torch(model_dirs: list[Path]) -> str:
    from model.card import load_card
    from model.contract import check_runtime, release

    pins = torch_pins()
    if len(set(pins.values())) != 1:
        raise CheckFailed(f"torch versions differ: {pins}")
    image = pins["Dockerfile"]
    python = IMAGE_VENV / "bin" / "python"
    if not python.exists():
        raise CheckFailed(f"no {IMAGE_VENV.name} (`make install` builds it with torch {image})")
    jobs = []
    for directory in model_dirs:
        card = load_card(str(directory))
        check_runtime(card, image)
        shape = [1, len(card.input.bands), card.input.chip_size, card.input.chip_size]
        jobs.append((card.model_id, card.weights_uri, shape))
    done = subprocess.run([str(python), "-c", IMAGE_SCRIPT, json.dumps(jobs)],
                          capture_output=True, text=True, timeout=300)
    if done.returncode:
        raise CheckFailed(f"a model does not load under torch {image}: "
                          f"{done.stderr.strip().splitlines()[-1:]}")
    result = json.loads(done.stdout)
    if release(result["torch"]) != release(image):
        raise CheckFailed(f"{IMAGE_VENV.name} has torch {result['torch']}, the images pin "
                          f"{image}: `make install`")
    return (f"{len(jobs)} models load and score under torch {image}, the images' "
            f"({', '.join(sorted(result['models']))})")


def example_parameters() -> dict[str, str]:
    return json.loads((TEMPLATES / "example-parameters.json").read_text())


def check_graph(model_uri: str) -> str:
    from pipeline.ops.dry_run import TranslationError, translate

    try:
        graph = translate([*(f"--{k}={v}" for k, v in example_parameters().items()),
                           f"--model_uri={model_uri}"])
    except TranslationError as exc:
        raise CheckFailed(str(exc)) from exc
    if graph["non_runtime_modules"]:
        raise CheckFailed(f"the launcher imports {graph['non_runtime_modules']}")
    return (f"translates for Dataflow (--dry_run): {len(graph['transforms'])} transforms, "
            f"{len(graph['steps'])} stateful steps, the launcher imports the runtime only")


def check_metadata() -> str:
    import argparse as ap

    from pipeline.options import LOCAL_ONLY, TileStreamOptions

    metadata = json.loads((TEMPLATES / "metadata.json").read_text())
    params = {p["name"]: p for p in metadata["parameters"]}
    parser = ap.ArgumentParser()
    TileStreamOptions._add_argparse_args(parser)
    options = {a.dest for a in parser._actions if a.dest != "help"} - set(LOCAL_ONLY)
    if set(params) != options:
        raise CheckFailed(f"metadata.json and the options differ: only in metadata "
                          f"{sorted(set(params) - options)}, only in options "
                          f"{sorted(options - set(params))}")
    for name, value in example_parameters().items():
        if not any(re.fullmatch(r, value) for r in params[name].get("regexes", [".*"])):
            raise CheckFailed(f"example value {name}={value!r} fails its regex")
    return f"metadata.json matches the {len(params)} template options"


def check_iam() -> str:
    from pipeline.ops import iam

    needs = iam.load_needs() + iam.platform_needs()
    grants = iam.terraform_grants()
    report = iam.evaluate(needs, grants)
    if report.denied:
        raise CheckFailed(f"{len(report.denied)} needs no grant allows: " + "; ".join(
            f"{n.identity} {n.permission} on {n.resource}" for n in report.denied[:5]))
    return (f"{len(report.needs)} recorded needs of {len({n.identity for n in report.needs})} "
            f"identities all granted by {len(grants)} bindings ({len(report.unused)} unused)")


def check_terraform() -> str:
    from pipeline.ops import iam

    problems = iam.Terraform(variables={"project": iam.LOCAL_PROJECT}).unresolved()
    if problems:
        raise CheckFailed("unresolved references: " + "; ".join(problems[:5]))
    terraform = shutil.which("terraform")
    if terraform is None:
        return "references resolve (no terraform CLI here: formatting not checked)"
    done = subprocess.run([terraform, "fmt", "-check", "-recursive", "-list=true",
                           str(TEMPLATES / "terraform")], capture_output=True, text=True,
                          timeout=60)
    if done.returncode:
        raise CheckFailed(f"not formatted (terraform fmt): {done.stdout.split()}")
    return "formatted (terraform fmt -check) and every reference resolves"


def run(model_dirs: list[Path], out=sys.stdout) -> int:
    from pipeline.options import DEFAULT_MODEL_URI

    checks: list[tuple[str, Callable[[], str]]] = [
        ("torch", lambda: check_torch(model_dirs)),
        ("graph", lambda: check_graph(DEFAULT_MODEL_URI)),
        ("metadata", check_metadata), ("iam", check_iam), ("terraform", check_terraform)]
    failed = 0
    for name, check in checks:
        started = time.monotonic()
        try:
            verdict, line = "ok", check()
        except Exception as exc:  # every check reports, whatever the others do
            verdict, line = "FAIL", str(exc) if isinstance(exc, CheckFailed) else \
                f"{type(exc).__name__}: {exc}"
            failed += 1
        print(f"{verdict:<4}  {name:<9} {line} ({time.monotonic() - started:.1f}s)", file=out,
              flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy.sh preflight", description=__doc__)
    parser.add_argument("--model_dir", action="append", default=[], type=Path,
                        help="a model the deployment serves besides the shipped ones")
    args = parser.parse_args(argv)
    shipped = sorted(p.parent for p in ARTIFACTS.rglob("model_card.json"))
    return run([*shipped, *args.model_dir])


if __name__ == "__main__":
    sys.exit(main())
