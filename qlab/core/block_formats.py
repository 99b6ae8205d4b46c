"""GGUF (llama.cpp) block formats: Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, bit-exact with llama.cpp's reference
quantizers where those have a Python reference (``gguf.quants``: Q8_0, Q4_0, Q4_1).

As in ggml's ``type_traits`` table, a format is one row: block size and the fields one block stores (bits x
count), so bytes per block and bits per weight are arithmetic, never typed. Each format only writes
``quantize_blocks`` / ``dequantize_blocks`` over ``(n_blocks, block_size)`` tensors; ``quantize`` reshapes and
checks. ``to_gguf_bytes`` lays a block out exactly as a .gguf file stores it.

These differ from ``qlab.core.quant``'s int4 groups in the details that matter for error: Q4_0 maps the signed
value of largest magnitude to -8 (so one side of the grid gets 8 levels, the other 7) and rounds by
truncating x/d + 8.5; Q4_1 stores an fp16 minimum; the K formats store 6- or 8-bit sub-block scales under one
fp16 super-scale, and search the scale that minimises a weighted squared error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qlab.core.errors import QlabError
from qlab.core.registry import Registry
from qlab.core.threads import one_thread

Parts = dict[str, torch.Tensor]
QK_K = 256  # super-block of the K formats


@dataclass(frozen=True)
class Field:
    """One stored field of a block: ``count`` values of ``bits`` bits."""

    name: str
    bits: int
    count: int


@dataclass(frozen=True)
class BlockFormat:
    """A GGUF block format.

    Args:
        name: llama.cpp's name, e.g. ``"Q4_0"``.
        block_size: weights per block.
        fields: what one block stores, in file order.
        description: one line for people.
        quantize_blocks: ``(n_blocks, block_size)`` float32 -> parts (codes and scales as stored).
        dequantize_blocks: parts -> ``(n_blocks, block_size)`` float32.
        pack: parts -> ``(n_blocks, bytes_per_block)`` uint8, the GGUF byte layout.
    """

    name: str
    block_size: int
    fields: tuple[Field, ...]
    description: str
    quantize_blocks: Callable[[torch.Tensor], Parts]
    dequantize_blocks: Callable[[Parts], torch.Tensor]
    pack: Callable[[Parts], torch.Tensor]

    @property
    def bytes_per_block(self) -> int:
        return sum(f.bits * f.count for f in self.fields) // 8

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes_per_block / self.block_size

    @property
    def scale_bits_per_weight(self) -> float:
        """The part of bits per weight spent on scales and minimums rather than codes."""
        return sum(f.bits * f.count for f in self.fields if not f.name.startswith("q")) / self.block_size


@dataclass(frozen=True)
class BlockTensor:
    """A tensor quantized to a block format: its parts, shape, and format."""

    parts: Parts
    shape: torch.Size
    fmt: BlockFormat

    def dequantize(self) -> torch.Tensor:
        return self.fmt.dequantize_blocks(self.parts).reshape(self.shape)

    @property
    def nbytes(self) -> int:
        return self.parts_blocks * self.fmt.bytes_per_block

    @property
    def parts_blocks(self) -> int:
        return next(iter(self.parts.values())).shape[0]

    @property
    def bits_per_weight(self) -> float:
        return self.fmt.bits_per_weight

    def to_gguf_bytes(self) -> torch.Tensor:
        """The blocks as a .gguf file stores them: ``(n_blocks, bytes_per_block)`` uint8."""
        return self.fmt.pack(self.parts)


# ---------------------------------------------------------------------------------------- shared helpers


def _fp16_bytes(values: torch.Tensor) -> torch.Tensor:
    """Little-endian bytes of fp16 values, (n,) -> (n, 2)."""
    return values.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def _safe_inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (ties away from zero), as gguf-py's ``np_roundf`` computes it."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def _nearest_int(x: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int``: round half to even through the float mantissa, as an int32."""
    return torch.round(x).to(torch.int32)


