"""The compiled kernels of ``qlab.core.cpu_kernels`` (imported only when a tensor is large enough to use them,
so that importing qlab never waits for numba). Defined at module level so numba can cache them on disk: a
kernel made inside a function is compiled again by every process (1.6 s).

Values come in and go out as their bit patterns: bf16 as uint16, float32 as uint32. Each kernel is compiled once
per pair of pattern widths, so that a bf16 pattern's shift into a float32's is a constant: passed as a number, it
made numba widen every lane to 64 bits, and the loops ran 1.3-5x slower on an AVX-512 CPU. A float32 and its
pattern are one register read two ways (``as_float``, ``as_pattern``), so each row is loaded, rounded and stored in
one loop: through a scratch row in memory, as numpy views, the rounding took 1.4x as long. The kernels are made of
inline pieces (a row's range, a batch of rows' scales, a row's rounding), so the fused kernel and the rounding one
run the same loops.

A format's grid comes as a tuple whose length says how values round (numba compiles each kind apart): two float32s
(qmin, qmax) an integer grid; four numbers (mantissa bits, the float32 exponent field of the smallest normal,
largest value, overflow: ``cpu_kernels.float_grid``) a float format; ``TABLE_BOUNDARIES`` sorted boundaries and
then one more levels a table (flat: numba's parallel loops take no tuple of tuples).
"""

from __future__ import annotations

import functools

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

_compiled = functools.partial(numba.njit, parallel=True, cache=True, nogil=True)

# Boundaries of a table grid: 4-bit formats have at most 15 (fewer: padded with infinity).
TABLE_BOUNDARIES = 15
# How far ahead of the row it reads a kernel asks for the weights (bytes), and a cache line's bytes. One core of
# these CPUs reads memory at ~7 GB/s when it asks for each line as it needs it: the hardware's own prefetching
# stops at each 4 KiB page. Asked for 4 KiB ahead (2-16 KiB made no difference), reading a 1B model's linear
# weights in bf16 took 0.10 s instead of 0.16-0.17 s on two cores, in every run. The fused kernel gained 9-28 % in
# four interleaved runs (int8 g64 0.37 s instead of 0.43 s) and nothing in two later ones (0.96-1.02x): it also
# computes, and how much the reads cost depends on how busy the host's memory is at the time.
FETCH_AHEAD_BYTES = 4096
CACHE_LINE_BYTES = 64


@intrinsic
def as_float(typingctx, pattern):
    """The float32 whose bits are the uint32 ``pattern`` (numba only)."""
    def reinterpret(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), reinterpret


@intrinsic
def as_pattern(typingctx, value):
    """The bits of the float32 ``value`` as a uint32 (numba only)."""
    def reinterpret(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), reinterpret


