"""A scheme plan applied to a model: which linears it quantizes, the exact bytes it stores, the shadow copy.

Size accounting lives here, beside the scheme, so the memory planner, the sweep and export agree on one count
without importing each other.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from qlab.core.algorithms import LayerStats, quantize_weight
from qlab.core.algorithms.awq import InputScaledQTensor
from qlab.core.errors import QlabError
from qlab.core.formats import get_format
from qlab.core.quant import QTensor, QuantScheme


def quantizable_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The linear layers a weight-only scheme quantizes: every nn.Linear except an output head whose weight
    is tied to the input embedding (quantizing it would quantize the embedding table too)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = None if embedding is None else embedding.weight  # looked up once, not for each of hundreds of linears
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module.weight is not tied]


class QuantizedLinear(torch.nn.Module):
    """A linear layer whose weight lives as a QTensor and is dequantized on each call (weight-only PTQ).

    An AWQ weight stores the codes of ``W diag(s)``: the layer multiplies its input by the stored ``1 / s``
    first (``input_scale``), as an engine does where the scale cannot be folded into the op before.
    """

    def __init__(self, qweight: QTensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.qweight = qweight
        self.bias = bias
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.input_scale = qweight.input_scale if isinstance(qweight, InputScaledQTensor) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias computes in the input's dtype, as the weight does: a bf16 layer fed fp32 activations (a CPU
        # without native bf16 math) would otherwise fail.
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.input_scale is None:
            return torch.nn.functional.linear(x, self.qweight.dequantize(x.dtype), bias)
        return torch.nn.functional.linear(x * self.input_scale.to(x.dtype), self.qweight.dequantize_scaled(x.dtype),
                                          bias)


# A whole-model scheme, or a per-layer plan: linear module name -> scheme (a mixed-precision assignment).
SchemePlan = QuantScheme | Mapping[str, QuantScheme]


def weights_dtype(model: torch.nn.Module) -> torch.dtype:
    """The floating dtype holding most of a model's parameters."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


_SIXTEEN_BITS = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def unquantized_format(plan: SchemePlan, base: torch.dtype | None = None) -> str:
    """Storage format of tensors the plan leaves alone (embeddings, norms, biases, a tied head) in a model whose
    weights are ``base`` (``weights_dtype``).

    A plain-cast scheme (fp32/fp16/bf16) casts everything. Anything else keeps them at 16 bits, as deployments
    do: a 16-bit model's own dtype (torchao, bitsandbytes and the Hugging Face quantizers leave a bf16
    checkpoint's other modules in bf16; fp16 would turn its values above 65504 into inf and flush its smallest
    ones), fp16 for a model in fp32.
    """
    schemes = {plan} if isinstance(plan, QuantScheme) else set(plan.values())
    formats = {s.format for s in schemes}
    if len(formats) == 1 and not next(iter(schemes)).fmt.scaled:
        return formats.pop()
    return _SIXTEEN_BITS.get(base, "fp16")


def layer_schemes(model: torch.nn.Module, plan: SchemePlan, names: Sequence[str] | None = None
                  ) -> dict[str, QuantScheme]:
    """Which scheme each quantizable linear gets; layers a per-layer plan omits stay unquantized. ``names``: the
    model's quantizable linears, where the caller has them already."""
    names = [name for name, _ in quantizable_linears(model)] if names is None else names
    if isinstance(plan, QuantScheme):
        return dict.fromkeys(names, plan)
    unknown = sorted(set(plan) - set(names))
    if unknown:
        raise QlabError(f"the plan names {len(unknown)} layer(s) that are not quantizable linears of this model "
                        f"(e.g. '{unknown[0]}'); use names from the Model page's layer table.")
    return {name: plan[name] for name in names if name in plan}


# Where each part of ``QuantScheme.storage_bytes`` is counted in a SizeReport; codes are what is left.
PART_FIELDS = {"scales": "scale_bytes", "zero_points": "scale_bytes", "metadata": "metadata_bytes",
               "group_index": "index_bytes", "input_scales": "awq_scale_bytes"}