def _ordered_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension in ggml's order (a float accumulator, left to right), keeping the dim.

    The K formats pick a scale by comparing sums; summing pairwise, as torch does, changes the last bits and
    flips some choices. The loop runs over the 16 or 32 positions of a sub-block, each step over every block.
    """
    columns = values.movedim(-1, 0).contiguous()  # each position's values contiguous: fast adds
    total = columns[0].clone()
    for column in columns[1:]:
        total += column
    return total.unsqueeze(-1)


def _nibbles(codes: torch.Tensor, half: int) -> torch.Tensor:
    """Pack 4-bit codes: value j and value j + half share byte j (low, high nibble), as ggml does."""
    codes = codes.to(torch.uint8).reshape(codes.shape[0], -1, 2, half)
    return (codes[:, :, 0] | (codes[:, :, 1] << 4)).reshape(codes.shape[0], -1)


# ---------------------------------------------------------------------------------------- Q8_0, Q4_0, Q4_1


def _q8_0_quantize(blocks: torch.Tensor) -> Parts:
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    codes = _round_half_away(blocks * _safe_inverse(d)).to(torch.int8)
    return {"d": d[:, 0].to(torch.float16), "qs": codes}


def _q8_0_dequantize(parts: Parts) -> torch.Tensor:
    return parts["qs"].to(torch.float32) * parts["d"].to(torch.float32)[:, None]


def _q8_0_pack(parts: Parts) -> torch.Tensor:
    return torch.cat([_fp16_bytes(parts["d"]), parts["qs"].view(torch.uint8)], dim=1)


def _q4_0_quantize(blocks: torch.Tensor) -> Parts:
    # The signed value of largest magnitude maps to code 0 (-8): its sign decides which side gets 8 levels.
    extreme = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))
    d = extreme / -8
    codes = torch.trunc(blocks * _safe_inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return {"d": d[:, 0].to(torch.float16), "qs": codes}


def _q4_0_dequantize(parts: Parts) -> torch.Tensor:
    return (parts["qs"].to(torch.float32) - 8) * parts["d"].to(torch.float32)[:, None]


def _q4_0_pack(parts: Parts) -> torch.Tensor:
    return torch.cat([_fp16_bytes(parts["d"]), _nibbles(parts["qs"], 16)], dim=1)


def _q4_1_quantize(blocks: torch.Tensor) -> Parts:
    low, high = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)
    d = (high - low) / 15
    codes = torch.trunc((blocks - low) * _safe_inverse(d) + 0.5).clamp(0, 15).to(torch.uint8)
    return {"d": d[:, 0].to(torch.float16), "m": low[:, 0].to(torch.float16), "qs": codes}


def _q4_1_dequantize(parts: Parts) -> torch.Tensor:
    return (parts["qs"].to(torch.float32) * parts["d"].to(torch.float32)[:, None]
            + parts["m"].to(torch.float32)[:, None])


def _q4_1_pack(parts: Parts) -> torch.Tensor:
    return torch.cat([_fp16_bytes(parts["d"]), _fp16_bytes(parts["m"]), _nibbles(parts["qs"], 16)], dim=1)


# ---------------------------------------------------------------------------------------- Q4_K

_KX2_STEPS = torch.arange(21, dtype=torch.float32)  # make_qkx2_quants(..., rmin=-1, rdelta=0.1, nstep=20)


def _make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's ``make_qkx2_quants`` for rows of ``x``: the (scale, -min) of an affine grid 0..nmax that
    minimises the weighted squared error, over 21 candidate ranges, each refit by least squares."""
    low = x.amin(dim=1).clamp(max=0)
    high = x.amax(dim=1)
    flat = high == low
    high = torch.where(flat, low + 1, high)  # a constant row: any scale; ggml returns scale 0 for it
    sum_w = _ordered_sum(weights)[:, 0]
    sum_x = _ordered_sum(weights * x)[:, 0]
    iscale = nmax / (high - low)
    scale = 1 / iscale
    levels = _nearest_int(iscale[:, None] * (x - low[:, None])).clamp(0, nmax).to(torch.float32)
    best_error = _ordered_sum(weights * (scale[:, None] * levels + low[:, None] - x) ** 2)[:, 0]
    minimum = low
    numerators = -1.0 + 0.1 * _KX2_STEPS + nmax
    # Sequential over the 21 candidates, as in ggml: an accepted candidate moves the minimum that the next
    # candidates' grids start from, so they cannot be evaluated independently. Each step covers every row.
    for numerator in numerators:
        iscale = numerator / (high - minimum)
        levels = _nearest_int(iscale[:, None] * (x - minimum[:, None])).clamp(0, nmax).to(torch.float32)
        sum_l = _ordered_sum(weights * levels)[:, 0]
        sum_l2 = _ordered_sum(weights * levels * levels)[:, 0]
        sum_xl = _ordered_sum(weights * levels * x)[:, 0]
        det = sum_w * sum_l2 - sum_l * sum_l
        safe_det = torch.where(det > 0, det, torch.ones_like(det))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_det
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2)),
                                 this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        error = _ordered_sum(weights * (this_scale[:, None] * levels + this_min[:, None] - x) ** 2)[:, 0]
        better = (det > 0) & (error < best_error)
        best_error = torch.where(better, error, best_error)
        scale = torch.where(better, this_scale, scale)
        minimum = torch.where(better, this_min, minimum)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -minimum


