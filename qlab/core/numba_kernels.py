"""The compiled kernels of ``qlab.core.cpu_kernels`` (imported only when a tensor is large enough to use them,
so that importing qlab never waits for numba). Defined at module level so numba can cache them on disk: a
kernel made inside a function is compiled again by every process (1.6 s).

Values come in and go out as their bit patterns: bf16 as uint16, float32 as uint32. Each kernel is compiled once
per pair of pattern widths, so that a bf16 pattern's shift into a float32's is a constant: passed as a number, it
made numba widen every lane to 64 bits, and the loops ran 1.3-5x slower on an AVX-512 CPU.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from numba import types
from numba.extending import overload

_compiled = functools.partial(numba.njit, parallel=True, cache=True, nogil=True)


def load_row(values, row, bits):
    """Row ``row`` of ``values`` (bf16 or float32 patterns) into ``bits`` as float32 patterns (numba only)."""


@overload(load_row, inline="always")
def _load_row(values, row, bits):
    if values.dtype == types.uint16:  # a bf16 is the top half of a float32
        def load(values, row, bits):
            for j in range(values.shape[1]):
                bits[j] = np.uint32(values[row, j]) << np.uint32(16)
    else:
        def load(values, row, bits):
            for j in range(values.shape[1]):
                bits[j] = values[row, j]
    return load


def store_row(bits, out, row):
    """Float32 patterns ``bits`` into row ``row`` of ``out`` (bf16 or float32 patterns) (numba only)."""


@overload(store_row, inline="always")
def _store_row(bits, out, row):
    if out.dtype == types.uint16:
        def store(bits, out, row):
            for j in range(out.shape[1]):
                # to nearest even, as torch's float32 -> bfloat16 cast, which makes every NaN 0x7FC0
                pattern = bits[j]
                rounded = (pattern + np.uint32(0x7FFF) + ((pattern >> np.uint32(16)) & np.uint32(1))) \
                    >> np.uint32(16)
                nan = (pattern & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
                out[row, j] = np.uint16(0x7FC0) if nan else np.uint16(rounded)
    else:
        def store(bits, out, row):
            for j in range(out.shape[1]):
                out[row, j] = bits[j]
    return store


@numba.njit(inline="always")
def ordered(pattern):
    # A float32's pattern as an int32 in the floats' order (negative ones count down): integer min and max
    # run in vector lanes, where float ones must keep NaN's order and run one value at a time.
    signed = np.int32(pattern)
    return signed ^ ((signed >> np.int32(31)) & np.int32(0x7FFFFFFF))


@_compiled
def ranges(values, low, high, rows):
    n, width = values.shape
    for task in numba.prange((n + rows - 1) // rows):
        bits = np.empty(width, np.uint32)
        keys = np.empty(2, np.int32)
        ends = keys.view(np.float32)
        for row in range(task * rows, min(n, (task + 1) * rows)):
            load_row(values, row, bits)
            lo, hi, magnitude = np.int32(0x7FFFFFFF), np.int32(-0x80000000), np.uint32(0)
            for j in range(width):
                key = ordered(bits[j])
                lo = min(lo, key)
                hi = max(hi, key)
                # |x|'s pattern: infinity's is 0x7F800000, every NaN's above it
                magnitude = max(magnitude, bits[j] & np.uint32(0x7FFFFFFF))
            keys[0], keys[1] = ordered(lo), ordered(hi)  # the map is its own inverse
            # A block holding NaN or infinity gets a NaN range, as torch.aminmax gives it.
            finite = magnitude < np.uint32(0x7F800000)
            low[row] = ends[0] if finite else np.float32(np.nan)
            high[row] = ends[1] if finite else np.float32(np.nan)


@numba.njit(inline="always")
def ordered16(pattern):
    # ``ordered`` of a bf16's 16 bits
    signed = np.int16(pattern)
    return np.int16(signed ^ ((signed >> np.int16(15)) & np.int16(0x7FFF)))


@_compiled
def bf16_ranges(values, low, high, rows):
    # ``ranges`` of bf16 patterns on their 16 bits (a bf16's order is its float32's): 32 lanes to a 512-bit
    # register, where numba's widened keys took 64-bit lanes; 3-5x faster than widening every value first.
    n, width = values.shape
    for task in numba.prange((n + rows - 1) // rows):
        keys = np.empty(2, np.int32)
        ends = keys.view(np.float32)
        for row in range(task * rows, min(n, (task + 1) * rows)):
            lo, hi, magnitude = np.int16(0x7FFF), np.int16(-0x8000), np.uint16(0)
            for j in range(width):
                pattern = values[row, j]
                key = ordered16(pattern)
                lo = min(lo, key)
                hi = max(hi, key)
                magnitude = max(magnitude, np.uint16(pattern & np.uint16(0x7FFF)))
            keys[0] = np.int32(np.uint32(np.uint16(ordered16(lo))) << np.uint32(16))
            keys[1] = np.int32(np.uint32(np.uint16(ordered16(hi))) << np.uint32(16))
            finite = magnitude < np.uint16(0x7F80)  # bf16's infinity; every NaN lies above it
            low[row] = ends[0] if finite else np.float32(np.nan)
            high[row] = ends[1] if finite else np.float32(np.nan)


@_compiled
def integers(values, inverse, zero, scale, qmin, qmax, out, rows):
    n, width = values.shape
    for task in numba.prange((n + rows - 1) // rows):
        bits = np.empty(width, np.uint32)
        floats = bits.view(np.float32)
        for row in range(task * rows, min(n, (task + 1) * rows)):
            load_row(values, row, bits)
            for j in range(width):
                code = np.rint(floats[j] * inverse[row] + zero[row])
                # adding 0 - z turns rounding's -0 into the +0 of code 0, as torch's route
                floats[j] = (min(max(code, qmin), qmax) + (np.float32(0) - zero[row])) * scale[row]
            store_row(bits, out, row)


# Boundaries of the tables below: 4-bit formats have at most 15 (fewer: padded with infinity).
TABLE_BOUNDARIES = 15


@_compiled
def table(values, inverse, boundaries, levels, scale, out, rows):
    # boundaries: TABLE_BOUNDARIES sorted values (a value above one goes up a slot); levels: each slot's. Held in
    # registers and compared one after another, with no lookup per value (a gather: microcode on some CPUs).
    n, width = values.shape
    b0, b1, b2, b3, b4, b5, b6, b7 = boundaries[0], boundaries[1], boundaries[2], boundaries[3], boundaries[4], \
        boundaries[5], boundaries[6], boundaries[7]
    b8, b9, b10, b11, b12, b13, b14 = boundaries[8], boundaries[9], boundaries[10], boundaries[11], boundaries[12], \
        boundaries[13], boundaries[14]
    l0, l1, l2, l3, l4, l5, l6, l7 = levels[0], levels[1], levels[2], levels[3], levels[4], levels[5], levels[6], \
        levels[7]
    l8, l9, l10, l11, l12, l13, l14, l15 = levels[8], levels[9], levels[10], levels[11], levels[12], levels[13], \
        levels[14], levels[15]
    for task in numba.prange((n + rows - 1) // rows):
        bits = np.empty(width, np.uint32)
        floats = bits.view(np.float32)
        for row in range(task * rows, min(n, (task + 1) * rows)):
            load_row(values, row, bits)
            for j in range(width):
                scaled = floats[j] * inverse[row]
                level = l0
                level = l1 if scaled > b0 else level
                level = l2 if scaled > b1 else level
                level = l3 if scaled > b2 else level
                level = l4 if scaled > b3 else level
                level = l5 if scaled > b4 else level
                level = l6 if scaled > b5 else level
                level = l7 if scaled > b6 else level
                level = l8 if scaled > b7 else level
                level = l9 if scaled > b8 else level
                level = l10 if scaled > b9 else level
                level = l11 if scaled > b10 else level
                level = l12 if scaled > b11 else level
                level = l13 if scaled > b12 else level
                level = l14 if scaled > b13 else level
                level = l15 if scaled > b14 else level
                floats[j] = level * scale[row]
            store_row(bits, out, row)


@_compiled
def floats(values, inverse, scale, mantissa_bits, lowest, largest, overflow, out, rows):
    n, width = values.shape
    for task in numba.prange((n + rows - 1) // rows):
        bits = np.empty(width, np.uint32)
        floats = bits.view(np.float32)
        up_bits = np.empty(width, np.uint32)
        up = up_bits.view(np.float32)
        down_bits = np.empty(width, np.uint32)
        down = down_bits.view(np.float32)
        for row in range(task * rows, min(n, (task + 1) * rows)):
            load_row(values, row, bits)
            for j in range(width):
                floats[j] = floats[j] * inverse[row]
            # The format's step where each value lies (its subnormals' step below its smallest normal) and its
            # inverse, as powers of two built from the exponent field: scaling by them is exact, so rint makes
            # the one rounding, to nearest even, as the cast does.
            for j in range(width):
                exponent = max((bits[j] >> np.uint32(23)) & np.uint32(0xFF), lowest)
                up_bits[j] = (np.uint32(254) + mantissa_bits - exponent) << np.uint32(23)
                down_bits[j] = (exponent - mantissa_bits) << np.uint32(23)
            for j in range(width):
                level = np.rint(floats[j] * up[j]) * down[j]
                if abs(level) > largest:  # NaN stays NaN: the comparison is false
                    level = np.float32(np.copysign(overflow, floats[j]))
                floats[j] = level * scale[row]
            store_row(bits, out, row)


@_compiled
def scales(low, high, symmetric, max_abs, qmin, qmax, rounding, mantissa_bits, lowest, largest, smallest,
           scale, inverse, zero, suspect, rows):
    # quant._unchecked_scale and fake_quantize_unchecked's checks, operation for operation, on each block's range;
    # rounding says how the scale is stored: 0 float32, 1 on a float grid (fp16), 2 bfloat16.
    n = low.shape[0]
    steps = qmax - qmin
    for task in numba.prange((n + rows - 1) // rows):
        first = task * rows
        count = min(n, first + rows) - first
        wanted = np.empty(count, np.float32)  # the scale that maps the range onto the grid exactly
        wanted_bits = wanted.view(np.uint32)
        stored = np.empty(count, np.float32)  # that scale in its storage dtype, rounded up
        stored_bits = stored.view(np.uint32)
        step = np.empty(count, np.float32)
        step_bits = step.view(np.uint32)
        bottom = np.empty(count, np.float32)  # the low end that sets the zero point
        bad = False
        for i in range(count):
            lo, hi = low[first + i], high[first + i]
            bad |= not (np.isfinite(lo) and np.isfinite(hi))
            if symmetric:
                hi = max(-lo, hi)
                lo = -hi
                exact = hi / max_abs
            else:
                lo, hi = min(lo, np.float32(0)), max(hi, np.float32(0))
                exact = (hi - lo) / steps
                if not np.isfinite(exact):  # a range wider than float32's largest number overflows the difference
                    exact = hi / steps - lo / steps
            wanted[i] = exact if hi - lo > 0 else np.float32(1)
            bottom[i] = lo
        if rounding == 0:
            for i in range(count):
                stored[i] = wanted[i]
        elif rounding == 2:
            for i in range(count):
                pattern = wanted_bits[i]
                stored_bits[i] = (pattern + np.uint32(0x7FFF) + ((pattern >> np.uint32(16)) & np.uint32(1))) \
                    & np.uint32(0xFFFF0000)
                step_bits[i] = stored_bits[i] + np.uint32(0x10000)  # the next bfloat16 up
        else:
            for i in range(count):
                exponent = max((wanted_bits[i] >> np.uint32(23)) & np.uint32(0xFF), lowest)
                stored_bits[i] = (np.uint32(254) + mantissa_bits - exponent) << np.uint32(23)
                step_bits[i] = (exponent - mantissa_bits) << np.uint32(23)
            for i in range(count):
                level = np.rint(wanted[i] * stored[i]) * step[i]
                stored[i] = level if level <= largest else np.float32(np.inf)
            for i in range(count):  # the grid's step where the stored scale lies, for the next one up
                exponent = max((stored_bits[i] >> np.uint32(23)) & np.uint32(0xFF), lowest)
                step_bits[i] = (exponent - mantissa_bits) << np.uint32(23)
            for i in range(count):
                step[i] = stored[i] + step[i]
        for i in range(count):
            bad |= not np.isfinite(stored[i])  # the storage dtype cannot hold this scale
            # Round up, never down: a scale rounded down clips the ends of the range.
            value = step[i] if rounding != 0 and stored[i] < wanted[i] else stored[i]
            value = min(max(value, smallest), largest)
            scale[first + i] = value
            inverse[first + i] = np.float32(1) / value
            if symmetric:
                extent = max_abs
            else:
                point = min(max(qmin - np.rint(bottom[i] / value), qmin), qmax)
                zero[first + i] = point
                extent = max(abs(qmin - point), abs(qmax - point))
            bad |= extent * value >= np.float32(3.4028234663852886e38) or not np.isfinite(inverse[first + i])
        suspect[task] = bad
