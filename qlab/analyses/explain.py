"""Teaching views of the formats, computed by the same backend as everything else (``qlab.core.formats``,
``qlab.core.quant``, ``qlab.core.block_formats``): the bits of one value in every format, the representable values of a
format over a range, rounding error against value, the affine mapping step by step, how calibration reacts to
an outlier, and what per-tensor, per-channel, group-wise and block-wise scales cost and buy on a real matrix.

Scaling conventions (one place, used by every view): plain casts (fp32, fp16, bf16) and the raw FP8/FP4
encodings use no scale; integer formats and NF4 use a symmetric scale that maps ``absmax`` (the largest
magnitude of the tensor the value is assumed to live in) to the format's largest level.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass

import torch

from qlab.core import block_formats
from qlab.core.errors import QlabError
from qlab.core.formats import Format, get_format
from qlab.core.quant import CALIBRATIONS, QTensor, QuantScheme, error_stats, quantize
from qlab.models.loading import ASSETS_DIR

BIT_FORMATS: tuple[str, ...] = ("fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "int8", "int4", "nf4")
RAW_FLOAT_FORMATS = frozenset({"fp8_e4m3", "fp8_e5m2", "fp4_e2m1"})  # shown as raw encodings (scale 1)
_INT_VIEWS = {32: torch.int32, 16: torch.int16, 8: torch.uint8}


@functools.cache
def presets() -> dict:
    """The common worked examples and headline claims (``assets/teaching_presets.json``)."""
    return json.loads((ASSETS_DIR / "teaching_presets.json").read_text(encoding="utf-8"))


FLOAT32_MAX = torch.finfo(torch.float32).max


def _scale_for(fmt: Format, absmax: float) -> float | None:
    """The scale a value of a tensor with this absmax gets in this format (None for plain casts)."""
    if not fmt.scaled:
        return None
    if fmt.name in RAW_FLOAT_FORMATS:
        return 1.0
    if not (0 < absmax <= FLOAT32_MAX):  # a float32 tensor's largest magnitude
        raise QlabError(f"the tensor's largest magnitude must be a positive float32 number (at most "
                        f"{FLOAT32_MAX:.4g}), got {absmax}.")
    return absmax / fmt.max_abs


def _round_trip(values: torch.Tensor, fmt: Format, absmax: float) -> QTensor:
    """``values`` through the format with the module's scaling conventions (one scale for all of them)."""
    scheme = QuantScheme(fmt.name, "tensor", scale_dtype="fp32")
    scale = _scale_for(fmt, absmax)
    return quantize(values, scheme) if scale is None else quantize(values, scheme, scale=scale)


# ------------------------------------------------------------------------------------------- bit layouts


@dataclass(frozen=True)
class BitLayout:
    """One value in one format: its stored bits split into fields, the value it becomes, and what went wrong.

    ``sign``/``exponent``/``mantissa`` are bit strings for float formats; integer and table formats put their
    code's bits in ``code_bits`` instead. ``flags`` name overflow, saturation, clamping, subnormals, underflow.
    """

    format: str
    bits: int
    kind: str
    value: float
    stored: float
    error: float
    relative_error: float
    code: int
    sign: str
    exponent: str
    mantissa: str
    code_bits: str
    scale: float | None
    flags: tuple[str, ...]

    def to_record(self) -> dict:
        record = asdict(self)
        record["flags"] = ", ".join(self.flags)
        return record


