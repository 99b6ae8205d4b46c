"""Round-to-nearest of integer, table and float formats on a CPU in compiled kernels.

torch's route (``qlab.core.quant._dequantized_blocks``) makes seven passes over each chunk (cast, scale, round,
clamp, offset, rescale, cast back), a slow min/max over 64-value rows and two dozen passes over the rows to make
their scales: 2.4 s for the 0.97 B linear weights of a 1B model on two cores, while one evaluation of 512 tokens
takes 1.5 s on AMX, 4 s on AVX512-BF16. With min-max scales one kernel does everything (``round_groups``, the CPU
counterpart of ``gpu_kernels.round_groups``): each task of whole rows (``VALUES_PER_TASK`` values) finds its rows'
ranges, makes their scales, inverses and zero points, then rounds, rescales and stores each value in one loop per
row while the rows are still in its core's L2 cache, so the weights are read from memory once. Scales made
elsewhere (percentile, MSE) go to the rounding loop alone (``dequantize_blocks``). Either way the bits are torch's
route's: the same float32 operations in the same order, ties to even, stores rounded to nearest even as torch casts.
For those linears in groups of 64 (bf16 in and out, two cores, medians of 9 runs) the fused kernel took 0.49 s for
int4, 0.50 s int8, 0.71 s nf4, 0.48 s fp8_e4m3, against 0.68, 0.70, 1.07 and 0.79 s for the three kernels before
it (ranges, scales, rounding through a scratch row in memory): most of the gain is the one loop per row, as the
kernels run below this machine's memory bandwidth.

- Integers: ``rint`` and a clamp. Tables (4-bit): the value is compared with each boundary in turn, all of them
  held in registers; a lookup per value would be a gather, microcode on some CPUs.
- Floats (fp16, fp8): ``rint`` at the format's step for each value's exponent, the step built from the exponent
  field (torch's casts of bf16 to them took 1.6 s and 3.7 s for those linears). A plain cast to fp16 goes here
  only from bf16: torch casts fp32 (the bundled models' embeddings) in one vectorised pass.

numba compiles each kernel once per machine, pair of dtypes and kind of format (about 1.5 s), and keeps it in
``__pycache__`` beside the kernels, as Python keeps bytecode; a later process loads them in 0.25 s. Tensors too small
to repay that keep torch's route (the bundled models never import numba), and so does everything else: fp16
weights, one scale for a whole tensor, percentile and MSE calibration's scales (not their rounding), casts to bf16,
a GPU.
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
# Values one thread takes at a time (whole rows): 0.5-1 MB, so they stay in its core's L2 cache (2 MB here)
# from the fused kernel's ranges to its rounding.
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


def _scale_storage(scale_dtype: torch.dtype) -> tuple[int, np.uint32, np.uint32, np.float32, np.float32]:
    """How the kernels store a scale in ``scale_dtype`` (0 float32, 1 on a float grid, 2 bfloat16), that grid's
    mantissa bits and smallest normal exponent field, and the dtype's largest and smallest scale."""
    finfo = torch.finfo(scale_dtype)
    extremes = np.float32(finfo.max), np.float32(finfo.tiny * finfo.eps)
    if scale_dtype == torch.float32:
        return 0, np.uint32(0), np.uint32(0), *extremes
    if scale_dtype == torch.bfloat16:
        return 2, np.uint32(0), np.uint32(0), *extremes
    return 1, *float_grid(scale_dtype)[:2], *extremes


def round_groups(blocks: torch.Tensor, out: torch.Tensor, fmt, scale_dtype: torch.dtype, symmetric: bool,
                 search: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """``fake_quantize_unchecked`` of min-max blocks (a format the kernels round) in one pass over the weights:
    each task finds its rows' ranges, makes their scales (stored in ``scale_dtype``, rounded up, as
    ``quant._block_scales``) and rounds the rows into ``out`` while they are in its core's cache. Returns the
    0-dim bool flag of values that cannot be trusted."""
    rows = _rows_per_task(blocks)
    suspect = np.zeros(-(-blocks.shape[0] // rows), dtype=np.bool_)
    _kernels().round_groups(_patterns(blocks), symmetric, np.float32(fmt.max_abs), np.float32(fmt.qmin),
                            np.float32(fmt.qmax), _scale_storage(scale_dtype), _grid(fmt, search), _patterns(out),
                            suspect, rows)
    return torch.from_numpy(suspect).any()


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
    _kernels().round_rows(_patterns(rows), ones, ones, np.zeros_like(ones), float_grid(fmt.cast_dtype),
                          _patterns(out.view(rows.shape)), _rows_per_task(rows))


def _padded_table(search: tuple[torch.Tensor, torch.Tensor], boundaries_count: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A table's ``search`` (``quant._lut_search``) as float32, grown to ``boundaries_count`` boundaries for a
    kernel that compares with a fixed number: the extra boundaries are infinite, so no value goes past them, and
    the extra levels repeat the last."""
    boundaries, levels = (t.to(torch.float32) for t in search)
    padding = boundaries_count - boundaries.numel()
    return (torch.cat([boundaries, boundaries.new_full((padding,), math.inf)]),
            torch.cat([levels, levels[-1:].expand(padding)]))


def _grid(fmt, search: tuple[torch.Tensor, torch.Tensor] | None) -> tuple:
    """The format's grid as the kernels take it, a tuple whose length says how values round (``numba_kernels``)."""
    if fmt.kind == "float":
        return float_grid(fmt.cast_dtype)
    if fmt.kind == "integer":
        return np.float32(fmt.qmin), np.float32(fmt.qmax)
    return tuple(torch.cat(_padded_table(search, _kernels().TABLE_BOUNDARIES)).numpy())


def dequantize_blocks(blocks: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, inverse: torch.Tensor,
                      zero: torch.Tensor | None, fmt, search: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """``_dequantized_blocks`` for a format the kernels round, with scales made elsewhere (percentile and MSE
    calibration's); a table format with its ``search``: the sorted boundaries (a value above one goes up a slot)
    and each slot's level."""
    scale, inverse = (s.reshape(-1).contiguous().numpy() for s in (scale, inverse))
    zero = np.zeros_like(scale) if zero is None else zero.reshape(-1).contiguous().numpy()
    _kernels().round_rows(_patterns(blocks), scale, inverse, zero, _grid(fmt, search), _patterns(out),
                          _rows_per_task(blocks))
