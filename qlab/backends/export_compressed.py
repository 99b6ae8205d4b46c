"""Write a model quantized by qlab's own rounding (RTN, GPTQ, GPTQ act-order with static groups, AWQ) as a
compressed-tensors checkpoint: the ``pack-quantized`` layout that vLLM serves and transformers loads.

Each quantized linear ``L`` is stored as ``L.weight_packed`` (int32, the codes offset to unsigned and packed
along the inputs by ``compressed_tensors``' own ``pack_to_int32``), ``L.weight_scale`` (one per row and group,
at the scheme's scale dtype), ``L.weight_zero_point`` (asymmetric only: int codes packed along the rows) and
``L.weight_shape``; ``config.json`` carries the ``quantization_config`` that compressed-tensors' ``ModelCompressor``
writes. The codes and scales are qlab's, written as they are: dequantizing them gives qlab's weights bit for bit.
Everything else (embeddings, norms, a tied head) is stored at fp16, the precision qlab's simulation and size
accounting give it (``qlab.core.plan.unquantized_format``), so the reload is the simulated model itself.

The layout has no per-input activation scale, so AWQ is written the way AutoAWQ and llm-compressor write it:
one scale per input shared by the linears that read the same tensor, folded into the op before them (the
RMSNorm before q/k/v and before gate/up, up's rows before down, v's rows before o when the attention is not
grouped; a grouped-query o_proj is rounded plainly, as those tools skip it). ``qlab.core.algorithms.awq``
picks that shared scale on the stacked weights with the shared input's statistics. The sweep's AWQ keeps one
scale per linear as an explicit input scale, which no serving layout holds; the two differ slightly.

compressed-tensors 0.20 (the release that fits qlab's pins) reads activation order only as ``weight`` (static
groups, no group index): GPTQ act-order with dynamic groups (a ``g_idx``) is refused with that advice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from qlab.backends.export import (
    COMPRESSED_TENSORS,
    EXPORT_FORMAT,
    SCHEME_FILE,
    WEIGHTS_FILE,
    ExportResult,
    check_out_dir,
    file_sha256,
    package_version,
    staged,
    without_aliases,
)
from qlab.core.algorithms import LayerStats, needs_calibration, quantize_weight
from qlab.core.algorithms.awq import awq_quantize
from qlab.core.errors import QlabError
from qlab.core.plan import (
    QuantizedLinear,
    quantizable_linears,
    quantized_copy,
    unquantized_format,
    weights_dtype,
)
from qlab.core.quant import QTensor, QuantScheme, quantize
from qlab.models.loading import LoadedModel

BITS = (4, 8)  # the integer widths vLLM's weight-only (WNA16) kernels run
GROUP_SIZES = (32, 64, 128)  # the group sizes those kernels (Marlin, Machete) take
ALGORITHMS = ("rtn", "gptq", "gptq-act-order", "awq")
BACKEND = "compressed-tensors"


@dataclass(frozen=True)
class CompressedPlan:
    """What is written: each quantized linear's QTensor, and the parameters AWQ's folding changed (fp32)."""

    qtensors: Mapping[str, QTensor]
    replaced: Mapping[str, torch.Tensor]


def check_expressible(scheme: QuantScheme) -> None:
    """Raise a one-line QlabError if ``scheme`` cannot be written as pack-quantized compressed-tensors."""
    fmt = scheme.fmt
    if fmt.kind != "integer" or fmt.bits not in BITS:
        raise QlabError(f"the compressed-tensors layout serving engines run holds int4 or int8 weights, not "
                        f"{scheme.format}; pick --format int4 or int8.")
    if scheme.granularity == "tensor":
        raise QlabError("compressed-tensors int weights need one scale per output channel or per group; use "
                        "--granularity channel or group.")
    if scheme.granularity == "group" and scheme.group_size not in GROUP_SIZES:
        raise QlabError(f"group size {scheme.group_size} is not one vLLM's int4/int8 kernels take; use "
                        f"{', '.join(map(str, GROUP_SIZES))} or --granularity channel.")
    if scheme.algorithm not in ALGORITHMS:
        raise QlabError(f"{scheme.algorithm} fits a float zero-point, and the layout stores integer ones; export "
                        f"{', '.join(ALGORITHMS)}.")
    if scheme.sparsity != "none":
        raise QlabError("pack-quantized compressed-tensors is dense; export without --sparsity.")
    if scheme.algorithm == "gptq-act-order" and scheme.granularity == "group" and not scheme.static_groups:
        raise QlabError("compressed-tensors 0.20 no longer reads a group index (g_idx, activation order 'group'); "
                        "add --static-groups (its activation order 'weight'), which keeps groups in input order.")


def _plan_names(model: torch.nn.Module, scheme: QuantScheme) -> list[str]:
    """The linears written quantized: all but the output head (kept at full width, as llm-compressor does)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [name for name, module in quantizable_linears(model) if module is not head]
    for name in names:
        shape = tuple(model.get_submodule(name).weight.shape)
        try:
            scheme.storage_bytes(shape)  # a group size that does not divide the inputs
        except QlabError:
            raise QlabError(f"group size {scheme.group_size} does not divide the {shape[1]} inputs of '{name}'; "
                            f"use a group size that divides every layer (64 for SmolLM2) or --granularity "
                            "channel.") from None
    return names


