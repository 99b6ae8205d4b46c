"""Weight layouts as the runtimes ship them: the exact bytes one matrix occupies in a library's own format.

A ``QuantScheme`` describes an idea (int4, groups of 128, an fp16 scale); a layout is what a library really
stores for it, padding and packing included: torchao's tinygemm tiles pad the input width to a multiple of
1024 and keep a bf16 scale *and* a bf16 zero per group, GPTQ checkpoints keep an int32 group index per input,
GGUF blocks carry their own scales. Each layout is one row — its parts as arithmetic on (out, in) — with the
source of the formula; ``tests/test_layouts.py`` checks each against the library's own size function or a
published checkpoint.

Layouts plug into the memory planner wherever a scheme does (``qlab.analyses.memory.weight_spec``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from qlab.core.errors import QlabError
from qlab.core.registry import Registry

Parts = dict[str, int]


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _need(shape: tuple[int, int], name: str, divisor: int, what: str) -> None:
    if shape[1] % divisor:
        raise QlabError(f"{name} stores {what} along the input width, and {shape[1]} of a ({shape[0]}, "
                        f"{shape[1]}) matrix is not a multiple of {divisor}; keep that matrix in another format.")


@dataclass(frozen=True)
class Layout:
    """One library's storage of a weight matrix.

    Args:
        name: registry key, e.g. ``"gptq-int4-g128"``.
        format: the registry number format of its codes (``qlab.core.formats``), for native-format checks.
        bits: nominal code bits, for labels.
        parts: (out, in) -> bytes of each stored tensor, padding included.
        rest_format: how the library keeps the tensors it does not convert (embeddings, norms, a kept head).
        source: where the formula comes from (file and function of the library, or its specification).
        description: one line for people.
    """

    name: str
    format: str
    bits: int
    parts: Callable[[tuple[int, int]], Parts]
    rest_format: str
    source: str
    description: str

    @property
    def label(self) -> str:
        return self.name

    def storage_bytes(self, shape: tuple[int, ...]) -> Parts:
        """Bytes of each stored part of a matrix of this (out, in) shape, as ``QuantScheme.storage_bytes`` names
        them: ``codes``, ``scales``, ``zero_points`` and whatever else the layout keeps."""
        if len(shape) != 2 or min(shape) < 1:
            raise QlabError(f"{self.name} stores 2-D weight matrices; got shape {tuple(shape)}.")
        return self.parts((int(shape[0]), int(shape[1])))

    def bits_per_weight(self, shape: tuple[int, ...]) -> float:
        """Stored bits per weight of a matrix of this shape, padding, scales and zero-points included."""
        return 8 * sum(self.storage_bytes(shape).values()) / math.prod(shape)


# --- the formulas ------------------------------------------------------------------------------------------


def _torchao_int8(shape: tuple[int, int]) -> Parts:
    out, inp = shape
    # Int8Tensor.from_hp: choose_qparams_affine(scale_dtype=float32, zero_point_dtype=int8, keepdim) per row.
    return {"codes": out * inp, "scales": 4 * out, "zero_points": out}


def _torchao_int4_tiles(shape: tuple[int, int]) -> Parts:
    out, inp = shape
    # Int4TilePackedTo4dTensor.from_hp: in_features padded to 1024, out to 8 (ntile), then
    # _convert_weight_to_int4pack; pack_tinygemm_scales_and_zeros keeps [in/128, out, 2] in bf16.
    n, k = _pad(out, 8), _pad(inp, 1024)
    return {"codes": n * k // 2, "scales": 2 * n * (k // 128), "zero_points": 2 * n * (k // 128)}


def _torchao_fp8_rows(shape: tuple[int, int]) -> Parts:
    out, inp = shape
    # Float8Tensor.from_hp(granularity=PerRow()): float8_e4m3fn data and a float32 scale per row.
    return {"codes": out * inp, "scales": 4 * out, "zero_points": 0}


def _gptq(shape: tuple[int, int], group: int = 128) -> Parts:
    out, inp = shape
    _need(shape, "GPTQ", 32, "eight 4-bit codes per int32")
    groups = math.ceil(inp / group)
    # AutoGPTQ QuantLinear.__init__ buffers (GPTQModel keeps them): qweight int32 [in // 32 * 4, out],
    # qzeros int32 [ceil(in / g), out // 32 * 4], scales fp16 [ceil(in / g), out], g_idx int32 [in] (stored
    # whether or not act-order shuffled it).
    return {"codes": 4 * (inp // 32 * 4) * out, "scales": 2 * groups * out, "zero_points": 4 * groups * (out // 32 * 4),
            "group_index": 4 * inp}


def _awq(shape: tuple[int, int], group: int = 128) -> Parts:
    out, inp = shape
    _need(shape, "AWQ", group, f"groups of {group}")
    # AutoAWQ WQLinear_GEMM.__init__ buffers: qweight int32 [in, out // 8], qzeros int32 [in // g, out // 8],
    # scales fp16 [in // g, out].
    return {"codes": 4 * inp * (out // 8), "scales": 2 * (inp // group) * out, "zero_points": 4 * (inp // group) * (out // 8)}


def _mxfp4(shape: tuple[int, int]) -> Parts:
    out, inp = shape
    _need(shape, "MXFP4", 32, "blocks of 32")
    # OCP MX v1.0: 32 E2M1 values share one E8M0 scale; gpt-oss stores *_blocks uint8 [.., in/32, 16] and
    # *_scales uint8 [.., in/32].
    return {"codes": out * inp // 2, "scales": out * inp // 32, "zero_points": 0}


def _nvfp4(shape: tuple[int, int]) -> Parts:
    out, inp = shape
    _need(shape, "NVFP4", 16, "blocks of 16")
    # NVIDIA ModelOpt / vLLM ModelOptNvFp4LinearMethod: weight uint8 [out, in/2], weight_scale float8_e4m3fn
    # [out, in/16], weight_scale_2 float32 scalar (the per-tensor global scale), input_scale float32 scalar.
    return {"codes": out * inp // 2, "scales": out * inp // 16 + 4, "zero_points": 0, "input_scales": 4}


def ggml_type_size(type_name: str) -> tuple[int, int]:
    """(values per block, bytes per block) of a ggml type, from gguf-py's GGML_QUANT_SIZES (llama.cpp's table)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[type_name.strip().upper()]]
    except KeyError:
        raise QlabError(f"unknown ggml type '{type_name}'; use one of Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, F16, ...") from None


