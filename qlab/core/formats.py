"""The format registry: every number format qlab can quantize to, described once.

A format knows its bit width, its kind (float cast, integer grid or lookup table), how to round a tensor onto
its grid, and how to enumerate its representable values. Bits per weight of a scheme are derived from these
entries (see ``qlab.core.quant.storage_bytes``), never typed in a second place.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch

from qlab.core.errors import QlabError
from qlab.core.registry import Registry

Kind = Literal["float", "integer", "lut"]

# QLoRA's NormalFloat4 table (Dettmers et al. 2023, bitsandbytes `create_normal_map(offset=0.9677083)`):
# quantiles of N(0, 1) normalised to [-1, 1], asymmetric so that zero is exact.
NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
# OCP MX FP4 E2M1: 1 sign, 2 exponent, 1 mantissa bit, no inf/nan. Codes 0..7 are the positive magnitudes in
# order, so an even code index is an even mantissa bit, which is what round-half-to-even needs.
FP4_E2M1_TABLE = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True)
class Format:
    """One number format.

    Args:
        name: registry key, e.g. ``"int4"``.
        bits: storage bits per value.
        kind: ``"float"`` (rounded by a torch cast), ``"integer"`` (uniform grid with scale and zero-point) or
            ``"lut"`` (a table of levels times a scale).
        scaled: whether a per-block scale maps tensors onto the grid; plain casts (fp32/fp16/bf16) have none.
        cast_dtype: the torch dtype whose cast defines rounding, for float formats.
        exponent_bits, mantissa_bits: float layout (sign bit implied).
        table: the levels of a lookup-table format, indexed by code.
        description: one line for people.
    """

    name: str
    bits: int
    kind: Kind
    scaled: bool
    description: str
    cast_dtype: torch.dtype | None = None
    exponent_bits: int = 0
    mantissa_bits: int = 0
    table: tuple[float, ...] | None = None

    @property
    def qmin(self) -> int:
        """Smallest integer code (two's complement)."""
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return 2 ** (self.bits - 1) - 1

    @property
    def max_abs(self) -> float:
        """Largest finite magnitude on the unscaled grid."""
        if self.kind == "integer":
            return float(self.qmax)
        if self.kind == "lut":
            return max(abs(v) for v in self.table)
        return float(torch.finfo(self.cast_dtype).max)

    @property
    def code_dtype(self) -> torch.dtype:
        """dtype that holds one unpacked code in memory."""
        if self.kind == "float":
            return self.cast_dtype
        return torch.int8 if self.kind == "integer" else torch.uint8

    def levels(self) -> torch.Tensor:
        """Sorted, distinct representable values of the unscaled grid (float32).

        Integer formats give their codes; fp32 is too large to enumerate and raises.
        """
        if self.kind == "integer":
            return torch.arange(self.qmin, self.qmax + 1, dtype=torch.float32)
        if self.kind == "lut":
            return torch.tensor(sorted(set(self.table)), dtype=torch.float32)
        return _float_levels(self.name)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Round already-scaled float32 values onto the grid and return the codes (``code_dtype``).

        Integers round half to even, then saturate; floats use torch's cast, which is the hardware rounding
        (round-to-nearest-even, E4M3 "fn" saturates at 448, E5M2/fp16 overflow to inf); tables pick the
        nearest level, ties to the even code.
        """
        if self.kind == "integer":
            return torch.round(x).clamp_(self.qmin, self.qmax).to(torch.int8)
        if self.kind == "float":
            return x.to(self.cast_dtype)
        return _nearest_table_index(x, self.name)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Unscaled float32 values of codes."""
        if self.kind == "lut":
            return _table_tensor(self.name).to(codes.device)[codes.long()]
        return codes.to(torch.float32)


def _float_levels(name: str) -> torch.Tensor:
    fmt = FORMATS[name]
    if fmt.bits > 16:
        raise QlabError(f"{name} has 2^{fmt.bits} values, too many to list; pick a format of 16 bits or fewer.")
    return _enumerate_float(name).clone()


@functools.cache
def _enumerate_float(name: str) -> torch.Tensor:
    fmt = FORMATS[name]
    patterns = torch.arange(2**fmt.bits, dtype=torch.int32)
    raw = patterns.to(torch.int16 if fmt.bits == 16 else torch.uint8)
    values = raw.view(fmt.cast_dtype).to(torch.float32)
    values = values[torch.isfinite(values)]
    return torch.unique(values)  # sorted; +0 and -0 collapse


@functools.cache
def _table_tensor(name: str) -> torch.Tensor:
    return torch.tensor(FORMATS[name].table, dtype=torch.float32)


@functools.cache
def _table_search(name: str) -> tuple[torch.Tensor, tuple[float, ...], tuple[bool, ...], bool]:
    """Code of each sorted level, the decision boundaries between neighbours, and for each boundary
    whether a value exactly on it goes up (round half to even: towards the even code)."""
    table = _table_tensor(name)
    order = torch.argsort(table, stable=True)
    sorted_levels = table[order]
    distinct = torch.cat([torch.tensor([True]), sorted_levels[1:] != sorted_levels[:-1]])
    sorted_levels, codes = sorted_levels[distinct], order[distinct]
    midpoints = ((sorted_levels[1:] + sorted_levels[:-1]) / 2).tolist()
    ties_up = tuple(bool(codes[k + 1] % 2 == 0 and codes[k] % 2 == 1) for k in range(len(midpoints)))
    identity = bool(torch.equal(codes, torch.arange(len(codes))))
    return codes.to(torch.uint8), tuple(midpoints), ties_up, identity


def _nearest_table_index(x: torch.Tensor, name: str) -> torch.Tensor:
    codes, midpoints, ties_up, identity = _table_search(name)
    # Counting the boundaries below x, one comparison per boundary (15 for a 4-bit table), is ~3x faster
    # than torch.bucketize on CPU; `>=` on the boundaries whose ties go up implements half-to-even.
    slot = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for boundary, up in zip(midpoints, ties_up, strict=True):
        slot += (x >= boundary) if up else (x > boundary)
    return slot if identity else codes.to(x.device)[slot.long()]


def straddled_levels(low: torch.Tensor, high: torch.Tensor, boundaries: torch.Tensor, levels: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """For buckets of float32 values, each from ``low`` to ``high``, on a table searched by its sorted
    ``boundaries`` (a value above one goes up a slot) and each slot's ``levels``: the level of each bucket's
    smallest value, the one boundary its values straddle (inf if none) and the level above it; None if some bucket
    straddles two (then one comparison per value cannot find its level)."""
    slot_low, slot_high = torch.bucketize(low, boundaries), torch.bucketize(high, boundaries)
    if (slot_high - slot_low).max() > 1:
        return None
    inside = torch.cat([boundaries, boundaries.new_full((1,), math.inf)])[slot_low]
    inside = torch.where(slot_high > slot_low, inside, math.inf)
    return levels[slot_low].contiguous(), inside, levels[slot_high].contiguous()


# The registry, named as every qlab registry is (GGUF block formats and backends alike): ``register``,
# ``get_format``, ``format_names``.
_FORMATS: Registry[Format] = Registry("format", choose="choose one of:")
FORMATS = _FORMATS.entries
register = _FORMATS.register
format_names = _FORMATS.names  # widest first


def get_format(name: str | Format) -> Format:
    """Look a format up by name or alias (case-insensitive); accepts a Format as is."""
    return name if isinstance(name, Format) else _FORMATS.get(name)


register(Format("fp32", 32, "float", False, "IEEE single: 1 sign, 8 exponent, 23 mantissa bits (the baseline)",
                torch.float32, 8, 23), "float32")
register(Format("fp16", 16, "float", False, "IEEE half: 5 exponent, 10 mantissa bits, max 65504",
                torch.float16, 5, 10), "float16", "half")
register(Format("bf16", 16, "float", False, "bfloat16: fp32's 8-bit exponent range with 7 mantissa bits",
                torch.bfloat16, 8, 7), "bfloat16")
register(Format("fp8_e4m3", 8, "float", True, "FP8 E4M3 'fn': max 448, no infinities; saturates on overflow",
                torch.float8_e4m3fn, 4, 3), "fp8", "e4m3", "float8_e4m3fn")
register(Format("fp8_e5m2", 8, "float", True, "FP8 E5M2: fp16's range (max 57344) with 2 mantissa bits",
                torch.float8_e5m2, 5, 2), "e5m2", "float8_e5m2")
for _bits in (8, 4, 3, 2):
    register(Format(f"int{_bits}", _bits, "integer", True,
                    f"{_bits}-bit integer grid [{-(2 ** (_bits - 1))}, {2 ** (_bits - 1) - 1}] with scale "
                    "and optional zero-point"))
register(Format("nf4", 4, "lut", True, "NormalFloat4 (QLoRA): 16 normal-quantile levels times a block absmax",
                table=NF4_TABLE))
register(Format("fp4_e2m1", 4, "lut", True, "FP4 E2M1 (OCP MX): ±{0, 0.5, 1, 1.5, 2, 3, 4, 6} times a scale",
                exponent_bits=2, mantissa_bits=1, table=FP4_E2M1_TABLE), "fp4", "e2m1")
