"""Run several schemes on one model and yield one result row per scheme as it finishes.

A model whose blocks ``qlab.analyses.streamed`` knows is evaluated block by block, each block's weights
quantized once and materialised in the compute dtype (no copy of the model). Any other model gets, per scheme,
a *shadow* of the cached base model: ``copy.deepcopy`` with a memo that maps every base parameter to itself,
so the shadow shares all tensors it does not change and the base is never written. Quantized linears in the
shadow hold their codes and dequantize in ``forward``, which keeps the extra memory at the size of the codes
rather than a second FP32 model.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from qlab.analyses.calibration import calibration_stats
from qlab.analyses.sensitivity import check_calibration
from qlab.analyses.streamed import evaluate_streamed, streamable_stack
from qlab.core.algorithms import LayerStats, needs_calibration
from qlab.core.errors import QlabError
from qlab.core.formats import get_format
from qlab.core.plan import (
    SizeReport,
    quantized_copy,
    size_report,
    unquantized_format,
    weights_dtype,
)
from qlab.core.quant import QuantScheme, check_group_sizes
from qlab.models.evaluate import Baseline, CancelCheck, EvalSpec, Progress, compute_baseline, evaluate
from qlab.models.loading import LoadedModel, quantizable_linears


@dataclass(frozen=True)
class ResultRow:
    """One finished (model, scheme) measurement; ``to_record`` is the flat JSON/CSV/table form."""

    model: str
    scheme: QuantScheme
    size: SizeReport
    metrics: dict[str, float]
    quantize_seconds: float
    eval_seconds: float
    eval_tokens: int
    extra: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.quantize_seconds + self.eval_seconds

    def to_record(self) -> dict:
        record = {"model": self.model, "label": self.scheme.label, **self.scheme.to_dict(),
                  "bits_per_weight": round(self.size.bits_per_weight, 6), "size_bytes": self.size.size_bytes,
                  "quantized_bytes": self.size.quantized_bytes, "scale_bytes": self.size.scale_bytes,
                  "other_bytes": self.size.other_bytes, "unquantized_format": unquantized_format(self.scheme),
                  **self.metrics, "seconds": round(self.seconds, 3),
                  "quantize_seconds": round(self.quantize_seconds, 3),
                  "eval_seconds": round(self.eval_seconds, 3), "eval_tokens": self.eval_tokens, **self.extra}
        return record


def parse_formats(text: str | Iterable[str]) -> list[str]:
    """'fp16, int8,int4' -> canonical names, validated, duplicates dropped, order kept."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise QlabError("no formats given; pass a comma-separated list such as fp16,int8,int4.")
    return list(dict.fromkeys(get_format(n).name for n in names))


def run_sweep(loaded: LoadedModel, schemes: list[QuantScheme], spec: EvalSpec,
              baseline: Baseline | None = None, progress: Progress | None = None,
              cancel: CancelCheck | None = None) -> Iterator[ResultRow]:
    """Quantize and evaluate each scheme in turn, yielding its row as soon as it is measured.

    ``progress(fraction, message)`` reports overall progress; ``cancel()`` returning True stops at the next
    batch with ``Cancelled``, after every finished row has been yielded.
    """
    check_schemes(loaded, schemes)  # the text's length is the front end's check: a timing run may calibrate short
    units = len(schemes) + (baseline is None)
    done = 0

    def stage(label: str) -> Progress | None:
        if progress is None:
            return None
        return lambda fraction, message: progress((done + fraction) / units, f"{label}: {message}")

    if baseline is None:
        baseline = compute_baseline(loaded, spec, stage(f"{loaded.dtype_label} baseline"), cancel)
        done += 1
    stats: dict[str, LayerStats] | None = None
    calibration: dict = {}
    streamed = streamable_stack(loaded.model) is not None
    base_dtype = weights_dtype(loaded.model)
    shells: dict = {}  # the blocks made runnable, lent to each scheme in turn (this generator's own)
    for position, scheme in enumerate(schemes):
        started = time.perf_counter()
        extra = {"baseline_ppl": baseline.metrics["ppl"]} if "ppl" in baseline.metrics else {}
        if needs_calibration(scheme):
            if stats is None:  # once per sweep, shared by every calibrated scheme
                stats, calibration = calibration_stats(loaded, spec, stage(f"{scheme.label} calibration"), cancel)
            extra.update(calibration)
        extra.update(reference_dtype=baseline.reference_dtype, evaluation="streamed" if streamed else "shadow copy",
                     unquantized_format=unquantized_format(scheme, base_dtype))
        try:
            metrics, quantized_at = measure_scheme(loaded, scheme, baseline, stats, streamed, stage(scheme.label),
                                                   cancel, shells)
        except RuntimeError as error:  # torch.OutOfMemoryError is one, and so is the CPU allocator's failure
            if not out_of_memory(error):
                raise
            metrics = None
        if metrics is None:  # raised out here, so no traceback keeps the failed scheme's tensors alive
            _release_memory()
            kept = f"the {position} finished before it are kept" if position > 1 else (
                "the one finished before it is kept" if position else "no scheme had finished")
            raise QlabError(f"'{loaded.name}' ran out of memory on {_where(loaded.device)} while measuring "
                            f"{scheme.label} ({kept}); free memory (other programs or dashboard sessions), lower "
                            "the evaluation tokens, or pick another device.")
        finished = time.perf_counter()
        row = ResultRow(loaded.name, scheme, size_report(loaded.model, scheme), metrics,
                        quantized_at - started, finished - quantized_at, baseline.tokens, extra)
        gc.collect()
        done += 1
        if progress:
            progress(done / units, f"{scheme.label}: done")
        yield row


def measure_scheme(loaded: LoadedModel, scheme: QuantScheme, baseline: Baseline,
                   stats: dict[str, LayerStats] | None, streamed: bool, progress: Progress | None = None,
                   cancel: CancelCheck | None = None, shells: dict | None = None) -> tuple[dict[str, float], float]:
    """One scheme's metrics and the moment its quantization ended (``run_sweep``'s work for one scheme);
    ``streamed``: whether the model's blocks stream (``streamable_stack``), ``shells`` as ``evaluate_streamed``
    takes them."""
    if streamed:  # each block quantized once, materialised, run for every token, freed
        timings: dict[str, float] = {}
        streaming = time.perf_counter()
        metrics = evaluate_streamed(loaded, scheme, baseline, stats, progress, cancel, timings, shells)
        return metrics, streaming + timings["quantize_s"]
    shadow = quantized_copy(loaded.model, scheme, stats)
    quantized_at = time.perf_counter()
    return evaluate(shadow, baseline, progress, cancel), quantized_at


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure: CUDA's ``OutOfMemoryError`` or the CPU allocator's."""
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def _where(device: str) -> str:
    return {"cpu": "the CPU", "auto": "the GPUs"}.get(device, device)


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_schemes(loaded: LoadedModel, schemes: list[QuantScheme], spec: EvalSpec | None = None) -> None:
    """Every check that can fail, before any work, so a bad choice costs no time; with ``spec``, also that its
    text is long enough to calibrate the schemes' algorithms (GPTQ, AWQ) on."""
    if not schemes:
        raise QlabError("no schemes to run; pick at least one format.")
    widths = {name: module.in_features for name, module in quantizable_linears(loaded.model)}
    for scheme in schemes:
        check_group_sizes(dict.fromkeys(widths, scheme), widths, loaded.name)
        size_report(loaded.model, scheme)  # every layer's storage: refuses 2:4 on inputs not in fours
    if spec is not None:
        check_calibration(loaded, schemes, spec)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
