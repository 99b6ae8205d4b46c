"""Round-to-nearest of integer, table and float formats on a CPU in compiled passes over the weights.

torch's route (``qlab.core.quant._dequantized_blocks``) makes seven passes over each chunk (cast, scale, round,
clamp, offset, rescale, cast back), a slow min/max over 64-value rows and two dozen passes over the rows to make
their scales: 2.4 s for the 0.97 B linear weights of a 1B model on two cores, while one evaluation of 512 tokens
takes 1.5 s on AMX, 4 s on AVX512-BF16. Here one pass finds each block's range, one makes every block's scale,
inverse and zero point, and one rounds, rescales and stores each value while it is in a register: the same bits
(the same float32 operations in the same order, ties to even, stores rounded to nearest even as torch casts).

- Integers: ``rint`` and a clamp. Tables (4-bit): the value is compared with each boundary in turn, all of them
  held in registers; a lookup per value would be a gather, microcode on some CPUs.
- Floats (fp16, fp8): ``rint`` at the format's step for each value's exponent, the step built from the exponent
  field (torch's casts of bf16 to them took 1.6 s and 3.7 s for those linears). A plain cast to fp16 goes here
  only from bf16: torch casts fp32 (the bundled models' embeddings) in one vectorised pass.

numba compiles each kernel once per machine and pair of dtypes (about 1.5 s), and keeps it in ``__pycache__``
beside the kernels, as Python keeps bytecode; a later process loads them in 0.25 s. Tensors too small to repay
that keep torch's route (the bundled models never import numba), and so does everything else: fp16 weights,
one scale for a whole tensor, percentile and MSE calibration's scales, casts to bf16, a GPU.
"""

from __future__ import annotations

import functools
import importlib
import math

import numpy as np
import torch

# Values in one tensor from which the kernels are used (loading them costs 0.25 s once per process): a 1B model's
# linears hold 1-33 M, the bundled models' at most 0.88 M.
MIN_VALUES = 1 << 20
# Values rounded by one thread at a time (whole rows), so its float32 scratch row is made once per batch of rows.
VALUES_PER_TASK = 1 << 18
# Stored dtypes read and written here, as their bit patterns (signed view, unsigned view).
_PATTERNS = {torch.bfloat16: (torch.int16, np.uint16), torch.float32: (torch.int32, np.uint32)}


@functools.cache
def _kernels():
    """The compiled kernels' module, or None without numba (then torch's route does everything)."""
    try:
        return importlib.import_module("qlab.core.numba_kernels")
    except ImportError:
        return None


