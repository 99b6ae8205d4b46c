"""qlab's int4 g64 weight-only matmul for one-row decode steps on a CUDA GPU: a Triton GEMV over qlab's own int4
codes (asymmetric, groups of 64 inputs), the format ``int4tq`` of the GPU benchmark.

Why another int4 kernel: tinygemm and gemlite's A16W4 both read their 4-bit weights at about 1.55 TB/s on an H100
and an H200 alike (``bench/layer_ceiling.py``), half the copy bandwidth, so int4 gains nothing from the H200's
faster memory. They turn each 4-bit code into a float with a conversion instruction, which a GPU runs at a
fraction of the rate of its adds and multiplies. Here a code becomes a float with one bitwise instruction: ``0x4B000000 |
code`` is the float32 2^23 + code, and subtracting 2^23 leaves the code exactly. The scale and zero-point are
applied once per group, not per weight: sum(s (q - z) x) = s (sum(q x) - z sum(x)).

Layout: codes packed eight to an int32 along the input dimension, output columns contiguous ((in / 8, out)), so a
warp's loads are consecutive; scales and zero-points (in code units) in bf16, (in / 64, out). A program sums
``GROUPS`` groups of its ``BLOCK_N`` columns; programs along the input dimension write partial sums (splits, out)
in float32, which are added up by plain torch ops after the kernel, so a compiled model fuses that sum into the
next operation instead of zeroing a buffer for atomic adds. A product of many rows (a prompt's prefill) does not
run the GEMV once per row: a second kernel writes the weight out in bf16 once and cuBLAS multiplies by it.

Imported only where Triton is (a CUDA machine); on a CPU the tests run it in Triton's interpreter.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import nn

GROUP = 64
PER_WORD = 8  # 4-bit codes in an int32


@triton.jit
def _code_plus_2_23(shifted, HARDWARE: tl.constexpr):
    # The low nibble of each int32 OR'ed into the bits of the float32 2^23. On a GPU one LOP3 instruction does
    # both: written as "& then |", the compiler first extracts the bit field (two instructions), then ORs.
    if HARDWARE:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, 15, 1258291200, 234;", "=r,r", [shifted],
                                         dtype=tl.int32, is_pure=True, pack=1)
    return (shifted & 0xF) | 0x4B000000


@triton.jit
def _gemv_kernel(x_ptr, packed_ptr, scale_ptr, zero_ptr, partial_ptr, N, K,
                 BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, HARDWARE: tl.constexpr):
    column_block, split, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    columns = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = columns < N  # the last block of a width that is not a multiple of BLOCK_N
    words = tl.arange(0, 8)  # the group's 8 packed rows: word w holds inputs 8w .. 8w + 7
    total = tl.zeros([BLOCK_N], tl.float32)
    for step in range(GROUPS):
        group = split * GROUPS + step
        first = group * 64
        packed = tl.load(packed_ptr + (group * 8 + words)[:, None] * N + columns[None, :], mask=inside[None, :])
        sums = tl.zeros([8, BLOCK_N], tl.float32)
        x_sum = tl.zeros([8], tl.float32)
        for nibble in tl.static_range(8):
            x = tl.load(x_ptr + row * K + first + words * 8 + nibble).to(tl.float32)
            # 2^23 + code as a float32's bits, minus 2^23: the code, exactly, without a conversion instruction
            code = _code_plus_2_23(packed >> (4 * nibble), HARDWARE).to(tl.float32, bitcast=True) - 8388608.0
            sums += code * x[:, None]
            x_sum += x
        scale = tl.load(scale_ptr + group * N + columns, mask=inside).to(tl.float32)
        zero = tl.load(zero_ptr + group * N + columns, mask=inside).to(tl.float32)
        total += scale * (tl.sum(sums, axis=0) - zero * tl.sum(x_sum, axis=0))
    tl.store(partial_ptr + (split * tl.num_programs(2) + row) * N + columns, total, mask=inside)


@triton.jit
def _dequantize_kernel(packed_ptr, scale_ptr, zero_ptr, out_ptr, N,
                       BLOCK_N: tl.constexpr, HARDWARE: tl.constexpr):
    group, column_block = tl.program_id(0), tl.program_id(1)
    columns = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = columns < N
    words = tl.arange(0, 8)
    packed = tl.load(packed_ptr + (group * 8 + words)[:, None] * N + columns[None, :], mask=inside[None, :])
    scale = tl.load(scale_ptr + group * N + columns, mask=inside).to(tl.float32)
    zero = tl.load(zero_ptr + group * N + columns, mask=inside).to(tl.float32)
    for nibble in tl.static_range(8):
        code = _code_plus_2_23(packed >> (4 * nibble), HARDWARE).to(tl.float32, bitcast=True) - 8388608.0
        inputs = group * 64 + words * 8 + nibble
        tl.store(out_ptr + inputs[:, None] * N + columns[None, :],
                 ((code - zero[None, :]) * scale[None, :]).to(tl.bfloat16), mask=inside[None, :])


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """qlab's int4 codes 0..15 (out, in) and per group scale and zero-point in code units (out, in / 64), as
    ``gpu_recipe.int4_groups`` gives them, in this kernel's layout: (in / 8, out) int32 words, scales and
    zero-points (in / 64, out) in bf16."""
    out_features, in_features = codes.shape
    if in_features % GROUP:
        raise ValueError(f"int4 g{GROUP} needs the input width to be a multiple of {GROUP}, not {in_features}")
    nibbles = codes.to(torch.int32).T.reshape(in_features // PER_WORD, PER_WORD, out_features)
    shifts = (4 * torch.arange(PER_WORD, device=codes.device, dtype=torch.int32)).view(1, PER_WORD, 1)
    # OR of the shifted nibbles: a sum of disjoint bit fields; int64 first so the top nibble cannot overflow
    packed = (nibbles.to(torch.int64) << shifts.to(torch.int64)).sum(dim=1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return (packed.contiguous(), scales.T.contiguous().to(torch.bfloat16),
            zeros.T.contiguous().to(torch.bfloat16))


# Programs a launch aims for: on a lent H100 (132 multiprocessors) every weight shape of Llama-3.1-8B ran fastest,
# or within 10 % of it, with 256 columns and two warps a program and the input split until there were 1024-2004
# programs (bench/int4tq_tune.py; bench/results/int4tq_h100.json). Fewer, longer programs left memory idle:
# gate/up took 45 us with 448 of them against 36 us with 1792.
PROGRAMS = 1536
BLOCK_N = 256
WARPS = 2
DEQUANTIZE_BLOCK = 256
# From this many rows on (a prompt's prefill), the weight is dequantized once and multiplied by cuBLAS: the GEMV
# reads the whole weight again for every row. On a lent H100, for Llama-3.1-8B's weights, writing them out took
# about 13 ms and the GEMV about 1.65 ms a row (bench/results/int4tq_prefill_h100.json): even at about 8 rows.
DEQUANTIZE_FROM_ROWS = 8


def launch_shape(out_features: int, in_features: int, *, programs: int = PROGRAMS, block: int = BLOCK_N,
                 warps: int = WARPS) -> tuple[int, int, int]:
    """(columns per program, groups of 64 inputs per program, warps) for a weight's shape: the most groups per
    program (a divisor of the groups) that still makes ``programs`` programs of ``block`` columns, one group where
    none does."""
    groups = in_features // GROUP
    column_blocks = -(-out_features // block)
    per_program = next((c for c in range(groups, 0, -1)
                        if groups % c == 0 and column_blocks * (groups // c) >= programs), 1)
    return block, per_program, warps


def _on_hardware(tensor: torch.Tensor) -> bool:
    """Whether the kernels run compiled for a GPU (the LOP3 instruction) rather than in Triton's interpreter."""
    return tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1"


