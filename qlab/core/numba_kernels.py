"""The compiled kernels of ``qlab.core.cpu_kernels`` (imported only when a tensor is large enough to use them,
so that importing qlab never waits for numba). Defined at module level so numba can cache them on disk: a
kernel made inside a function is compiled again by every process (1.6 s)."""

from __future__ import annotations

import functools

import numba
import numpy as np

_compiled = functools.partial(numba.njit, parallel=True, cache=True, nogil=True)


@numba.njit(inline="always")
def load_row(values, row, shift, floats):
    for j in range(values.shape[1]):
        floats[j] = np.uint32(values[row, j]) << shift


@numba.njit(inline="always")
def store_row(bits, out, row, shift):
    for j in range(out.shape[1]):
        pattern = bits[j]
        if shift:  # round to nearest even, as torch's float32 -> bfloat16 cast
            pattern = (pattern + np.uint32(0x7FFF) + ((pattern >> np.uint32(16)) & np.uint32(1))) >> shift
        out[row, j] = pattern


@numba.njit(inline="always")
def ordered(pattern):
    # A float32's pattern as an int32 in the floats' order (negative ones count down): integer min and max
    # run in vector lanes, where float ones must keep NaN's order and run one value at a time.
    signed = np.int32(pattern)
    return signed ^ ((signed >> np.int32(31)) & np.int32(0x7FFFFFFF))


@_compiled
def ranges(values, shift, low, high, rows):
    n, width = values.shape
    for task in numba.prange((n + rows - 1) // rows):
        bits = np.empty(width, np.uint32)
        keys = np.empty(2, np.int32)
        ends = keys.view(np.float32)
        for row in range(task * rows, min(n, (task + 1) * rows)):
            load_row(values, row, shift, bits)
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


@_compiled
def integers(values, shift, inverse, zero, offset, scale, qmin, qmax, out, out_shift, rows):
    n, width = values.shape
    for task in numba.prange((n + rows - 1) // rows):
        bits = np.empty(width, np.uint32)
        floats = bits.view(np.float32)
        for row in range(task * rows, min(n, (task + 1) * rows)):
            load_row(values, row, shift, bits)
            for j in range(width):
                code = np.rint(floats[j] * inverse[row] + zero[row])
                floats[j] = (min(max(code, qmin), qmax) + offset[row]) * scale[row]
            store_row(bits, out, row, out_shift)


@_compiled
def table(values, shift, inverse, low_level, boundary, high_level, scale, out, out_shift, rows):
    n, width = values.shape
    for task in numba.prange((n + rows - 1) // rows):
        bits = np.empty(width, np.uint32)
        floats = bits.view(np.float32)
        for row in range(task * rows, min(n, (task + 1) * rows)):
            load_row(values, row, shift, bits)
            for j in range(width):
                scaled = floats[j] * inverse[row]
                floats[j] = scaled
                prefix = bits[j] >> np.uint32(16)
                level = high_level[prefix] if scaled > boundary[prefix] else low_level[prefix]
                floats[j] = level * scale[row]
            store_row(bits, out, row, out_shift)
