"""GPTQ vs RTN on a whole bundled model: `python bench/gptq.py [--model M] [--tokens N] [--json OUT]`.

Runs the sweep with int4/int3 in groups of 64 and int4 per channel, each rounded to nearest and with GPTQ
(Hessians from the end of the evaluation text, collected once), and writes the result rows with the machine
and settings to JSON (default bench/results/gptq_cpu.json).
"""

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from qlab.analyses import activations  # noqa: E402
from qlab.analyses.sweep import run_sweep  # noqa: E402
from qlab.core.algorithms import gptq  # noqa: E402
from qlab.core.quant import QuantScheme  # noqa: E402
from qlab.models.evaluate import EvalSpec  # noqa: E402
from qlab.models.hardware import detect_this_machine  # noqa: E402
from qlab.models.loading import load, weights_digest  # noqa: E402

SCHEMES = (QuantScheme("int4", "group", 64), QuantScheme("int3", "group", 64), QuantScheme("int4", "channel"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "gptq_cpu.json"))
    args = parser.parse_args()
    loaded = load(args.model)
    before = weights_digest(loaded.model)
    schemes = [dataclasses.replace(s, algorithm=a) for s in SCHEMES for a in ("rtn", "gptq")]
    started = time.perf_counter()
    rows = [row.to_record() for row in run_sweep(loaded, schemes, EvalSpec(args.tokens))]
    result = {
        "benchmark": "GPTQ vs RTN, whole model, weight-only simulation",
        "model": loaded.name, "eval_tokens": args.tokens,
        "calibration_tokens": activations.CALIBRATION_TOKENS, "damp_percent": gptq.DAMP_PERCENT,
        "machine": detect_this_machine().name, "python": platform.python_version(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - started, 1),
        "base_weights_unchanged": weights_digest(loaded.model) == before, "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1, default=float))
    for row in rows:
        print(f"{row['label']:24} {row['bits_per_weight']:.3f} bpw  ppl {row['ppl']:8.2f}  "
              f"KLD {row['kld_mean']:.4f}  top-1 {row['top1_agreement']:.3f}")


if __name__ == "__main__":
    main()
