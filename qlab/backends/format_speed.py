"""Speed of the chosen formats on this machine, for the Overview: one real backend per weight format, short
runs, no accuracy pass (the sweep measures accuracy).

Each backend's runs repeat until the fastest three agree within ``NOISY_SPREAD_PCT`` or its share of one time cap
for the whole measurement (``SPEED_CAP_S`` by default) is spent; a result whose runs never agreed is marked ``noisy``.

A format is timed through the first backend of ``PREFERENCE`` that stores it, handles the model's kind and
runs here; weight-only backends come first because that is what the sweep simulates. A format no backend runs
here gets a record that says so, which is stored like a measurement so it is not retried on every visit.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterator, Sequence

from qlab import backends
from qlab.analyses.overview import SPEED_CAP_S, evaluation_seconds, matmul_seconds
from qlab.backends import speed
from qlab.core.quant import QuantScheme
from qlab.models.evaluate import CancelCheck, Progress
from qlab.models.loading import LoadedModel, quantizable_linears

# The module each backend library is imported as (its PyPI name differs).
LIBRARY_MODULES = {"torchao": "torchao", "optimum-quanto": "optimum.quanto", "onnxruntime": "onnxruntime",
                   "llama-cpp-python": "llama_cpp", "bitsandbytes": "bitsandbytes", "torch": "torch"}
PREFERENCE = ("fp32", "bf16", "torchao-int8wo", "quanto-int8", "torch-dynamic-int8", "onnxruntime-int8",
              "quanto-int4", "llamacpp-q4_0", "torchao-int4wo", "torchao-float8wo", "quanto-float8", "bnb-nf4")
# The fewest runs: one warm-up, then three timed runs that, on a quiet machine, already agree.
QUICK_SPEC = speed.SpeedSpec(prompt_tokens=32, new_tokens=8, repetitions=3, warmup=1, sentences=8)
NOISY_SPREAD_PCT = 10.0  # runs repeat until they spread less than this; a median of runs that never did is noisy
# Per token of decode, Python and kernel-launch overhead a 2-core CPU adds to the matmuls (measured ~10 ms).
DECODE_STEP_OVERHEAD_S = 0.01
# On a CPU the weight-only backends' eager decode steps read the model far slower than the machine copies memory:
# torchao's int8 dequantizes every weight in every step, quanto's int4 pays Python per linear. Over SmolLM2 and the
# random 1B Llama on the quiet AVX512-BF16 EPYC (bench/results/estimates_cpu.json) a step took 3-12x the base
# model's bytes at the measured read bandwidth; quanto's building took 0.5-1.2 s and 6.8 s, torchao's 0.5-0.9 s and
# 12.5 s: about a fixed 0.4 s and 10 ns a quantized weight.
CPU_DECODE_READ_SLOWDOWN = 5.0
CPU_BUILD_FIXED_S = 0.4
CPU_BUILD_S_PER_WEIGHT = 1e-8
# On a GPU eager generate is launch-bound, not matmul-bound: the 8B model decoded 15-28 tokens/s on the H200 in
# every format (bench/results/real_model_gpu.json, run 4), about 40 ms a token whatever the matmuls cost.
GPU_DECODE_STEP_OVERHEAD_S = 0.04
GPU_BUILD_EVALS = 1.0  # building a backend's model (quantizing its weights) costs about one evaluation


def device_of(loaded: LoadedModel) -> str:
    """Where the speed is measured: on the GPU the model was loaded on, else on the CPU."""
    return "cpu" if loaded.device == "cpu" else "cuda"


def backend_for(fmt: str, kind: str, device: str = "cpu") -> backends.Backend | None:
    """The backend that times ``fmt`` here: the first of ``PREFERENCE`` that stores it and runs; None if none."""
    candidates = {b.slug: b for b in backends.all_backends()
                  if b.weight_format == fmt and kind in b.kinds and b.available(device)[0]}
    ordered = [candidates[slug] for slug in PREFERENCE if slug in candidates]
    return (ordered or list(candidates.values()) or [None])[0]


def import_libraries(kind: str, schemes: Sequence[QuantScheme], device: str = "cpu") -> None:
    """Import the kernel libraries ``measure`` will use for these schemes, now, in the calling thread."""
    for scheme in schemes:
        backend = backend_for(scheme.format, kind, device)
        if backend is not None and backend.library in LIBRARY_MODULES:
            importlib.import_module(LIBRARY_MODULES[backend.library])


def estimate_seconds(loaded: LoadedModel, schemes: Sequence[QuantScheme], spec: speed.SpeedSpec = QUICK_SPEC
                     ) -> float:
    """About how long ``measure`` takes when the runs agree at once (a quiet machine): per backend, a build plus
    (warm-up + repetitions) runs. A noisy machine repeats them until the time cap, so up to ``max(cap, this)``.
    On a CPU a decode step is priced by reading the model at this machine's read bandwidth."""
    runnable = [s for s in schemes if backend_for(s.format, loaded.kind, device_of(loaded)) is not None]
    on_cpu = device_of(loaded) == "cpu"
    if loaded.kind == "causal-lm":
        if on_cpu:
            model_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
            step = max(matmul_seconds(loaded, 1),
                       CPU_DECODE_READ_SLOWDOWN * model_bytes / speed.this_machine_bandwidth())
            step += DECODE_STEP_OVERHEAD_S
        else:
            step = matmul_seconds(loaded, 1) + GPU_DECODE_STEP_OVERHEAD_S
        run = matmul_seconds(loaded, spec.prompt_tokens) + spec.new_tokens * step
    else:
        run = matmul_seconds(loaded, spec.sentences * 128)  # texts padded to the longest, up to 128 tokens
    if on_cpu:
        weights = sum(m.weight.numel() for _, m in quantizable_linears(loaded.model))
        build = CPU_BUILD_FIXED_S + CPU_BUILD_S_PER_WEIGHT * weights
    else:
        build = GPU_BUILD_EVALS * evaluation_seconds(loaded, 512)
    return len(runnable) * (build + (spec.warmup + spec.repetitions) * run)


