"""Quantization schemes and the pure tensor functions that apply them.

``quantize`` turns a float tensor into a ``QTensor`` (codes, scale, zero-point); ``dequantize`` maps it back;
``fake_quantize`` does both, which is how the sweep simulates a scheme. Everything works on a 2-D "blocks"
view of the tensor, one row per scale: the whole tensor, one output channel, or one group of ``group_size``
consecutive inputs. No Python loop runs over elements, channels or groups.

Over 500 lines on purpose: the frozen scheme, its storage arithmetic and the vectorised encode/decode are one
contract (bits per weight is computed here and nowhere else); the rounding algorithms live in
qlab.core.algorithms.
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Literal

import torch

from qlab.core import cpu_kernels, gpu_kernels
from qlab.core.errors import QlabError
from qlab.core.formats import Format, _table_search, _table_tensor, get_format, straddled_levels

Granularity = Literal["tensor", "channel", "group"]
Calibration = Literal["minmax", "percentile", "mse"]
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group")
CALIBRATIONS: tuple[str, ...] = ("minmax", "percentile", "mse")
# Everything but rtn and hqq needs calibration inputs, which qlab.analyses.sweep collects; see qlab.core.algorithms.
ALGORITHMS: tuple[str, ...] = ("rtn", "gptq", "gptq-act-order", "awq", "hqq")
# 2:4 semi-structured sparsity: two of every four consecutive inputs pruned, by magnitude or by SparseGPT.
SPARSITIES: tuple[str, ...] = ("none", "2:4", "2:4-sparsegpt")
TARGETS: tuple[str, ...] = ("weights",)  # activations come with real kernels; the field keeps room for them
SCALE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MSE_CLIP_RATIOS = torch.linspace(1.0, 0.5, 26)  # candidate clipping ranges, as fractions of the min-max range


@dataclass(frozen=True)
class QuantScheme:
    """How one tensor (or every linear weight of a model) is quantized.

    Args:
        format: a registry name (``qlab.core.formats``), e.g. ``"int4"``, ``"nf4"``, ``"fp8_e4m3"``.
        granularity: one scale per ``"tensor"``, per output ``"channel"`` (row), or per ``"group"`` of
            ``group_size`` consecutive values along the last dimension.
        group_size: values per group when ``granularity == "group"``.
        symmetric: zero-point fixed at 0 (integers only may be asymmetric).
        calibration: how the clipping range is chosen: ``"minmax"``, ``"percentile"`` (of |x|), or ``"mse"``
            (the clip ratio minimising squared error, searched per block).
        percentile: the percentile used by ``calibration="percentile"``.
        scale_dtype: dtype scales are stored in; ``"auto"`` is fp16 for groups (as GPTQ/AWQ/llama.cpp store
            them) and fp32 otherwise.
        targets: which tensors are quantized; only ``("weights",)`` for now.
        algorithm: weight rounding algorithm (``qlab.core.algorithms``): ``"rtn"`` (round to nearest),
            ``"gptq"`` (error-compensating rounding from calibration inputs), ``"gptq-act-order"`` (GPTQ over
            inputs in order of decreasing Hessian diagonal), ``"awq"`` (activation-aware per-input scales kept
            as an input scale) or ``"hqq"`` (calibration-free half-quadratic fit of a float zero-point; always
            asymmetric, on integer formats).
        static_groups: with ``gptq-act-order`` and groups, compute every group's scale before reordering, so
            groups stay consecutive and no group index is stored (the reference's ``static_groups``).
        sparsity: ``"none"``, ``"2:4"`` (keep the two largest of every four consecutive inputs) or
            ``"2:4-sparsegpt"`` (SparseGPT picks them from the Hessian and compensates; with ``gptq`` on scaled
            formats). Stored as the kept values plus 2 bits of position per kept value.

    Plain casts (fp32, fp16, bf16) have no scale, so their granularity fields are normalised away and two
    schemes that do the same thing compare equal.
    """

    format: str = "int8"
    granularity: str = "channel"
    group_size: int = 128
    symmetric: bool = True
    calibration: str = "minmax"
    percentile: float = 99.9
    scale_dtype: str = "auto"
    targets: tuple[str, ...] = ("weights",)
    algorithm: str = "rtn"
    static_groups: bool = False
    sparsity: str = "none"

    def __post_init__(self) -> None:
        fmt = get_format(self.format)
        set_field = object.__setattr__.__get__(self)
        set_field("format", fmt.name)
        set_field("targets", tuple(self.targets))
        if self.granularity not in GRANULARITIES:
            raise QlabError(f"unknown granularity '{self.granularity}'; use one of {', '.join(GRANULARITIES)}.")
        if self.calibration not in CALIBRATIONS:
            raise QlabError(f"unknown calibration '{self.calibration}'; use one of {', '.join(CALIBRATIONS)}.")
        if self.algorithm not in ALGORITHMS:
            raise QlabError(f"unknown algorithm '{self.algorithm}'; use one of {', '.join(ALGORITHMS)}.")
        if self.sparsity not in SPARSITIES:
            raise QlabError(f"unknown sparsity '{self.sparsity}'; use one of {', '.join(SPARSITIES)}.")
        if not set(self.targets) <= set(TARGETS) or not self.targets:
            raise QlabError(f"targets must be a subset of {TARGETS}; activation quantization is not built yet.")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise QlabError(f"group size must be a positive integer, got {self.group_size!r}.")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise QlabError(f"percentile must be in (50, 100], got {self.percentile}.")
        if not fmt.scaled:
            # A plain cast has no scale: canonicalise so equal schemes hash equal. GPTQ has nothing to round in
            # it but a fixed 2:4 mask to compensate, so that pair stays (SparseGPT is named by its sparsity).
            algorithm = "gptq" if (self.algorithm, self.sparsity) == ("gptq", "2:4") else "rtn"
            for name, value in (("granularity", "tensor"), ("group_size", 128), ("symmetric", True),
                                ("calibration", "minmax"), ("percentile", 99.9), ("scale_dtype", "auto"),
                                ("algorithm", algorithm), ("static_groups", False)):
                set_field(name, value)
            return
        self._check_algorithm(fmt, set_field)
        if not self.symmetric and fmt.kind != "integer":
            raise QlabError(f"{fmt.name} is symmetric by construction; asymmetric applies to integer formats.")
        if self.granularity != "group":
            set_field("group_size", 128)
        scale_dtype = self.scale_dtype
        if scale_dtype == "auto":
            scale_dtype = "fp16" if self.granularity == "group" else "fp32"
        if scale_dtype not in SCALE_DTYPES:
            raise QlabError(f"unknown scale dtype '{self.scale_dtype}'; use auto, {', '.join(SCALE_DTYPES)}.")
        set_field("scale_dtype", scale_dtype)

    def _check_algorithm(self, fmt: Format, set_field) -> None:
        """Refuse algorithm, static-group and sparsity combinations no algorithm implements; normalise the rest."""
        if self.static_groups and self.algorithm != "gptq-act-order":
            raise QlabError("static groups only change gptq-act-order (other algorithms keep groups in input "
                            "order already); drop static groups or use algorithm gptq-act-order.")
        if self.granularity != "group":
            set_field("static_groups", False)
        if self.algorithm == "hqq":
            if fmt.kind != "integer":
                raise QlabError(f"HQQ fits a zero-point on a uniform integer grid, and {fmt.name} is not one; "
                                "pick an int format or another algorithm.")
            set_field("symmetric", False)  # the zero-point is what HQQ optimises
        if self.sparsity != "none" and self.algorithm not in ("rtn", "gptq"):
            raise QlabError(f"2:4 sparsity combines with rtn or gptq, not {self.algorithm}; pick one of those.")
        if self.sparsity == "2:4-sparsegpt" and self.algorithm != "gptq":
            raise QlabError("SparseGPT prunes and rounds in one error-compensating pass; use it with algorithm "
                            "gptq, or plain 2:4 (magnitude) with rtn.")

    @property
    def fmt(self) -> Format:
        return get_format(self.format)

    @property
    def label(self) -> str:
        """Short human name, e.g. ``int4 g128 asym`` or ``int8 per-channel``."""
        if not self.fmt.scaled:
            return " ".join(part for part in (self.format, self.algorithm, self.sparsity)
                            if part not in ("rtn", "none"))
        parts = [self.format, {"tensor": "per-tensor", "channel": "per-channel"}.get(
            self.granularity, f"g{self.group_size}")]
        if not self.symmetric:
            parts.append("asym")
        if self.calibration != "minmax":
            parts.append(self.calibration if self.calibration == "mse" else f"p{self.percentile:g}")
        if self.algorithm != "rtn":
            parts.append(self.algorithm)
        if self.static_groups:
            parts.append("static-groups")
        if self.sparsity != "none":
            parts.append(self.sparsity)
        return " ".join(parts)

    def to_dict(self) -> dict:
        """JSON-ready record of every field."""
        record = asdict(self)
        record["targets"] = list(self.targets)
        return record

    @classmethod
    def from_dict(cls, record: dict) -> QuantScheme:
        """Inverse of ``to_dict``; unknown keys are an error, not silently dropped."""
        known = {f.name for f in fields(cls)}
        unknown = set(record) - known
        if unknown:
            raise QlabError(f"unknown scheme fields {sorted(unknown)}; known fields are {sorted(known)}.")
        return cls(**record)

    def storage_bytes(self, shape: tuple[int, ...] | torch.Size) -> dict[str, int]:
        """Bytes the quantized tensor of this shape really occupies: codes, scales, zero-points, and what an
        algorithm adds (``metadata`` of 2:4 sparsity, an act-order ``group_index``, AWQ's ``input_scales``)."""
        numel = math.prod(shape)
        fmt = self.fmt
        inputs = shape[-1] if len(shape) else 1
        stored = numel
        if self.sparsity != "none":
            if inputs % 4:
                raise QlabError(f"2:4 sparsity prunes groups of 4 consecutive inputs, and {inputs} inputs of a "
                                f"tensor of shape {tuple(shape)} do not split into them; leave it dense.")
            stored = numel // 2
        parts = {"codes": math.ceil(stored * fmt.bits / 8), "scales": 0, "zero_points": 0}
        if self.sparsity != "none":
            # The positions of the two kept values in each group of four, 2 bits each: the metadata of torch's
            # semi-structured (CUTLASS / cuSPARSELt) layout for fp16, bf16 and int8 alike.
            parts["metadata"] = math.ceil(stored * 2 / 8)
        if not fmt.scaled:
            return parts
        n_blocks = block_count(shape, self)
        scale_bytes = torch.finfo(SCALE_DTYPES[self.scale_dtype]).bits // 8
        parts["scales"] = n_blocks * scale_bytes
        if self.algorithm == "hqq":
            parts["zero_points"] = n_blocks * scale_bytes  # a float zero-point, stored like the scale
        elif not self.symmetric:
            parts["zero_points"] = math.ceil(n_blocks * fmt.bits / 8)
        if self.algorithm == "gptq-act-order" and self.granularity == "group" and not self.static_groups:
            parts["group_index"] = 4 * inputs  # the int32 g_idx of GPTQ checkpoints: each input's group
        if self.algorithm == "awq":
            parts["input_scales"] = 2 * inputs  # fp16, one per input, unless folded into the op before
        return parts

    def bits_per_weight(self, shape: tuple[int, ...] | torch.Size) -> float:
        """Storage bits per value for a tensor of this shape, scales and zero-points included."""
        return 8 * sum(self.storage_bytes(shape).values()) / math.prod(shape)


def block_count(shape: tuple[int, ...] | torch.Size, scheme: QuantScheme) -> int:
    """Number of scales a tensor of this shape needs under the scheme (checks divisibility)."""
    numel = math.prod(shape)
    if scheme.granularity == "tensor" or not scheme.fmt.scaled:
        return 1
    if scheme.granularity == "channel":
        return shape[0] if len(shape) >= 2 else 1
    last = shape[-1] if len(shape) else 1
    if last % scheme.group_size:
        raise QlabError(f"group size {scheme.group_size} does not divide the last dimension {last} of a "
                        f"tensor of shape {tuple(shape)}; pick a divisor of {last} or per-channel granularity.")
    return numel // scheme.group_size


def _as_blocks(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    n_blocks = block_count(x.shape, scheme)
    return x.reshape(n_blocks, -1)


@dataclass(frozen=True)
class QTensor:
    """A quantized tensor: ``codes`` on the format's grid, one ``scale`` (and ``zero_point``) per block.

    ``codes`` are kept unpacked in memory (one ``code_dtype`` value each); ``packed()`` gives the tensors as
    they are stored, sub-byte codes packed, and ``nbytes`` is their size.
    """

    codes: torch.Tensor
    scale: torch.Tensor | None
    zero_point: torch.Tensor | None
    scheme: QuantScheme
    shape: torch.Size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Back to floats: ``(codes - zero_point) * scale`` on the format's grid."""
        values = self.scheme.fmt.decode(self.codes)
        if self.scale is not None:
            blocks = values.reshape(self.scale.numel(), -1)
            if self.zero_point is not None:
                blocks = blocks - self.zero_point.to(torch.float32)[:, None]
            values = blocks * self.scale.to(torch.float32)[:, None]
        values = values.reshape(self.shape).to(dtype)
        # An fp32 cast's codes are its values: a caller that writes into the result must not write into them.
        return values.clone() if values.data_ptr() == self.codes.data_ptr() else values

    def packed(self) -> dict[str, torch.Tensor]:
        """The tensors as stored: codes packed to ``bits`` per value, scales at their dtype."""
        fmt = self.scheme.fmt
        if fmt.kind == "float":
            stored = {"codes": self.codes.reshape(-1)}
        else:
            stored = {"codes": pack_codes(self._unsigned(self.codes), fmt.bits)}
        if self.scale is not None:
            stored["scales"] = self.scale
        if self.zero_point is not None:
            stored["zero_points"] = pack_codes(self._unsigned(self.zero_point), fmt.bits)
        return stored

    def _unsigned(self, codes: torch.Tensor) -> torch.Tensor:
        fmt = self.scheme.fmt
        if fmt.kind == "integer":
            return (codes.reshape(-1).to(torch.int16) - fmt.qmin).to(torch.uint8)
        return codes.reshape(-1)

    @property
    def nbytes(self) -> int:
        """True storage in bytes: packed codes plus scales and zero-points at their real dtypes."""
        return sum(self.scheme.storage_bytes(self.shape).values())

    @property
    def bits_per_weight(self) -> float:
        return self.scheme.bits_per_weight(self.shape)

    def input_groups(self) -> torch.Tensor:
        """For each input (last-dimension) column, the index of its group within a row: consecutive groups of
        ``group_size`` here, all 0 for one scale per tensor or per channel."""
        if self.scheme.granularity != "group" or self.scale is None:
            return torch.zeros(math.prod(self.shape[1:]), dtype=torch.int64, device=self.codes.device)
        return torch.arange(self.shape[-1], device=self.codes.device) // self.scheme.group_size

    def input_scales(self) -> torch.Tensor | None:
        """What each input column is divided by before rounding (AWQ's input scale), or None: the grid of a
        column in weight space is the block's grid times this."""
        return None


def pack_codes(unsigned: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (< 2**bits) into a uint8 bit stream, least significant bit first."""
    flat = unsigned.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat
    if 8 % bits == 0:
        per_byte = 8 // bits
        padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % per_byte)).view(-1, per_byte)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        return (padded << shifts).sum(dim=1, dtype=torch.uint8)
    bit_index = torch.arange(bits, dtype=torch.uint8)
    bitstream = ((flat[:, None] >> bit_index) & 1).reshape(-1)
    bitstream = torch.nn.functional.pad(bitstream, (0, (-bitstream.numel()) % 8)).view(-1, 8)
    return (bitstream << torch.arange(8, dtype=torch.uint8)).sum(dim=1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: the first ``count`` codes as uint8."""
    if bits == 8:
        return packed[:count]
    bitstream = ((packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[: count * bits]
    weights = (1 << torch.arange(bits, dtype=torch.int32))
    return (bitstream.view(count, bits).to(torch.int32) * weights).sum(dim=1).to(torch.uint8)


def _check_finite(x: torch.Tensor) -> None:
    # One reduction first: NaN and infinities propagate through a sum, so a finite sum proves every value
    # finite without allocating a mask as large as the tensor (per-layer sensitivity quantizes every linear).
    if torch.isfinite(x.sum()):
        return
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise QlabError(f"the tensor holds {bad} NaN or infinite value(s); quantization needs finite numbers, "
                        "so fix or exclude that tensor first.")


def _clip_range(blocks: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block (low, high) the grid must cover, before the MSE search."""
    if scheme.calibration == "percentile":
        n = blocks.shape[1]
        if scheme.symmetric:
            k = max(1, min(n, math.ceil(scheme.percentile / 100 * n)))
            high = blocks.abs().kthvalue(k, dim=1).values
            return -high, high
        k_high = max(1, min(n, math.ceil(scheme.percentile / 100 * n)))
        k_low = max(1, min(n, n + 1 - k_high))
        return blocks.kthvalue(k_low, dim=1).values, blocks.kthvalue(k_high, dim=1).values
    if scheme.symmetric:
        high = blocks.abs().amax(dim=1)
        return -high, high
    return blocks.amin(dim=1), blocks.amax(dim=1)


def _scale_from_range(low: torch.Tensor, high: torch.Tensor, scheme: QuantScheme
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (rounded to its storage dtype) and integer zero-point that map [low, high] onto the grid."""
    scale, zero_point, excess = _unchecked_scale(low, high, scheme)
    need = excess.amax().item()
    if need > 0:  # clamping to fp16's 65504 would silently clip the range instead
        scale_dtype = SCALE_DTYPES[scheme.scale_dtype]
        raise QlabError(f"this range needs a scale of {need:.3g}, more than {str(scale_dtype).removeprefix('torch.')} "
                        f"holds ({torch.finfo(scale_dtype).max:.3g}); use a wider scale dtype (fp32).")
    return scale, zero_point


def _unchecked_scale(low: torch.Tensor, high: torch.Tensor, scheme: QuantScheme
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``_scale_from_range`` without its check, so no device sync: also each block's scale where its dtype
    cannot hold it (0 where it can)."""
    fmt = scheme.fmt
    scale_dtype = SCALE_DTYPES[scheme.scale_dtype]
    finfo = torch.finfo(scale_dtype)
    if scheme.symmetric:
        scale = high / fmt.max_abs
        zero_point = None
    else:
        # Like torch's observers, the range always contains 0 so that zero (padding, ReLU) is exact.
        low, high = low.clamp(max=0), high.clamp(min=0)
        steps = fmt.qmax - fmt.qmin
        scale = (high - low) / steps
        # A range wider than float32's largest number (2e38 to -2e38) overflows the difference, not the scale.
        scale = torch.where(torch.isfinite(scale), scale, high / steps - low / steps)
    # An all-zero block: any scale is exact. (A scale that underflows to 0 from a tiny, nonzero range is not
    # that case: the clamp below gives it the smallest subnormal instead.)
    scale = torch.where(high - low > 0, scale, torch.ones_like(scale))
    # Round up, never down: a scale rounded down to fp16/bf16 makes the grid span less than [low, high] and
    # clips the ends of the range, by more than half a step for bf16 or fp16 subnormal scales.
    stored = scale.to(scale_dtype)
    excess = torch.where(torch.isfinite(stored), 0.0, scale)
    stored = torch.where(stored.to(torch.float32) < scale,
                         torch.nextafter(stored, torch.full_like(stored, math.inf)), stored)
    scale = stored.clamp(min=finfo.tiny * finfo.eps, max=finfo.max)
    if not scheme.symmetric:
        zero_point = _zero_point_for(low, scale, fmt)
    return scale, zero_point, excess


def _zero_point_for(low: torch.Tensor, scale: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The integer code that ``low`` maps to qmin with, clamped to the grid."""
    zero_point = fmt.qmin - torch.round(low.clamp(max=0) / scale.to(torch.float32))
    return zero_point.clamp(fmt.qmin, fmt.qmax).to(torch.int8)


def encode(blocks: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
           fmt: Format) -> torch.Tensor:
    """Codes of ``blocks`` (one row per scale) on the format's grid, given each row's scale and zero-point."""
    return encoder(scale, zero_point, fmt)(blocks)


def encoder(scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: Format
            ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``encode`` for any number of columns of blocks (one row per scale), the reciprocal of the scales and its
    check made once: GPTQ encodes column by column, and the check waits for a GPU."""
    scale = scale.to(torch.float32)[:, None]
    # Multiply by the reciprocal in float32, exactly as torch.quantize_per_tensor does, so ties agree.
    inverse = 1.0 / scale
    # A scale below 2.9e-39 (a range under 1e-36): its reciprocal overflows, and those rows divide instead.
    finite = torch.isfinite(inverse)
    finite = None if finite.all() else finite
    zero = None if zero_point is None else zero_point.to(torch.float32)[:, None]

    def codes(blocks: torch.Tensor) -> torch.Tensor:
        scaled = blocks * inverse
        if finite is not None:
            scaled = torch.where(finite, scaled, blocks / scale)
        if zero is None:
            return fmt.round(scaled)
        # The zero-point is added before rounding, round(x / scale + zero_point), as torch.quantize_per_tensor and
        # torch.quantize_per_channel do: a tie goes to the even code, not to an even offset from the zero-point.
        return torch.round(scaled + zero).clamp_(fmt.qmin, fmt.qmax).to(torch.int8)

    return codes


def _mse_scale(blocks: torch.Tensor, scheme: QuantScheme
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Search shrunken clip ranges per block; keep the one with the least squared error."""
    low, high = _clip_range(blocks, scheme)
    best_scale, best_zero = _scale_from_range(low, high, scheme)
    best_error = torch.full((blocks.shape[0],), float("inf"), device=blocks.device)
    for ratio in MSE_CLIP_RATIOS.tolist():
        scale, zero = _scale_from_range(low * ratio, high * ratio, scheme)
        codes = encode(blocks, scale, zero, scheme.fmt)
        values = scheme.fmt.decode(codes)
        if zero is not None:
            values = values - zero.to(torch.float32)[:, None]
        error = ((values * scale.to(torch.float32)[:, None] - blocks) ** 2).sum(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def compute_scale(x: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Calibrate the per-block scale (stored dtype) and zero-point (int8, or None if symmetric)."""
    if not scheme.fmt.scaled:
        return None, None
    x = x.detach().to(torch.float32)
    _check_finite(x)
    blocks = _as_blocks(x, scheme)
    if scheme.calibration == "mse":
        return _mse_scale(blocks, scheme)
    return _scale_from_range(*_clip_range(blocks, scheme), scheme)


def _override(value: float | torch.Tensor | None, n_blocks: int, dtype: torch.dtype, what: str
              ) -> torch.Tensor | None:
    if value is None:
        return None
    tensor = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    if tensor.numel() == 1:
        tensor = tensor.expand(n_blocks)
    if tensor.numel() != n_blocks:
        raise QlabError(f"{what} has {tensor.numel()} values but the scheme needs {n_blocks} (one per block).")
    if not torch.isfinite(tensor).all():
        raise QlabError(f"{what} must be a finite number.")
    return tensor.to(dtype).contiguous()


def quantize(x: torch.Tensor, scheme: QuantScheme, scale: float | torch.Tensor | None = None,
             zero_point: int | torch.Tensor | None = None) -> QTensor:
    """Quantize a float tensor. An explicit ``scale``/``zero_point`` (a number or one per block) overrides
    calibration; the scale is still rounded to the scheme's scale dtype, because that is what is stored."""
    fmt = scheme.fmt
    x = x.detach().to(torch.float32)
    if x.numel() == 0:
        raise QlabError(f"the tensor of shape {tuple(x.shape)} is empty; there is nothing to quantize.")
    if scheme.sparsity != "none":
        raise QlabError(f"{scheme.label} prunes before it rounds; quantize it with "
                        "qlab.core.algorithms.quantize_weight (the sweep does), or pick sparsity none.")
    if scheme.algorithm != "rtn" and fmt.scaled:
        # Rounding to nearest here would silently stand in for GPTQ (or AWQ, HQQ) under its label.
        raise QlabError(f"{scheme.label} rounds with {scheme.algorithm}, not to nearest; quantize it with "
                        "qlab.core.algorithms.quantize_weight (the sweep does, with calibration inputs where the "
                        "algorithm needs them) or pick algorithm rtn.")
    if not fmt.scaled:
        if scale is not None or zero_point is not None:
            raise QlabError(f"{fmt.name} is a plain cast with no scale or zero-point; drop those options.")
        return QTensor(fmt.round(x), None, None, scheme, x.shape)
    _check_finite(x)
    blocks = _as_blocks(x, scheme)
    n_blocks = blocks.shape[0]
    if zero_point is not None and scheme.symmetric:
        raise QlabError("a zero-point needs an asymmetric scheme; add --asymmetric or drop the zero-point.")
    given_scale = _override(scale, n_blocks, SCALE_DTYPES[scheme.scale_dtype], "scale")
    if given_scale is not None and not (given_scale.to(torch.float32) > 0).all():
        raise QlabError("scale must be positive (and representable in the scale dtype).")
    given_zero = _override(zero_point, n_blocks, torch.float64, "zero-point")
    if given_zero is not None:
        if not ((given_zero >= fmt.qmin) & (given_zero <= fmt.qmax) & (given_zero == given_zero.round())).all():
            raise QlabError(f"zero-point must be an integer in [{fmt.qmin}, {fmt.qmax}] for {fmt.name}.")
        given_zero = given_zero.to(torch.int8)
    if given_scale is None:
        calibrated_scale, calibrated_zero = compute_scale(x, scheme)
        given_scale = calibrated_scale
        given_zero = calibrated_zero if given_zero is None else given_zero
    elif given_zero is None and not scheme.symmetric:
        given_zero = _zero_point_for(_clip_range(blocks, scheme)[0], given_scale, fmt)
    _check_grid_fits(given_scale, given_zero, fmt)
    codes = encode(blocks, given_scale, given_zero, fmt)
    return QTensor(codes.reshape(x.shape), given_scale, given_zero, scheme, x.shape)


def _check_grid_fits(scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: Format) -> None:
    """Refuse a grid whose end points are past float32's largest number: their values would dequantize to
    infinity (values within a step of 3.4e38, or a scale given too large)."""
    if zero_point is None:
        extent = torch.full_like(scale, fmt.max_abs, dtype=torch.float64)
    else:
        zero = zero_point.to(torch.float64)
        extent = torch.maximum((fmt.qmin - zero).abs(), (fmt.qmax - zero).abs())
    ends = extent * scale.to(torch.float64)
    largest = torch.finfo(torch.float32).max
    if (ends > largest).any():
        raise QlabError(f"the {fmt.name} grid would reach {ends.max().item():.3g}, past float32's largest number "
                        f"({largest:.3g}), so its end points would dequantize to infinity; scale the values (or "
                        "the given scale) down.")


def fake_quantize(x: torch.Tensor, scheme: QuantScheme, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``quantize(x, scheme).dequantize(dtype)`` bit for bit (``dtype`` defaults to ``x``'s), without keeping
    codes: the simulation primitive. One device sync, to refuse what ``quantize`` refuses."""
    values, suspect = fake_quantize_unchecked(x, scheme, dtype)
    if suspect is not None and suspect.item():
        return quantize(x, scheme).dequantize(values.dtype)
    return values


def fake_quantize_unchecked(x: torch.Tensor, scheme: QuantScheme, dtype: torch.dtype | None = None,
                            out: torch.Tensor | None = None, flag: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fake_quantize`` without a device sync, and a one-value tensor (or None) that the caller must check:
    nonzero means these values cannot be trusted, and ``quantize(x, scheme)`` gives the exact ones or the error
    (a value not finite, a scale its dtype cannot hold, a grid past float32, a reciprocal scale that overflows).
    Lets a caller round many tensors and then wait for the device once. ``out`` (``x``'s shape, in ``dtype``)
    receives the values instead of a new tensor: a caller that reuses it saves the allocation. ``flag``, one
    that an earlier call returned, may be raised in place by the GPU kernel (then it is the one returned): a
    caller rounding many tensors then saves a reduction and an "or" per tensor."""
    fmt = scheme.fmt
    x = x.detach()
    dtype = x.dtype if dtype is None else dtype
    if out is not None and not _fits(out, x, dtype):
        raise QlabError(f"the output tensor is {tuple(out.shape)} {out.dtype} on {out.device}; these values need "
                        f"a contiguous {tuple(x.shape)} {dtype} tensor on {x.device}.")
    if x.numel() == 0 or scheme.sparsity != "none" or (scheme.algorithm != "rtn" and fmt.scaled):
        return _into(out, quantize(x, scheme).dequantize(dtype)), None  # raises, as quantize does
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        x = x.to(torch.float32)  # then every conversion below is exact, as in quantize
    if not fmt.scaled:
        if cpu_kernels.casts(x, dtype, fmt):
            values = torch.empty(x.shape, dtype=dtype) if out is None else out
            cpu_kernels.cast(x, values, fmt)
            return values, None
        if out is None:
            values = x.to(fmt.cast_dtype).to(dtype)
            return (values.clone() if values.data_ptr() == x.data_ptr() else values), None
        chunk = FAKE_QUANTIZE_CHUNK_ELEMENTS.get(x.device.type, 1 << 22)
        flat, target = x.reshape(-1), out.view(-1)
        for start in range(0, flat.numel(), chunk):  # the cast's scratch stays one chunk
            target[start:start + chunk].copy_(flat[start:start + chunk].to(fmt.cast_dtype))
        return out, None
    blocks = _as_blocks(x, scheme)
    values = torch.empty(x.shape, dtype=dtype, device=x.device) if out is None else out
    target = values.view(blocks.shape)
    search = _lut_search(fmt.name, blocks.device) if fmt.kind == "lut" else None
    if scheme.calibration == "minmax" and gpu_kernels.fuses(blocks, dtype, fmt):
        suspect = gpu_kernels.round_groups(blocks, target, fmt, SCALE_DTYPES[scheme.scale_dtype], scheme.symmetric,
                                           search, flag)
        if suspect is not None:
            return values, suspect
    compiled = cpu_kernels.usable(blocks, dtype) and cpu_kernels.rounds(fmt)
    if compiled and scheme.calibration == "minmax":
        return values, cpu_kernels.round_groups(blocks, target, fmt, SCALE_DTYPES[scheme.scale_dtype],
                                                scheme.symmetric, search)
    scale, inverse, zero, suspect = _block_scales(x, blocks, scheme)
    if compiled:
        cpu_kernels.dequantize_blocks(blocks, target, scale, inverse, zero, fmt, search)
    elif not (gpu_kernels.usable(blocks, dtype) and gpu_kernels.rounds(fmt)
              and gpu_kernels.dequantize_blocks(blocks, target, scale, inverse, zero, fmt, search)):
        _dequantized_blocks(blocks, target, scale, inverse, zero, fmt)
    return values, suspect


def fake_quantize_together_unchecked(xs: Sequence[torch.Tensor], scheme: QuantScheme, dtype: torch.dtype,
                                     outs: Sequence[torch.Tensor] | None = None, flag: torch.Tensor | None = None
                                     ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """``fake_quantize_unchecked`` of several tensors under one scheme (into ``outs`` where given), with one flag
    for all of them: on a GPU the fused kernel rounds those it takes (min-max blocks of one width and dtype) in
    as few launches as it can, where one launch per weight kept the GPU waiting for the host."""
    outs = [None] * len(xs) if outs is None else list(outs)
    fmt = scheme.fmt
    values: list[torch.Tensor | None] = [None] * len(xs)
    together: dict[tuple, list[tuple[int, torch.Tensor]]] = collections.defaultdict(list)
    if scheme.calibration == "minmax" and scheme.algorithm == "rtn" and scheme.sparsity == "none" and fmt.scaled:
        for index, (x, out) in enumerate(zip(xs, outs, strict=True)):
            if x.device.type != "cuda" or x.numel() == 0:
                continue
            if out is None:
                outs[index] = out = torch.empty(x.shape, dtype=dtype, device=x.device)
            elif not _fits(out, x, dtype):
                continue  # fake_quantize_unchecked says what is wrong with it
            blocks = _as_blocks(x.detach(), scheme)
            if gpu_kernels.fuses(blocks, dtype, fmt):
                together[(blocks.shape[1], blocks.dtype, blocks.device)].append((index, blocks))
    for group in together.values():
        indices = [index for index, _ in group]
        blocks = [part for _, part in group]
        targets = [outs[index].view(part.shape) for index, part in group]
        search = _lut_search(fmt.name, blocks[0].device) if fmt.kind == "lut" else None
        raised = gpu_kernels.round_groups_together(blocks, targets, fmt, SCALE_DTYPES[scheme.scale_dtype],
                                                   scheme.symmetric, search, flag)
        if raised is None:
            continue  # the kernel is off now: fake_quantize_unchecked takes torch's route for each
        flag = combined_flag(flag, raised)
        for index in indices:
            values[index] = outs[index]
    for index, x in enumerate(xs):
        if values[index] is None:
            values[index], raised = fake_quantize_unchecked(x, scheme, dtype, out=outs[index], flag=flag)
            flag = combined_flag(flag, raised)
    return values, flag


def combined_flag(flag: torch.Tensor | None, raised: torch.Tensor | None) -> torch.Tensor | None:
    """One flag of untrusted values for both: ``flag`` itself where ``raised`` is it (raised in place) or None."""
    if raised is None or raised is flag:
        return flag
    return raised if flag is None else flag | raised


def _fits(out: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``out`` can receive the values of ``x`` in ``dtype``."""
    return out.shape == x.shape and out.dtype == dtype and out.device == x.device and out.is_contiguous()


def _block_scales(x: torch.Tensor, blocks: torch.Tensor, scheme: QuantScheme
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Each block's scale and its inverse, its zero point (None if symmetric), as float32 columns, and whether
    some of them cannot be trusted (``fake_quantize_unchecked``'s flag): what ``cpu_kernels.round_groups`` also
    computes, operation for operation."""
    fmt = scheme.fmt
    if scheme.calibration == "minmax":
        # Ranges of the stored values: min and max are exact in any float dtype, so no float32 copy is needed,
        # and they carry every NaN or infinity with them.
        low, high = (end.to(torch.float32) for end in torch.aminmax(blocks, dim=1))
        suspect = ~(torch.isfinite(low) & torch.isfinite(high)).all()
        if scheme.symmetric:
            high = torch.maximum(-low, high)  # max |x| = max(-min, max)
            low = -high
        scale, zero_point, excess = _unchecked_scale(low, high, scheme)
        suspect |= (excess > 0).any()
    else:  # percentile and MSE calibrations are searches of their own: checked as quantize checks them
        scale, zero_point = compute_scale(x, scheme)
        suspect = torch.zeros((), dtype=torch.bool, device=x.device)
    scale = scale.to(torch.float32)[:, None]
    inverse = 1.0 / scale
    # Grid ends past float32's largest number (checked in float64 by quantize: >= is the float32 bound on it).
    if zero_point is None:
        zero, extent = None, fmt.max_abs
    else:
        zero = zero_point[:, None].to(torch.float32)
        extent = torch.maximum((fmt.qmin - zero).abs(), (fmt.qmax - zero).abs())
    suspect |= (extent * scale >= torch.finfo(torch.float32).max).any() | ~torch.isfinite(inverse).all()
    return scale, inverse, zero, suspect


def _into(out: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    return values if out is None else out.copy_(values)


# A CPU kernel given mixed dtypes (bf16 times float32, float32 written into bf16) converts value by value, ten
# times slower than a cast and then a float32 op; a GPU kernel converts as it loads and stores, for free.
CAST_FIRST_DEVICES = frozenset({"cpu"})
# Values rounded at once: on a CPU few enough that the float32 scratch stays near the cores through the passes
# over it (2^18 costs 20% less CPU time on a quiet machine, but every op is a barrier of the threads, and on a
# busy machine 4x as many barriers cost more than that); on a GPU many, so that launches hide behind the work.
FAKE_QUANTIZE_CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 25}


def _dequantized_blocks(blocks: torch.Tensor, out: torch.Tensor, scale: torch.Tensor, inverse: torch.Tensor,
                        zero: torch.Tensor | None, fmt: Format) -> None:
    """Write ``encode`` then ``QTensor.dequantize`` of ``blocks`` into ``out``, chunk by chunk, in place (the
    per-block float32 columns of ``_block_scales``)."""
    chunk = FAKE_QUANTIZE_CHUNK_ELEMENTS.get(blocks.device.type, 1 << 22)
    n_blocks, width = blocks.shape
    if n_blocks == 1:  # one scale: chunks along the block
        parts = [(slice(0, 1), slice(start, start + chunk)) for start in range(0, width, chunk)]
    else:
        step = max(1, chunk // width)
        parts = [(slice(start, start + step), slice(None)) for start in range(0, n_blocks, step)]
    split = blocks.device.type in CAST_FIRST_DEVICES
    nothing = torch.zeros((), dtype=torch.float32, device=blocks.device)
    if fmt.kind == "integer":
        # Adding 0 - z, not subtracting z: the -0 that rounding leaves (-0.3 -> -0) becomes the +0 of the int8
        # code 0, as in QTensor.dequantize.
        offset = torch.zeros_like(scale) if zero is None else 0.0 - zero
    for rows, columns in parts:
        part, target = blocks[rows, columns], out[rows, columns]
        scaled = part.to(torch.float32, copy=True).mul_(inverse[rows]) if split else torch.mul(part, inverse[rows])
        if fmt.kind == "integer":
            if zero is not None:
                scaled.add_(zero[rows])
            scaled.round_().clamp_(fmt.qmin, fmt.qmax)
            if zero is None and not split:
                torch.addcmul(nothing, scaled, scale[rows], out=target)  # the + 0, the scaling and the cast in one
                continue
            scaled.add_(offset[rows])
        elif fmt.kind == "float":
            scaled.copy_(scaled.to(fmt.cast_dtype))
        else:
            scaled = _lut_levels(scaled, fmt.name)
        if split:
            target.copy_(scaled.mul_(scale[rows]))
        else:
            torch.mul(scaled, scale[rows], out=target)


# On a CPU, table formats round through a table indexed by the top 16 bits of each float32 (7 ops per chunk, a
# third of the time of counting boundaries and a quarter of bucketize's); on a GPU one bucketize kernel is cheap.
PREFIX_TABLE_DEVICES = frozenset({"cpu"})


@functools.cache
def _lut_search(name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A table format's decision boundaries, each nudged so that strict comparisons keep its tie rule, and the
    level each slot between them decodes to; on ``device``."""
    codes, midpoints, ties_up, _ = _table_search(name)
    boundaries = torch.tensor(midpoints, dtype=torch.float32)
    # On float32, x >= b exactly when x > nextafter(b, -inf): a tie that goes up becomes a strict comparison.
    down = torch.nextafter(boundaries, torch.full_like(boundaries, -math.inf))
    boundaries = torch.where(torch.tensor(ties_up), down, boundaries)
    return boundaries.to(device), _table_tensor(name)[codes.long()].to(device)


@functools.cache
def _prefix_tables(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """For each top-16-bit prefix of a float32: the level of its smallest value, the one boundary its values
    straddle (inf if none) and the level above it; None if some prefix straddles two (levels too close)."""
    boundaries, levels = _lut_search(name, torch.device("cpu"))
    prefixes = torch.arange(1 << 16, dtype=torch.int32)
    ends = [(prefixes << 16).view(torch.float32), ((prefixes << 16) | 0xFFFF).view(torch.float32)]
    # NaN patterns stand for the infinity of their sign: a NaN never gets here (the fallback takes it).
    ends = [torch.where(end.isnan(), torch.copysign(torch.tensor(math.inf), end), end) for end in ends]
    return straddled_levels(torch.minimum(*ends), torch.maximum(*ends), boundaries, levels)


def _lut_levels(scaled: torch.Tensor, name: str) -> torch.Tensor:
    """The nearest level of a table format to each scaled value, ties as ``Format.round`` breaks them."""
    tables = _prefix_tables(name) if scaled.device.type in PREFIX_TABLE_DEVICES else None
    flat = scaled.view(-1)
    if tables is not None:
        low, inside, high = tables
        prefix = (flat.view(torch.int32) >> 16) & 0xFFFF
        # index_select: a third of the time of advanced indexing on a CPU
        chosen = torch.where(flat > torch.index_select(inside, 0, prefix), torch.index_select(high, 0, prefix),
                             torch.index_select(low, 0, prefix))
        return chosen.view(scaled.shape)
    boundaries, levels = _lut_search(name, scaled.device)
    slots = torch.bucketize(flat, boundaries, out_int32=True)
    return torch.index_select(levels, 0, slots).view(scaled.shape)


def grid_values(qtensor: QTensor, block: int = 0, column: int | None = None) -> torch.Tensor:
    """The real values block ``block`` of a quantized tensor can take: the grid drawn over histograms. With an
    input scale (AWQ) that grid is on the scaled weights, ``x / input_scales()``; ``column`` gives the grid of that
    one input column in weight space instead (each column's differs)."""
    fmt = qtensor.scheme.fmt
    levels = fmt.levels()
    if qtensor.scale is None:
        return levels
    if qtensor.zero_point is not None:
        levels = levels - qtensor.zero_point[block].to(torch.float32)
    grid = levels * qtensor.scale[block].to(torch.float32)
    input_scales = qtensor.input_scales()
    if column is not None and input_scales is not None:
        grid = grid * input_scales[column].to(torch.float32)
    return grid


def block_of(qtensor: QTensor, row: int, group: int = 0) -> tuple[int, torch.Tensor]:
    """Index of the block holding (row, group) of a 2-D quantized tensor, and the columns it covers, ascending
    (not consecutive when act-order groups inputs by their Hessian order: ``QTensor.input_groups``)."""
    rows, columns = qtensor.shape[0], math.prod(qtensor.shape[1:])
    if not 0 <= row < rows:
        raise QlabError(f"row {row} is outside 0..{rows - 1}.")
    scheme = qtensor.scheme
    if scheme.granularity == "tensor" or qtensor.scale is None:
        return 0, torch.arange(columns)
    if scheme.granularity == "channel":
        return row, torch.arange(columns)
    groups_per_row = columns // scheme.group_size
    if not 0 <= group < groups_per_row:
        raise QlabError(f"group {group} is outside 0..{groups_per_row - 1}.")
    return row * groups_per_row + group, (qtensor.input_groups() == group).nonzero()[:, 0].cpu()


def _per_element(qtensor: QTensor, per_block: torch.Tensor) -> torch.Tensor:
    """A value per block (``scale``'s order) given to every element of its block, in the tensor's shape."""
    shape = qtensor.shape
    if per_block.numel() == 1:
        return per_block.reshape(()).expand(shape)
    if qtensor.scheme.granularity == "channel":
        return per_block.reshape(shape[0], *[1] * (len(shape) - 1)).expand(shape)
    groups = qtensor.input_groups()
    return per_block.reshape(-1, shape[-1] // qtensor.scheme.group_size)[:, groups].reshape(shape)


def error_stats(x: torch.Tensor, qtensor: QTensor, dequantized: torch.Tensor | None = None) -> dict[str, float]:
    """Relative MSE, SQNR (dB), share of values clipped (saturated) by their block's grid, bits per weight.

    Each value is compared with the grid of its own block (act-order's scattered groups included), as the
    values the format rounds: divided by the input scale under AWQ."""
    x = x.detach().to(torch.float32)
    dequantized = qtensor.dequantize() if dequantized is None else dequantized
    relative_mse = (((dequantized - x) ** 2).mean() / (x**2).mean().clamp(min=1e-30)).item()
    clipped = 0.0
    if qtensor.scale is not None:
        fmt = qtensor.scheme.fmt
        scale = qtensor.scale.to(torch.float32)
        if qtensor.zero_point is None:
            low, high = -fmt.max_abs * scale, fmt.max_abs * scale
        else:
            zero = qtensor.zero_point.to(torch.float32)
            low, high = (fmt.qmin - zero) * scale, (fmt.qmax - zero) * scale
        # Beyond the outermost level by more than half the outermost step: rounding alone cannot explain it.
        levels = fmt.levels()
        tolerance = (levels[-1] - levels[-2]).item() / 2 * scale
        input_scales = qtensor.input_scales()
        rounded = x.reshape(qtensor.shape)
        if input_scales is not None:
            rounded = rounded / input_scales.to(torch.float32)
        outside = ((rounded < _per_element(qtensor, low - tolerance))
                   | (rounded > _per_element(qtensor, high + tolerance)))
        clipped = outside.float().mean().item()
    return {
        "relative_mse": relative_mse,
        "sqnr_db": -10 * math.log10(relative_mse) if relative_mse > 0 else float("inf"),
        "clipped_fraction": clipped,
        "bits_per_weight": qtensor.bits_per_weight,
    }


def check_group_sizes(chosen: Mapping[str, QuantScheme], widths: Mapping[str, int], model: str) -> None:
    """Fail before any work when a group size does not divide the input width of a matrix it is chosen for
    (``chosen`` and ``widths`` are keyed by matrix name), naming the group sizes that would fit."""
    for scheme in dict.fromkeys(chosen.values()):
        if scheme.granularity != "group" or not scheme.fmt.scaled:
            continue
        mine = {widths[name] for name, s in chosen.items() if s == scheme}
        bad = sorted(w for w in mine if w % scheme.group_size)
        if bad:
            fits = [g for g in (32, 64, 128, 256) if all(w % g == 0 for w in mine)]
            raise QlabError(f"group size {scheme.group_size} does not divide input width(s) {bad} of {model}; "
                            f"use group size {' or '.join(map(str, fits)) or 'per-channel granularity'}.")