def _q4_k_quantize(blocks: torch.Tensor) -> Parts:
    n = blocks.shape[0]
    sub = blocks.reshape(n * 8, 32)
    # quantize_row_q4_K_ref: weights are the RMS of the sub-block plus |x|, favouring large weights.
    # In float64 then rounded: torch's float32 sqrt is not always correctly rounded (C's sqrtf is), and one
    # ulp here changes the scale search.
    rms = (_ordered_sum(sub * sub) / 32).double().sqrt().float()
    scales, mins = _make_qkx2_quants(sub, rms + sub.abs(), 15)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale, max_min = scales.amax(dim=1, keepdim=True), mins.amax(dim=1, keepdim=True)
    inv_scale = torch.where(max_scale > 0, 63 / torch.where(max_scale > 0, max_scale, 1), 0)
    inv_min = torch.where(max_min > 0, 63 / torch.where(max_min > 0, max_min, 1), 0)
    sc = _nearest_int(inv_scale * scales).clamp(max=63)
    m = _nearest_int(inv_min * mins).clamp(max=63)
    d = (max_scale / 63)[:, 0].to(torch.float16)
    dmin = (max_min / 63)[:, 0].to(torch.float16)
    step = d.to(torch.float32)[:, None] * sc
    offset = dmin.to(torch.float32)[:, None] * m
    safe_step = torch.where(step == 0, torch.ones_like(step), step)
    codes = _nearest_int((blocks.reshape(n, 8, 32) + offset[:, :, None]) / safe_step[:, :, None]).clamp(0, 15)
    codes = torch.where(step[:, :, None] == 0, torch.zeros_like(codes), codes)
    return {"d": d, "dmin": dmin, "sc": sc.to(torch.uint8), "m": m.to(torch.uint8),
            "qs": codes.reshape(n, QK_K).to(torch.uint8)}


def _q4_k_dequantize(parts: Parts) -> torch.Tensor:
    n = parts["qs"].shape[0]
    step = parts["d"].to(torch.float32)[:, None] * parts["sc"].to(torch.float32)
    offset = parts["dmin"].to(torch.float32)[:, None] * parts["m"].to(torch.float32)
    values = parts["qs"].reshape(n, 8, 32).to(torch.float32) * step[:, :, None] - offset[:, :, None]
    return values.reshape(n, QK_K)


