"""optimum-quanto (PyPI ``optimum-quanto``, the Hugging Face Optimum quantizer): qint8 / qint4 / qfloat8 weights."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from qlab.backends.base import Backend, Tolerance, package_available, register
from qlab.core.quant import QuantScheme
from qlab.models.loading import LoadedModel, quantizable_linears


class _OutsideInferenceMode(torch.nn.Module):
    """Runs the wrapped model under no_grad instead of inference_mode.

    quanto's packed INT4 tensors set a version counter when transposed, which inference tensors refuse
    ("Cannot set version_counter for inference tensor"); qlab's evaluation runs under inference_mode.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, *args, **kwargs):
        with torch.inference_mode(False), torch.no_grad():
            return self.model(*args, **kwargs)

    @property
    def base_model(self) -> torch.nn.Module:
        return _OutsideInferenceMode(self.model.base_model)

    def get_output_embeddings(self) -> torch.nn.Module | None:
        return self.model.get_output_embeddings()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.get_input_embeddings()


def _available(device: str) -> tuple[bool, str]:
    return package_available("optimum.quanto", "optimum-quanto")


def _quantizer(weights: str) -> Callable[[LoadedModel, str], torch.nn.Module]:
    def apply(loaded: LoadedModel, device: str) -> torch.nn.Module:
        from optimum.quanto import freeze, qfloat8, qint4, qint8, quantize

        qtype = {"qint8": qint8, "qint4": qint4, "qfloat8": qfloat8}[weights]
        wanted = {name for name, _ in quantizable_linears(loaded.model)}
        others = [name for name, module in loaded.model.named_modules()
                  if isinstance(module, torch.nn.Linear) and name not in wanted]
        model = copy.deepcopy(loaded.model)  # quantize() swaps modules in place: never on the shared base
        if device == "cuda":
            model = model.to(device="cuda", dtype=torch.bfloat16)
        quantize(model, weights=qtype, exclude=others or None)
        freeze(model)
        return _OutsideInferenceMode(model)

    return apply


def quanto_int4_group_size(in_features: int) -> int | None:
    """The group size quanto picks for a layer (``QModuleMixin``): 128, minus 32 until it divides the width."""
    group_size = 128
    if in_features <= group_size:
        return None
    while in_features % group_size and group_size > 32:
        group_size -= 32
    return group_size if in_features % group_size == 0 else None


def _int4_twin(model: torch.nn.Module) -> dict[str, QuantScheme]:
    """Per-layer twin of quanto's qint4: asymmetric min-max groups whose size follows each layer's width."""
    plan = {}
    for name, module in quantizable_linears(model):
        group = quanto_int4_group_size(module.in_features)
        plan[name] = (QuantScheme("int4", "group", group, symmetric=False) if group
                      else QuantScheme("int4", "channel", symmetric=False))
    return plan


register(Backend(
    slug="quanto-int8", library="optimum-quanto", title="optimum-quanto qint8 weights (per channel)",
    weight_format="int8", compute_dtype="activation", devices=("cpu", "cuda"), kinds=("causal-lm", "embedding"),
    twin=lambda model: QuantScheme("int8", "channel"),
    note="Dequantizes in Python-level tensor subclasses: 2.5x slower than BF16 on an A10, slower than FP32 on CPU.",
    _apply=_quantizer("qint8"), _available=_available))

register(Backend(
    slug="quanto-int4", library="optimum-quanto", title="optimum-quanto qint4 weights (groups of 128 or less)",
    weight_format="int4", compute_dtype="activation", devices=("cpu", "cuda"), kinds=("causal-lm", "embedding"),
    twin=_int4_twin,
    note="GPU: Marlin/AWQ INT4 kernels for BF16 groups of 128; CPU: unpack and dequantize on every call.",
    _apply=_quantizer("qint4"), _available=_available,
    tolerance=Tolerance(kld_abs=0.01, kld_rel=0.5, cosine_abs=0.005,
                        why="quanto keeps a float shift per group where the twin rounds an integer zero-point")))

register(Backend(
    slug="quanto-float8", library="optimum-quanto", title="optimum-quanto qfloat8 (E4M3) weights",
    weight_format="fp8_e4m3", compute_dtype="activation", devices=("cpu", "cuda"),
    kinds=("causal-lm", "embedding"), twin=lambda model: QuantScheme("fp8_e4m3", "channel"),
    note="No FP8 kernel on either device here: cast back on every call (152 ms/token vs 39.9 BF16 on an A10).",
    _apply=_quantizer("qfloat8"), _available=_available))
