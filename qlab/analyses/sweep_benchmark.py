"""Benchmarks whose numbers go into JSON, never into timed unit tests."""

from __future__ import annotations

import platform
import time

import psutil
import torch
import transformers

from qlab import __version__
from qlab.analyses.sweep import peak_rss_bytes, run_sweep
from qlab.core.quant import QuantScheme
from qlab.models.evaluate import EvalSpec, compute_baseline
from qlab.models.loading import load, model_sha256


def bench_sweep(model_name: str, schemes: list[QuantScheme], tokens: int) -> dict:
    """Time one FP32 evaluation and a full sweep (baseline included) in one process; record peak RSS.

    Goals from the foundation issue: sweep <= 7x one FP32 evaluation; peak RSS <= 2.5x the FP32 model.
    RSS is reported both whole-process and above the interpreter with its libraries imported, because
    torch and transformers alone take a few hundred MB that no sweep design can remove.
    """
    process = psutil.Process()
    rss_before_load = process.memory_info().rss
    loaded = load(model_name)
    spec = EvalSpec(tokens=tokens)
    started = time.perf_counter()
    compute_baseline(loaded, spec)
    one_eval_s = time.perf_counter() - started
    started = time.perf_counter()
    rows = [row.to_record() for row in run_sweep(loaded, schemes, spec)]
    sweep_s = time.perf_counter() - started
    peak = peak_rss_bytes()
    return {
        "benchmark": "sweep",
        "model": loaded.name,
        "formats": [s.label for s in schemes],
        "tokens": rows[0]["eval_tokens"] if rows else tokens,
        "one_fp32_eval_s": round(one_eval_s, 3),
        "sweep_s": round(sweep_s, 3),
        "sweep_over_eval": round(sweep_s / one_eval_s, 3),
        "goal_sweep_over_eval": 7.0,
        "fp32_model_bytes": loaded.fp32_bytes,
        "peak_rss_bytes": peak,
        "rss_before_load_bytes": rss_before_load,
        "peak_rss_over_model": round(peak / loaded.fp32_bytes, 3),
        "peak_rss_above_libraries_over_model": round((peak - rss_before_load) / loaded.fp32_bytes, 3),
        "goal_peak_rss_over_model": 2.5,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        # What makes the rows comparable with other runs once stored (``Store.import_payload``).
        "qlab": __version__,
        "transformers": transformers.__version__,
        "model_sha256": model_sha256(loaded),
        "text_name": spec.text_name,
        "text_sha256": spec.text_sha256,
        "seed": torch.initial_seed(),
        "rows": rows,
    }
