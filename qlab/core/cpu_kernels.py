"""Round-to-nearest of integer and table formats on a CPU in two compiled passes over the weights.

torch's route (``qlab.core.quant._dequantized_blocks``) makes seven passes over each chunk (cast, scale, round,
clamp, offset, rescale, cast back) plus a slow min/max over 64-value rows: 2.4 s for the 0.97 B linear weights of
a 1B model on two cores, while one evaluation of 512 tokens on AMX takes 1.5 s. Here one pass finds each block's
range and a second rounds, rescales and stores each value while it is in a register: the same bits (the same
float32 operations in the same order, ties to even, stores rounded to nearest even as torch casts), 3-4x faster.

numba compiles each kernel once per machine and pair of dtypes (about 1.5 s), and keeps it in ``__pycache__``
beside the kernels, as Python keeps bytecode; a later process loads them in 0.25 s. Tensors too small to repay
that keep torch's route (the bundled models never import numba), and so does everything else: float formats,
fp16 weights, one scale for a whole tensor, a GPU.
"""

from __future__ import annotations

import functools
import importlib

import numpy as np
import torch

# Values in one tensor from which loading the kernels (once per process) pays: a 1B model's linears hold 4-33 M.
MIN_VALUES = 1 << 22
# Values rounded by one thread at a time (whole rows), so its float32 scratch row is made once per batch of rows.
VALUES_PER_TASK = 1 << 18
# Stored dtypes read and written here, as (unsigned view, bits to shift into a float32's pattern).
_PATTERNS = {torch.bfloat16: (torch.int16, np.uint16, 16), torch.float32: (torch.int32, np.uint32, 0)}


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


def _patterns(x: torch.Tensor) -> tuple[np.ndarray, int]:
    signed, unsigned, shift = _PATTERNS[x.dtype]
    return x.view(signed).numpy().view(unsigned), shift


def block_ranges(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's (min, max) in float32, NaN where the row holds a NaN or an infinity."""
    values, shift = _patterns(blocks)
    low = torch.empty(blocks.shape[0], dtype=torch.float32)
    high = torch.empty_like(low)
    _kernels().ranges(values, shift, low.numpy(), high.numpy(), _rows_per_task(blocks))
    return low, high


def dequantize_blocks(blocks: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, inverse: torch.Tensor,
                      zero_point: torch.Tensor | None, fmt, tables: tuple[torch.Tensor, ...] | None) -> None:
    """``_dequantized_blocks`` for an integer format, or a table format with its prefix ``tables``."""
    kernels = _kernels()
    values, shift = _patterns(blocks)
    target, out_shift = _patterns(out)
    scale, inverse = (s.reshape(-1).contiguous().numpy() for s in (scale, inverse))
    if fmt.kind == "integer":
        zero = np.zeros_like(scale) if zero_point is None else zero_point.to(torch.float32).numpy()
        offset = np.float32(0.0) - zero  # adding 0 - z turns rounding's -0 into the +0 of code 0, as torch's route
        kernels.integers(values, shift, inverse, zero, offset, scale, np.float32(fmt.qmin), np.float32(fmt.qmax),
                 target, out_shift, _rows_per_task(blocks))
    else:
        low_level, boundary, high_level = (t.to(torch.float32).numpy() for t in tables)
        kernels.table(values, shift, inverse, low_level, boundary, high_level, scale, target, out_shift,
              _rows_per_task(blocks))

