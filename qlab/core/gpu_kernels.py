"""Round-to-nearest of integer, 4-bit table and float formats on a GPU in one pass over the weights (Triton).

torch's route (``qlab.core.quant._dequantized_blocks``) runs each chunk through half a dozen float32 passes
(scale, round, clamp, offset, rescale and cast, each a kernel writing a float32 copy): on a lent H100 the streamed
sweep of an 8B model spent 0.33-0.49 s of a scheme there (int4, int8, fp8), against 1.83 s for an evaluation.
Here one kernel reads each stored value once, makes the same float32 operations in the same order (no fused
multiply-adds: ``enable_fp_fusion=False``), and writes the result once, with torch's bits: ties to even, the
float32 -> bfloat16 store rounded to nearest even with torch's NaN. A float format past its largest value
gives what torch's CPU cast gives for infinity (``cpu_kernels.float_grid``), on every device.

With min-max scales over blocks of up to ``MAX_FUSED_WIDTH`` values (groups, channels), one launch per weight
does everything (``round_groups``): each program finds its blocks' ranges and makes their scales as
``quant._unchecked_scale`` does, torch's CUDA division by a number (a product with its float32 reciprocal)
included. Other scales (percentile, MSE, one per tensor) stay torch's (``quant._block_scales``) and only the
rounding runs here (``dequantize_blocks``). A 4-bit table (nf4, fp4) is searched in buckets: its range cut into
equal buckets, each holding at most one of its boundaries (``_bucketed``), a value's bucket names the one boundary
to compare it with and the levels on either side. The boundaries are nudged so that a strict comparison keeps the
table's tie rule (``quant._lut_search``), so the levels are the CPU kernels' (which compare with all 15 in turn:
on a lent H100 that took an nf4 scheme's rounding to 2.15x the time of copying the weights, int4's 1.04x).
Triton ships with CUDA builds of torch; without it, on a GPU before Ampere, or on a CPU, torch's route does
everything. The kernels have run on one GPU model with one Triton release: where one fails to compile or
launch elsewhere, the failure is logged and torch's route takes over for the rest of the process (the same bits,
only slower), instead of stopping a sweep.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from qlab.core import cpu_kernels
from qlab.core.formats import straddled_levels

# Values in one tensor from which the kernel is used: below, torch's few launches cost less than a first compile.
MIN_VALUES = 1 << 20
# Values each program rounds: large enough for wide loads, small enough for thousands of programs per weight.
VALUES_PER_PROGRAM = 2048
# Widest block the fused kernel (``round_groups``) holds in one program's registers: an 8B model's widest row.
MAX_FUSED_WIDTH = 1 << 14
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


class _FormatArguments(NamedTuple):
    """What the kernels take about the format: a table's buckets (``_bucketed``: the device table, else a
    placeholder never read; the bucket of a value x is trunc(x * scale + offset); their number) and a float
    format's grid (mantissa bits, smallest normal exponent field, largest value, overflow), zeros for what another
    kind of format does not use."""

    table: torch.Tensor
    bucket_scale: float
    bucket_offset: float
    buckets: int
    mantissa_bits: int = 0
    lowest: int = 0
    largest: float = 0.0
    overflow: float = 0.0

    @property
    def table_search(self) -> tuple[torch.Tensor, float, float, int]:
        return self.table, self.bucket_scale, self.bucket_offset, self.buckets

    @property
    def float_grid(self) -> tuple[int, int, float, float]:
        return self.mantissa_bits, self.lowest, self.largest, self.overflow


def _format_arguments(fmt, search, placeholder: torch.Tensor) -> _FormatArguments | None:
    """``_FormatArguments`` of ``fmt`` (``placeholder`` in place of a table it has not); None for a table whose
    boundaries no bucketing here separates (then torch's route rounds it)."""
    if fmt.kind == "lut":
        bucketed = _bucketed(*search)
        return None if bucketed is None else _FormatArguments(*bucketed)
    if fmt.kind == "float":
        mantissa_bits, lowest, largest, overflow = cpu_kernels.float_grid(fmt.cast_dtype)
        return _FormatArguments(placeholder, 0.0, 0.0, 1, int(mantissa_bits), int(lowest), float(largest),
                                float(overflow))
    return _FormatArguments(placeholder, 0.0, 0.0, 1)


# Most buckets a table is cut into: a 4-bit table needs 32 (nf4's closest boundaries are 0.08 of its range of 2
# apart, fp4's 0.5 of 12), and each bucket's entries are read from the device's cache.
MAX_BUCKETS = 1024


@functools.cache
def _bucketed(boundaries: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, float, float, int] | None:
    """A table's search cut into buckets, each holding at most one boundary: the fewest (a power of two, up to
    ``MAX_BUCKETS``) that separate its boundaries, on ``boundaries``' device as three rows (each bucket's boundary,
    infinite where it holds none; the level below it; the level above it: ``formats.straddled_levels``), the
    float32 scale and offset of the kernels' bucket ``trunc(x * scale + offset)`` (clamped to the buckets, a NaN
    in the first) and their number; None where none does. Once per table and device (``quant._lut_search`` hands
    the same tensors every time).

    Exact for every float32: each bucket holds an interval of values (the bucket is monotone in x), whose ends are
    found by bisecting float32's order with the kernels' own roundings (product, then sum, each rounded once), and
    a value's level is the level of the slot above every boundary it exceeds."""
    device = boundaries.device
    boundaries, levels = boundaries.cpu(), levels.cpu()
    low, high = np.float32(levels[0].item()), np.float32(levels[-1].item())
    buckets = 16
    while buckets <= MAX_BUCKETS:
        scale = np.float32(buckets) / (high - low)
        offset = -low * scale
        starts = _bucket_starts(scale, offset, buckets)  # the smallest float32 in each bucket
        ends = np.append(np.nextafter(starts[1:], np.float32(-np.inf)), np.float32(np.inf))
        found = straddled_levels(torch.from_numpy(starts), torch.from_numpy(ends), boundaries, levels)
        if found is not None:
            below, inside, above = found
            return torch.cat([inside, below, above]).to(device), float(scale), float(offset), buckets
        buckets *= 2
    return None


def _bucket_of(x: np.ndarray, scale: np.float32, offset: np.float32, buckets: int) -> np.ndarray:
    """The kernels' bucket of each float32 in ``x``."""
    with np.errstate(over="ignore", invalid="ignore"):
        position = x * scale + offset
    return np.clip(np.nan_to_num(np.trunc(position), nan=0.0), 0, buckets - 1).astype(np.int64)


def _bucket_starts(scale: np.float32, offset: np.float32, buckets: int) -> np.ndarray:
    """The smallest float32 of each bucket (the first's is -inf; an empty bucket's, the next one's), by bisection
    over float32's order: a float32's order is its bits as a signed integer, negatives' magnitude bits flipped."""
    def as_floats(order: np.ndarray) -> np.ndarray:
        bits = np.where(order >= 0, order, ~order | -(1 << 31)).astype(np.int32)
        return bits.view(np.float32)

    wanted = np.arange(buckets)
    low = np.full(buckets, -(0x7F800000) - 1, dtype=np.int64)  # -inf's order
    high = np.full(buckets, 0x7F800000, dtype=np.int64)  # +inf's order: in the last bucket
    while np.any(low < high):  # the smallest order whose bucket is at least the wanted one
        middle = (low + high) // 2
        reached = _bucket_of(as_floats(middle), scale, offset, buckets) >= wanted
        high = np.where(reached, middle, high)
        low = np.where(reached, low, middle + 1)
    return as_floats(low)


@functools.cache
def _scale_arguments(scale_dtype: torch.dtype) -> tuple[int, int, int, float, float]:
    """How the fused kernel stores a scale in ``scale_dtype`` (0 float32, 1 on a float grid, 2 bfloat16), that
    grid's mantissa bits and smallest normal exponent field, and the dtype's largest and smallest scale."""
    finfo = torch.finfo(scale_dtype)
    extremes = float(finfo.max), float(finfo.tiny * finfo.eps)
    if scale_dtype == torch.float32:
        return 0, 0, 0, *extremes
    if scale_dtype == torch.bfloat16:
        return 2, 0, 0, *extremes
    mantissa_bits, lowest = (int(n) for n in cpu_kernels.float_grid(scale_dtype)[:2])
    return 1, mantissa_bits, lowest, *extremes


def _launched(device: torch.device, launch, *arguments) -> bool:
    """``launch(*arguments)``; False (and the kernels off for the rest of the process) where it cannot compile or
    run."""
    global MIN_VALUES
    try:
        launch(*arguments)
    except torch.cuda.OutOfMemoryError:
        raise  # the GPU's state, not the kernel's: torch's route would need more memory still
    except Exception:  # Triton's compiler and launcher raise many types; each is this kernel's failure alone
        logging.getLogger(__name__).warning("the GPU rounding kernel failed on %s; torch's route rounds from now "
                                            "on", device, exc_info=True)
        MIN_VALUES = math.inf
        return False
    return True


def dequantize_blocks(blocks: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, inverse: torch.Tensor,
                      zero: torch.Tensor | None, fmt, search: tuple[torch.Tensor, torch.Tensor] | None) -> bool:
    """``quant._dequantized_blocks`` for a format the kernel rounds (a table's ``search`` is ``quant._lut_search``):
    ``out`` receives ``encode`` then ``QTensor.dequantize`` of every value. False where the kernel could not be
    compiled or launched here (then ``out`` holds nothing and the kernel is off for the rest of the process) or the
    format is a table it cannot bucket."""
    scale, inverse = (s.reshape(-1).contiguous() for s in (scale, inverse))
    has_zero = zero is not None
    zero = zero.reshape(-1).contiguous() if has_zero else inverse  # never read without a zero point
    format_arguments = _format_arguments(fmt, search, scale)
    if format_arguments is None:
        return False
    target = out.view(torch.int16) if out.dtype == torch.bfloat16 else out
    return _launched(out.device, _kernels().dequantize,
                     blocks.reshape(-1), target.reshape(-1), blocks.shape[1], scale, inverse, zero,
                     *format_arguments.table_search, _KINDS[fmt.kind], has_zero, float(fmt.qmin), float(fmt.qmax),
                     *format_arguments.float_grid, out.dtype == torch.bfloat16, VALUES_PER_PROGRAM)


@functools.cache
def _reciprocal(number: float) -> float:
    """1 / ``number`` in float32, as torch's CUDA division by a Python number makes it (and then multiplies)."""
    return float(np.float32(1) / np.float32(number))


def _padded_width(width: int) -> int:
    return 1 << max(0, width - 1).bit_length()


def fuses(blocks: torch.Tensor, out_dtype: torch.dtype, fmt) -> bool:
    """Whether ``round_groups`` takes these min-max blocks: a format the kernel rounds, several blocks, each
    narrow enough for one program's registers (groups, and channels of up to ``MAX_FUSED_WIDTH`` values)."""
    return (blocks.dim() == 2 and blocks.shape[0] > 1 and blocks.shape[1] <= MAX_FUSED_WIDTH and rounds(fmt)
            and usable(blocks, out_dtype)
            and blocks.numel() + max(VALUES_PER_PROGRAM, _padded_width(blocks.shape[1])) < 2 ** 31)


def round_groups(blocks: torch.Tensor, out: torch.Tensor, fmt, scale_dtype: torch.dtype, symmetric: bool,
                 search: tuple[torch.Tensor, torch.Tensor] | None, flag: torch.Tensor | None = None
                 ) -> torch.Tensor | None:
    """``fake_quantize_unchecked`` of min-max blocks in one launch, scales included: each program finds its
    blocks' ranges, makes their scales (stored in ``scale_dtype``, rounded up) and rounds their values into
    ``out`` while they are in registers. On an 8B model the scales' torch passes and the rounding pass took
    0.18-0.20 s of a scheme's GPU time against 0.09 s for an evaluation (``quant._block_scales``' two dozen
    launches per weight). Returns the flag of untrusted values (a one-value int32 on the device, not waited
    for, nonzero if some cannot be trusted): ``flag`` itself, raised in place, where it is such a flag on this
    device (a pass over many weights then makes, reduces and combines no flag per weight: 3 launches fewer each,
    host time the GPU otherwise waits for); None where the kernel could not run (then ``out`` holds nothing)."""
    return round_groups_together([blocks], [out], fmt, scale_dtype, symmetric, search, flag)


# Weights one launch takes at most: a transformer block's linears (a Llama block has 7).
MAX_TOGETHER = 8


def round_groups_together(blocks: Sequence[torch.Tensor], outs: Sequence[torch.Tensor], fmt,
                          scale_dtype: torch.dtype, symmetric: bool, search: tuple[torch.Tensor, torch.Tensor] | None,
                          flag: torch.Tensor | None = None) -> torch.Tensor | None:
    """``round_groups`` of several weights, each of which ``fuses``, with blocks of one width and dtype and outputs
    of one dtype on one device: up to ``MAX_TOGETHER`` of them in one launch where their values and outputs lie at
    multiples of 16 elements from the first's (the kernel then loads as wide as for one). Launching once per
    weight, the host took longer to queue an 8B model's linears than the GPU took to round them. The flag is
    ``round_groups``'; None where the kernel could not run (then the outputs hold nothing)."""
    device = blocks[0].device
    width = blocks[0].shape[1]
    width_padded = _padded_width(width)
    rows = max(1, VALUES_PER_PROGRAM // width_padded)
    if flag is None or flag.dtype != torch.int32 or flag.numel() != 1 or flag.device != device:
        flag = torch.zeros(1, dtype=torch.int32, device=device)
    format_arguments = _format_arguments(fmt, search, flag)
    if format_arguments is None:
        return None
    on_gpu = device.type == "cuda"
    # On a GPU a bf16 is stored by the hardware's conversion (to nearest even, as torch's): it differs from torch's
    # only in a NaN's bits, and a block holding NaN is flagged, its values made again by the checked route.
    # Triton's interpreter on a CPU has no bf16: there the kernel stores the bits.
    store_bits = outs[0].dtype == torch.bfloat16 and not on_gpu
    targets = [out.view(torch.int16) if store_bits else out for out in outs]
    arguments = (*format_arguments.table_search, _KINDS[fmt.kind], symmetric, float(fmt.qmin), float(fmt.qmax),
                 float(fmt.max_abs), on_gpu, _reciprocal(fmt.max_abs), _reciprocal(fmt.qmax - fmt.qmin),
                 *format_arguments.float_grid, *_scale_arguments(scale_dtype), store_bits, rows, width_padded)
    for group in _launch_groups(list(zip(blocks, targets, strict=True))):
        first_values, first_out = group[0]
        if len(group) == 1:
            weights_table, n_rows, programs = flag, first_values.shape[0], -(-first_values.shape[0] // rows)
        else:
            weights_table, programs = _weights_table(group, rows)
            n_rows = 0  # each weight's is in the table
        if not _launched(device, _kernels().round_groups, first_values, first_out, flag, weights_table, len(group),
                         n_rows, width, *arguments, programs):
            return None
    return flag


def _launch_groups(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """(values, output) pairs in runs of up to ``MAX_TOGETHER`` whose tensors lie at multiples of 16 elements from
    their run's first ones."""
    groups: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    for values, out in pairs:
        if groups and len(groups[-1]) < MAX_TOGETHER and all(
                (tensor.data_ptr() - first.data_ptr()) % (16 * tensor.element_size()) == 0
                for tensor, first in zip((values, out), groups[-1][0], strict=True)):
            groups[-1].append((values, out))
        else:
            groups.append([(values, out)])
    return groups


def _weights_table(group: list[tuple[torch.Tensor, torch.Tensor]], rows: int) -> tuple[torch.Tensor, int]:
    """The kernel's table for weights launched together (per weight: its values' and output's offsets in elements
    from the first's, its rows, its first program) and the launch's programs."""
    (first_values, first_out), numbers, programs = group[0], [], 0
    for values, out in group:
        numbers += [(values.data_ptr() - first_values.data_ptr()) // values.element_size(),
                    (out.data_ptr() - first_out.data_ptr()) // out.element_size(), values.shape[0], programs]
        programs += -(-values.shape[0] // rows)
    return _device_table(tuple(numbers), first_values.device), programs


@functools.lru_cache(maxsize=1024)
def _device_table(numbers: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # Kept by value: a block whose weights and outputs lie where they lay before (the streamed sweep's reused
    # buffers) launches with no copy to the device.
    return torch.tensor(numbers, dtype=torch.int64).to(device)
