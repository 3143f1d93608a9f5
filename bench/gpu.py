"""GPU inference benchmark: batch sizes x precision x memory format x torch.compile.

    python bench/gpu.py [--model_uri DIR] [--out bench/gpu_results.json] [--seconds 3]

Runs the stream's own inference function (``segmentation_inference_fn``: stack, forward,
softmax, uint8 quantisation on the device) on the shipped student, for each combination of
batch size (32..1024), precision (fp32, bf16 and fp16 autocast), memory format (contiguous,
channels-last) and compilation (TorchScript as shipped, ``torch.compile`` of the eager network
rebuilt from the card when the card says how). Chips/s are measured after warm-up with CUDA
synchronisation; each configuration also checks that its class maps agree with fp32's on the
same chips (argmax agreement), so a faster setting that changes answers is visible.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.card import load_card  # noqa: E402
from model.contract import load_checked  # noqa: E402
from pipeline.options import DEFAULT_MODEL_URI  # noqa: E402

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def eager_model(card, scripted, device):
    """The network rebuilt from the card's architecture with the shipped weights (for
    torch.compile, which needs eager modules), or None when the card does not say how."""
    try:
        from model.training.architectures import UNetSpec, build

        model = build(UNetSpec.from_dict(card.architecture))
        model.load_state_dict(scripted.state_dict())
        return model.to(device).eval()
    except Exception as exc:  # not every card says how to rebuild its network
        print(f"no eager network for torch.compile: {exc}", file=sys.stderr)
        return None


def measure(model, chips: torch.Tensor, batch: int, precision, channels_last: bool,
            seconds: float) -> tuple[float, torch.Tensor]:
    x = chips[:batch].contiguous()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)

    def step():
        with torch.inference_mode(), torch.autocast("cuda", dtype=precision,
                                                    enabled=precision is not None):
            logits = model(x)
            return (torch.softmax(logits.float(), dim=1) * 255.0).round_().to(torch.uint8)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        out = step()
        runs += 1
    torch.cuda.synchronize()
    return runs * batch / (time.perf_counter() - started), out.argmax(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_uri", default=DEFAULT_MODEL_URI)
    parser.add_argument("--out", default=str(ROOT / "bench" / "gpu_results.json"))
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--batches", default="32,128,512,1024")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py: CUDA is not available here; nothing measured", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    card = load_card(args.model_uri)
    batches = [int(b) for b in args.batches.split(",")]
    chips = torch.randn(max(batches), len(card.input.bands), card.input.chip_size,
                        card.input.chip_size, device=device)
    variants = {"torchscript": load_checked(card, device)}
    eager = eager_model(card, variants["torchscript"], device)
    if eager is not None:
        try:
            variants["torch.compile"] = torch.compile(eager, mode="max-autotune")
        except Exception as exc:  # report, keep going
            print(f"torch.compile unavailable: {exc}", file=sys.stderr)
    results, reference = [], {}
    for (name, model), batch, (precision_name, precision), channels_last in itertools.product(
            variants.items(), batches, PRECISIONS.items(), (False, True)):
        if precision_name == "bf16" and not torch.cuda.is_bf16_supported():
            continue
        try:
            rate, classes = measure(model, chips, batch, precision, channels_last, args.seconds)
        except Exception as exc:
            results.append({"variant": name, "batch": batch, "precision": precision_name,
                            "channels_last": channels_last, "error": str(exc)[:300]})
            continue
        key = batch
        if name == "torchscript" and precision is None and not channels_last:
            reference[key] = classes
        agreement = float((classes == reference[key]).float().mean()) if key in reference \
            else None
        results.append({"variant": name, "batch": batch, "precision": precision_name,
                        "channels_last": channels_last, "chips_per_s": round(rate, 1),
                        "class_agreement_vs_fp32": agreement})
        print(json.dumps(results[-1]), file=sys.stderr)
    best = max((r for r in results if "chips_per_s" in r
                and (r["class_agreement_vs_fp32"] or 0) >= 0.99),
               key=lambda r: r["chips_per_s"], default=None)
    report = {"machine": {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                          "cuda": torch.version.cuda, "python": platform.python_version(),
                          "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
              "model": card.model_id, "results": results, "best_at_99pct_agreement": best}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