def bit_layout(value: float, fmt_name: str, absmax: float = 1.0) -> BitLayout:
    """The bits ``value`` is stored as in a format. The value is first an FP32 number, as a weight is."""
    fmt = get_format(fmt_name)
    if not math.isfinite(value):
        raise QlabError(f"type a finite number, not {value}.")
    x = torch.tensor([value], dtype=torch.float32)
    flags: list[str] = []
    if math.isinf(x.item()):
        raise QlabError(f"{value:g} is beyond FP32's range (±3.4e38), so it cannot be a weight; type a smaller one.")
    qtensor = _round_trip(x, fmt, absmax)
    stored = qtensor.dequantize().item()
    scale = None if qtensor.scale is None else qtensor.scale.item()
    sign = exponent = mantissa = code_bits = ""
    if fmt.kind == "float":
        pattern = int(qtensor.codes.view(_INT_VIEWS[fmt.bits]).item()) & ((1 << fmt.bits) - 1)
        text = format(pattern, f"0{fmt.bits}b")
        sign, exponent, mantissa = text[0], text[1: 1 + fmt.exponent_bits], text[1 + fmt.exponent_bits:]
        code = pattern
        flags += _float_flags(value, stored, exponent, mantissa, fmt)
    else:
        code = int(qtensor.codes.item())
        width = fmt.bits
        code_bits = format(code & ((1 << width) - 1), f"0{width}b")
        if fmt.name == "fp4_e2m1":
            # Table order is the E2M1 encoding itself: sign, 2 exponent bits, 1 mantissa bit.
            sign, exponent, mantissa = code_bits[0], code_bits[1:3], code_bits[3]
            flags += _float_flags(value, stored, exponent, mantissa, fmt)
        elif abs(value) / scale > fmt.max_abs * (1 + 1e-6) + (0.5 if fmt.kind == "integer" else 0):
            flags.append(f"clamped to the outermost level (stored {stored:.6g})")
    if value != 0 and stored == 0:
        flags.append("underflow: became zero")
    error = stored - value
    relative = abs(error) / abs(value) if value != 0 else (0.0 if stored == 0 else math.inf)
    return BitLayout(fmt.name, fmt.bits, fmt.kind, value, stored, error, relative, code, sign, exponent, mantissa,
                     code_bits, scale, tuple(dict.fromkeys(flags)))


def _float_flags(value: float, stored: float, exponent: str, mantissa: str, fmt: Format) -> list[str]:
    flags = []
    if math.isinf(stored):
        flags.append("overflow: became infinity")
    elif math.isnan(stored):
        flags.append("not a number")
    elif abs(value) > fmt.max_abs:
        flags.append(f"saturated at the largest value ±{fmt.max_abs:g}")
    if exponent and set(exponent) == {"0"} and "1" in mantissa:
        flags.append("subnormal (exponent bits all zero: no implicit leading 1)")
    return flags


def bit_layouts(value: float, formats: tuple[str, ...] = BIT_FORMATS, absmax: float = 1.0) -> list[BitLayout]:
    """``bit_layout`` in several formats, side by side."""
    return [bit_layout(value, name, absmax) for name in formats]


# ------------------------------------------------------------------------------------------- number lines


@dataclass(frozen=True)
class NumberLine:
    """Representable values of a format in [low, high]: all of them, or an even sample when there are more
    than ``limit`` (``count`` is always the true number)."""

    format: str
    values: torch.Tensor
    count: int
    sampled: bool


def _fp32_key(x: torch.Tensor) -> torch.Tensor:
    """A monotone integer key of float32 values: consecutive representable values have consecutive keys."""
    bits = x.to(torch.float32).view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def _fp32_from_key(key: torch.Tensor) -> torch.Tensor:
    bits = torch.where(key < 0, (-key) | 0x80000000, key)
    return torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)


def _check_range(low: float, high: float) -> None:
    """A range of float32 values: finite Python floats past ±3.4e38 become infinities as tensors, which would
    then be counted and rounded as if they were numbers."""
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise QlabError(f"the range must be two finite numbers with low < high, got [{low}, {high}].")
    if max(abs(low), abs(high)) > FLOAT32_MAX:
        raise QlabError(f"the range [{low:g}, {high:g}] goes past float32's largest number ({FLOAT32_MAX:.4g}); "
                        "choose limits within it.")


