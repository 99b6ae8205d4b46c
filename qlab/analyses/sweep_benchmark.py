"""Benchmarks whose numbers go into JSON, never into timed unit tests."""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable, Iterator

import psutil
import torch
import transformers

from qlab import __version__
from qlab.analyses.calibration import calibration_stats
from qlab.analyses.sensitivity import block_stack
from qlab.analyses.streamed import streamable_stack
from qlab.analyses.sweep import measure_scheme, out_of_memory, peak_rss_bytes, run_sweep
from qlab.core.algorithms import dequantized_weights_unchecked, needs_calibration
from qlab.core.errors import QlabError
from qlab.core.peak_rss import PeakRss, high_water_mark
from qlab.core.plan import quantizable_linears
from qlab.core.quant import QuantScheme
from qlab.models.evaluate import EvalSpec, compute_baseline, evaluate
from qlab.models.hardware import detect_this_machine
from qlab.models.loading import RUNTIME_BYTES, SWEEP_MEMORY_FACTOR, load, model_sha256

# One evaluation of the base model, the unit of every scheme's cost, is the median of three: a single one wandered
# by 1.2-2x between runs of the same work on a CPU, and by 1.5-2.0 s on an H100 (bench/results/sweep_*.json).
BASE_EVALUATIONS = 3
MAX_REPEATS = 50


def bench_sweep(model_name: str, schemes: list[QuantScheme], tokens: int,
                on_row: Callable[[dict], None] | None = None, repeats: int = 0, **placement: str | None) -> dict:
    """Time one evaluation of the base model (the median of ``BASE_EVALUATIONS``, each kept in ``base_eval_s``)
    and a full sweep (baseline included) in one process, the model
    loaded by ``load(model_name, **placement)`` (``device``, ``device_map``, ``dtype``; default: the CPU, in its
    own dtype); each row gets its cost over that evaluation and its peak memory. ``on_row`` receives the result
    as it stands after each scheme (``"complete": False`` until the last), so that a caller can keep the rows
    measured before a later scheme fails.

    ``repeats`` rounds after the sweep measure each scheme again between two base evaluations
    (``_alternated``): each row then also gets its cost over the mean of those two, once per round, and their
    median. Where the machine's speed drifts faster than a sweep runs (a shared CPU: 2x within a minute), a
    single sweep's ratios say more about the drift than about the schemes.

    Goals: each scheme <= 1.2x one base evaluation on the same device; peak memory <= 1.3x the weights as loaded
    plus the largest tensor plus 1 GB of working memory (GPU: ``torch.cuda.max_memory_allocated``; CPU: peak RSS
    above the interpreter with its libraries imported, which no sweep design can remove).
    """
    if not 0 <= repeats <= MAX_REPEATS:
        raise QlabError(f"repeats must be between 0 and {MAX_REPEATS}, not {repeats}.")
    process = psutil.Process()
    rss_before_load = process.memory_info().rss
    started = time.perf_counter()
    loaded = load(model_name, **{k: v for k, v in placement.items() if v is not None})
    load_s = time.perf_counter() - started
    peak = PeakMemory(loaded.device, rss_before_load)
    spec = EvalSpec(tokens=tokens)
    started = time.perf_counter()
    baseline = compute_baseline(loaded, spec)
    baseline_s = time.perf_counter() - started
    peak.reset()
    base_eval_s = []
    for _ in range(BASE_EVALUATIONS):
        started = time.perf_counter()
        evaluate(loaded.model, baseline)  # the base model scored against itself: the work one scheme also does
        peak.synchronize()
        base_eval_s.append(time.perf_counter() - started)
    one_eval_s = statistics.median(base_eval_s)
    eval_peak = peak.read()
    copy_floor_s = _copy_seconds(loaded, peak)
    warm_up_s = _warm_up(loaded, schemes, baseline.compute_dtype, peak)
    largest = max(p.numel() * p.element_size() for p in loaded.model.parameters())
    goal_peak = int(SWEEP_MEMORY_FACTOR * loaded.weight_bytes) + largest + RUNTIME_BYTES
    rows = []
    host = detect_this_machine().host
    weights_sha256 = model_sha256(loaded)  # before the clock starts: files of 16 GB take seconds to hash
    started = time.perf_counter()
    sweep = run_sweep(loaded, schemes, spec, baseline)

    def result(complete: bool) -> dict:
        sweep_s = time.perf_counter() - started + baseline_s
        overall = max([eval_peak] + [r["peak_memory_bytes"] for r in rows])
        return {
            "benchmark": "sweep",
            "model": loaded.name,
            "device": loaded.device,
            "gpu": torch.cuda.get_device_name(0) if loaded.device != "cpu" else None,
            "dtype": str(loaded.dtype).removeprefix("torch."),
            "reference_dtype": baseline.reference_dtype,
            "formats": [s.label for s in schemes],
            "tokens": baseline.tokens,
            "parameters": loaded.num_params,
            "load_s": round(load_s, 3),
            "baseline_s": round(baseline_s, 3),
            "one_eval_s": round(one_eval_s, 3),
            "base_eval_s": [round(seconds, 3) for seconds in base_eval_s],
            # Every quantizable weight read and written once, as materialising a scheme must: its floor here.
            "copy_floor_s": round(copy_floor_s, 3),
            "copy_floor_over_eval": round(copy_floor_s / one_eval_s, 3),
            # The rounding kernels' first calls in this process (loading Triton's or numba's compiled code), paid
            # once per process, before the clock: a dashboard pays them at its first sweep, not at every scheme.
            "kernel_warm_up_s": round(warm_up_s, 3),
            "sweep_s": round(sweep_s, 3),
            "sweep_over_eval": round(sweep_s / one_eval_s, 3),
            "max_scheme_cost_over_eval": max((r["cost_over_eval"] for r in rows), default=None),
            "goal_scheme_cost_over_eval": 1.2,
            "repeats": repeats,
            "repeat_base_eval_s": [round(seconds, 3) for seconds in repeat_base_s],
            "max_scheme_cost_over_eval_median": max((r["cost_over_eval_median"] for r in rows
                                                     if "cost_over_eval_median" in r), default=None),
            "model_bytes": loaded.weight_bytes,
            "largest_tensor_bytes": largest,
            "peak_memory_kind": peak.kind,
            "eval_peak_memory_bytes": eval_peak,
            "peak_memory_bytes": overall,
            "peak_memory_over_model": round(overall / loaded.weight_bytes, 3),
            "goal_peak_memory_bytes": goal_peak,
            "rss_before_load_bytes": rss_before_load,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            # The CPU varies between machines, and its bf16 matmuls (AMX, AVX512-BF16 or neither) set one evaluation.
            "cpu_model": host.cpu_model,
            "cpu_flags": sorted(host.cpu_flags),
            "torch": torch.__version__,
            # What makes the rows comparable with other runs once stored (``Store.import_payload``).
            "qlab": __version__,
            "transformers": transformers.__version__,
            "model_sha256": weights_sha256,
            "text_name": spec.text_name,
            "text_sha256": spec.text_sha256,
            "seed": torch.initial_seed(),
            "complete": complete,
            "rows": rows,
        }

    repeat_base_s: list[float] = []
    while True:
        peak.reset()
        row = next(sweep, None)
        if row is None:
            break
        scheme_peak = peak.read()
        rows.append({**row.to_record(), "cost_over_eval": round(row.seconds / one_eval_s, 3),
                     "peak_memory_bytes": scheme_peak, "peak_over_goal": round(scheme_peak / goal_peak, 3)})
        if on_row is not None and (len(rows) < len(schemes) or repeats):
            on_row(result(complete=False))
    for done in _alternated(loaded, schemes, baseline, spec, repeats, peak, repeat_base_s, rows):
        if on_row is not None and done < repeats:
            on_row(result(complete=False))
    return result(complete=True)