@intrinsic
def prefetch(typingctx, array, index):
    """Ask the CPU to bring the C-contiguous ``array``'s element ``index`` (counted as if it were flat) into its
    caches, without waiting for it (numba only): LLVM's prefetch, an instruction on x86 and ARM, nothing where a
    target has none."""
    def ask(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        byte = ir.IntType(8).as_pointer()
        fetch = builder.module.declare_intrinsic("llvm.prefetch", fnty=ir.FunctionType(
            ir.VoidType(), [byte, ir.IntType(32), ir.IntType(32), ir.IntType(32)]))
        read, keep_in_every_cache, data_cache = (ir.Constant(ir.IntType(32), n) for n in (0, 3, 1))
        builder.call(fetch, [builder.bitcast(builder.gep(data, [args[1]]), byte), read, keep_in_every_cache,
                             data_cache])
        return context.get_dummy_value()
    return types.void(array, types.intp), ask


@numba.njit(inline="always")
def fetch_ahead(values, row):
    # The cache lines FETCH_AHEAD_BYTES past row ``row`` of the 2-D ``values``, asked for while this row is read.
    start = row * values.shape[1] + FETCH_AHEAD_BYTES // values.itemsize
    for index in range(start, min(start + values.shape[1], values.size), CACHE_LINE_BYTES // values.itemsize):
        prefetch(values, index)


def load(values, row, column):
    """``values[row, column]`` (a bf16 or float32 pattern) as a float32 (numba only)."""


@overload(load, inline="always")
def _load(values, row, column):
    if values.dtype == types.uint16:  # a bf16 is the top half of a float32
        return lambda values, row, column: as_float(np.uint32(values[row, column]) << np.uint32(16))
    return lambda values, row, column: as_float(values[row, column])


def store(out, row, column, value):
    """The float32 ``value`` into ``out[row, column]`` (a bf16 or float32 pattern) (numba only)."""


@overload(store, inline="always")
def _store(out, row, column, value):
    if out.dtype == types.uint16:
        def store_bf16(out, row, column, value):
            # to nearest even, as torch's float32 -> bfloat16 cast, which makes every NaN 0x7FC0
            pattern = as_pattern(value)
            rounded = (pattern + np.uint32(0x7FFF) + ((pattern >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            nan = (pattern & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
            out[row, column] = np.uint16(0x7FC0) if nan else np.uint16(rounded)
        return store_bf16

    def store_float32(out, row, column, value):
        out[row, column] = as_pattern(value)
    return store_float32


@numba.njit(inline="always")
def ordered(pattern):
    # A float32's pattern as an int32 in the floats' order (negative ones count down): integer min and max
    # run in vector lanes, where float ones must keep NaN's order and run one value at a time.
    signed = np.int32(pattern)
    return signed ^ ((signed >> np.int32(31)) & np.int32(0x7FFFFFFF))


@numba.njit(inline="always")
def ordered16(pattern):
    # ``ordered`` of a bf16's 16 bits
    signed = np.int16(pattern)
    return np.int16(signed ^ ((signed >> np.int16(15)) & np.int16(0x7FFF)))


def row_range(values, row):
    """Row ``row``'s (min, max) as float32s, as torch.aminmax gives them for finite rows; a row holding a NaN or
    an infinity has one in its min or max (a NaN's key lies beyond the infinities'), which ``make_scales`` flags
    (numba only)."""


@overload(row_range, inline="always")
def _row_range(values, row):
    if values.dtype == types.uint16:
        def bf16_range(values, row):
            # On the 16 bits (a bf16's order is its float32's): 32 lanes to a 512-bit register, where numba's
            # widened keys took 64-bit lanes; 3-5x faster than widening every value first.
            lo, hi = np.int16(0x7FFF), np.int16(-0x8000)
            for j in range(values.shape[1]):
                key = ordered16(values[row, j])
                lo = min(lo, key)
                hi = max(hi, key)
            return (as_float(np.uint32(np.uint16(ordered16(lo))) << np.uint32(16)),
                    as_float(np.uint32(np.uint16(ordered16(hi))) << np.uint32(16)))
        return bf16_range

    def float32_range(values, row):
        lo, hi = np.int32(0x7FFFFFFF), np.int32(-0x80000000)
        for j in range(values.shape[1]):
            key = ordered(values[row, j])
            lo = min(lo, key)
            hi = max(hi, key)
        return as_float(np.uint32(ordered(lo))), as_float(np.uint32(ordered(hi)))  # the map is its own inverse
    return float32_range


def row_extent(values, row):
    """Row ``row``'s (-max |x|, max |x|) as float32s: all that a symmetric scale reads of a range (``make_scales``
    takes max(-min, max)), in one reduction where ``row_range`` makes two; a NaN's or an infinity's magnitude is
    the largest, so such a row is flagged as ``row_range``'s is (numba only)."""


@overload(row_extent, inline="always")
def _row_extent(values, row):
    if values.dtype == types.uint16:
        def bf16_extent(values, row):
            magnitude = np.uint16(0)
            for j in range(values.shape[1]):
                magnitude = max(magnitude, np.uint16(values[row, j] & np.uint16(0x7FFF)))
            top = as_float(np.uint32(magnitude) << np.uint32(16))
            return -top, top
        return bf16_extent

    def float32_extent(values, row):
        magnitude = np.uint32(0)
        for j in range(values.shape[1]):
            magnitude = max(magnitude, values[row, j] & np.uint32(0x7FFFFFFF))
        top = as_float(magnitude)
        return -top, top
    return float32_extent


@numba.njit(inline="always")
def make_scales(low, high, symmetric, max_abs, qmin, qmax, storage, scale, inverse, zero):
    # quant._unchecked_scale and fake_quantize_unchecked's checks, operation for operation, on each block's range
    # (``low``, ``high``): its scale, inverse and zero point (left unwritten if ``symmetric``), and whether any of
    # them cannot be trusted. ``storage``: how the scale is stored (0 float32, 1 on a float grid (fp16),
    # 2 bfloat16), that grid's mantissa bits and smallest normal exponent field, the largest and smallest scale.
    rounding, mantissa_bits, lowest, largest, smallest = storage
    count = low.shape[0]
    steps = qmax - qmin
    wanted = np.empty(count, np.float32)  # the scale that maps the range onto the grid exactly
    stored = np.empty(count, np.float32)  # that scale in its storage dtype, rounded up
    step = np.empty(count, np.float32)  # the next scale up in the storage dtype
    bottom = np.empty(count, np.float32)  # the low end that sets the zero point
    bad = False
    for i in range(count):
        lo, hi = low[i], high[i]
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
            pattern = as_pattern(wanted[i])
            rounded = (pattern + np.uint32(0x7FFF) + ((pattern >> np.uint32(16)) & np.uint32(1))) \
                & np.uint32(0xFFFF0000)
            stored[i] = as_float(rounded)
            step[i] = as_float(rounded + np.uint32(0x10000))
    else:
        for i in range(count):
            exponent = max((as_pattern(wanted[i]) >> np.uint32(23)) & np.uint32(0xFF), lowest)
            level = np.rint(wanted[i] * as_float((np.uint32(254) + mantissa_bits - exponent) << np.uint32(23))) \
                * as_float((exponent - mantissa_bits) << np.uint32(23))
            stored[i] = level if level <= largest else np.float32(np.inf)
        for i in range(count):  # the grid's step where the stored scale lies, for the next one up
            exponent = max((as_pattern(stored[i]) >> np.uint32(23)) & np.uint32(0xFF), lowest)
            step[i] = stored[i] + as_float((exponent - mantissa_bits) << np.uint32(23))
    for i in range(count):
        bad |= not np.isfinite(stored[i])  # the storage dtype cannot hold this scale
        # Round up, never down: a scale rounded down clips the ends of the range.
        value = step[i] if rounding != 0 and stored[i] < wanted[i] else stored[i]
        value = min(max(value, smallest), largest)
        scale[i] = value
        inverse[i] = np.float32(1) / value
        if symmetric:
            extent = max_abs
        else:
            point = min(max(qmin - np.rint(bottom[i] / value), qmin), qmax)
            zero[i] = point
            extent = max(abs(qmin - point), abs(qmax - point))
        bad |= extent * value >= np.float32(3.4028234663852886e38) or not np.isfinite(inverse[i])
    return bad


def round_row(values, row, grid, scale, inverse, zero, out):
    """``encode`` then ``QTensor.dequantize`` of row ``row`` of ``values`` on ``grid`` (see the module's
    docstring) with the row's ``scale``, ``inverse`` and ``zero`` point, into row ``row`` of ``out`` (numba
    only)."""


@overload(round_row, inline="always")
def _round_row(values, row, grid, scale, inverse, zero, out):
    if len(grid) == 4:
        def round_floats(values, row, grid, scale, inverse, zero, out):
            mantissa_bits, lowest, largest, overflow = grid
            for j in range(values.shape[1]):
                scaled = load(values, row, j) * inverse
                # The format's step where the value lies (its subnormals' step below its smallest normal) and its
                # inverse, as powers of two built from the exponent field: scaling by them is exact, so rint makes
                # the one rounding, to nearest even, as the cast does.
                exponent = max((as_pattern(scaled) >> np.uint32(23)) & np.uint32(0xFF), lowest)
                up = as_float((np.uint32(254) + mantissa_bits - exponent) << np.uint32(23))
                down = as_float((exponent - mantissa_bits) << np.uint32(23))
                level = np.rint(scaled * up) * down
                if abs(level) > largest:  # NaN stays NaN: the comparison is false
                    level = np.float32(np.copysign(overflow, scaled))
                store(out, row, j, level * scale)
        return round_floats

    if len(grid) == 2 * TABLE_BOUNDARIES + 1:
        def round_table(values, row, grid, scale, inverse, zero, out):
            # Boundaries sorted (a value above one goes up a slot) and each slot's level, held in registers and
            # compared one after another, with no lookup per value (a gather: microcode on some CPUs).
            b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, \
                l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, l11, l12, l13, l14, l15 = grid
            for j in range(values.shape[1]):
                scaled = load(values, row, j) * inverse
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
                store(out, row, j, level * scale)
        return round_table

    def round_integers(values, row, grid, scale, inverse, zero, out):
        qmin, qmax = grid
        for j in range(values.shape[1]):
            code = np.rint(load(values, row, j) * inverse + zero)
            # adding 0 - z turns rounding's -0 into the +0 of code 0, as torch's route
            store(out, row, j, (min(max(code, qmin), qmax) + (np.float32(0) - zero)) * scale)
    return round_integers


@_compiled
def round_rows(values, scale, inverse, zero, grid, out, rows):
    # Each row with its given scale, inverse and zero point, a task of ``rows`` rows at a time.
    n = values.shape[0]
    for task in numba.prange((n + rows - 1) // rows):
        for row in range(task * rows, min(n, (task + 1) * rows)):
            fetch_ahead(values, row)
            round_row(values, row, grid, scale[row], inverse[row], zero[row], out)


@_compiled
def round_groups(values, symmetric, max_abs, qmin, qmax, storage, grid, out, suspect, rows):
    # Min-max blocks, scales included: each task of ``rows`` rows finds their ranges, makes their scales and
    # rounds them while they are in the core's L2 cache, so the weights are read from memory once.
    n = values.shape[0]
    for task in numba.prange((n + rows - 1) // rows):
        first = task * rows
        count = min(n, first + rows) - first
        low = np.empty(count, np.float32)
        high = np.empty(count, np.float32)
        if symmetric:
            for i in range(count):
                fetch_ahead(values, first + i)
                low[i], high[i] = row_extent(values, first + i)
        else:
            for i in range(count):
                fetch_ahead(values, first + i)
                low[i], high[i] = row_range(values, first + i)
        scale = np.empty(count, np.float32)
        inverse = np.empty(count, np.float32)
        zero = np.zeros(count, np.float32)
        suspect[task] = make_scales(low, high, symmetric, max_abs, qmin, qmax, storage, scale, inverse, zero)
        for i in range(count):
            round_row(values, first + i, grid, scale[i], inverse[i], zero[i], out)