def number_line(fmt_name: str, low: float, high: float, absmax: float = 1.0, limit: int = 4000) -> NumberLine:
    """The values a format can store between ``low`` and ``high`` (scaled as in ``bit_layout``)."""
    fmt = get_format(fmt_name)
    _check_range(low, high)
    if fmt.name == "fp32":
        # 2^32 patterns: count them by their integer keys instead of enumerating.
        lo_key, hi_key = _fp32_key(torch.tensor([low]))[0], _fp32_key(torch.tensor([high]))[0]
        lo_key += int(_fp32_from_key(lo_key[None])[0] < low)
        hi_key -= int(_fp32_from_key(hi_key[None])[0] > high)
        count = int(hi_key - lo_key + 1)
        # float64: keys reach 2^31, past float32's 24 exact bits (the last key would round onto infinity's).
        keys = torch.linspace(float(lo_key), float(hi_key), min(count, limit), dtype=torch.float64).round()
        keys = keys.to(torch.int64).unique()
        return NumberLine(fmt.name, _fp32_from_key(keys), count, count > limit)
    scale = _scale_for(fmt, absmax)
    levels = fmt.levels() * (1.0 if scale is None else scale)
    # Grid points past float32's range (int8's -128 steps at an absmax of 3.4e38) are infinities, not values.
    inside = levels[(levels >= low) & (levels <= high) & torch.isfinite(levels)]
    if inside.numel() > limit:
        picked = torch.linspace(0, inside.numel() - 1, limit).round().long().unique()
        return NumberLine(fmt.name, inside[picked], inside.numel(), True)
    return NumberLine(fmt.name, inside, inside.numel(), False)


def rounding_errors(fmt_names: tuple[str, ...], low: float, high: float, absmax: float = 1.0,
                    points: int = 2001) -> list[dict]:
    """Each format's stored value and error at ``points`` evenly spaced values in [low, high]: absolute error
    for integer and table grids (uniform steps), relative error for floats (steps grow with magnitude)."""
    _check_range(low, high)
    x = torch.linspace(low, high, points, dtype=torch.float32)
    records = []
    for name in fmt_names:
        fmt = get_format(name)
        stored = _round_trip(x, fmt, absmax).dequantize()
        error = stored - x
        relative = torch.where(x != 0, error.abs() / x.abs(), torch.zeros_like(x))
        measure = "relative" if fmt.kind == "float" or fmt.name == "fp4_e2m1" else "absolute"
        shown = relative if measure == "relative" else error.abs()
        records += [{"format": fmt.name, "value": v, "stored": s, "error": e, "shown_error": m,
                     "error_kind": measure}
                    for v, s, e, m in zip(x.tolist(), stored.tolist(), error.tolist(), shown.tolist(), strict=True)]
    return records


# ------------------------------------------------------------------------------------------- affine mapping


@dataclass(frozen=True)
class AffineMapping:
    """The affine mapping of a few values, step by step: x / scale, + zero-point, round, clamp, dequantize.

    ``rows`` hold each step per value; ``storage`` the bytes before and after, scale and zero-point included.
    """

    rows: list[dict]
    scheme: QuantScheme
    scale: float
    zero_point: int
    qmin: int
    qmax: int
    how: str
    storage: dict[str, int]