def measure(loaded: LoadedModel, schemes: Sequence[QuantScheme], spec: speed.SpeedSpec = QUICK_SPEC,
            progress: Progress | None = None, cancel: CancelCheck | None = None, cap_s: float = SPEED_CAP_S,
            clock: Callable[[], float] = time.perf_counter) -> Iterator[dict]:
    """Time each scheme's format through its backend, repeating until the runs agree or ``cap_s`` seconds (all
    formats together, on ``clock``) are spent; yield one record per scheme (label, backend, ``speed`` in decode
    tokens/s or sentences/s, its spread, ``noisy``), or one saying why it could not run here."""
    cap = speed.TimeCap(cap_s, NOISY_SPREAD_PCT, clock)
    device = device_of(loaded)
    chosen = [(scheme, backend_for(scheme.format, loaded.kind, device)) for scheme in schemes]
    unique = list({b.slug: b for _, b in chosen if b is not None}.values())
    for row in speed.run_bench(loaded, unique, spec, device, accuracy_tokens=None, progress=progress, cancel=cancel,
                               cap=cap):
        for scheme, backend in chosen:
            if backend is not None and backend.slug == row["backend"]:
                yield _record(scheme, row)
    for scheme, backend in chosen:
        if backend is None:
            yield {"label": scheme.label, "format": scheme.format, "backend": None, "available": False,
                   "speed": None, "reason": f"no {scheme.format} backend for a {loaded.kind} model runs on this "
                                            f"machine's {'CPU' if device == 'cpu' else 'GPU'}"}


def _record(scheme: QuantScheme, row: dict) -> dict:
    timing = "decode_tokens_per_s" if row.get("decode_tokens_per_s") is not None else "sentences_per_s"
    spread = row.get(f"{timing}_spread_pct")
    return {**row, "label": scheme.label, "format": scheme.format, "speed": row.get(timing),
            "speed_unit": "decode tokens/s" if timing == "decode_tokens_per_s" else "sentences/s",
            "speed_min": row.get(f"{timing}_min"), "speed_max": row.get(f"{timing}_max"), "spread_pct": spread,
            "noisy": row.get("agreed") is False or (spread is not None and spread > NOISY_SPREAD_PCT)}
