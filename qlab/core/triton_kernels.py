"""The Triton kernel of ``qlab.core.gpu_kernels`` (imported only when a GPU tensor is large enough to use it, so
that importing qlab never imports Triton). The float32 operations are those of ``qlab.core.numba_kernels``, value
for value; rounding to nearest even is made by adding and subtracting 2^23 to the magnitude, exact in float32
below 2^23 (above it every float32 is already an integer), so the same code runs in Triton's interpreter on a
CPU, where libdevice's rint does not."""

from __future__ import annotations

import triton
import triton.language as tl

TABLE_BOUNDARIES = 15  # boundaries a table's kernel compares with: a 4-bit table has at most 15, padded with inf


@triton.jit
def _rint(x):
    # |x| + 2^23 lies where float32's step is 1, so the addition rounds |x| to an integer (ties to the even sum,
    # 2^23 being even); the sign is put back bit for bit, so -0.3 gives -0 as torch.round does.
    magnitude = tl.abs(x)
    rounded = (magnitude + 8388608.0) - 8388608.0
    sign = x.to(tl.int32, bitcast=True) & -2147483648
    rounded = (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return tl.where(magnitude < 8388608.0, rounded, x)


@triton.jit
def _as_float(pattern):
    return pattern.to(tl.float32, bitcast=True)


@triton.jit
def _dequantize(values, out, width, n, scale, inverse, zero, boundaries, levels, KIND: tl.constexpr,
                HAS_ZERO: tl.constexpr, BOUNDARIES: tl.constexpr, qmin, qmax, mantissa_bits, lowest, largest,
                overflow, STORE_BF16_BITS: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    row = offsets // width
    x = tl.load(values + offsets, mask=inside, other=0.0).to(tl.float32)
    step = tl.load(scale + row, mask=inside, other=1.0)
    scaled = x * tl.load(inverse + row, mask=inside, other=1.0)
    if KIND == 0:  # integers: round(x / s + z), clamped, then (code + (0 - z)) * s
        if HAS_ZERO:
            point = tl.load(zero + row, mask=inside, other=0.0)
            code = _rint(scaled + point)
            offset = 0.0 - point
        else:
            code = _rint(scaled)
            offset = 0.0
        # +0 turns rounding's -0 into the +0 of code 0, as torch's route
        level = tl.minimum(tl.maximum(code, qmin), qmax) + offset
    elif KIND == 1:  # a table: the level of the slot above every boundary the value exceeds
        level = tl.zeros_like(scaled) + tl.load(levels)
        for k in tl.static_range(BOUNDARIES):
            level = tl.where(scaled > tl.load(boundaries + k), tl.load(levels + k + 1), level)
    else:  # floats: rint at the format's step where the value lies, built from its exponent field
        pattern = scaled.to(tl.int32, bitcast=True)
        exponent = tl.maximum((pattern >> 23) & 0xFF, lowest)
        up = _as_float((254 + mantissa_bits - exponent) << 23)
        down = _as_float((exponent - mantissa_bits) << 23)
        level = _rint(scaled * up) * down
        level = tl.where(tl.abs(level) > largest, tl.where(pattern < 0, -overflow, overflow), level)
    result = level * step
    if STORE_BF16_BITS:  # to nearest even, every NaN 0x7FC0: torch's float32 -> bfloat16
        bits = result.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded)
        tl.store(out + offsets, rounded.to(tl.int16), mask=inside)
    else:
        tl.store(out + offsets, result.to(out.dtype.element_ty), mask=inside)


def dequantize(values, out, width, scale, inverse, zero, boundaries, levels, kind, has_zero, qmin, qmax,
               mantissa_bits, lowest, largest, overflow, store_bf16_bits, block):
    n = values.numel()
    # The table's length is a compile-time constant, so the comparisons unroll (a module constant read inside the
    # kernel failed to compile on a GPU).
    _dequantize[(triton.cdiv(n, block),)](
        values, out, width, n, scale, inverse, zero, boundaries, levels, kind, has_zero, TABLE_BOUNDARIES, qmin,
        qmax, mantissa_bits, lowest, largest, overflow, store_bf16_bits, block, enable_fp_fusion=False)
