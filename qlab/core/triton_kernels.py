"""The Triton kernel of ``qlab.core.gpu_kernels`` (imported only when a GPU tensor is large enough to use it, so
that importing qlab never imports Triton). The float32 operations are those of ``qlab.core.numba_kernels``, value
for value; rounding to nearest even is made by adding and subtracting 2^23 to the magnitude, exact in float32
below 2^23 (above it every float32 is already an integer), so the same code runs in Triton's interpreter on a
CPU, where libdevice's rint does not."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _rint(x, HARDWARE: tl.constexpr = False):
    # HARDWARE (a GPU): the instruction, ties to even. Else |x| + 2^23 lies where float32's step is 1, so the
    # addition rounds |x| to an integer (ties to the even sum, 2^23 being even); the sign is put back bit for bit,
    # so -0.3 gives -0 as torch.round does. The two agree on every float32 but NaN's payload.
    if HARDWARE:
        return libdevice.rint(x)
    magnitude = tl.abs(x)
    rounded = (magnitude + 8388608.0) - 8388608.0
    sign = x.to(tl.int32, bitcast=True) & -2147483648
    rounded = (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return tl.where(magnitude < 8388608.0, rounded, x)


@triton.jit
def _as_float(pattern):
    return pattern.to(tl.float32, bitcast=True)


@triton.jit
def _level(scaled, point, table, bucket_scale, bucket_offset, KIND: tl.constexpr, HAS_ZERO: tl.constexpr,
           BUCKETS: tl.constexpr, qmin, qmax, mantissa_bits, lowest, largest, overflow, HARDWARE: tl.constexpr = False):
    """The grid's value for each scaled value, before the scale: the code's level (and the zero point's offset)."""
    if KIND == 0:  # integers: round(x / s + z), clamped, then (code + (0 - z)) * s
        if HAS_ZERO:
            code = _rint(scaled + point, HARDWARE)
            offset = 0.0 - point
        else:
            code = _rint(scaled, HARDWARE)
            offset = 0.0
        # +0 turns rounding's -0 into the +0 of code 0, as torch's route
        level = tl.minimum(tl.maximum(code, qmin), qmax) + offset
    elif KIND == 1:  # a table: the value's bucket holds one boundary, and the levels either side of it
        position = scaled * bucket_scale + bucket_offset
        position = tl.minimum(tl.where(position > 0.0, position, 0.0), BUCKETS - 1.0)  # a NaN in the first
        bucket = position.to(tl.int32)
        level = tl.where(scaled > tl.load(table + bucket), tl.load(table + 2 * BUCKETS + bucket),
                         tl.load(table + BUCKETS + bucket))
    else:  # floats: rint at the format's step where the value lies, built from its exponent field
        pattern = scaled.to(tl.int32, bitcast=True)
        exponent = tl.maximum((pattern >> 23) & 0xFF, lowest)
        up = _as_float((254 + mantissa_bits - exponent) << 23)
        down = _as_float((exponent - mantissa_bits) << 23)
        level = _rint(scaled * up, HARDWARE) * down
        level = tl.where(tl.abs(level) > largest, tl.where(pattern < 0, -overflow, overflow), level)
    return level


@triton.jit
def _store(out, offsets, result, inside, STORE_BF16_BITS: tl.constexpr):
    if STORE_BF16_BITS:  # to nearest even, every NaN 0x7FC0: torch's float32 -> bfloat16
        bits = result.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, rounded)
        tl.store(out + offsets, rounded.to(tl.int16), mask=inside)
    else:
        tl.store(out + offsets, result.to(out.dtype.element_ty), mask=inside)


@triton.jit
def _dequantize(values, out, width, n, scale, inverse, zero, table, bucket_scale, bucket_offset, KIND: tl.constexpr,
                HAS_ZERO: tl.constexpr, BUCKETS: tl.constexpr, qmin, qmax, mantissa_bits, lowest, largest,
                overflow, STORE_BF16_BITS: tl.constexpr, BLOCK: tl.constexpr):
    # Float arguments as float32 in both compiled code and Triton's interpreter (which hands them in as float64).
    bucket_scale, bucket_offset = tl.cast(bucket_scale, tl.float32), tl.cast(bucket_offset, tl.float32)
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    row = offsets // width
    x = tl.load(values + offsets, mask=inside, other=0.0).to(tl.float32)
    step = tl.load(scale + row, mask=inside, other=1.0)
    scaled = x * tl.load(inverse + row, mask=inside, other=1.0)
    if HAS_ZERO:
        point = tl.load(zero + row, mask=inside, other=0.0)
    else:
        point = 0.0
    level = _level(scaled, point, table, bucket_scale, bucket_offset, KIND, HAS_ZERO, BUCKETS, qmin, qmax,
                   mantissa_bits, lowest, largest, overflow)
    _store(out, offsets, level * step, inside, STORE_BF16_BITS)


