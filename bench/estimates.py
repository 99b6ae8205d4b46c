"""How close the announced estimates come to the work they announce, on this machine.

    python bench/estimates.py [--models minilm-l6,smollm2-135m,DIR] [--tokens 512] [--json OUT]

Before a long step the dashboard says about how long it takes (``qlab.analyses.overview``: the Quantize page's
sweep, the Overview's pieces, the Sensitivity page's full analysis). Per model this times, one after another in
one process, each step those estimates cover and writes each estimate beside its measurement:

- ``evaluation``: one evaluation of the model on the tokens (the median of three);
- ``baseline``: the reference pass every comparison needs;
- ``sweep``: fp16, int8 g64, int4 g64 and nf4 g64 with the baseline ready (the Quantize page's and the Overview's);
- ``quick_sensitivity``: the Overview's quick per-layer sensitivity of those formats;
- ``full_analysis``: the Sensitivity page's analysis of int8 and int4 g64, one block at a time, forward view;
- ``measured_speed``: the Overview's short speed measurement of those formats through this machine's backends.

A ratio above 1 is an estimate that overshot. Numba's kernels are compiled (or read from their cache) before the
clock starts, as they are once per machine; the read bandwidth the speed estimate prices a decode step by is
measured once, as the Overview measures it once per process. Run it on a quiet machine: the load average is
recorded beside.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from qlab.analyses import overview, sensitivity  # noqa: E402
from qlab.analyses.sensitivity_quick import quick_sensitivity  # noqa: E402
from qlab.analyses.sweep import run_sweep  # noqa: E402
from qlab.backends import format_speed, speed  # noqa: E402
from qlab.cli.common import emit  # noqa: E402
from qlab.core.quant import QuantScheme  # noqa: E402
from qlab.models import loading  # noqa: E402
from qlab.models.evaluate import EvalSpec, compute_baseline, compute_dtype, evaluate  # noqa: E402
from qlab.models.hardware import cpu_flags  # noqa: E402

SWEEP = (QuantScheme("fp16"), QuantScheme("int8", "group", 64), QuantScheme("int4", "group", 64),
         QuantScheme("nf4", "group", 64))
ANALYSED = SWEEP[1:3]


def timed(work) -> tuple[float, object]:
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def measure(name: str, tokens: int) -> dict:
    load_s, loaded = timed(lambda: loading.load(name))
    spec = EvalSpec(tokens)
    request = overview.OverviewRequest(SWEEP, "this-machine", spec)
    estimates = {  # before anything runs, as the pages announce them
        "evaluation": overview.evaluation_seconds(loaded, tokens),
        "baseline": overview.sweep_seconds(loaded, [], spec),
        "sweep": overview.sweep_seconds(loaded, SWEEP, spec, baseline_ready=True),
        "quick_sensitivity": overview.estimate_seconds("sensitivity", loaded, request, SWEEP),
        "full_analysis": overview.analysis_seconds(loaded, ANALYSED, spec),
        "measured_speed": format_speed.estimate_seconds(loaded, SWEEP),
    }
    list(run_sweep(loaded, list(SWEEP[1:2]), EvalSpec(64)))  # compiles (or reads) the rounding kernels
    measured = {}
    measured["baseline"], baseline = timed(lambda: compute_baseline(loaded, spec))
    measured["evaluation"] = statistics.median(timed(lambda: evaluate(loaded.model, baseline))[0] for _ in range(3))
    measured["sweep"], _ = timed(lambda: list(run_sweep(loaded, list(SWEEP), spec, baseline=baseline)))
    measured["quick_sensitivity"], _ = timed(lambda: quick_sensitivity(loaded, list(SWEEP), spec))
    measured["full_analysis"], _ = timed(lambda: sensitivity.analyze(loaded, ANALYSED, baseline))
    format_speed.import_libraries(loaded.kind, SWEEP)  # as the Overview does before its clock
    measured["measured_speed"], speeds = timed(lambda: list(format_speed.measure(loaded, SWEEP)))
    return {"model": loaded.name, "parameters": loaded.num_params, "dtype": str(loaded.dtype).removeprefix("torch."),
            "compute_dtype": str(compute_dtype(loaded.model)).removeprefix("torch."), "tokens": tokens,
            "load_s": round(load_s, 2),
            "steps": {step: {"estimated_s": round(estimates[step], 2), "measured_s": round(measured[step], 2),
                             "estimate_over_measured": round(estimates[step] / measured[step], 2)}
                      for step in estimates},
            "speed_backends": {r["label"]: r["backend"] for r in speeds},  # None: no backend runs it here
            "load_average_after": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="minilm-l6,smollm2-135m",
                        help="bundled slugs or checkpoint folders, comma-separated")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--json", metavar="OUT", help="write the results here")
    ns = parser.parse_args(argv)
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"})
    # The probes every estimate scales with, taken once here as the pages take them once per process.
    probes = {str(dtype).removeprefix("torch."): overview.matmul_flops_per_s("cpu", dtype)
              for dtype in (torch.float32, torch.bfloat16)}  # what the models here compute in
    bandwidth = speed.this_machine_bandwidth()
    result = {"benchmark": "estimates", "cpu_flags": flags, "threads": torch.get_num_threads(),
              "probe_flops_per_s": {name: round(rate) for name, rate in probes.items()},
              "bandwidth_bytes_per_s": round(bandwidth),
              "load_average_before": round(os.getloadavg()[0], 2),
              "models": [measure(name.strip(), ns.tokens) for name in ns.models.split(",") if name.strip()]}
    emit(result, ns.json)


if __name__ == "__main__":
    main()