def _awq_blocks(model: torch.nn.Module, names: list[str]) -> list[dict[str, str]]:
    """Per decoder layer, the module names AWQ's folding needs (Llama-style layers only)."""
    parts = {"norm1": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
             "o": "self_attn.o_proj", "norm2": "post_attention_layernorm", "gate": "mlp.gate_proj",
             "up": "mlp.up_proj", "down": "mlp.down_proj"}
    modules = dict(model.named_modules())
    blocks = [{key: f"{name[: -len('input_layernorm')]}{part}" for key, part in parts.items()}
              for name in modules if name.endswith("input_layernorm")]
    covered = {block[key] for block in blocks for key in ("q", "k", "v", "o", "gate", "up", "down")}
    if not blocks or any(name not in modules for block in blocks for name in block.values()) \
            or set(names) != covered:
        raise QlabError("AWQ exports fold their scales into the RMSNorm and linears of Llama-style decoder layers "
                        "(input_layernorm, q/k/v/o_proj, post_attention_layernorm, gate/up/down_proj), and this "
                        "model has other layers; export it with gptq or rtn.")
    return blocks


def _shared_awq(weights: list[torch.Tensor], stats: LayerStats, scheme: QuantScheme
                ) -> tuple[list[QTensor], torch.Tensor]:
    """AWQ over linears reading one input: one scale searched on their stacked rows (groups run along the
    inputs, so stacking rows changes no group), split back into one QTensor each, and the fp16 ``1 / s``."""
    stacked = awq_quantize(torch.cat(weights), stats.input_abs_mean, stats.hessian, scheme)
    groups = stacked.scale.numel() // stacked.shape[0]
    out, row = [], 0
    for weight in weights:
        rows = slice(row, row + weight.shape[0])
        zero = None if stacked.zero_point is None else stacked.zero_point.reshape(-1, groups)[rows].reshape(-1)
        out.append(QTensor(stacked.codes[rows], stacked.scale.reshape(-1, groups)[rows].reshape(-1), zero, scheme,
                           weight.shape))
        row += weight.shape[0]
    return out, stacked.input_scale


def _awq_plan(model: torch.nn.Module, names: list[str], scheme: QuantScheme, stats: Mapping[str, LayerStats],
              progress: Callable[[float, str], None]) -> CompressedPlan:
    qtensors: dict[str, QTensor] = {}
    replaced: dict[str, torch.Tensor] = {}
    rtn = dataclasses.replace(scheme, algorithm="rtn")
    blocks = _awq_blocks(model, names)
    for done, block in enumerate(blocks):
        progress(done / len(blocks), f"AWQ {block['norm1'].removesuffix('.input_layernorm')}")
        weight = {key: model.get_submodule(block[key]).weight.detach().to(torch.float32)
                  for key in ("q", "k", "v", "o", "gate", "up", "down")}
        # down reads act(gate) * up: its 1/s goes into up's rows before up itself is rounded.
        [qtensors[block["down"]]], inverse = _shared_awq([weight["down"]], stats[block["down"]], scheme)
        weight["up"] = weight["up"] * inverse.to(torch.float32)[:, None]
        if weight["v"].shape[0] == weight["o"].shape[1]:  # one v row per o input: fold into v, as for up
            [qtensors[block["o"]]], inverse = _shared_awq([weight["o"]], stats[block["o"]], scheme)
            weight["v"] = weight["v"] * inverse.to(torch.float32)[:, None]
        else:  # grouped-query attention: a v row feeds several o inputs, which would need one scale
            qtensors[block["o"]] = quantize(weight["o"], rtn)
        for norm, keys in (("norm1", ("q", "k", "v")), ("norm2", ("gate", "up"))):
            quantized, inverse = _shared_awq([weight[k] for k in keys], stats[block[keys[0]]], scheme)
            qtensors.update({block[k]: q for k, q in zip(keys, quantized, strict=True)})
            gain = model.get_submodule(block[norm]).weight.detach().to(torch.float32)
            replaced[f"{block[norm]}.weight"] = gain * inverse.to(torch.float32)
    return CompressedPlan(qtensors, replaced)


