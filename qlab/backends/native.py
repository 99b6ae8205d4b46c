"""torch itself: the FP32 and BF16 references, and torch.ao dynamic INT8 (the common claims' "PyTorch quantization")."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch

from qlab.backends.base import ActivationQuant, Backend, Tolerance, register
from qlab.core.errors import QlabError
from qlab.core.quant import QuantScheme
from qlab.models.checkpoint import free_memory
from qlab.models.loading import LoadedModel, quantizable_linears


def _moved(model: torch.nn.Module, device: str | None, dtype: torch.dtype | None) -> list[torch.Tensor]:
    """The tensors of ``model`` not already on ``device`` in ``dtype`` (floating ones only, as ``Module.to``)."""
    target = torch.device(device) if device else None
    if target is not None and target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    return [t for t in tensors if (target is not None and t.device != target)
            or (dtype is not None and t.is_floating_point() and t.dtype != dtype)]


def shadow(model: torch.nn.Module, device: str | None = None, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A new module tree sharing every tensor with ``model``, except those not yet on ``device`` in ``dtype``,
    which it holds converted copies of; ``model`` is never written (``Module.to`` would cast shared tensors)."""
    memo: dict[int, torch.Tensor] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for tensor in _moved(model, device, dtype):
        converted = tensor.detach().to(device=device, dtype=dtype if tensor.is_floating_point() else None)
        memo[id(tensor)] = (torch.nn.Parameter(converted, requires_grad=False)
                            if isinstance(tensor, torch.nn.Parameter) else converted)
    return copy.deepcopy(model, memo)


def _always(device: str) -> tuple[bool, str]:
    return True, "built into torch"


def _reference(dtype: torch.dtype) -> Callable[[LoadedModel, str], torch.nn.Module]:
    """The model with its weights and activations in ``dtype`` whatever dtype it was loaded in (an "FP32" row of
    a BF16 checkpoint times FP32 kernels), refused in one line when the converted copy would not fit."""
    label = {torch.float32: "FP32", torch.bfloat16: "BF16"}[dtype]

    def apply(loaded: LoadedModel, device: str) -> torch.nn.Module:
        moved = _moved(loaded.model, device, dtype)
        needed = sum(t.numel() * (dtype if t.is_floating_point() else t.dtype).itemsize for t in moved)
        free = free_memory("cpu" if device == "cpu" else str(torch.device(device)))
        if needed > free:
            raise QlabError(f"timing {loaded.name} in {label} needs a {needed / 1e9:.3g} GB copy of its "
                            f"{loaded.dtype_label} weights but only {free / 1e9:.3g} GB is free on {device}, so it "
                            "is not timed; free memory or pick a smaller model.")
        return shadow(loaded.model, device, dtype)

    return apply


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
    _apply=_reference(torch.float32), _available=_always,
    tolerance=Tolerance(kld_abs=1e-6, kld_rel=0.0, cosine_abs=1e-6)))

register(Backend(
    slug="bf16", library="torch", title="torch BF16 weights and activations", weight_format="bf16",
    compute_dtype="bf16", devices=("cpu", "cuda"), kinds=("causal-lm", "embedding"),
    twin=lambda model: QuantScheme("bf16"),
    note="Half the bytes of FP32; fast on GPUs and on CPUs with AVX512-BF16 or AMX, emulated elsewhere.",
    _apply=_reference(torch.bfloat16), _available=_always,
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