def _q4_k_pack(parts: Parts) -> torch.Tensor:
    sc, m = parts["sc"].to(torch.uint8), parts["m"].to(torch.uint8)
    # 12 bytes for 8 six-bit scales and 8 six-bit mins (ggml's get_scale_min_k4 layout).
    packed = torch.cat([
        (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6),
        (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4),
    ], dim=1)
    # Codes: each 64 weights share 32 bytes, the first 32 in low nibbles, the next 32 in high nibbles.
    return torch.cat([_fp16_bytes(parts["d"]), _fp16_bytes(parts["dmin"]), packed,
                      _nibbles(parts["qs"], 32)], dim=1)


# ---------------------------------------------------------------------------------------- Q6_K

_QX_STEPS = torch.tensor([0.0] + [float(s) for s in range(-9, 10) if s != 0])


def _make_qx_quants(x: torch.Tensor, nmax: int) -> torch.Tensor:
    """llama.cpp's ``make_qx_quants`` with ``rmse_type=1``: the symmetric scale (grid -nmax..nmax-1) that
    minimises the x²-weighted squared error over 19 candidate ranges, each refit by least squares."""
    extreme = x.gather(1, x.abs().argmax(dim=1, keepdim=True))
    safe_extreme = torch.where(extreme == 0, torch.ones_like(extreme), extreme)
    iscale = -(nmax + 0.1 * _QX_STEPS)[None, :, None] / safe_extreme[:, :, None]  # (rows, candidates, 1)
    levels = _nearest_int(iscale * x[:, None, :]).clamp(-nmax, nmax - 1).to(torch.float32)
    w = (x * x)[:, None, :]
    sum_lx = _ordered_sum(w * x[:, None, :] * levels)[..., 0]
    sum_l2 = _ordered_sum(w * levels * levels)[..., 0]
    safe_l2 = torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2))
    scale = torch.where(sum_l2 > 0, sum_lx / safe_l2, torch.zeros_like(sum_l2))
    # Candidate 0 is the plain range; a later one, in llama.cpp's order -9..9, replaces the best only when
    # strictly better, compared exactly as ggml does (sum_lx^2 > best * sum_l2).
    best_scale = scale[:, 0]
    best = best_scale * sum_lx[:, 0]
    for candidate in range(1, scale.shape[1]):  # 18 candidates, each step over every row
        better = (sum_l2[:, candidate] > 0) & (sum_lx[:, candidate] * sum_lx[:, candidate]
                                               > best * sum_l2[:, candidate])
        best_scale = torch.where(better, scale[:, candidate], best_scale)
        best = torch.where(better, best_scale * sum_lx[:, candidate], best)
    return torch.where(extreme[:, 0].abs() < 1e-15, torch.zeros_like(best_scale), best_scale)


def _q6_k_quantize(blocks: torch.Tensor) -> Parts:
    n = blocks.shape[0]
    scales = _make_qx_quants(blocks.reshape(n * 16, 16), 32).reshape(n, 16)
    extreme = scales.gather(1, scales.abs().argmax(dim=1, keepdim=True))
    zero_block = extreme[:, 0].abs() < 1e-15
    iscale = -128 / torch.where(zero_block[:, None], torch.ones_like(extreme), extreme)
    d = (1 / iscale)[:, 0].to(torch.float16)
    sc = _nearest_int(iscale * scales).clamp(max=127)
    step = d.to(torch.float32)[:, None] * sc
    safe_step = torch.where(step == 0, torch.ones_like(step), step)
    codes = _nearest_int(blocks.reshape(n, 16, 16) / safe_step[:, :, None]).clamp(-32, 31) + 32
    codes = torch.where(step[:, :, None] == 0, torch.full_like(codes, 32), codes)
    d = torch.where(zero_block, torch.zeros_like(d), d)
    sc = torch.where(zero_block[:, None], torch.zeros_like(sc), sc)
    return {"d": d, "sc": sc.to(torch.int8), "qs": codes.reshape(n, QK_K).to(torch.uint8)}


