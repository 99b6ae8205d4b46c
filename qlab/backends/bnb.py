"""bitsandbytes (PyPI ``bitsandbytes``): QLoRA's NF4 and LLM.int8() layers, CUDA kernels."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from qlab.backends.base import Backend, Tolerance, package_available, register
from qlab.core.quant import QuantScheme
from qlab.models.loading import LoadedModel, quantizable_linears

# bitsandbytes' default 4-bit block: 64 weights share one absmax (kept in FP32 without double quantization).
NF4_BLOCK_SIZE = 64


def _available(device: str) -> tuple[bool, str]:
    return package_available("bitsandbytes", "bitsandbytes")


def _swap_linears(make: Callable[[torch.nn.Linear], torch.nn.Module]) -> Callable[[LoadedModel, str], torch.nn.Module]:
    def apply(loaded: LoadedModel, device: str) -> torch.nn.Module:
        names = [name for name, _ in quantizable_linears(loaded.model)]
        model = copy.deepcopy(loaded.model).to(dtype=torch.bfloat16)
        for name in names:
            model.set_submodule(name, make(model.get_submodule(name)))
        # Moving bitsandbytes parameters to CUDA is what quantizes them.
        return model.to("cuda")

    return apply


def _nf4(linear: torch.nn.Linear) -> torch.nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.bfloat16, quant_type="nf4", device="cpu")
    layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                     blocksize=NF4_BLOCK_SIZE)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


def _int8(linear: torch.nn.Linear) -> torch.nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=6.0, device="cpu")
    layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


register(Backend(
    slug="bnb-nf4", library="bitsandbytes", title=f"bitsandbytes NF4 (QLoRA), blocks of {NF4_BLOCK_SIZE}",
    weight_format="nf4", compute_dtype="activation", devices=("cuda",), kinds=("causal-lm", "embedding"),
    twin=lambda model: QuantScheme("nf4", "group", NF4_BLOCK_SIZE, scale_dtype="fp32"),
    note="A memory format: weights are dequantized to BF16 before each matmul (about 1.4x slower than FP16).",
    _apply=_swap_linears(_nf4), _available=_available))

register(Backend(
    slug="bnb-int8", library="bitsandbytes", title="bitsandbytes LLM.int8() (outliers above 6.0 kept in FP16)",
    weight_format="int8", compute_dtype="int8", devices=("cuda",), kinds=("causal-lm", "embedding"),
    twin=lambda model: QuantScheme("int8", "channel"), quantizes_activations=True,
    note="Mixed INT8/FP16 decomposition: saves memory, usually slower than FP16 at batch 1.",
    _apply=_swap_linears(_int8), _available=_available,
    tolerance=Tolerance(kld_abs=0.02, kld_rel=3.0, why="activations are quantized per row (outliers excepted)")))
