"""Run several schemes on one model and yield one result row per scheme as it finishes.

Each scheme gets a *shadow* of the cached base model: ``copy.deepcopy`` with a memo that maps every base
parameter to itself, so the shadow shares all tensors it does not change and the base is never written.
Quantized linears in the shadow hold their codes and dequantize in ``forward``, which keeps the extra memory
at the size of the codes rather than a second FP32 model.
"""

from __future__ import annotations

import copy
import gc
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from qlab.core.algorithms import calibration_hessians, needs_calibration, quantize_weight
from qlab.core.errors import QlabError
from qlab.models.evaluate import Baseline, CancelCheck, EvalSpec, Progress, compute_baseline, evaluate
from qlab.core.formats import get_format
from qlab.models.loading import LoadedModel, quantizable_linears
from qlab.core.quant import QTensor, QuantScheme, check_group_sizes


class QuantizedLinear(torch.nn.Module):
    """A linear layer whose weight lives as a QTensor and is dequantized on each call (weight-only PTQ)."""

    def __init__(self, qweight: QTensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.qweight = qweight
        self.bias = bias
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.qweight.dequantize(x.dtype), self.bias)


# A whole-model scheme, or a per-layer plan: linear module name -> scheme (a mixed-precision assignment).
SchemePlan = QuantScheme | Mapping[str, QuantScheme]


def unquantized_format(plan: SchemePlan) -> str:
    """Storage format of tensors the plan leaves alone (embeddings, norms, biases, a tied head).

    A plain-cast scheme (fp32/fp16/bf16) casts everything; anything else keeps them at fp16, as deployments do.
    """
    schemes = {plan} if isinstance(plan, QuantScheme) else set(plan.values())
    formats = {s.format for s in schemes}
    if len(formats) == 1 and not next(iter(schemes)).fmt.scaled:
        return formats.pop()
    return "fp16"


def layer_schemes(model: torch.nn.Module, plan: SchemePlan) -> dict[str, QuantScheme]:
    """Which scheme each quantizable linear gets; layers a per-layer plan omits stay unquantized."""
    names = [name for name, _ in quantizable_linears(model)]
    if isinstance(plan, QuantScheme):
        return dict.fromkeys(names, plan)
    unknown = sorted(set(plan) - set(names))
    if unknown:
        raise QlabError(f"the plan names {len(unknown)} layer(s) that are not quantizable linears of this model "
                        f"(e.g. '{unknown[0]}'); use names from the Model page's layer table.")
    return {name: plan[name] for name in names if name in plan}


@dataclass(frozen=True)
class SizeReport:
    """Bytes of a model as stored under a scheme, split the way the Memory page shows them."""

    quantized_params: int
    quantized_bytes: int  # codes + scales + zero-points of the quantized linears
    scale_bytes: int  # the scales and zero-points part of quantized_bytes
    other_params: int
    other_bytes: int

    @property
    def size_bytes(self) -> int:
        return self.quantized_bytes + self.other_bytes

    @property
    def bits_per_weight(self) -> float:
        """Bits per quantized weight, overhead included."""
        return 8 * self.quantized_bytes / max(1, self.quantized_params)


def size_report(model: torch.nn.Module, plan: SchemePlan) -> SizeReport:
    """Exact storage of a model under a scheme or per-layer plan, from shapes and the format registry."""
    assignment = layer_schemes(model, plan)
    modules = dict(model.named_modules())
    quantized_ids = set()
    quantized_params = quantized_bytes = scale_bytes = 0
    for name, scheme in assignment.items():
        weight = modules[name].weight
        parts = scheme.storage_bytes(tuple(weight.shape))
        quantized_ids.add(id(weight))
        quantized_params += weight.numel()
        quantized_bytes += sum(parts.values())
        scale_bytes += parts["scales"] + parts["zero_points"]
    other_bits = get_format(unquantized_format(plan)).bits
    other_params = sum(p.numel() for p in model.parameters() if id(p) not in quantized_ids)
    return SizeReport(quantized_params, quantized_bytes, scale_bytes, other_params,
                      other_params * other_bits // 8)


def quantized_copy(model: torch.nn.Module, plan: SchemePlan,
                   hessians: Mapping[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """A shadow of ``model`` with the scheme (or per-layer plan) applied; ``model`` itself is only read.

    ``hessians`` (linear name -> H from calibration inputs) are needed by schemes whose algorithm uses them
    (GPTQ); ``run_sweep`` collects them once per sweep.
    """
    rest_format = get_format(unquantized_format(plan))
    assignment = layer_schemes(model, plan)
    modules = dict(model.named_modules())
    quantized_ids = {id(modules[name].weight) for name in assignment}
    memo: dict[int, object] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        memo[id(tensor)] = tensor
        if isinstance(tensor, torch.nn.Parameter) and id(tensor) not in quantized_ids and rest_format.bits < 32:
            memo[id(tensor)] = torch.nn.Parameter(rest_format.round(tensor.detach()).to(tensor.dtype),
                                                  requires_grad=False)
    shadow = copy.deepcopy(model, memo)
    for name, scheme in assignment.items():
        bias = shadow.get_submodule(name).bias
        hessian = None if hessians is None else hessians.get(name)
        shadow.set_submodule(name, QuantizedLinear(quantize_weight(modules[name].weight, scheme, hessian), bias))
    return shadow


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
    check_schemes(loaded, schemes)
    units = len(schemes) + (baseline is None)
    done = 0

    def stage(label: str) -> Progress | None:
        if progress is None:
            return None
        return lambda fraction, message: progress((done + fraction) / units, f"{label}: {message}")

    if baseline is None:
        baseline = compute_baseline(loaded, spec, stage("FP32 baseline"), cancel)
        done += 1
    hessians: dict[str, torch.Tensor] | None = None
    calibration: dict = {}
    for scheme in schemes:
        started = time.perf_counter()
        extra = {"baseline_ppl": baseline.metrics["ppl"]} if "ppl" in baseline.metrics else {}
        if needs_calibration(scheme):
            if hessians is None:  # once per sweep, shared by every GPTQ scheme
                hessians, calibration = calibration_hessians(loaded, spec, stage(f"{scheme.label} calibration"),
                                                             cancel)
            extra.update(calibration)
        shadow = quantized_copy(loaded.model, scheme, hessians)
        quantized_at = time.perf_counter()
        metrics = evaluate(shadow, baseline, stage(scheme.label), cancel)
        finished = time.perf_counter()
        row = ResultRow(loaded.name, scheme, size_report(loaded.model, scheme), metrics,
                        quantized_at - started, finished - quantized_at, baseline.tokens, extra)
        del shadow
        gc.collect()
        done += 1
        if progress:
            progress(done / units, f"{scheme.label}: done")
        yield row


def check_schemes(loaded: LoadedModel, schemes: list[QuantScheme]) -> None:
    """Every check that can fail, before any work, so a bad choice costs no time."""
    if not schemes:
        raise QlabError("no schemes to run; pick at least one format.")
    widths = {name: module.in_features for name, module in quantizable_linears(loaded.model)}
    for scheme in schemes:
        check_group_sizes(dict.fromkeys(widths, scheme), widths, loaded.name)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