def ggml_row_bytes(type_name: str, values: int) -> int:
    """ggml_row_size: bytes of one row of ``values`` values; the row must hold whole blocks."""
    block, size = ggml_type_size(type_name)
    if values % block:
        raise QlabError(f"a {type_name} row holds whole blocks of {block} values; {values} is not a multiple.")
    return values // block * size


def _gguf(type_name: str) -> Callable[[tuple[int, int]], Parts]:
    def parts(shape: tuple[int, int]) -> Parts:
        out, inp = shape
        return {"codes": out * ggml_row_bytes(type_name, inp), "scales": 0, "zero_points": 0}

    return parts


# --- registry ----------------------------------------------------------------------------------------------

_LAYOUTS: Registry[Layout] = Registry("weight layout")
LAYOUTS = _LAYOUTS.entries
register = _LAYOUTS.register
get_layout = _LAYOUTS.get
layout_names = _LAYOUTS.names


_TORCHAO = "torchao 0.18 torchao/quantization/quantize_/workflows"
register(Layout("torchao-int8-weight-only", "int8", 8, _torchao_int8, "bf16",
                f"{_TORCHAO}/int8/int8_tensor.py Int8Tensor.from_hp (Int8WeightOnlyConfig, PerRow)",
                "torchao int8 weight-only: int8 codes, a float32 scale and an int8 zero per row"))
register(Layout("torchao-int4-tile-packed", "int4", 4, _torchao_int4_tiles, "bf16",
                f"{_TORCHAO}/int4/int4_tile_packed_to_4d_tensor.py Int4TilePackedTo4dTensor.from_hp and "
                "torchao/quantization/utils.py pack_tinygemm_scales_and_zeros",
                "torchao int4 weight-only, tinygemm tiles: input padded to 1024, bf16 scale and zero per 128"))
register(Layout("torchao-fp8-per-row", "fp8_e4m3", 8, _torchao_fp8_rows, "bf16",
                f"{_TORCHAO}/float8/float8_tensor.py Float8Tensor.from_hp (PerRow)",
                "torchao fp8 (e4m3) weights with a float32 scale per row (dynamic fp8 activations)"))
register(Layout("gptq-int4-g128", "int4", 4, _gptq, "fp16",
                "AutoGPTQ auto_gptq/nn_modules/qlinear QuantLinear.__init__ buffers (GPTQModel keeps them)",
                "GPTQ checkpoint: int32-packed 4-bit codes and zeros, fp16 scales per 128, int32 g_idx per input"))
register(Layout("awq-int4-g128", "int4", 4, _awq, "fp16",
                "AutoAWQ awq/modules/linear/gemm.py WQLinear_GEMM.__init__ buffers",
                "AWQ (GEMM) checkpoint: int32-packed 4-bit codes and zeros, fp16 scales per 128"))
register(Layout("mxfp4", "fp4_e2m1", 4, _mxfp4, "bf16",
                "OCP Microscaling Formats (MX) v1.0 specification, section 5 (MXFP4: k=32, E8M0 scale); the "
                "gpt-oss checkpoints' *_blocks / *_scales tensors",
                "MXFP4: E2M1 codes, one E8M0 (power-of-two) scale per 32 values: 4.25 bits"))
register(Layout("nvfp4", "fp4_e2m1", 4, _nvfp4, "bf16",
                "NVIDIA TensorRT Model Optimizer NVFP4 checkpoints as vLLM loads them "
                "(vllm/model_executor/layers/quantization/modelopt.py ModelOptNvFp4LinearMethod.create_weights)",
                "NVFP4: E2M1 codes, an FP8 E4M3 scale per 16 values and a float32 scale per tensor: 4.5 bits"))
for _type, _bits in (("Q8_0", 8), ("Q4_0", 4), ("Q4_K", 4), ("Q5_K", 5), ("Q6_K", 6)):
    # Sizes are read from gguf-py when a matrix is sized, so importing qlab needs no gguf.
    register(Layout(f"gguf-{_type.lower()}", "int8" if _type == "Q8_0" else "int4", _bits, _gguf(_type), "fp16",
                    "gguf-py gguf/constants.py GGML_QUANT_SIZES (ggml's type_traits) and gguf/quants.py "
                    "quant_shape_to_byte_shape",
                    f"GGUF {_type} blocks for every block matrix (llama-quantize --pure); the rest at fp16"))
