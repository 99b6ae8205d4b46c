"""GGUF block formats against llama.cpp's references: gguf-py's quantizers (Q8_0, Q4_0, Q4_1: byte for byte),
gguf-py's dequantizers (every format: our bytes decode to our values), GGML_QUANT_SIZES (bits per weight),
and a scalar port of ggml-quants.c for the K formats, which gguf-py cannot quantize."""

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from qlab.core.block_formats import (
    BLOCK_FORMATS,
    QK_K,
    block_format_names,
    get_block_format,
    quantize,
    register,
)
from qlab.core.errors import QlabError


def awkward_tensor(rows: int = 24, columns: int = 512) -> torch.Tensor:
    """Gaussian weights plus the blocks that break quantizers: zeros, constants, a lone outlier, all
    positive, all negative, and a negative extreme."""
    x = torch.randn(rows, columns, generator=torch.Generator().manual_seed(0)) * 0.05
    x[0, :256] = 0
    x[1, :32] = 0.25
    x[2, 7] = 4.0
    x[3, :64] = x[3, :64].abs()
    x[4, :64] = -x[4, :64].abs()
    x[5, 40] = -2.0
    x[6] = torch.linspace(-1, 1, columns)
    return x


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantizers_are_byte_exact_with_gguf_py(name):
    x = awkward_tensor()
    ours = quantize(x, name).to_gguf_bytes().numpy().reshape(x.shape[0], -1)
    reference = gguf_quants.quantize(x.numpy(), GGMLQuantizationType[name])
    assert ours.shape == reference.shape
    assert np.array_equal(ours, reference)


@pytest.mark.parametrize("name", list(BLOCK_FORMATS))
def test_our_bytes_decode_with_gguf_py_to_our_values(name):
    x = awkward_tensor()
    tensor = quantize(x, name)
    decoded = gguf_quants.dequantize(tensor.to_gguf_bytes().numpy().reshape(x.shape[0], -1),
                                     GGMLQuantizationType[name])
    assert np.array_equal(decoded.reshape(x.shape), tensor.dequantize().numpy())


@pytest.mark.parametrize("name", list(BLOCK_FORMATS))
def test_sizes_match_ggml(name):
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    fmt = get_block_format(name.lower())
    assert (fmt.block_size, fmt.bytes_per_block) == (block_size, type_size)
    x = awkward_tensor()
    tensor = quantize(x, name)
    assert tensor.nbytes == x.numel() // block_size * type_size
    assert tensor.to_gguf_bytes().shape == (x.numel() // block_size, type_size)


def test_bits_per_weight_are_the_published_ones():
    # shared/reference/anchors.md, "GGUF block formats".
    assert {n: f.bits_per_weight for n, f in BLOCK_FORMATS.items()} == {
        "Q8_0": 8.5, "Q4_0": 4.5, "Q4_1": 5.0, "Q4_K": 4.5, "Q6_K": 6.5625}
    assert BLOCK_FORMATS["Q4_0"].scale_bits_per_weight == 0.5
    assert BLOCK_FORMATS["Q4_K"].scale_bits_per_weight == 0.5
    assert block_format_names() == ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]


# ------------------------------------------------------------- scalar port of ggml-quants.c (reference code)

f32 = np.float32


def nearest_int(value) -> int:
    return int(np.round(f32(value)))  # ggml's magic-number trick rounds half to even, as np.round does


def make_qkx2_quants(x, weights, nmax, rmin=-1.0, rdelta=0.1, nstep=20):
    n = len(x)
    low, high = x[0], x[0]
    sum_w = weights[0]
    sum_x = f32(sum_w * x[0])
    for i in range(1, n):
        low, high = min(low, x[i]), max(high, x[i])
        sum_w = f32(sum_w + weights[i])
        sum_x = f32(sum_x + f32(weights[i] * x[i]))
    low = min(low, f32(0))
    if high == low:
        return f32(0), -low, [0] * n
    iscale = f32(f32(nmax) / f32(high - low))
    scale = f32(1 / iscale)
    levels = [max(0, min(nmax, nearest_int(iscale * f32(x[i] - low)))) for i in range(n)]
    best_error = f32(0)
    for i in range(n):
        diff = f32(f32(scale * levels[i]) + low - x[i])
        best_error = f32(best_error + f32(weights[i] * f32(diff * diff)))
    for step in range(nstep + 1):
        iscale = f32(f32(f32(rmin) + f32(f32(rdelta) * step) + nmax) / f32(high - low))
        aux = [max(0, min(nmax, nearest_int(iscale * f32(x[i] - low)))) for i in range(n)]
        sum_l = sum_l2 = sum_xl = f32(0)
        for i in range(n):
            w, level = weights[i], f32(aux[i])
            sum_l = f32(sum_l + f32(w * level))
            sum_l2 = f32(sum_l2 + f32(f32(w * level) * level))
            sum_xl = f32(sum_xl + f32(f32(w * level) * x[i]))
        det = f32(f32(sum_w * sum_l2) - f32(sum_l * sum_l))
        if det > 0:
            this_scale = f32(f32(f32(sum_w * sum_xl) - f32(sum_x * sum_l)) / det)
            this_min = f32(f32(f32(sum_l2 * sum_x) - f32(sum_l * sum_xl)) / det)
            if this_min > 0:
                this_min, this_scale = f32(0), f32(sum_xl / sum_l2)
            error = f32(0)
            for i in range(n):
                diff = f32(f32(this_scale * aux[i]) + this_min - x[i])
                error = f32(error + f32(weights[i] * f32(diff * diff)))
            if error < best_error:
                levels, best_error, scale, low = aux, error, this_scale, this_min
    return scale, -low, levels