@triton.jit
def _isfinite(x):
    return tl.abs(x) < float("inf")


@triton.jit
def _round_groups(values, out, suspect, weights_table, n_rows, width, table, bucket_scale, bucket_offset,
                  KIND: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_ZERO: tl.constexpr, BUCKETS: tl.constexpr, qmin,
                  qmax, max_abs,
                  GPU: tl.constexpr, inverse_max_abs, inverse_steps, mantissa_bits, lowest,
                  largest, overflow, SCALE_ROUNDING: tl.constexpr, scale_mantissa_bits, scale_lowest, scale_largest,
                  scale_smallest, STORE_BF16_BITS: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr,
                  WEIGHTS: tl.constexpr):
    # Each program takes ROWS whole blocks: finds each block's range, makes its scale (quant._unchecked_scale and
    # fake_quantize_unchecked's checks, as numba_kernels.make_scales makes them, every division correctly rounded),
    # then rounds the block's values while they are in registers: the weights are read once. On a GPU a division by a
    # number is a product with its float32 reciprocal, as torch's CUDA division by a Python number computes it (on
    # a CPU torch divides, and so does the kernel in Triton's interpreter), and rint is the instruction (a quarter
    # fewer instructions per value than the interpreter's exact emulation).
    # Float arguments as float32 in both compiled code and Triton's interpreter (which hands them in as float64).
    qmin, qmax, max_abs = tl.cast(qmin, tl.float32), tl.cast(qmax, tl.float32), tl.cast(max_abs, tl.float32)
    inverse_max_abs, inverse_steps = tl.cast(inverse_max_abs, tl.float32), tl.cast(inverse_steps, tl.float32)
    scale_largest, scale_smallest = tl.cast(scale_largest, tl.float32), tl.cast(scale_smallest, tl.float32)
    bucket_scale, bucket_offset = tl.cast(bucket_scale, tl.float32), tl.cast(bucket_offset, tl.float32)
    program = tl.program_id(0)
    if WEIGHTS > 1:
        # Several weights in one launch, each program inside one of them: ``weights_table`` holds, per weight, where its
        # values and its output lie (in elements from the first weight's, multiples of 16), its rows and its
        # first program.
        slot = 0
        for k in tl.static_range(1, WEIGHTS):
            slot += (program >= tl.load(weights_table + 4 * k + 3)).to(tl.int32)
        entry = weights_table + 4 * slot
        values += tl.multiple_of(tl.load(entry), 16)
        out += tl.multiple_of(tl.load(entry + 1), 16)
        n_rows = tl.load(entry + 2).to(tl.int32)
        program -= tl.load(entry + 3).to(tl.int32)
    rows = program * ROWS + tl.arange(0, ROWS)
    columns = tl.arange(0, WIDTH)
    real_rows = rows < n_rows
    inside = real_rows[:, None] & (columns < width)[None, :]
    offsets = rows[:, None] * width + columns[None, :]
    x = tl.load(values + offsets, mask=inside, other=0.0).to(tl.float32)
    low = tl.min(tl.where(inside, x, float("inf")), axis=1)
    high = tl.max(tl.where(inside, x, -float("inf")), axis=1)
    # A block holding NaN or infinity: its values cannot be trusted, and the caller's checked route says why.
    magnitude = tl.max(tl.where(inside, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0), axis=1)
    bad = magnitude >= 0x7F800000
    if SYMMETRIC:
        high = tl.maximum(-low, high)
        low = -high
        if GPU:
            exact = high * inverse_max_abs
        else:
            exact = tl.math.div_rn(high, max_abs)
    else:
        low = tl.minimum(low, 0.0)
        high = tl.maximum(high, 0.0)
        steps = qmax - qmin
        # a range wider than float32's largest number overflows the difference, not the scale
        if GPU:
            exact = (high - low) * inverse_steps
            exact = tl.where(_isfinite(exact), exact, high * inverse_steps - low * inverse_steps)
        else:
            exact = tl.math.div_rn(high - low, steps)
            exact = tl.where(_isfinite(exact), exact, tl.math.div_rn(high, steps) - tl.math.div_rn(low, steps))
    wanted = tl.where(high - low > 0, exact, 1.0)
    if SCALE_ROUNDING == 0:  # float32 scales
        value = wanted
    else:
        if SCALE_ROUNDING == 2:  # bfloat16: to nearest even, and the next bfloat16 up
            pattern = wanted.to(tl.int32, bitcast=True)
            stored_bits = (pattern + 0x7FFF + ((pattern >> 16) & 1)) & -65536
            stored = _as_float(stored_bits)
            up = _as_float(stored_bits + 0x10000)
        else:  # on a float grid (fp16): rint at the step where the scale lies, and that step added once
            exponent = tl.maximum((wanted.to(tl.int32, bitcast=True) >> 23) & 0xFF, scale_lowest)
            stored = _rint(wanted * _as_float((254 + scale_mantissa_bits - exponent) << 23), GPU) * \
                _as_float((exponent - scale_mantissa_bits) << 23)
            stored = tl.where(stored <= scale_largest, stored, float("inf"))
            exponent = tl.maximum((stored.to(tl.int32, bitcast=True) >> 23) & 0xFF, scale_lowest)
            up = stored + _as_float((exponent - scale_mantissa_bits) << 23)
        bad |= ~_isfinite(stored)  # the storage dtype cannot hold this scale
        # Round up, never down: a scale rounded down clips the ends of the range.
        value = tl.where(stored < wanted, up, stored)
    value = tl.minimum(tl.maximum(value, scale_smallest), scale_largest)
    inverse = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), value)
    if SYMMETRIC:
        point = tl.zeros_like(value)
        extent = max_abs
    else:
        point = tl.minimum(tl.maximum(qmin - _rint(tl.math.div_rn(low, value), GPU), qmin), qmax)
        extent = tl.maximum(tl.abs(qmin - point), tl.abs(qmax - point))
    bad |= (extent * value >= 3.4028234663852886e38) | ~_isfinite(inverse)
    # Raised only where a block is bad: one flag for a whole pass of launches, never cleared here.
    tl.store(suspect, 1, mask=tl.max((bad & real_rows).to(tl.int32), axis=0) > 0)
    scaled = x * inverse[:, None]
    level = _level(scaled, point[:, None], table, bucket_scale, bucket_offset, KIND, HAS_ZERO, BUCKETS, qmin, qmax,
                   mantissa_bits, lowest, largest, overflow, GPU)
    _store(out, offsets, level * value[:, None], inside, STORE_BF16_BITS)