@dataclass(frozen=True)
class SizeReport:
    """Bytes of a model as stored under a scheme, split the way the Memory page shows them."""

    quantized_params: int
    quantized_bytes: int  # all the quantized linears store: codes, scales, zero-points and what algorithms add
    scale_bytes: int  # the scales and zero-points part of quantized_bytes
    other_params: int
    other_bytes: int
    metadata_bytes: int = 0  # 2:4 sparsity's positions of the kept values (2 bits each)
    index_bytes: int = 0  # GPTQ act-order's group index (an int32 per input)
    awq_scale_bytes: int = 0  # AWQ's input scales (an fp16 per input), unless folded into the op before

    @classmethod
    def from_parts(cls, matrices: Iterable[tuple[int, Mapping[str, int], int]], other_params: int,
                   other_bytes: int) -> SizeReport:
        """The report of quantized matrices given as (values, ``storage_bytes`` parts, how many of them), beside
        ``other_params`` values stored in ``other_bytes``."""
        totals = dict.fromkeys(("quantized_params", "quantized_bytes", *PART_FIELDS.values()), 0)
        for values, parts, count in matrices:
            totals["quantized_params"] += values * count
            totals["quantized_bytes"] += sum(parts.values()) * count
            for part, size in parts.items():
                if part in PART_FIELDS:
                    totals[PART_FIELDS[part]] += size * count
        return cls(other_params=other_params, other_bytes=other_bytes, **totals)

    @property
    def code_bytes(self) -> int:
        """The quantized values themselves: what the quantized linears store besides scales and algorithm parts."""
        return (self.quantized_bytes - self.scale_bytes - self.metadata_bytes - self.index_bytes
                - self.awq_scale_bytes)

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
    weights = [modules[name].weight for name in assignment]
    quantized_ids = {id(weight) for weight in weights}
    other_bits = get_format(unquantized_format(plan)).bits
    other_params = sum(p.numel() for p in model.parameters() if id(p) not in quantized_ids)
    return SizeReport.from_parts(((w.numel(), scheme.storage_bytes(tuple(w.shape)), 1)
                                  for w, scheme in zip(weights, assignment.values(), strict=True)),
                                 other_params, other_params * other_bits // 8)


def quantized_copy(model: torch.nn.Module, plan: SchemePlan,
                   calibration: Mapping[str, LayerStats] | None = None) -> torch.nn.Module:
    """A shadow of ``model`` with the scheme (or per-layer plan) applied; ``model`` itself is only read.

    ``calibration`` (linear name -> its input statistics) is needed by schemes whose algorithm uses it (GPTQ,
    AWQ, SparseGPT); ``run_sweep`` collects it once per sweep.
    """
    rest_format = get_format(unquantized_format(plan, weights_dtype(model)))
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
        stats = None if calibration is None else calibration.get(name)
        shadow.set_submodule(name, QuantizedLinear(quantize_weight(modules[name].weight, scheme, stats), bias))
    return shadow


def layer_scheme_map(model: torch.nn.Module, plan: SchemePlan) -> dict[str, dict]:
    """``{linear module name: QuantScheme.to_dict()}`` for a scheme or per-layer plan on a model: the exact
    recipe of a simulated quantization, reloadable with ``QuantScheme.from_dict`` and ``plan.quantized_copy``."""
    return {name: scheme.to_dict() for name, scheme in layer_schemes(model, plan).items()}


# --- a plan as a file: one JSON format written, every older qlab spelling read ------------------------------

PLAN_FORMAT = "qlab-plan/1"
# Older files name their format and keep the schemes under their own key: the store's per-layer scheme export
# (``runs export-scheme``, ``export --scheme-json``) and the Sensitivity page's mix.
OLD_PLAN_FORMATS = {"qlab-layer-schemes": "layers", "qlab.mixed/1": "modules"}

_QUANTO_WEIGHTS = {"int8": "qint8", "int4": "qint4", "int2": "qint2", "fp8_e4m3": "qfloat8_e4m3fn",
                   "fp8_e5m2": "qfloat8_e5m2"}


_NOT_REPRODUCED = {"gptq": "GPTQ's error-compensated rounding", "gptq-act-order": "GPTQ act-order's rounding",
                   "awq": "AWQ's per-input-channel scales", "hqq": "HQQ's optimised scales and zero-points"}


def _algorithm_note(scheme: QuantScheme, library: str) -> str | None:
    """Why ``library``'s entry for ``scheme`` does not give qlab's weights: the library rounds the original
    weights to nearest, so it keeps the format and groups but not a calibrated algorithm or 2:4 pruning."""
    missing = [_NOT_REPRODUCED[scheme.algorithm]] if scheme.algorithm in _NOT_REPRODUCED else []
    if scheme.algorithm == "gptq-act-order" and not scheme.static_groups:
        missing.append("its groups in activation order (a group index per input)")
    if scheme.sparsity != "none":
        missing.append(f"the {scheme.sparsity} pruning")
    if not missing:
        return None
    return (f"{library} rounds the original weights to nearest: this entry keeps the number format but not "
            f"{' nor '.join(missing)}, so its weights and outputs differ from qlab's.")


def _torchao_config(scheme: QuantScheme) -> dict | None:
    """The torchao ``quantize_`` config (class name and keyword arguments) that applies ``scheme``; with a
    ``note`` where the config keeps the layout but not the scheme's algorithm or sparsity."""
    fmt = scheme.fmt
    if not fmt.scaled:
        return None  # a plain cast: convert the module's dtype instead of quantizing it
    note = _algorithm_note(scheme, "torchao's quantize_")
    config = _torchao_layout(scheme)
    return config if config is None or note is None else {**config, "note": note}


def _torchao_layout(scheme: QuantScheme) -> dict | None:
    fmt = scheme.fmt
    granularity = {"tensor": "PerTensor()", "channel": "PerAxis(0)"}.get(scheme.granularity,
                                                                       f"PerGroup({scheme.group_size})")
    if fmt.kind == "integer":
        return {"config": "IntxWeightOnlyConfig", "weight_dtype": f"torch.int{fmt.bits}",
                "granularity": granularity, "mapping_type": "SYMMETRIC" if scheme.symmetric else "ASYMMETRIC",
                "scale_dtype": f"torch.{ {'fp16': 'float16', 'bf16': 'bfloat16', 'fp32': 'float32'}[scheme.scale_dtype] }"}
    if scheme.format == "fp8_e4m3":
        return {"config": "Float8WeightOnlyConfig", "weight_dtype": "torch.float8_e4m3fn"}
    return None


def _quanto_entry(scheme: QuantScheme) -> dict:
    """optimum-quanto's spelling of ``scheme`` (``'none'`` where it has no weight qtype), with the same ``note``
    as torchao's entry where quanto's rounding cannot give the scheme's weights."""
    weights = _QUANTO_WEIGHTS.get(scheme.format, "none")
    note = None if weights == "none" else _algorithm_note(scheme, "optimum-quanto's quantize")
    return {"weights": weights, "activations": "none", **({"note": note} if note else {})}


def plan_record(model: torch.nn.Module, plan: SchemePlan, model_id: str, model_sha256: str | None = None,
                **extra: object) -> dict:
    """A scheme or per-layer plan on a model as JSON: the model's id and weights hash, each quantized linear's
    QuantScheme (``layers``), the format of everything else, the exact size, and the same plan as a torchao
    ``FqnToConfig`` mapping and an optimum-quanto map (entries a library cannot express are null / ``'none'``,
    the reason in ``notes``). ``extra`` (JSON-ready: a mix's budget and measured error...) is kept as given."""
    assignment = layer_schemes(model, plan)
    size = size_report(model, plan)
    torchao = {name: _torchao_config(scheme) for name, scheme in assignment.items()}
    quanto = {name: _quanto_entry(scheme) for name, scheme in assignment.items()}
    formats = sorted({scheme.format for scheme in assignment.values()})
    notes = [f"{f}: torchao has no quantize_ config for it (null entries)" for f in formats
             if any(torchao[n] is None and s.format == f and s.fmt.scaled for n, s in assignment.items())]
    notes += [f"{f}: optimum-quanto has no weight qtype for it ('none')" for f in formats
              if f not in _QUANTO_WEIGHTS]
    if any(_algorithm_note(scheme, "") for scheme in assignment.values()):
        notes.append("torchao and optimum-quanto round to nearest: entries for layers rounded or pruned otherwise "
                     "keep the format but not the method (each such entry's note says what is missing).")
    notes.append("optimum-quanto picks its own scale granularity (per-channel for 8 bits, groups for 4/2 bits); "
                 "torchao's entries keep this plan's granularity.")
    return {"format": PLAN_FORMAT, "model": model_id, "model_sha256": model_sha256,
            "unquantized_format": unquantized_format(plan, weights_dtype(model)), "bits_per_weight": size.bits_per_weight,
            "size_bytes": size.size_bytes, **extra,
            "layers": {name: scheme.to_dict() for name, scheme in assignment.items()},
            "torchao": {"FqnToConfig": torchao}, "optimum_quanto": quanto, "notes": notes}


def read_plan(record: Mapping) -> dict[str, QuantScheme]:
    """The per-layer plan (linear module name -> QuantScheme) of a ``plan_record`` file, of an older
    ``qlab-layer-schemes`` or ``qlab.mixed/1`` file, or of a downloaded recommendation (its ``plan``), ready
    for ``quantized_copy``."""
    if isinstance(record, Mapping) and "format" not in record and isinstance(record.get("plan"), Mapping):
        record = record["plan"]
    written = record.get("format") if isinstance(record, Mapping) else None
    key = "layers" if written == PLAN_FORMAT else OLD_PLAN_FORMATS.get(written) if isinstance(written, str) else None
    if key is None or not isinstance(record.get(key), Mapping):
        raise QlabError(f"this is not a qlab plan file (its 'format' must be {PLAN_FORMAT}, or an older "
                        f"{' or '.join(OLD_PLAN_FORMATS)} with its schemes); export the plan again.")
    return {name: QuantScheme.from_dict(scheme) for name, scheme in record[key].items()}
