"""The rounding methods the sources name, on the bundled models: `python bench/rounding_methods.py [--models M,...]
[--formats int4,int3] [--algorithms rtn,gptq,...] [--device cpu|cuda] [--tokens N] [--note TEXT] [--json OUT]`.

RTN, GPTQ, GPTQ with act-order, AWQ and HQQ at int4 and int3 in asymmetric groups of 128 (64 where 128 does not
divide every layer's input width, as SmolLM2-135M's 576), each a whole-model weight-only simulation measured by
the sweep (KLD, perplexity and top-1 agreement for a causal LM; cosine and retrieval agreement for an embedding
model) with its time to quantize. Calibrated methods share one calibration pass per model (4096 tokens from the
end of the evaluation text, apart from the tokens evaluated); its time is given once per model, not charged to
the first method that triggered it. Writes bench/results/rounding_methods_cpu.json by default.

A random-initialised checkpoint (bench/random_checkpoint.py) gives the time to quantize a model of real size: its
accuracy columns say nothing (random weights), its times do not depend on the values.
"""

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from qlab.analyses import activations  # noqa: E402
from qlab.analyses.sweep import run_sweep  # noqa: E402
from qlab.core.algorithms import awq, gptq, hqq  # noqa: E402
from qlab.core.plan import quantizable_linears  # noqa: E402
from qlab.core.quant import QuantScheme  # noqa: E402
from qlab.models.evaluate import EvalSpec  # noqa: E402
from qlab.models.hardware import detect_this_machine  # noqa: E402
from qlab.models.loading import load, weights_digest  # noqa: E402

ALGORITHMS = ("rtn", "gptq", "gptq-act-order", "awq", "hqq")
FORMATS = ("int4", "int3")
GROUP_SIZES = (128, 64)  # the first that divides every quantized layer's input width
BASELINE_NOTES = {"smollm2-135m": "SmolLM2-135M's bundled baseline is a dequantized Q4_1 GGUF, not a true "
                                  "full-precision model: every method is measured against a 4-bit model already."}


def group_size_for(loaded) -> int:
    widths = {module.in_features for _, module in quantizable_linears(loaded.model)}
    return next(g for g in GROUP_SIZES if all(w % g == 0 for w in widths))


def measure(model: str, tokens: int, formats: Sequence[str] = FORMATS, device: str = "cpu",
            algorithms: Sequence[str] = ALGORITHMS) -> dict:
    """Every method at every format on one model, as one sweep (calibration collected once)."""
    loaded = load(model, device=device)
    before = weights_digest(loaded.model)
    group_size = group_size_for(loaded)
    schemes = [QuantScheme(fmt, "group", group_size, symmetric=False, algorithm=algorithm)
               for fmt in formats for algorithm in algorithms]
    started = time.perf_counter()
    rows = [row.to_record() for row in run_sweep(loaded, schemes, EvalSpec(tokens))]
    calibration_seconds = next((r["calibration_seconds"] for r in rows if "calibration_seconds" in r), None)
    charged = False
    for row in rows:
        row["rounding_seconds"] = row["quantize_seconds"]
        if "calibration_seconds" in row and not charged:  # this row's time includes the one calibration pass
            row["rounding_seconds"] = round(row["quantize_seconds"] - row["calibration_seconds"], 3)
            charged = True
    return {
        "model": loaded.name, "group_size": group_size,
        "group_size_note": ("groups of 128" if group_size == 128 else
                            f"groups of {group_size}: 128 does not divide every input width of {loaded.name}"),
        "baseline_note": BASELINE_NOTES.get(loaded.name), "calibration_seconds": calibration_seconds,
        "seconds": round(time.perf_counter() - started, 1),
        "base_weights_unchanged": weights_digest(loaded.model) == before, "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,minilm-l6")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--device", default="cpu", help="cpu or a GPU such as cuda:0")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--note", default=None, help="recorded with the result, e.g. that the machine was shared")
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" /
                                              "rounding_methods_cpu.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    result = {
        "benchmark": "rounding methods (RTN, GPTQ, GPTQ act-order, AWQ, HQQ), whole model, weight-only simulation",
        "eval_tokens": args.tokens, "calibration_tokens": activations.CALIBRATION_TOKENS,
        "gptq_damp_percent": gptq.DAMP_PERCENT, "awq_grid_points": awq.GRID_POINTS, "hqq_steps": hqq.STEPS,
        "machine": detect_this_machine().name, "python": platform.python_version(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "note": args.note, "models": [],
    }
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        formats = [f.strip() for f in args.formats.split(",") if f.strip()]
        algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
        result["models"].append(measure(model, args.tokens, formats, args.device, algorithms))
        result["seconds"] = round(time.perf_counter() - started, 1)
        # Written after each model: a run stopped half-way keeps what it finished.
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=float))
        for row in result["models"][-1]["rows"]:
            quality = (f"ppl {row['ppl']:8.2f}  KLD {row['kld_mean']:.4f}  top-1 {row['top1_agreement']:.3f}"
                       if "ppl" in row else f"cosine {row['cosine_mean']:.4f}")
            print(f"{model:14} {row['label']:30} {row['bits_per_weight']:.3f} bpw  {quality}  "
                  f"rounding {row['rounding_seconds']:.1f} s")


if __name__ == "__main__":
    main()
