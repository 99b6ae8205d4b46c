"""torchao (PyPI ``torchao``): weight-only INT8/INT4/FP8 and dynamic-activation recipes, via ``quantize_``.

Its fast paths are GPU kernels reached through ``torch.compile`` (tinygemm INT4, fused INT8 dequant-matmul);
on a CPU most of its tensors fall back to dequantize-then-matmul in eager mode, which is smaller, not faster.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from qlab.backends.base import ActivationQuant, Backend, Tolerance, package_available, register
from qlab.core.quant import QuantScheme
from qlab.models.loading import LoadedModel, quantizable_linears

# torchao's published INT4 recipe (README, Llama-3.1-8B on H100) uses groups of 64; 64 also divides SmolLM2's 576.
INT4_GROUP_SIZE = 64


def _available(device: str) -> tuple[bool, str]:
    return package_available("torchao", "torchao")


def _quantizer(make_config: Callable[[], object]) -> Callable[[LoadedModel, str], torch.nn.Module]:
    def apply(loaded: LoadedModel, device: str) -> torch.nn.Module:
        from torchao.quantization import quantize_

        wanted = {name for name, _ in quantizable_linears(loaded.model)}
        model = copy.deepcopy(loaded.model)  # quantize_ swaps weights in place: never on the shared base
        if device == "cuda":
            # torchao's GPU kernels take BF16 activations (tinygemm INT4 accepts nothing else).
            model = model.to(device="cuda", dtype=torch.bfloat16)
        quantize_(model, make_config(), filter_fn=lambda module, name: name in wanted)
        return model

    return apply


def _int8wo():
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _int8dq():
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return Int8DynamicActivationInt8WeightConfig()


def _int4wo():
    from torchao.quantization import Int4WeightOnlyConfig

    return Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d")


def _float8wo():
    from torchao.quantization import Float8WeightOnlyConfig

    return Float8WeightOnlyConfig()


def _float8dq():
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def _float8_gpu_available(device: str) -> tuple[bool, str]:
    ok, reason = _available(device)
    if ok and torch.cuda.get_device_capability() < (8, 9):
        return False, "FP8 matmuls need an Ada or Hopper GPU (compute capability 8.9+)."
    return ok, reason


register(Backend(
    slug="torchao-int8wo", library="torchao", title="torchao INT8 weight-only (per channel)",
    weight_format="int8", compute_dtype="activation", devices=("cpu", "cuda"), kinds=("causal-lm", "embedding"),
    twin=lambda model: QuantScheme("int8", "channel"),
    note="GPU: torch.compile fuses the INT8->BF16 dequantization into the matmul (1.57x on H100). CPU eager: "
         "dequantizes the whole weight on every call, slower than FP32.",
    _apply=_quantizer(_int8wo), _available=_available))

register(Backend(
    slug="torchao-int4wo", library="torchao", title=f"torchao INT4 weight-only, groups of {INT4_GROUP_SIZE} (tinygemm)",
    weight_format="int4", compute_dtype="activation", devices=("cuda",), kinds=("causal-lm",),
    twin=lambda model: QuantScheme("int4", "group", INT4_GROUP_SIZE, symmetric=False),
    note="tinygemm INT4 kernel (CUDA, BF16 activations): 1.9x on H100 with torch.compile. torchao 0.18 ships no "
         "CPU INT4 layout.",
    _apply=_quantizer(_int4wo), _available=_available,
    tolerance=Tolerance(kld_abs=5e-3, kld_rel=0.5, why="tinygemm stores a BF16 scale and zero per group")))

register(Backend(
    slug="torchao-float8wo", library="torchao", title="torchao FP8 E4M3 weight-only (per channel)",
    weight_format="fp8_e4m3", compute_dtype="activation", devices=("cpu", "cuda"),
    kinds=("causal-lm", "embedding"), twin=lambda model: QuantScheme("fp8_e4m3", "channel"),
    note="The matmul runs in the activation dtype after an FP8->BF16 cast: about 1.4x on H100 compiled, far "
         "slower than FP32 on a CPU.",
    _apply=_quantizer(_float8wo), _available=_available))

register(Backend(
    slug="torchao-int8dq", library="torchao", title="torchao INT8 dynamic activations + INT8 weights",
    weight_format="int8", compute_dtype="int8", devices=("cpu", "cuda"), kinds=("causal-lm", "embedding"),
    twin=lambda model: QuantScheme("int8", "channel"), quantizes_activations=True,
    activations=ActivationQuant(bits=8, granularity="token", symmetric=True),
    note="Quantizes every activation at run time: a win for large batches, a loss at batch 1 (0.09x on A100).",
    _apply=_quantizer(_int8dq), _available=_available,
    tolerance=Tolerance(kld_abs=5e-3, kld_rel=0.5, cosine_abs=5e-3,
                        why="the twin rounds activations per token like torchao")))

register(Backend(
    slug="torchao-float8dq", library="torchao", title="torchao FP8 dynamic activations + FP8 weights (per row)",
    weight_format="fp8_e4m3", compute_dtype="fp8", devices=("cuda",), kinds=("causal-lm",),
    twin=lambda model: QuantScheme("fp8_e4m3", "channel"), quantizes_activations=True,
    note="FP8 tensor-core matmuls (Ada/Hopper only).",
    _apply=_quantizer(_float8dq), _available=_float8_gpu_available,
    tolerance=Tolerance(kld_abs=0.01, kld_rel=2.0, why="activations are cast to FP8 at run time")))