def quantize_for_export(loaded: LoadedModel, scheme: QuantScheme,
                        calibration: Mapping[str, LayerStats] | None = None,
                        progress: Callable[[float, str], None] | None = None) -> CompressedPlan:
    """Every linear but the head quantized with ``scheme`` (AWQ with shared, foldable scales); calibrated
    algorithms need ``calibration`` (``qlab.analyses.calibration.calibration_stats``)."""
    check_expressible(scheme)
    names = _plan_names(loaded.model, scheme)
    progress = progress or (lambda fraction, message: None)
    if needs_calibration(scheme) and calibration is None:
        raise QlabError(f"{scheme.label} needs calibration statistics for every layer; collect them with "
                        "qlab.analyses.calibration.calibration_stats.")
    if scheme.algorithm == "awq":
        return _awq_plan(loaded.model, names, scheme, calibration, progress)
    stats = calibration or {}
    qtensors = {}
    for done, name in enumerate(names):
        progress(done / len(names), f"{scheme.algorithm} {name}")
        qtensors[name] = quantize_weight(loaded.model.get_submodule(name).weight, scheme, stats.get(name))
    return CompressedPlan(qtensors, {})


def simulated_model(loaded: LoadedModel, plan: CompressedPlan) -> torch.nn.Module:
    """qlab's simulation of the checkpoint: a copy of the model with the rest at 16 bits (as
    ``quantized_copy`` does), AWQ's folded parameters in place, and each linear dequantized from its QTensor."""
    rest = unquantized_format(next(iter(plan.qtensors.values())).scheme, weights_dtype(loaded.model))
    shadow = quantized_copy(loaded.model, {})  # no linear quantized: every parameter rounded to ``rest``
    for name, value in plan.replaced.items():
        module, _, attribute = name.rpartition(".")
        parameter = torch.nn.Parameter(_round(value, rest).to(torch.float32), requires_grad=False)
        setattr(shadow.get_submodule(module), attribute, parameter)
    for name, qtensor in plan.qtensors.items():
        shadow.set_submodule(name, QuantizedLinear(qtensor, shadow.get_submodule(name).bias))
    return shadow


def _round(value: torch.Tensor, fmt_name: str) -> torch.Tensor:
    from qlab.core.formats import get_format

    return get_format(fmt_name).round(value.detach().to(torch.float32))


def _checkpoint_tensors(model: torch.nn.Module, plan: CompressedPlan, rest: str) -> tuple[dict, dict]:
    """The safetensors dict (packed linears, the rest at ``rest``) and the tied aliases left out."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    state, aliases = without_aliases(model.state_dict())
    quantized = {f"{name}.weight" for name in plan.qtensors}
    tensors = {name: _round(plan.replaced.get(name, tensor), rest) if tensor.is_floating_point() else tensor
               for name, tensor in state.items() if name not in quantized}
    for name, qtensor in plan.qtensors.items():
        rows, bits = qtensor.shape[0], qtensor.scheme.fmt.bits
        tensors[f"{name}.weight_packed"] = pack_to_int32(qtensor.codes.to(torch.int8), bits)
        tensors[f"{name}.weight_scale"] = qtensor.scale.reshape(rows, -1)
        tensors[f"{name}.weight_shape"] = torch.tensor(tuple(qtensor.shape), dtype=torch.int64)
        if qtensor.zero_point is not None:
            zero = qtensor.zero_point.to(torch.int8).reshape(rows, -1)
            tensors[f"{name}.weight_zero_point"] = pack_to_int32(zero, bits, packed_dim=0)
    return {k: v.contiguous() for k, v in tensors.items()}, aliases


def quantization_config(model: torch.nn.Module, scheme: QuantScheme, quantized: list[str]):
    """compressed-tensors' ``QuantizationConfig`` for the checkpoint: one group for every Linear, the linears
    left alone (the head) ignored."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    group = scheme.granularity == "group"
    args = QuantizationArgs(num_bits=scheme.fmt.bits, type="int", symmetric=scheme.symmetric,
                            strategy="group" if group else "channel", group_size=scheme.group_size if group else None,
                            actorder="weight" if scheme.algorithm == "gptq-act-order" else None,
                            zp_dtype=None if scheme.symmetric else torch.int8)
    ignored = sorted(name for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) and name not in quantized)
    return QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")},
        format="pack-quantized", quantization_status="compressed", ignore=ignored)


