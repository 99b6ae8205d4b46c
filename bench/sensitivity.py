"""Sensitivity benchmark: cost of the per-layer analysis against one FP32 evaluation, and the 4.5-bit mix.

    python bench/sensitivity.py [--models smollm2-135m,minilm-l6] [--tokens 512] [--json OUT]

Per model, in one process on the same tokens:
- ``one_fp32_eval_s``: ``qlab.models.evaluate.evaluate`` of the FP32 model (mean of a run before and one after the
  analysis, since the machine's load drifts); ``baseline_s``: ``compute_baseline``, which the sweep benchmark
  calls "one FP32 evaluation".
- the issue's goal: every block's end-to-end delta plus every linear's output error for ONE format
  (the whole ``analyze(..., predict=False)`` call) in at most 20x one FP32 evaluation, as wall time and as this
  process's CPU time. AIMET's per-layer analysis costs (layers + 1) evaluations.
- the recommender's run (int8 and int4, curvature pass included), the mix at 4.5 bits per weight and the uniform
  formats, measured end to end: how much less error the mix has than uniform int4 at the same group size; and
  uniform int4 with groups of 32, which also stores 4.5 bits per weight.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from qlab.analyses.mixed import Budget, choices_from, compare, measure  # noqa: E402
from qlab.analyses.sensitivity import analyze, block_stack  # noqa: E402
from qlab.analyses.sweep import peak_rss_bytes  # noqa: E402
from qlab.cli.common import emit  # noqa: E402
from qlab.core.quant import QuantScheme  # noqa: E402
from qlab.models.evaluate import EvalSpec, compute_baseline, evaluate  # noqa: E402
from qlab.models.loading import load, quantizable_linears, weights_digest  # noqa: E402

GOAL_RATIO = 20.0
GROUP_SIZE = 64  # divides every linear of both bundled models (SmolLM2's 576 does not take 128)
BUDGET_BITS = 4.5


def _timed(function, *args, **kwargs):
    """The result, wall seconds and CPU seconds (all threads of this process) of one call.

    CPU time is reported beside wall time because the machine is shared: other processes stretch wall time
    by 2-10x from one minute to the next, while this process's own CPU time moves much less.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def bench_model(name: str, tokens: int) -> dict:
    loaded = load(name)
    digest = weights_digest(loaded.model)
    baseline, baseline_s, baseline_cpu_s = _timed(compute_baseline, loaded, EvalSpec(tokens=tokens))
    _, eval_before_s, eval_before_cpu_s = _timed(evaluate, loaded.model, baseline)
    int8, int4 = (QuantScheme(f, "group", GROUP_SIZE) for f in ("int8", "int4"))
    one_format, goal_s, goal_cpu_s = _timed(analyze, loaded, [int4], baseline, predict=False)
    _, eval_after_s, eval_after_cpu_s = _timed(evaluate, loaded.model, baseline)
    one_eval_s = (eval_before_s + eval_after_s) / 2
    one_eval_cpu_s = (eval_before_cpu_s + eval_after_cpu_s) / 2

    report, _, _ = _timed(analyze, loaded, [int8, int4], baseline)
    choices = choices_from(loaded, report)
    (mix,), rows = compare(loaded, choices, [Budget(BUDGET_BITS)], baseline)
    # Uniform int4 with groups of 32 stores exactly 4.5 bits per weight too: the same-size uniform rival.
    same_size = QuantScheme("int4", "group", 32)
    rows += measure(loaded, {same_size.label: same_size}, baseline)
    by_label = {row["label"]: row for row in rows}
    mix_error, int4_error = by_label[mix.label]["error"], by_label[int4.label]["error"]
    assert weights_digest(loaded.model) == digest, "the analysis changed the cached model's weights"
    stack = block_stack(loaded.model)
    return {
        "model": loaded.name,
        "caveat": loaded.source.caveat,
        "tokens": baseline.tokens,
        "blocks": len(stack.linears),
        "linears": len(quantizable_linears(loaded.model)),
        "baseline_s": round(baseline_s, 3),
        "baseline_cpu_s": round(baseline_cpu_s, 3),
        "one_fp32_eval_s": round(one_eval_s, 3),
        "one_fp32_eval_runs_s": [round(eval_before_s, 3), round(eval_after_s, 3)],
        "one_fp32_eval_cpu_s": round(one_eval_cpu_s, 3),
        "one_format": int4.label,
        "one_format_seconds": {k: round(v, 3) for k, v in one_format.seconds.items()},
        "goal_s": round(goal_s, 3),
        "goal_cpu_s": round(goal_cpu_s, 3),
        "goal_over_eval": round(goal_s / one_eval_s, 2),
        "goal_over_eval_cpu": round(goal_cpu_s / one_eval_cpu_s, 2),
        "goal_over_baseline": round(goal_s / baseline_s, 2),
        "goal_ratio": GOAL_RATIO,
        "aimet_evaluations_per_block": len(stack.linears) + 1,
        "aimet_evaluations_per_linear": len(quantizable_linears(loaded.model)) + 1,
        "recommender_formats": [int8.label, int4.label],
        "recommender_seconds": {k: round(v, 3) for k, v in report.seconds.items()},
        "predictor": choices.predictor,
        "budget_bits_per_weight": BUDGET_BITS,
        "mix_bits_per_weight": mix.bits_per_weight,
        "mix_layers_per_format": {s.label: sum(1 for v in mix.assignment.values() if v == s)
                                  for s in report.schemes},
        "metric": report.metric,
        "mix_error": mix_error,
        "int4_error": int4_error,
        "int8_error": by_label[int8.label]["error"],
        "mix_error_reduction_vs_int4": round(1 - mix_error / int4_error, 4),
        "int4_g32_error": by_label[same_size.label]["error"],
        "int4_g32_bits_per_weight": by_label[same_size.label]["bits_per_weight"],
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2-135m,minilm-l6")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--json", default="bench/results/sensitivity_cpu.json", metavar="OUT")
    args = parser.parse_args(argv)
    result = {"benchmark": "sensitivity", "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "models": []}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        result["models"].append(bench_model(name, args.tokens))
        result["peak_rss_bytes"] = peak_rss_bytes()
        emit(result, args.json)  # after each model: a killed run keeps what it finished
    return 0


if __name__ == "__main__":
    sys.exit(main())