def _alternated(loaded, schemes: list[QuantScheme], baseline, spec: EvalSpec, repeats: int, peak: PeakMemory,
                base_s: list[float], rows: list[dict]) -> Iterator[int]:
    """``repeats`` rounds of: each scheme measured as the sweep measures it, with one base evaluation before
    the first and after each (``base_s``), so that a scheme sits between two. Each row gets ``repeated_s``, its
    ``repeated_cost_over_eval`` (its seconds over the mean of the evaluations either side, per round), their
    median and range. Yields the rounds done; running out of memory ends it with one line, the rounds done kept
    by the caller's ``on_row``."""
    if not repeats:
        return
    streamed = streamable_stack(loaded.model) is not None
    stats = calibration_stats(loaded, spec)[0] if any(needs_calibration(s) for s in schemes) else None
    shells: dict = {}

    def timed(work: Callable[[], object]) -> float:
        peak.synchronize()
        started = time.perf_counter()
        work()
        peak.synchronize()
        return time.perf_counter() - started

    def base_evaluation() -> float:
        return timed(lambda: evaluate(loaded.model, baseline))

    base_s.append(base_evaluation())
    for row in rows:
        row["repeated_s"], row["repeated_cost_over_eval"] = [], []
    for done in range(1, repeats + 1):
        for scheme, row in zip(schemes, rows, strict=True):
            try:
                seconds = timed(lambda s=scheme: measure_scheme(loaded, s, baseline, stats, streamed, shells=shells))
            except RuntimeError as error:  # as run_sweep says it: the rounds written before are kept
                if not out_of_memory(error):
                    raise
                seconds = None
            if seconds is None:  # raised out here, so no traceback keeps the scheme's tensors alive
                raise QlabError(f"'{loaded.name}' ran out of memory measuring {scheme.label} again in round {done} "
                                f"of {repeats}; the sweep and the rounds before this one are kept.")
            base_s.append(base_evaluation())
            row["repeated_s"].append(round(seconds, 3))
            row["repeated_cost_over_eval"].append(round(2 * seconds / (base_s[-2] + base_s[-1]), 3))
        for row in rows:
            ratios = row["repeated_cost_over_eval"]
            row["cost_over_eval_median"] = round(statistics.median(ratios), 3)
            row["cost_over_eval_range"] = [min(ratios), max(ratios)]
        yield done