def affine_mapping(values: list[float], fmt: str = "int8", symmetric: bool = True, calibration: str = "minmax",
                   percentile: float = 99.9, scale: float | None = None,
                   zero_point: int | None = None) -> AffineMapping:
    """Quantize ``values`` as one tensor (one fp32 scale) with ``qlab.core.quant`` and explain each step.

    A typed ``scale`` (and ``zero_point``) overrides calibration, as in ``qlab quantize --scale``.
    """
    if not values:
        raise QlabError("give at least one value, e.g. -2.45, 1.32, 0.67, -0.89.")
    if get_format(fmt).kind != "integer":
        raise QlabError(f"the affine walk-through is for integer formats (int8, int4, ...), not {fmt}.")
    scheme = QuantScheme(fmt, "tensor", symmetric=symmetric, calibration=calibration, percentile=percentile,
                         scale_dtype="fp32")
    x = torch.tensor(values, dtype=torch.float32)
    qtensor = quantize(x, scheme, scale=scale, zero_point=zero_point)
    used_scale = qtensor.scale.to(torch.float32)
    used_zero = 0 if qtensor.zero_point is None else int(qtensor.zero_point.item())
    # The same float32 arithmetic as qlab.core.quant.encode, kept step by step for the table; where a value far
    # past the grid (1e37 at a typed scale of 0.01) overflows float32 the table shows the float64 quotient.
    scaled = x * (1.0 / used_scale)
    if not torch.isfinite(scaled).all():
        scaled = torch.where(torch.isfinite(scaled), scaled.double(), x.double() / used_scale.double())
    shifted = scaled + used_zero
    rounded = torch.round(shifted)
    codes = qtensor.codes.to(torch.int64)
    dequantized = qtensor.dequantize()
    rows = [{"value": v, "value / scale": s, "+ zero-point": z, "rounded": int(r) if abs(r) < 2**53 else r,
             "code": int(c), "clamped": r != c, "dequantized": d, "error": d - v}
            for v, s, z, r, c, d in zip(x.tolist(), scaled.tolist(), shifted.tolist(), rounded.tolist(),
                                        codes.tolist(), dequantized.tolist(), strict=True)]
    fmt_entry = scheme.fmt
    if scale is not None:
        how = f"scale typed by hand: {used_scale.item():.6g}"
    elif calibration == "mse":
        how = "scale searched: the clip range (100% down to 50% of min-max) with the least squared error"
    else:
        what = "max |x|" if calibration == "minmax" else f"{percentile:g}th percentile of |x|"
        if symmetric:
            high = (used_scale * fmt_entry.qmax).item()
            how = f"scale = {what} / qmax = {high:.6g} / {fmt_entry.qmax} = {used_scale.item():.6g}"
        else:
            how = (f"scale = (max - min) / (qmax - qmin) = {used_scale.item():.6g} over {fmt_entry.qmax - fmt_entry.qmin}"
                   f" steps; zero-point = qmin - round(min / scale) = {used_zero}")
    parts = scheme.storage_bytes(tuple(x.shape))
    storage = {"fp32_bytes": 4 * x.numel(), "code_bytes": parts["codes"], "scale_bytes": parts["scales"],
               "zero_point_bytes": parts["zero_points"], "total_bytes": sum(parts.values())}
    return AffineMapping(rows, scheme, used_scale.item(), used_zero, fmt_entry.qmin, fmt_entry.qmax, how, storage)


# ------------------------------------------------------------------------------------------- calibration


OUTLIER_LIMIT = 1e6


def outlier_tensor(outlier: float, count: int = 4096, seed: int = 0) -> torch.Tensor:
    """``count`` standard-normal values (seeded) with one value set to ``outlier`` (0 for none)."""
    # Past a million standard deviations squares of the values overflow float32 in the error statistics.
    if not abs(outlier) <= OUTLIER_LIMIT:
        raise QlabError(f"the outlier must be a number of standard deviations within ±{OUTLIER_LIMIT:g}, "
                        f"got {outlier}.")
    x = torch.randn(count, generator=torch.Generator().manual_seed(seed))
    if outlier:
        x[0] = outlier
    return x


def outlier_calibration(outlier: float, fmt: str = "int8", percentile: float = 99.9, count: int = 4096,
                        seed: int = 0) -> list[dict]:
    """How min-max, percentile and MSE calibration react to one outlier in a normal tensor."""
    x = outlier_tensor(outlier, count, seed)
    inliers = x[1:] if outlier else x
    records = []
    for calibration in CALIBRATIONS:
        scheme = QuantScheme(fmt, "tensor", calibration=calibration, percentile=percentile)
        qtensor = quantize(x, scheme)
        dequantized = qtensor.dequantize()
        codes = qtensor.codes[1:] if outlier else qtensor.codes
        inlier_error = ((dequantized[1:] if outlier else dequantized) - inliers) ** 2
        stats = error_stats(x, qtensor, dequantized)
        records.append({
            "calibration": calibration, "scale": qtensor.scale.item(),
            "clip_at": scheme.fmt.max_abs * qtensor.scale.item(),
            "inlier_relative_mse": (inlier_error.mean() / (inliers**2).mean()).item(),
            "relative_mse": stats["relative_mse"],
            "outlier_stored": dequantized[0].item() if outlier else None,
            "levels_used_by_inliers": int(codes.unique().numel()),
            "levels_available": 2**scheme.fmt.bits,
            "clipped_fraction": stats["clipped_fraction"],
        })
    return records