def q4_k_reference(block):
    """quantize_row_q4_K_ref for one super-block: (d, dmin, 6-bit scales, 6-bit mins, codes)."""
    scales, mins = [], []
    for j in range(8):
        x = [f32(v) for v in block[32 * j: 32 * j + 32]]
        sum_x2 = f32(0)
        for v in x:
            sum_x2 = f32(sum_x2 + f32(v * v))
        av_x = f32(np.sqrt(f32(sum_x2 / 32)))
        scale, minimum, _ = make_qkx2_quants(x, [f32(av_x + abs(v)) for v in x], 15)
        scales.append(scale)
        mins.append(minimum)
    max_scale, max_min = max(scales), max(mins)
    inv_scale = f32(63 / max_scale) if max_scale > 0 else f32(0)
    inv_min = f32(63 / max_min) if max_min > 0 else f32(0)
    sc = [min(63, nearest_int(inv_scale * s)) for s in scales]
    m = [min(63, nearest_int(inv_min * v)) for v in mins]
    d, dmin = np.float16(f32(max_scale / 63)), np.float16(f32(max_min / 63))
    codes = []
    for j in range(8):
        step, offset = f32(f32(d) * sc[j]), f32(f32(dmin) * m[j])
        codes += [0] * 32 if step == 0 else [max(0, min(15, nearest_int(f32(f32(block[32 * j + i]) + offset)
                                                                         / step))) for i in range(32)]
    return d, dmin, sc, m, codes


def make_qx_quants(x, nmax):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)."""
    extreme, amax = f32(0), f32(0)
    for v in x:
        if abs(v) > amax:
            amax, extreme = abs(v), v
    if amax < 1e-15:
        return f32(0)

    def sums(iscale):
        sum_lx = sum_l2 = f32(0)
        for v in x:
            level = f32(max(-nmax, min(nmax - 1, nearest_int(iscale * v))))
            w = f32(v * v)
            sum_lx = f32(sum_lx + f32(f32(w * v) * level))
            sum_l2 = f32(sum_l2 + f32(f32(w * level) * level))
        return sum_lx, sum_l2

    sum_lx, sum_l2 = sums(f32(-nmax / extreme))
    scale = f32(sum_lx / sum_l2) if sum_l2 else f32(0)
    best = f32(scale * sum_lx)
    for step in range(-9, 10):
        if step == 0:
            continue
        sum_lx, sum_l2 = sums(f32(-f32(nmax + f32(f32(0.1) * step)) / extreme))
        if sum_l2 > 0 and f32(sum_lx * sum_lx) > f32(best * sum_l2):
            scale = f32(sum_lx / sum_l2)
            best = f32(scale * sum_lx)
    return scale


def q6_k_reference(block):
    """quantize_row_q6_K_ref for one super-block: (d, int8 scales, codes 0..63)."""
    scales = [make_qx_quants([f32(v) for v in block[16 * j: 16 * j + 16]], 32) for j in range(16)]
    max_scale = max(scales, key=abs)
    iscale = f32(-128 / max_scale)
    d = np.float16(f32(1 / iscale))
    sc = [min(127, nearest_int(iscale * s)) for s in scales]
    codes = []
    for j in range(16):
        step = f32(f32(d) * sc[j])
        codes += [32] * 16 if step == 0 else [max(-32, min(31, nearest_int(f32(block[16 * j + i]) / step))) + 32
                                              for i in range(16)]
    return d, sc, codes


def k_blocks(count: int) -> torch.Tensor:
    x = torch.randn(count, QK_K, generator=torch.Generator().manual_seed(5)) * 0.03
    x[1, :40] *= 20  # a sub-block far larger than the rest
    x[2] = x[2].abs()  # all positive: the minimum clamps to 0
    x[3, 100] = -1.0
    return x


def test_q4_k_matches_a_scalar_port_of_ggml():
    blocks = k_blocks(12)
    parts = quantize(blocks, "Q4_K").parts
    for b in range(blocks.shape[0]):
        d, dmin, sc, m, codes = q4_k_reference(blocks[b].numpy())
        assert parts["d"][b].item() == float(d) and parts["dmin"][b].item() == float(dmin)
        assert parts["sc"][b].tolist() == sc and parts["m"][b].tolist() == m
        assert parts["qs"][b].tolist() == codes


def test_q6_k_matches_a_scalar_port_of_ggml():
    blocks = k_blocks(12)
    parts = quantize(blocks, "Q6_K").parts
    for b in range(blocks.shape[0]):
        d, sc, codes = q6_k_reference(blocks[b].numpy())
        assert parts["d"][b].item() == float(d)
        assert parts["sc"][b].tolist() == sc
        assert parts["qs"][b].tolist() == codes


def test_error_falls_with_bits_and_k_formats_beat_legacy_ones():
    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(1)) * 0.02

    def relative_mse(name: str) -> float:
        return (((quantize(x, name).dequantize() - x) ** 2).mean() / (x**2).mean()).item()

    errors = {name: relative_mse(name) for name in BLOCK_FORMATS}
    assert errors["Q8_0"] < errors["Q6_K"] < errors["Q4_K"] < errors["Q4_1"] < errors["Q4_0"]


def test_bad_inputs():
    with pytest.raises(QlabError, match="multiple of 32"):
        quantize(torch.zeros(4, 48), "Q4_0")
    with pytest.raises(QlabError, match="multiple of 256"):
        quantize(torch.zeros(4, 288), "Q6_K")
    with pytest.raises(QlabError, match="unknown GGUF block format"):
        get_block_format("Q3_K")
    with pytest.raises(ValueError, match="registered twice"):
        register(BLOCK_FORMATS["Q4_0"])
    with pytest.raises(QlabError, match="finite"):
        quantize(torch.full((1, 32), float("nan")), "Q8_0")
