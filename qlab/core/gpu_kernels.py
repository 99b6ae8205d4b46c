"""Round-to-nearest of integer, 4-bit table and float formats on a GPU in one pass over the weights (Triton).

torch's route (``qlab.core.quant._dequantized_blocks``) runs each chunk through half a dozen float32 passes
(scale, round, clamp, offset, rescale and cast, each a kernel writing a float32 copy): on a lent H100 the streamed
sweep of an 8B model spent 0.33-0.49 s of a scheme there (int4, int8, fp8), against 1.83 s for an evaluation.
Here one kernel reads each stored value once, makes the same float32 operations in the same order (no fused
multiply-adds: ``enable_fp_fusion=False``), and writes the result once, with torch's bits: ties to even, the
float32 -> bfloat16 store rounded to nearest even with torch's NaN. A float format past its largest value
gives what torch's CPU cast gives for infinity (``cpu_kernels.float_grid``), on every device.

The scales stay torch's (``quant._block_scales``): they are passes over one value per block. A 4-bit table (nf4,
fp4) is searched by comparing with its 15 boundaries, each nudged so that a strict comparison keeps the table's
tie rule (``quant._lut_search``), as the CPU kernels do. Triton ships with CUDA builds of
torch; without it, on a GPU before Ampere, or on a CPU, torch's route does everything. The kernel has run on one
GPU model with one Triton release: where it fails to compile or launch elsewhere, the failure is logged and torch's
route takes over for the rest of the process (the same bits, only slower), instead of stopping a sweep.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math

import torch

from qlab.core import cpu_kernels

# Values in one tensor from which the kernel is used: below, torch's few launches cost less than a first compile.
MIN_VALUES = 1 << 20
# Values each program rounds: large enough for wide loads, small enough for thousands of programs per weight.
VALUES_PER_PROGRAM = 2048
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_KINDS = {"integer": 0, "lut": 1, "float": 2}  # what the kernel does with each value, by format kind


@functools.cache
def _kernels():
    """The Triton kernel's module, or None without Triton (then torch's route does everything)."""
    try:
        return importlib.import_module("qlab.core.triton_kernels")
    except ImportError:
        return None


@functools.cache
def _supported(device_index: int) -> bool:
    # Ampere and later: Triton's current releases build for them (bf16 loads and stores included).
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def usable(blocks: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether these blocks (one row per scale) round here into ``out_dtype``."""
    return (blocks.device.type == "cuda" and blocks.dtype in _FLOAT_DTYPES and out_dtype in _FLOAT_DTYPES
            and MIN_VALUES <= blocks.numel() < 2 ** 31 - VALUES_PER_PROGRAM and blocks.is_contiguous()
            and _supported(blocks.device.index or 0) and _kernels() is not None)


def rounds(fmt) -> bool:
    """Whether the kernel rounds this format: every integer format, 4-bit tables, fp16 and fp8 (as the CPU
    kernels)."""
    return cpu_kernels.rounds(fmt)


def dequantize_blocks(blocks: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, inverse: torch.Tensor,
                      zero: torch.Tensor | None, fmt, search: tuple[torch.Tensor, torch.Tensor] | None) -> bool:
    """``quant._dequantized_blocks`` for a format the kernel rounds (a table's ``search`` is ``quant._lut_search``):
    ``out`` receives ``encode`` then ``QTensor.dequantize`` of every value. False where the kernel could not be
    compiled or launched here (then ``out`` holds nothing and the kernel is off for the rest of the process)."""
    global MIN_VALUES
    scale, inverse = (s.reshape(-1).contiguous() for s in (scale, inverse))
    has_zero = zero is not None
    zero = zero.reshape(-1).contiguous() if has_zero else inverse  # never read without a zero point
    boundaries = levels = scale  # never read but by a table
    mantissa_bits = lowest = 0
    largest = overflow = 0.0
    if fmt.kind == "lut":
        boundaries, levels = cpu_kernels.padded_table(search, _kernels().TABLE_BOUNDARIES)
    elif fmt.kind == "float":
        mantissa_bits, lowest, largest, overflow = (n.item() for n in cpu_kernels.float_grid(fmt.cast_dtype))
    target = out.view(torch.int16) if out.dtype == torch.bfloat16 else out
    try:
        _kernels().dequantize(blocks.reshape(-1), target.reshape(-1), blocks.shape[1], scale, inverse, zero,
                              boundaries, levels, _KINDS[fmt.kind], has_zero, float(fmt.qmin), float(fmt.qmax),
                              int(mantissa_bits), int(lowest), float(largest), float(overflow),
                              out.dtype == torch.bfloat16, VALUES_PER_PROGRAM)
    except torch.cuda.OutOfMemoryError:
        raise  # the GPU's state, not the kernel's: torch's route would need more memory still
    except Exception:  # Triton's compiler and launcher raise many types; each is this kernel's failure alone
        logging.getLogger(__name__).warning("the GPU rounding kernel failed on %s; torch's route rounds from now "
                                            "on", out.device, exc_info=True)
        MIN_VALUES = math.inf
        return False
    return True