def _copy_seconds(loaded, peak: PeakMemory) -> float:
    """Seconds to copy every quantizable linear weight once into a scratch tensor of its own dtype and device
    (one at a time: no more memory than the largest), the least that applying any scheme costs here."""
    weights = [module.weight for _, module in quantizable_linears(loaded.model)]
    largest = max((w.numel() for w in weights), default=0)
    # One per dtype and device (a model placed over several GPUs), written before the clock starts so that the
    # operating system's first touch of its pages is not counted.
    scratch = {key: torch.zeros(largest, dtype=key[0], device=key[1])
               for key in dict.fromkeys((w.dtype, w.device) for w in weights)}
    peak.synchronize()
    started = time.perf_counter()
    for weight in weights:
        scratch[weight.dtype, weight.device][:weight.numel()].view_as(weight).copy_(weight)
    peak.synchronize()
    return time.perf_counter() - started


def _warm_up(loaded, schemes: list[QuantScheme], dtype: torch.dtype, peak: PeakMemory) -> float:
    """Seconds for each round-to-nearest scheme to round the first block's linears, and those outside the blocks,
    into ``dtype`` as the streamed sweep rounds them (each set together): the first call of the rounding kernels in
    a process loads them (Triton 0.35-0.4 s on an H100, numba about 0.5 s on a CPU), and Triton compiles one kernel
    for each number of weights launched together (0.23-0.47 s of an 8B model's first fp8, int8 and nf4 schemes
    on a lent H100 and H200, whose head is launched alone, when only a block's linears were warmed)."""
    modules = dict(quantizable_linears(loaded.model))
    try:
        stack = block_stack(loaded.model)
        groups = [names for names in (stack.linears[0], stack.outside) if names]
    except QlabError:  # no stack of blocks: one weight loads the kernels
        groups = [list(modules)[:1]]
    peak.synchronize()
    started = time.perf_counter()
    for scheme in schemes:
        if scheme.algorithm != "rtn":
            continue
        for names in groups:
            with contextlib.suppress(QlabError):  # a group size the weights refuse: the sweep says so itself
                dequantized_weights_unchecked([(modules[name].weight, scheme, None) for name in names], dtype)
    peak.synchronize()
    return time.perf_counter() - started


class PeakMemory:
    """Peak memory between ``reset`` and ``read``: allocated bytes on the model's GPUs, or on the CPU the
    process's peak RSS above ``baseline_rss`` (``qlab.core.peak_rss``: Linux VmHWM, else ru_maxrss)."""

    def __init__(self, device: str, baseline_rss: int) -> None:
        self.gpus = [] if device == "cpu" else (list(range(torch.cuda.device_count())) if device == "auto"
                                                else [torch.device(device).index or 0])
        self.baseline_rss = baseline_rss
        self.kind = ("torch.cuda.max_memory_allocated" if self.gpus
                     else "peak RSS above the libraries (VmHWM)" if high_water_mark() is not None
                     else "peak RSS above the libraries (ru_maxrss, since the start)")
        self._rss: PeakRss | None = None

    def synchronize(self) -> None:
        for index in self.gpus:
            torch.cuda.synchronize(index)

    def reset(self) -> None:
        self.synchronize()
        for index in self.gpus:
            torch.cuda.reset_peak_memory_stats(index)
        if not self.gpus:
            if self._rss is not None:
                self._rss.stop()
            self._rss = PeakRss().start()

    def read(self) -> int:
        self.synchronize()
        if self.gpus:
            return sum(torch.cuda.max_memory_allocated(index) for index in self.gpus)
        exact = self._rss is not None and self._rss.exact
        return (self._rss.peak() if exact else peak_rss_bytes()) - self.baseline_rss
