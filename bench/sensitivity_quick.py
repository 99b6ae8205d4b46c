"""Quick sensitivity benchmark: its ranking against the full analysis's measured per-block deltas, and its cost.

    python bench/sensitivity_quick.py [--models smollm2-135m,minilm-l6] [--formats int8,int4]
                                      [--cost-formats fp16,int8,int4,nf4] [--group-size 64] [--tokens 512]
                                      [--json OUT]

Per model, in one process on the same tokens (the FP32 baseline is computed once and given to both analyses):
- per validated format, the Spearman rank correlation of the quick block scores with the block deltas the full
  analysis (``analyze``, ``unit="block"``) measures (goal: at least 0.85), beside that of the full analysis's own
  per-channel (diagonal) estimate summed per block, which the quick score replaces;
- the cost in FP32 evaluations per format (goal: at most 3), counted rather than timed
  (``evaluations_per_format``: matmul FLOPs of the quick analysis, no baseline given, over one evaluation's), for
  the validated formats at once, the first alone and the Overview's default set;
- wall and CPU seconds of the same calls beside one ``evaluate`` of the FP32 model (the mean of a run before
  and one after), which move with the machine's load.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from qlab.analyses.sensitivity import analyze  # noqa: E402
from qlab.analyses.sensitivity_quick import (  # noqa: E402
    agreement,
    evaluations_per_format,
    quick_sensitivity,
    spearman,
)
from qlab.cli.common import emit  # noqa: E402
from qlab.core.quant import QuantScheme  # noqa: E402
from qlab.models.evaluate import EvalSpec, compute_baseline, evaluate  # noqa: E402
from qlab.models.loading import load, quantizable_linears, weights_digest  # noqa: E402

GOAL_SPEARMAN = 0.85
GOAL_EVALS_PER_FORMAT = 3.0


def _timed(function, *args, **kwargs):
    """The result, wall seconds and CPU seconds (all threads of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def _diagonal_agreement(report) -> dict[str, float]:
    """The full analysis's per-channel estimate (``predicted_delta``) summed per block, ranked the same way."""
    result = {}
    for scheme in report.schemes:
        measured = {r["block"]: r["delta"] for r in report.blocks
                    if r["label"] == scheme.label and r["block"] is not None}
        predicted = dict.fromkeys(measured, 0.0)
        for row in report.linears:
            if row["label"] == scheme.label and row["block"] in predicted:
                predicted[row["block"]] += row["predicted_delta"]
        blocks = sorted(measured)
        result[scheme.label] = spearman([predicted[b] for b in blocks], [measured[b] for b in blocks])
    return result


def bench_model(name: str, schemes: list[QuantScheme], cost_schemes: list[QuantScheme], tokens: int) -> dict:
    loaded = load(name)
    digest = weights_digest(loaded.model)
    spec = EvalSpec(tokens=tokens)
    baseline, baseline_s, _ = _timed(compute_baseline, loaded, spec)
    _, before_s, before_cpu_s = _timed(evaluate, loaded.model, baseline)
    quick, quick_s, quick_cpu_s = _timed(quick_sensitivity, loaded, schemes, spec, baseline)
    _, one_s, one_cpu_s = _timed(quick_sensitivity, loaded, schemes[:1], spec, baseline)
    _, cost_s, cost_cpu_s = _timed(quick_sensitivity, loaded, cost_schemes, spec, baseline)
    _, after_s, after_cpu_s = _timed(evaluate, loaded.model, baseline)
    eval_s, eval_cpu_s = (before_s + after_s) / 2, (before_cpu_s + after_cpu_s) / 2
    report, full_s, full_cpu_s = _timed(analyze, loaded, schemes, baseline, unit="block")
    assert weights_digest(loaded.model) == digest, "an analysis changed the cached model's weights"
    counted = {"quick_formats": evaluations_per_format(loaded, schemes, spec, baseline),
               "one_format": evaluations_per_format(loaded, schemes[:1], spec, baseline),
               "cost_set": evaluations_per_format(loaded, cost_schemes, spec, baseline)}
    quick_rho, diagonal_rho = agreement(quick, report), _diagonal_agreement(report)
    formats = []
    for scheme in schemes:
        measured = {r["block"]: r["delta"] for r in report.blocks
                    if r["label"] == scheme.label and r["block"] is not None}
        blocks = sorted(measured)
        estimated = quick.block_scores(scheme)
        quick_scores = [estimated[b] for b in blocks]
        formats.append({
            "label": scheme.label,
            "spearman_quick": round(quick_rho[scheme.label], 4),
            "spearman_diagonal": round(diagonal_rho[scheme.label], 4),
            "meets_goal": quick_rho[scheme.label] >= GOAL_SPEARMAN,
            "quick_over_measured_total": round(sum(quick_scores) / sum(measured.values()), 3),
            "measured_block_delta": [measured[b] for b in blocks],
            "quick_block_score": quick_scores,
            "quick_top_layers": [r["layer"] for r in quick.top(5, scheme)],
        })
    n = len(schemes)
    return {
        "model": loaded.name,
        "caveat": loaded.source.caveat,
        "metric": quick.metric,
        "tokens": baseline.tokens,
        "blocks": len(formats[0]["measured_block_delta"]),
        "linears": len(quantizable_linears(loaded.model)),
        "goal_spearman": GOAL_SPEARMAN,
        "formats": formats,
        "goal_evals_per_format": GOAL_EVALS_PER_FORMAT,
        "evals_per_format_counted": {
            "how": "matmul FLOPs of quick_sensitivity (no baseline given) over one FP32 evaluation's, per format",
            "quick_formats": [s.label for s in schemes],
            "quick_formats_evals_per_format": round(counted["quick_formats"], 3),
            "one_format": schemes[0].label,
            "one_format_evals": round(counted["one_format"], 3),
            "cost_set": [s.label for s in cost_schemes],
            "cost_set_evals_per_format": round(counted["cost_set"], 3),
            "meets_goal": max(counted.values()) <= GOAL_EVALS_PER_FORMAT,
        },
        "timed": {
            "baseline_s": round(baseline_s, 3),
            "one_fp32_eval_s": round(eval_s, 3),
            "one_fp32_eval_runs_s": [round(before_s, 3), round(after_s, 3)],
            "one_fp32_eval_cpu_s": round(eval_cpu_s, 3),
            "quick_s": round(quick_s, 3),
            "quick_cpu_s": round(quick_cpu_s, 3),
            "quick_over_eval_per_format": round(quick_s / eval_s / n, 2),
            "quick_over_eval_per_format_cpu": round(quick_cpu_s / eval_cpu_s / n, 2),
            "quick_one_format_s": round(one_s, 3),
            "quick_one_format_over_eval": round(one_s / eval_s, 2),
            "quick_one_format_over_eval_cpu": round(one_cpu_s / eval_cpu_s, 2),
            "quick_cost_set_s": round(cost_s, 3),
            "quick_cost_set_over_eval_per_format": round(cost_s / eval_s / len(cost_schemes), 2),
            "quick_cost_set_over_eval_per_format_cpu": round(cost_cpu_s / eval_cpu_s / len(cost_schemes), 2),
            "full_analysis_s": round(full_s, 3),
            "full_analysis_cpu_s": round(full_cpu_s, 3),
            "full_over_quick": round(full_s / quick_s, 1),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="smollm2-135m,minilm-l6")
    parser.add_argument("--formats", default="int8,int4", help="formats validated against the full analysis")
    parser.add_argument("--cost-formats", default="fp16,int8,int4,nf4",
                        help="formats whose quick analysis is only timed (the Overview's default set)")
    parser.add_argument("--group-size", type=int, default=64, help="64 divides every linear of both bundled models")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--json", default="bench/results/sensitivity_quick_cpu.json", metavar="OUT")
    args = parser.parse_args(argv)
    schemes, cost_schemes = ([QuantScheme(f.strip(), "group", args.group_size) for f in formats.split(",") if f.strip()]
                             for formats in (args.formats, args.cost_formats))
    result = {"benchmark": "sensitivity_quick", "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
              "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
              "note": "timed on a 2-core machine shared with other jobs (load averages at start and end): a busy "
                      "machine stretches times several-fold and the ratios move with it", "models": []}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        result["models"].append(bench_model(name, schemes, cost_schemes, args.tokens))
        result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        emit(result, args.json)  # after each model: a killed run keeps what it finished
    return 0


if __name__ == "__main__":
    sys.exit(main())