# ------------------------------------------------------------------------------------------- granularity


def granularity_variants(shape: tuple[int, int], bits: int = 4) -> list[tuple[str, QuantScheme | str]]:
    """The ways to scale a (rows x columns) matrix compared by ``granularity_comparison``: one scale, one per
    row, groups of several sizes, NF4, and the GGUF block formats whose block divides the rows."""
    rows, columns = shape
    fmt = f"int{bits}"
    variants: list[tuple[str, QuantScheme | str]] = [
        ("per-tensor", QuantScheme(fmt, "tensor")),
        ("per-channel", QuantScheme(fmt, "channel")),
    ]
    variants += [(f"group {g}", QuantScheme(fmt, "group", g)) for g in (256, 128, 64, 32) if columns % g == 0]
    if columns % 32 == 0:
        variants.append(("group 32 asym", QuantScheme(fmt, "group", 32, symmetric=False)))
    if columns % 64 == 0:
        variants.append(("nf4 group 64", QuantScheme("nf4", "group", 64)))
    variants += [(f"GGUF {name}", name) for name, block in block_formats.BLOCK_FORMATS.items()
                 if columns % block.block_size == 0]
    return variants


def granularity_comparison(weight: torch.Tensor, bits: int = 4) -> list[dict]:
    """Error and true bits per weight of each way to scale a 2-D weight (``granularity_variants``)."""
    if weight.dim() != 2:
        raise QlabError(f"pick a 2-D weight matrix; this tensor has shape {tuple(weight.shape)}.")
    w = weight.detach().to(torch.float32)
    energy = (w**2).mean().clamp(min=1e-30)
    records = []
    for label, variant in granularity_variants(tuple(w.shape), bits):
        if isinstance(variant, QuantScheme):
            qtensor = quantize(w, variant)
            dequantized = qtensor.dequantize()
            parts = variant.storage_bytes(tuple(w.shape))
            bits_per_weight = qtensor.bits_per_weight
            overhead = 8 * (parts["scales"] + parts["zero_points"]) / w.numel()
            family = "nf4" if variant.format == "nf4" else variant.granularity
        else:
            tensor = block_formats.quantize(w, variant)
            dequantized = tensor.dequantize()
            bits_per_weight = tensor.bits_per_weight
            overhead = tensor.fmt.scale_bits_per_weight
            family = "gguf"
        relative_mse = (((dequantized - w) ** 2).mean() / energy).item()
        records.append({"variant": label, "family": family, "bits_per_weight": bits_per_weight,
                        "overhead_bits_per_weight": overhead, "relative_mse": relative_mse,
                        "sqnr_db": -10 * math.log10(relative_mse) if relative_mse > 0 else math.inf})
    return records


# ------------------------------------------------------------------------------------------- hardware


def hardware_support() -> list[dict]:
    """Which formats each catalog target (and this machine, detected) runs natively, from the catalog."""
    from qlab.models import hardware

    targets = [hardware.detect_this_machine(), *hardware.catalog()]
    return [{"target": hw.name, "id": hw.id, "kind": hw.kind, "arch": hw.arch,
             **{fmt: fmt in hw.native_formats for fmt in hardware.NATIVE_FORMATS}, "notes": hw.notes}
            for hw in targets]


def seed_hardware_claims() -> list[dict]:
    """The common hardware claims checked against the catalog: how many matching targets run each format."""
    from qlab.models import hardware

    catalog = hardware.catalog()
    rows = []
    for claim in presets()["hardware_claims"]:
        match = claim["match"]
        targets = [hw for hw in catalog
                   if ("vendor" not in match or hw.vendor == match["vendor"])
                   and ("id_contains" not in match or any(part in hw.id for part in match["id_contains"]))]
        support = {fmt: sum(fmt in hw.native_formats for hw in targets) for fmt in claim["formats"]}
        rows.append({"claim": claim["claim"],
                     "catalog_says": "; ".join(f"{fmt}: {count} of {len(targets)}" for fmt, count in support.items()),
                     "note": claim.get("note", ""), "catalog_targets": ", ".join(hw.name for hw in targets)})
    return rows
