"""torch itself: the FP32 and BF16 references, and torch.ao dynamic INT8 (the seeds' "PyTorch quantization")."""

from __future__ import annotations

import copy
import warnings

import torch

from qlab.backends.base import ActivationQuant, Backend, Tolerance, register
from qlab.core.quant import QuantScheme
from qlab.models.loading import LoadedModel, quantizable_linears


def shadow(model: torch.nn.Module) -> torch.nn.Module:
    """A new module tree sharing every tensor with ``model`` (for backends that change modules, not weights)."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def _always(device: str) -> tuple[bool, str]:
    return True, "built into torch"


def _fp32(loaded: LoadedModel, device: str) -> torch.nn.Module:
    if device == "cpu":
        return shadow(loaded.model)
    return copy.deepcopy(loaded.model).to(device)


def _bf16(loaded: LoadedModel, device: str) -> torch.nn.Module:
    # A full copy: Module.to() rewrites each shared Parameter's .data in place, which would cast the base.
    return copy.deepcopy(loaded.model).to(device=device, dtype=torch.bfloat16)


def _dynamic_int8_available(device: str) -> tuple[bool, str]:
    engines = torch.backends.quantized.supported_engines
    if not {"x86", "fbgemm", "qnnpack"} & set(engines):
        return False, f"this torch build has no quantized CPU engine (has {engines})."
    return True, f"quantized engine {torch.backends.quantized.engine}"


def _dynamic_int8(loaded: LoadedModel, device: str) -> torch.nn.Module:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    # Only the linears qlab's sweep quantizes: a head tied to the embedding stays FP32, as in the twin.
    spec = {name: per_channel_dynamic_qconfig for name, _ in quantizable_linears(loaded.model)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's "migrate to torchao" notice; the API still works
        return quantize_dynamic(loaded.model, spec, dtype=torch.qint8, inplace=False)


register(Backend(
    slug="fp32", library="torch", title="torch FP32 (the baseline)", weight_format="fp32", compute_dtype="fp32",
    devices=("cpu", "cuda"), kinds=("causal-lm", "embedding"), twin=lambda model: QuantScheme("fp32"),
    note="Reads 4 bytes per weight; every other path is compared with it.",
    _apply=_fp32, _available=_always, tolerance=Tolerance(kld_abs=1e-6, kld_rel=0.0, cosine_abs=1e-6)))

register(Backend(
    slug="bf16", library="torch", title="torch BF16 weights and activations", weight_format="bf16",
    compute_dtype="bf16", devices=("cpu", "cuda"), kinds=("causal-lm", "embedding"),
    twin=lambda model: QuantScheme("bf16"),
    note="Half the bytes of FP32; fast on GPUs and on CPUs with AVX512-BF16 or AMX, emulated elsewhere.",
    _apply=_bf16, _available=_always,
    tolerance=Tolerance(kld_abs=2e-3, kld_rel=1.0, cosine_abs=2e-3,
                        why="the twin rounds weights only; here activations are BF16 too")))

register(Backend(
    slug="torch-dynamic-int8", library="torch", title="torch.ao quantize_dynamic: INT8 weights, INT8 activations",
    weight_format="int8", compute_dtype="int8", devices=("cpu",), kinds=("causal-lm", "embedding"),
    twin=lambda model: QuantScheme("int8", "channel"),
    note="fbgemm/oneDNN INT8 GEMM (VNNI where the CPU has it); activations quantized per tensor at run time.",
    _apply=_dynamic_int8, _available=_dynamic_int8_available, quantizes_activations=True,
    # fbgemm's dynamic linear calls with reduce_range=True: 7-bit unsigned activations, one range per tensor.
    activations=ActivationQuant(bits=7, granularity="tensor", symmetric=False),
    tolerance=Tolerance(kld_abs=5e-3, kld_rel=0.5, cosine_abs=5e-3,
                        why="the twin rounds activations like fbgemm, but each matmul's range comes from "
                            "slightly different inputs")))
