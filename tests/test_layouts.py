"""Weight layouts: each byte count against the library's own size function, tensors or published files."""

from __future__ import annotations

import pytest
import torch

from qlab.analyses import memory, runtimes
from qlab.core.errors import QlabError
from qlab.core.layouts import get_layout, layout_names
from qlab.models import architectures

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 3584), (1000, 2880)]


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("shape", [(96, 256), (1000, 2880)])
def test_torchao_int8_and_fp8_are_the_tensors_torchao_builds(shape):
    from torchao.quantization.granularity import PerRow
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    w = torch.randn(shape, dtype=torch.bfloat16)
    int8 = Int8Tensor.from_hp(w, granularity=PerRow())
    assert sum(get_layout("torchao-int8-weight-only").storage_bytes(shape).values()) == _nbytes(
        int8.qdata, int8.scale, int8.zero_point)
    fp8 = Float8Tensor.from_hp(w, granularity=PerRow())
    assert sum(get_layout("torchao-fp8-per-row").storage_bytes(shape).values()) == _nbytes(fp8.qdata, fp8.scale)


@pytest.mark.parametrize("shape", SHAPES)
def test_torchao_int4_tiles_pad_as_torchao_does(shape):
    # Int4TilePackedTo4dTensor.from_hp needs a CUDA GPU; its sizes are torchao's own helpers: find_multiple for
    # the padding, the documented int32 [n/8][k/(8*16)][32][4] tile tensor, and pack_tinygemm_scales_and_zeros.
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros
    from torchao.utils import find_multiple

    out, inp = shape
    n, k = find_multiple(out, 8), find_multiple(inp, 1024)
    tiles = torch.empty(n // 8, k // 128, 32, 4, dtype=torch.int32, device="meta")
    scales = torch.ones(n, k // 128, dtype=torch.bfloat16)
    packed = pack_tinygemm_scales_and_zeros(scales, scales.clone(), torch.bfloat16)
    parts = get_layout("torchao-int4-tile-packed").storage_bytes(shape)
    assert parts["codes"] == _nbytes(tiles)
    assert parts["scales"] + parts["zero_points"] == _nbytes(packed)


@pytest.mark.parametrize("name", ["gguf-q8_0", "gguf-q4_0", "gguf-q4_k", "gguf-q5_k", "gguf-q6_k"])
@pytest.mark.parametrize("shape", [(4096, 4096), (1024, 14336)])
def test_gguf_blocks_are_gguf_py_byte_shapes(name, shape):
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    rows, row_bytes = quant_shape_to_byte_shape(shape, GGMLQuantizationType[name.removeprefix("gguf-").upper()])
    assert sum(get_layout(name).storage_bytes(shape).values()) == rows * row_bytes


@pytest.mark.parametrize("shape", SHAPES)
def test_mxfp4_and_nvfp4_blocks_are_ggml_types(shape):
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    out, inp = shape
    mx = quant_shape_to_byte_shape(shape, GGMLQuantizationType.MXFP4)  # 32 E2M1 values + one E8M0: 17 B
    assert sum(get_layout("mxfp4").storage_bytes(shape).values()) == mx[0] * mx[1]
    if inp % 64 == 0:
        nv = quant_shape_to_byte_shape(shape, GGMLQuantizationType.NVFP4)  # 64 values, 4 FP8 scales: 36 B
        # ModelOpt checkpoints add two float32 scalars: the tensor's global scale and the input scale.
        assert sum(get_layout("nvfp4").storage_bytes(shape).values()) == nv[0] * nv[1] + 8


def test_gptq_and_awq_are_their_checkpoint_buffers():
    # Llama-3.1-8B's gate_proj (14336 x 4096), group 128: AutoGPTQ QuantLinear and AutoAWQ WQLinear_GEMM buffers.
    out, inp, groups = 14336, 4096, 32
    gptq = get_layout("gptq-int4-g128").storage_bytes((out, inp))
    assert gptq == {"codes": (inp // 32 * 4) * out * 4, "scales": groups * out * 2,
                    "zero_points": groups * (out // 32 * 4) * 4, "group_index": inp * 4}
    awq = get_layout("awq-int4-g128").storage_bytes((out, inp))
    assert awq == {"codes": inp * (out // 8) * 4, "scales": groups * out * 2, "zero_points": groups * (out // 8) * 4}
    # 4 bits + an fp16 scale and a 4-bit zero per 128 (4.156 bits), and GPTQ's int32 group index per input.
    assert get_layout("awq-int4-g128").bits_per_weight((out, inp)) == pytest.approx(4 + 16 / 128 + 4 / 128)
    assert get_layout("gptq-int4-g128").bits_per_weight((out, inp)) == pytest.approx(4 + 20 / 128 + 32 / out)


@pytest.mark.parametrize(("slug", "ftype", "published"), [
    # llama.cpp's own size of published files: llama_model_size as llama-server reports it in /v1/models meta.size.
    ("gemma-3-1b", "Q4_K_M", 799_525_120),  # ggml-org/gemma-3-1b-it-GGUF gemma-3-1b-it-Q4_K_M.gguf
    ("qwen3-8b", "Q4_K_M", 5_021_827_072),  # Qwen_Qwen3-8B-Q4_K_M.gguf
    ("mistral-small-24b", "Q5_K_M", 16_756_101_120),  # a Mistral-Small-24B "Q5_K - Medium" file
])
def test_gguf_files_equal_what_llama_cpp_reports(slug, ftype, published):
    assert runtimes.gguf_bytes(architectures.get(slug), ftype)["total"] == published


def test_q4_k_m_follows_llama_quant_rules():
    types = {(name.rsplit(".", 1)[-1], kind): count
             for name, _, count, kind in runtimes.gguf_tensor_types(architectures.get("llama-3.1-8b"), "Q4_K_M")}
    # use_more_bits(i, 32): layers 0-3, 28-31 and 6, 9, ..., 27 (every third between): 16 of 32 at Q6_K.
    more = [i for i in range(32) if i < 4 or i >= 28 or (i - 4) % 3 == 2]
    assert types[("v_proj", "Q6_K")] == types[("down_proj", "Q6_K")] == len(more) == 16
    assert types[("v_proj", "Q4_K")] == 16 and types[("q_proj", "Q4_K")] == 32
    assert types[("lm_head", "Q6_K")] == 1 and types[("embed_tokens", "Q4_K")] == 1
    assert types[("input_layernorm", "F32")] == 32
    # Gemma-3-1B's 1152-wide rows are not whole 256-blocks: Q4_K falls back to Q5_0, the tied head to Q8_0.
    gemma = {(n.rsplit(".", 1)[-1], k) for n, _, _, k in runtimes.gguf_tensor_types(architectures.get("gemma-3-1b"),
                                                                                     "Q4_K_M")}
    assert ("q_proj", "Q5_0") in gemma and ("embed_tokens", "Q8_0") in gemma


def test_a_plan_takes_layouts_mixes_and_gguf_files():
    gptq = memory.plan("llama-3.1-8b", memory.weight_spec("gptq-int4-g128"), 8192)
    counts = architectures.count_params(architectures.get("llama-3.1-8b"))
    expected = sum(sum(get_layout("gptq-int4-g128").storage_bytes((s.out_features, s.in_features)).values())
                   * s.count for s in architectures.linear_shapes(architectures.get("llama-3.1-8b")))
    assert gptq.weights.quantized_bytes == expected and gptq.unquantized_format == "fp16"
    assert gptq.weights_bytes == expected + (counts.total - counts.quantizable) * 2
    mix = memory.plan("gpt-oss-20b", {"*.experts.*": get_layout("mxfp4"), "*": memory.weight_spec("bf16")}, 4096)
    # OpenAI's 12.8 GiB checkpoint: MXFP4 experts, everything else bf16.
    assert mix.weights_bytes == 13_761_264_768 and mix.weights_bytes / 2**30 == pytest.approx(12.8, abs=0.05)
    gguf = memory.plan("qwen3-8b", memory.weight_spec("Q4_K_M"), 8192, 1, "q8_0",
                       assumptions=memory.Assumptions(runtime="llama.cpp"))
    assert gguf.weights_bytes == 5_021_827_072 and gguf.scheme_label == "GGUF Q4_K_M"


def test_layouts_refuse_shapes_they_cannot_store():
    assert "nvfp4" in layout_names()
    with pytest.raises(QlabError, match="not a multiple of 16"):
        get_layout("nvfp4").storage_bytes((64, 40))
    with pytest.raises(QlabError, match="unknown weight layout"):
        get_layout("awq-int3")
    with pytest.raises(QlabError, match="needs a granularity"):
        memory.weight_spec("int4")