def _q6_k_dequantize(parts: Parts) -> torch.Tensor:
    n = parts["qs"].shape[0]
    step = parts["d"].to(torch.float32)[:, None] * parts["sc"].to(torch.float32)
    values = (parts["qs"].reshape(n, 16, 16).to(torch.float32) - 32) * step[:, :, None]
    return values.reshape(n, QK_K)


def _q6_k_pack(parts: Parts) -> torch.Tensor:
    n = parts["qs"].shape[0]
    # Per 128 weights: 64 bytes of low nibbles (weights l and l+64 share a byte... as ggml lays them out) and
    # 32 bytes of high 2-bit pairs (weights l, l+32, l+64, l+96 share a byte).
    q = parts["qs"].reshape(n, 2, 4, 32)
    low = q & 15
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2)
    high = q >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return torch.cat([ql.reshape(n, 128), qh.reshape(n, 64), parts["sc"].view(torch.uint8),
                      _fp16_bytes(parts["d"])], dim=1)


# The registry, named as every qlab registry is: ``register``, ``get_block_format``, ``block_format_names``.
# Names are llama.cpp's upper-case ones, so ``q4_0`` and ``Q4_0`` both find Q4_0; listed in llama.cpp's order
# (legacy 32-weight blocks, then K formats).
_BLOCK_FORMATS: Registry[BlockFormat] = Registry("GGUF block format", fold=str.upper)
BLOCK_FORMATS = _BLOCK_FORMATS.entries
register = _BLOCK_FORMATS.register
get_block_format = _BLOCK_FORMATS.get
block_format_names = _BLOCK_FORMATS.names


register(BlockFormat("Q8_0", 32, (Field("d", 16, 1), Field("qs", 8, 32)),
                     "8-bit codes, one fp16 scale (absmax/127) per 32 weights", _q8_0_quantize,
                     _q8_0_dequantize, _q8_0_pack))
register(BlockFormat("Q4_0", 32, (Field("d", 16, 1), Field("qs", 4, 32)),
                     "4-bit codes, one fp16 scale per 32 weights (largest-magnitude weight -> -8)",
                     _q4_0_quantize, _q4_0_dequantize, _q4_0_pack))
register(BlockFormat("Q4_1", 32, (Field("d", 16, 1), Field("m", 16, 1), Field("qs", 4, 32)),
                     "4-bit codes, fp16 scale and fp16 minimum per 32 weights", _q4_1_quantize,
                     _q4_1_dequantize, _q4_1_pack))
register(BlockFormat("Q4_K", QK_K, (Field("d", 16, 1), Field("dmin", 16, 1), Field("sc", 6, 8), Field("m", 6, 8),
                                    Field("qs", 4, QK_K)),
                     "4-bit codes; 8 sub-blocks of 32 with 6-bit scale and min under fp16 super-scales",
                     _q4_k_quantize, _q4_k_dequantize, _q4_k_pack))
register(BlockFormat("Q6_K", QK_K, (Field("qs", 6, QK_K), Field("sc", 8, 16), Field("d", 16, 1)),
                     "6-bit codes; 16 sub-blocks of 16 with an 8-bit scale under an fp16 super-scale",
                     _q6_k_quantize, _q6_k_dequantize, _q6_k_pack))


def quantize(x: torch.Tensor, name: str) -> BlockTensor:
    """Quantize a tensor to a block format; blocks run along the last dimension, as in a GGUF row."""
    fmt = get_block_format(name)
    x = x.detach().to(torch.float32)
    if x.numel() == 0 or x.shape[-1] % fmt.block_size:
        raise QlabError(f"{fmt.name} needs rows whose length is a multiple of {fmt.block_size}; this tensor's "
                        f"last dimension is {x.shape[-1] if x.dim() else 0}.")
    if not torch.isfinite(x).all():
        raise QlabError("the tensor holds NaN or infinite values; quantization needs finite numbers.")
    with one_thread():
        return BlockTensor(fmt.quantize_blocks(x.reshape(-1, fmt.block_size)), x.shape, fmt)