def usable(blocks: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether these blocks (one row per scale, several rows) round here into ``out_dtype``."""
    return (blocks.device.type == "cpu" and blocks.dtype in _PATTERNS and out_dtype in _PATTERNS
            and blocks.numel() >= MIN_VALUES and blocks.shape[0] > 1 and blocks.is_contiguous()
            and _kernels() is not None)


def _rows_per_task(blocks: torch.Tensor) -> int:
    return max(1, VALUES_PER_TASK // blocks.shape[1])


def _patterns(x: torch.Tensor) -> np.ndarray:
    signed, unsigned = _PATTERNS[x.dtype]
    return x.view(signed).numpy().view(unsigned)


def block_ranges(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (min, max) in float32, NaN where the row holds a NaN or an infinity."""
    low = torch.empty(blocks.shape[0], dtype=torch.float32)
    high = torch.empty_like(low)
    ranges = _kernels().bf16_ranges if blocks.dtype == torch.bfloat16 else _kernels().ranges
    ranges(_patterns(blocks), low.numpy(), high.numpy(), _rows_per_task(blocks))
    return low, high


def block_scales(blocks: torch.Tensor, symmetric: bool, fmt, scale_dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``quant._block_scales`` of min-max blocks: each row's scale (stored in ``scale_dtype``, rounded up) and
    its inverse, its zero point (None if ``symmetric``), as float32 columns, and whether some of them cannot be
    trusted. torch's two dozen passes over the rows took 0.26 s for a 1B model's linears in groups of 64."""
    low, high = block_ranges(blocks)
    scale, inverse = torch.empty_like(low), torch.empty_like(low)
    zero = None if symmetric else torch.empty_like(low)
    unwritten = np.empty(0, dtype=np.float32)  # the kernel writes no zero point for a symmetric grid
    rows = 1 << 14
    suspect = np.zeros((low.numel() + rows - 1) // rows, dtype=np.bool_)
    if scale_dtype == torch.float32:
        rounding, mantissa_bits, lowest = 0, np.uint32(0), np.uint32(0)
    elif scale_dtype == torch.bfloat16:
        rounding, mantissa_bits, lowest = 2, np.uint32(0), np.uint32(0)
    else:
        rounding, (mantissa_bits, lowest, _, _) = 1, float_grid(scale_dtype)
    finfo = torch.finfo(scale_dtype)
    _kernels().scales(low.numpy(), high.numpy(), symmetric, np.float32(fmt.max_abs), np.float32(fmt.qmin),
                      np.float32(fmt.qmax), rounding, mantissa_bits, lowest, np.float32(finfo.max),
                      np.float32(finfo.tiny * finfo.eps), scale.numpy(), inverse.numpy(),
                      unwritten if zero is None else zero.numpy(), suspect, rows)
    columns = [None if t is None else t[:, None] for t in (scale, inverse, zero)]
    return *columns, torch.from_numpy(suspect).any()


@functools.cache
def float_grid(cast_dtype: torch.dtype) -> tuple[np.uint32, np.uint32, np.float32, np.float32] | None:
    """For a float format: its mantissa bits, the float32 exponent field of its smallest normal, its largest
    value and what overflow gives: what torch's cast gives for infinity (infinity; E4M3 "fn" has none, and torch
    2.13 saturates it at the largest value where torch 2.11 gave NaN); None where its subnormals' inverse step
    leaves float32 (bf16)."""
    finfo = torch.finfo(cast_dtype)
    mantissa_bits = round(-math.log2(finfo.eps))
    lowest = round(math.log2(finfo.smallest_normal)) + 127
    if mantissa_bits >= lowest:
        return None
    overflow = torch.tensor(math.inf).to(cast_dtype).to(torch.float32).item()
    return np.uint32(mantissa_bits), np.uint32(lowest), np.float32(finfo.max), np.float32(overflow)


def rounds(fmt) -> bool:
    """Whether the kernels round this format: every integer format, 4-bit tables, fp16 and fp8."""
    if fmt.kind == "float":
        return float_grid(fmt.cast_dtype) is not None
    return fmt.kind == "integer" or fmt.bits <= 4


def casts(x: torch.Tensor, out_dtype: torch.dtype, fmt) -> bool:
    """Whether ``cast`` makes this plain cast: a large contiguous bf16 tensor to fp16 or fp8."""
    return (x.dtype == torch.bfloat16 and x.dim() > 0 and x.is_contiguous() and fmt.kind == "float"
            and usable(x.reshape(-1, x.shape[-1]), out_dtype) and rounds(fmt))


def cast(x: torch.Tensor, out: torch.Tensor, fmt) -> None:
    """``out`` = ``x`` cast to the unscaled float format ``fmt`` and back (any contiguous bf16 or fp32 ``x``
    and ``out`` of its shape)."""
    rows = x.reshape(-1, x.shape[-1])
    ones = np.ones(rows.shape[0], dtype=np.float32)
    _round_floats(rows, out.view(rows.shape), ones, ones, fmt)


def _round_floats(blocks: torch.Tensor, out: torch.Tensor, scale: np.ndarray, inverse: np.ndarray, fmt) -> None:
    _kernels().floats(_patterns(blocks), inverse, scale, *float_grid(fmt.cast_dtype), _patterns(out),
                      _rows_per_task(blocks))


def padded_table(search: tuple[torch.Tensor, torch.Tensor], boundaries_count: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A table's ``search`` (``quant._lut_search``) as float32, grown to ``boundaries_count`` boundaries for a
    kernel that compares with a fixed number: the extra boundaries are infinite, so no value goes past them, and
    the extra levels repeat the last."""
    boundaries, levels = (t.to(torch.float32) for t in search)
    padding = boundaries_count - boundaries.numel()
    return (torch.cat([boundaries, boundaries.new_full((padding,), math.inf)]),
            torch.cat([levels, levels[-1:].expand(padding)]))


def dequantize_blocks(blocks: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, inverse: torch.Tensor,
                      zero: torch.Tensor | None, fmt, search: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """``_dequantized_blocks`` for a format the kernels round; a table format with its ``search``: the sorted
    boundaries (a value above one goes up a slot) and each slot's level."""
    kernels = _kernels()
    values, target = _patterns(blocks), _patterns(out)
    scale, inverse = (s.reshape(-1).contiguous().numpy() for s in (scale, inverse))
    if fmt.kind == "float":
        _round_floats(blocks, out, scale, inverse, fmt)
    elif fmt.kind == "integer":
        zero = np.zeros_like(scale) if zero is None else zero.reshape(-1).contiguous().numpy()
        kernels.integers(values, inverse, zero, scale, np.float32(fmt.qmin), np.float32(fmt.qmax), target,
                         _rows_per_task(blocks))
    else:
        boundaries, levels = (t.numpy() for t in padded_table(search, kernels.TABLE_BOUNDARIES))
        kernels.table(values, inverse, boundaries, levels, scale, target, _rows_per_task(blocks))