def export_compressed(loaded: LoadedModel, scheme: QuantScheme, out_dir: str | os.PathLike, force: bool = False,
                      spec=None, progress: Callable[[float, str], None] | None = None,
                      calibration: Mapping[str, LayerStats] | None = None) -> ExportResult:
    """Quantize ``loaded`` with ``scheme`` and write a compressed-tensors checkpoint to ``out_dir`` that
    ``transformers.AutoModelForCausalLM.from_pretrained`` and vLLM load. Calibrated algorithms use
    ``calibration`` if given (a sweep's), else calibrate on ``spec``'s text. Checks the scheme, the model's
    shapes and ``out_dir`` before any work."""
    started = time.perf_counter()
    out_dir = check_export(loaded, scheme, out_dir, force)
    progress = progress or (lambda fraction, message: None)
    share = 0.5 if needs_calibration(scheme) and calibration is None else 0.0  # of the bar: calibration, rounding
    if share:
        from qlab.analyses.calibration import calibration_stats
        from qlab.models.evaluate import EvalSpec

        calibration, _ = calibration_stats(loaded, spec or EvalSpec(),
                                           lambda fraction, message: progress(share * fraction, message))
    plan = quantize_for_export(loaded, scheme, calibration,
                               lambda fraction, message: progress(share + (1 - share) * fraction, message))
    progress(1.0, "writing the checkpoint")
    result = write_compressed(loaded, scheme, plan, out_dir, force)
    return dataclasses.replace(result, seconds=time.perf_counter() - started)


def check_export(loaded: LoadedModel, scheme: QuantScheme, out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Everything that can be known before calibrating: the scheme fits the layout, the model's shapes fit
    the scheme (and AWQ's folding), the library is installed and ``out_dir`` may be written; its resolved path."""
    check_expressible(scheme)
    names = _plan_names(loaded.model, scheme)
    if scheme.algorithm == "awq":
        _awq_blocks(loaded.model, names)
    _check_library()
    out_dir = Path(out_dir).expanduser().resolve()
    check_out_dir(out_dir, force)
    return out_dir


def _check_library() -> None:

    if package_version(COMPRESSED_TENSORS) is None:
        raise QlabError("the compressed-tensors package is not installed; `pip install -r requirements.txt`.")


def write_compressed(loaded: LoadedModel, scheme: QuantScheme, plan: CompressedPlan, out_dir: str | os.PathLike,
                     force: bool = False) -> ExportResult:
    """Write ``plan`` (from ``quantize_for_export``) as a compressed-tensors checkpoint in ``out_dir``: weights,
    ``config.json`` with its ``quantization_config``, tokenizer files and ``qlab_scheme.json``."""
    from compressed_tensors.compressors import ModelCompressor
    from safetensors.torch import save_file

    from qlab import __version__
    from qlab.models.loading import model_sha256

    started = time.perf_counter()
    _check_library()
    rest = unquantized_format(scheme, weights_dtype(loaded.model))
    out_dir = Path(out_dir).expanduser().resolve()
    with staged(out_dir, force) as partial:
        tensors, aliases = _checkpoint_tensors(loaded.model, plan, rest)
        save_file(tensors, partial / WEIGHTS_FILE, metadata={"format": "pt"})
        config = loaded.model.config.to_dict()
        # The checkpoint's own dtype, so a plain from_pretrained builds the model at the precision it stores.
        config["dtype"] = {"fp16": "float16", "bf16": "bfloat16"}.get(rest, "float32")
        (partial / "config.json").write_text(json.dumps(config, indent=2))
        ModelCompressor(quantization_config(loaded.model, scheme, list(plan.qtensors))).update_config(str(partial))
        if hasattr(loaded.tokenizer, "save_pretrained"):
            loaded.tokenizer.save_pretrained(partial)
        record = {
            "format": EXPORT_FORMAT, "qlab": __version__, "backend": BACKEND, "library": COMPRESSED_TENSORS,
            "library_version": package_version(COMPRESSED_TENSORS), "torch": torch.__version__, "model": loaded.name,
            "model_kind": loaded.kind, "model_sha256": model_sha256(loaded), "scheme": scheme.to_dict(),
            "layers": {name: q.scheme.to_dict() for name, q in plan.qtensors.items()}, "unquantized_format": rest,
            "awq_folded": sorted(plan.replaced), "weights_file": WEIGHTS_FILE,
            "weights_sha256": file_sha256(partial / WEIGHTS_FILE), "tied": aliases,
        }
        (partial / SCHEME_FILE).write_text(json.dumps(record, indent=1))
        files = tuple(sorted(p.name for p in partial.iterdir()))
        total = sum(p.stat().st_size for p in partial.iterdir())
        weights_bytes = (partial / WEIGHTS_FILE).stat().st_size
    return ExportResult(out_dir, BACKEND, files, WEIGHTS_FILE, weights_bytes, total, time.perf_counter() - started)