def gemv(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
         block: int, groups: int, warps: int) -> torch.Tensor:
    """x (rows, in) bf16 times the packed int4 weight, as float32 partial sums (input splits, rows, out)."""
    rows, in_features = x.shape
    out_features = packed.shape[1]
    splits = in_features // (GROUP * groups)
    partial = torch.empty((splits, rows, out_features), dtype=torch.float32, device=x.device)
    _gemv_kernel[(-(-out_features // block), splits, rows)](
        x, packed, scales, zeros, partial, out_features, in_features, BLOCK_N=block, GROUPS=groups,
        HARDWARE=_on_hardware(x), num_warps=warps)
    return partial


def dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The packed int4 weight as a bf16 (in, out) matrix, (code - zero-point) * scale: what a many-row product
    (a prompt's prefill) multiplies by, read once, instead of running the GEMV once per row."""
    out_features = packed.shape[1]
    weight = torch.empty((packed.shape[0] * PER_WORD, out_features), dtype=torch.bfloat16, device=packed.device)
    _dequantize_kernel[(packed.shape[0] * PER_WORD // GROUP, -(-out_features // DEQUANTIZE_BLOCK))](
        packed, scales, zeros, weight, out_features, BLOCK_N=DEQUANTIZE_BLOCK, HARDWARE=_on_hardware(packed))
    return weight


@torch.library.custom_op("qlab::int4_gemv", mutates_args=())
def _int4_gemv_op(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  block: int, groups: int, warps: int) -> torch.Tensor:
    return gemv(x, packed, scales, zeros, block, groups, warps)


@_int4_gemv_op.register_fake
def _(x, packed, scales, zeros, block, groups, warps):
    splits = x.shape[1] // (GROUP * groups)
    return x.new_empty((splits, x.shape[0], packed.shape[1]), dtype=torch.float32)


@torch.library.custom_op("qlab::int4_dequantize", mutates_args=())
def _int4_dequantize_op(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    return dequantize(packed, scales, zeros)


@_int4_dequantize_op.register_fake
def _(packed, scales, zeros):
    return packed.new_empty((packed.shape[0] * PER_WORD, packed.shape[1]), dtype=torch.bfloat16)


class Int4Linear(nn.Module):
    """A linear layer holding qlab's int4 g64 codes in this kernel's layout (no bias: Llama's linears have none)."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor):
        super().__init__()
        packed, scale_rows, zero_rows = pack(codes, scales, zeros)
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scale_rows)
        self.register_buffer("zeros", zero_rows)
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]
        self.block, self.groups, self.warps = launch_shape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        if rows.shape[0] >= DEQUANTIZE_FROM_ROWS:
            weight = _int4_dequantize_op(self.packed, self.scales, self.zeros)
            return (rows @ weight.to(rows.dtype)).reshape(*x.shape[:-1], self.out_features)
        partial = _int4_gemv_op(rows, self.packed, self.scales, self.zeros, self.block, self.groups, self.warps)
        return partial.sum(dim=0).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