def dequantize(values, out, width, scale, inverse, zero, table, bucket_scale, bucket_offset, buckets, kind, has_zero,
               qmin, qmax, mantissa_bits, lowest, largest, overflow, store_bf16_bits, block):
    n = values.numel()
    _dequantize[(triton.cdiv(n, block),)](
        values, out, width, n, scale, inverse, zero, table, bucket_scale, bucket_offset, kind, has_zero, buckets, qmin,
        qmax, mantissa_bits, lowest, largest, overflow, store_bf16_bits, block, enable_fp_fusion=False)


def round_groups(values, out, suspect, weights_table, weights, n_rows, width, table, bucket_scale, bucket_offset,
                 buckets, kind, symmetric, qmin, qmax, max_abs, gpu, inverse_max_abs, inverse_steps, mantissa_bits,
                 lowest, largest, overflow, scale_rounding, scale_mantissa_bits, scale_lowest, scale_largest,
                 scale_smallest, store_bf16_bits, rows, width_padded, programs):
    _round_groups[(programs,)](
        values, out, suspect, weights_table, n_rows, width, table, bucket_scale, bucket_offset, kind, symmetric,
        not symmetric, buckets, qmin, qmax, max_abs, gpu, inverse_max_abs, inverse_steps, mantissa_bits, lowest,
        largest, overflow, scale_rounding, scale_mantissa_bits, scale_lowest, scale_largest, scale_smallest,
        store_bf16_bits, rows, width_padded, weights,
        num_warps=max(4, min(16, rows * width_padded // 512)), enable_fp_fusion=False)
