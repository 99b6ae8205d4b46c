"""Teaching views against independent references: struct's IEEE encodings, the IEEE decoding formula applied
to the bit strings, bit-pattern counts, and the common worked examples to the last digit."""

import math
import struct

import pytest
import torch

from qlab.analyses import explain
from qlab.core.errors import QlabError
from qlab.core.formats import get_format
from qlab.models import hardware

VALUES = [0.87654321, -2.45, 1.0, 0.1, -1e-3, 3.14159, 65504.0, 70000.0, 1e-6, 6e-8, 500.0, 448.0, 1e-40,
          3.3e38, -0.0, 0.0, 57344.0, 2.0**-14, 2.0**-9]


def fp32(value: float) -> float:
    return struct.unpack(">f", struct.pack(">f", value))[0]


def decode(layout: explain.BitLayout) -> float:
    """IEEE-style decoding of the bit strings, independent of torch: (-1)^s 2^(e - bias) 1.m, subnormals
    2^(1 - bias) 0.m; an all-ones exponent is inf/NaN except in E4M3 'fn' and FP4 (no infinities)."""
    fmt = get_format(layout.format)
    e_bits, m_bits = fmt.exponent_bits, fmt.mantissa_bits
    bias = 2 ** (e_bits - 1) - 1
    exponent, mantissa = int(layout.exponent, 2), int(layout.mantissa, 2) if layout.mantissa else 0
    sign = -1.0 if layout.sign == "1" else 1.0
    no_infinity = layout.format in ("fp8_e4m3", "fp4_e2m1")
    if exponent == 2**e_bits - 1 and not no_infinity:
        return sign * math.inf if mantissa == 0 else math.nan
    if exponent == 0:
        return sign * 2.0 ** (1 - bias) * mantissa / 2**m_bits
    return sign * 2.0 ** (exponent - bias) * (1 + mantissa / 2**m_bits)


@pytest.mark.parametrize("value", VALUES)
def test_fp32_and_fp16_bits_equal_struct(value):
    layout32 = explain.bit_layout(value, "fp32")
    assert layout32.sign + layout32.exponent + layout32.mantissa == format(
        struct.unpack(">I", struct.pack(">f", value))[0], "032b")
    layout16 = explain.bit_layout(value, "fp16")
    # struct's 'e' is IEEE binary16 with round-half-even; it raises on overflow where the cast gives inf.
    try:
        expected = format(struct.unpack(">H", struct.pack(">e", fp32(value)))[0], "016b")
    except OverflowError:
        expected = ("1" if value < 0 else "0") + "11111" + "0" * 10
    assert layout16.sign + layout16.exponent + layout16.mantissa == expected


@pytest.mark.parametrize("value", VALUES)
def test_bf16_bits_are_fp32_bits_rounded_to_nearest_even(value):
    bits = struct.unpack(">I", struct.pack(">f", value))[0]
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF  # ggml_compute_fp32_to_bf16
    layout = explain.bit_layout(value, "bf16")
    assert layout.sign + layout.exponent + layout.mantissa == format(rounded, "016b")


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1"])
@pytest.mark.parametrize("value", VALUES)
def test_bit_strings_decode_to_the_stored_value(fmt, value):
    layout = explain.bit_layout(value, fmt)
    assert len(layout.sign + layout.exponent + layout.mantissa) == layout.bits
    decoded = decode(layout)
    assert decoded == layout.stored or (math.isnan(decoded) and math.isnan(layout.stored))
    # And the stored value is the torch cast of the FP32 value (raw encodings: scale 1).
    if fmt != "fp4_e2m1":
        cast = torch.tensor([value], dtype=torch.float32).to(get_format(fmt).cast_dtype).float().item()
        assert cast == layout.stored


@pytest.mark.parametrize("value", [-2.45, 0.87654321, 0.004, -1.0, 1.2, -1.3])
def test_integer_codes_are_twos_complement_of_the_rounded_value(value):
    for fmt, bits in (("int8", 8), ("int4", 4)):
        layout = explain.bit_layout(value, fmt, absmax=1.0)
        qmax = 2 ** (bits - 1) - 1
        expected = max(-qmax - 1, min(qmax, round(fp32(value) / fp32(1.0 / qmax))))
        assert layout.code == expected
        assert layout.code_bits == format(struct.unpack(">B", struct.pack(">b", expected))[0], "08b")[-bits:]
        assert layout.stored == pytest.approx(expected / qmax, rel=1e-6)


def test_the_seed_single_weight_example():
    seed = explain.presets()["single_weight"]
    layouts = {lay.format: lay for lay in explain.bit_layouts(seed["value"], absmax=seed["range_absmax"])}
    assert layouts["fp16"].stored == 0.87646484375  # the seed's "0.877"
    # The seed's "0.877" is the original rounded to 3 decimals; what FP16 keeps is 0.876 to 3 decimals.
    assert f"{seed['value']:.3f}" == seed["claimed"]["fp16"] and f"{layouts['fp16'].stored:.3f}" == "0.876"
    assert layouts["int8"].code == 111 and layouts["int4"].code == 6  # abs-max scales 1/127 and 1/7
    assert round(seed["value"] * 128) == int(seed["claimed"]["int8"])  # the seed's 112 is a 1/128 scale
    assert layouts["fp32"].stored == fp32(0.87654321)


def test_flags_name_overflow_saturation_subnormals_and_underflow():
    def flags(value, fmt):
        return " ".join(explain.bit_layout(value, fmt).flags)

    assert "overflow" in flags(70000.0, "fp16") and flags(65504.0, "fp16") == ""
    assert "overflow" in flags(70000.0, "fp8_e5m2")
    assert "saturated" in flags(500.0, "fp8_e4m3") and flags(448.0, "fp8_e4m3") == ""
    assert "subnormal" in flags(1e-6, "fp16") and "subnormal" not in flags(1e-6, "bf16")
    assert "underflow" in flags(1e-9, "fp16") and "subnormal" in flags(1e-40, "bf16")
    assert "clamped" in flags(-2.45, "int8")
    assert "subnormal" in flags(0.5, "fp4_e2m1")
    with pytest.raises(QlabError, match="finite"):
        explain.bit_layout(math.inf, "fp16")
    with pytest.raises(QlabError, match="FP32"):
        explain.bit_layout(1e39, "fp16")


def count_fp16_patterns(low: float, high: float) -> int:
    values = {struct.unpack(">e", struct.pack(">H", p))[0] for p in range(2**16)}
    return sum(1 for v in values if math.isfinite(v) and low <= v <= high)


def test_number_lines_count_every_representable_value():
    assert explain.number_line("fp16", 0.0, 1.0).count == count_fp16_patterns(0.0, 1.0)
    assert explain.number_line("fp16", -2.0, 3.0).count == count_fp16_patterns(-2.0, 3.0)
    assert explain.number_line("fp32", 1.0, 2.0).count == 2**23 + 1
    assert explain.number_line("fp32", -1.0, 1.0).count == 2 * (127 * 2**23) + 1  # ±0 counted once
    line = explain.number_line("fp32", 1.0, 2.0, limit=100)
    assert line.sampled and line.values.numel() <= 100 and line.values.min() == 1.0 and line.values.max() == 2.0
    assert explain.number_line("int8", -1.0, 1.0).count == 255  # -127..127 times 1/127; -128 lies below -1
    assert explain.number_line("int4", -1.0, 1.0, absmax=1.0).count == 15
    assert explain.number_line("fp4_e2m1", -6.0, 6.0).count == 15  # 16 codes, ±0 one value
    assert explain.number_line("nf4", -1.0, 1.0).count == 16
    with pytest.raises(QlabError, match="low < high"):
        explain.number_line("fp16", 1.0, 1.0)


def test_rounding_errors_stay_within_half_a_step():
    records = explain.rounding_errors(("fp16", "int8"), 0.5, 1.0, absmax=1.0, points=501)
    fp16 = [r for r in records if r["format"] == "fp16"]
    assert all(r["error_kind"] == "relative" for r in fp16)
    assert max(r["shown_error"] for r in fp16) <= 2.0**-11  # half an ulp of [0.5, 1) relative to 0.5
    int8 = [r for r in records if r["format"] == "int8"]
    assert all(r["error_kind"] == "absolute" for r in int8)
    assert max(r["shown_error"] for r in int8) <= 0.5 / 127 * (1 + 1e-5)


def test_the_seed_affine_example_exactly():
    seed = explain.presets()["affine_example"]
    mapping = explain.affine_mapping(seed["values"], "int8", scale=seed["scale"])
    assert [r["code"] for r in mapping.rows] == seed["claimed_codes"] == [-128, 69, 35, -47]
    first = mapping.rows[0]
    assert -128.95 < first["value / scale"] < -128.94 and first["rounded"] == -129 and first["clamped"]
    assert [r["clamped"] for r in mapping.rows[1:]] == [False, False, False]
    assert first["dequantized"] == pytest.approx(-128 * 0.019, rel=1e-6)
    assert mapping.storage == {"fp32_bytes": 16, "code_bytes": 4, "scale_bytes": 4, "zero_point_bytes": 0,
                               "total_bytes": 8}
    assert seed["claimed_bytes_before"] == mapping.storage["fp32_bytes"]
    assert seed["claimed_bytes_after"] == mapping.storage["code_bytes"]
    absmax = explain.affine_mapping(seed["values"], "int8")
    assert [r["code"] for r in absmax.rows] == [-127, 68, 35, -46]
    assert absmax.scale == (torch.tensor(2.45) / 127).item()
    assert not any(r["clamped"] for r in absmax.rows)
    assert "2.45 / 127" in absmax.how
    asymmetric = explain.affine_mapping(seed["values"], "int8", symmetric=False)
    assert asymmetric.storage["zero_point_bytes"] == 1
    assert all(abs(r["error"]) <= asymmetric.scale / 2 + 1e-6 for r in asymmetric.rows)
    with pytest.raises(QlabError, match="integer formats"):
        explain.affine_mapping([1.0], "nf4")


def test_one_outlier_stretches_minmax_and_percentile_ignores_it():
    records = {r["calibration"]: r for r in explain.outlier_calibration(30.0, "int8")}
    assert records["minmax"]["clip_at"] == pytest.approx(30.0, rel=1e-6)
    assert records["percentile"]["clip_at"] < 5
    assert records["percentile"]["inlier_relative_mse"] < records["minmax"]["inlier_relative_mse"] / 10
    assert records["minmax"]["levels_used_by_inliers"] < 60 < records["percentile"]["levels_used_by_inliers"]
    assert records["percentile"]["outlier_stored"] < 5
    clean = {r["calibration"]: r for r in explain.outlier_calibration(0.0, "int8")}
    assert clean["minmax"]["levels_used_by_inliers"] > 150


def test_granularity_finer_scales_cost_bits_and_buy_accuracy():
    generator = torch.Generator().manual_seed(0)
    # Rows and column blocks of very different magnitudes, as real weight matrices have.
    w = torch.randn(64, 512, generator=generator) * torch.logspace(-2, 0, 64)[:, None]
    w = w * torch.logspace(0, 1, 16).repeat_interleave(32)[None, :]
    records = {r["variant"]: r for r in explain.granularity_comparison(w, bits=4)}
    assert records["per-tensor"]["relative_mse"] > records["per-channel"]["relative_mse"] > \
        records["group 32"]["relative_mse"]
    assert records["per-tensor"]["bits_per_weight"] == pytest.approx(4 + 32 / w.numel())
    assert records["group 32"]["bits_per_weight"] == 4.5 and records["GGUF Q4_0"]["bits_per_weight"] == 4.5
    assert records["GGUF Q6_K"]["bits_per_weight"] == 6.5625
    assert records["group 32 asym"]["bits_per_weight"] == 4.625
    narrow = {r["variant"] for r in explain.granularity_comparison(torch.randn(8, 96), bits=4)}
    assert "GGUF Q4_K" not in narrow and "GGUF Q4_0" in narrow and "group 64" not in narrow
    with pytest.raises(QlabError, match="2-D"):
        explain.granularity_comparison(torch.randn(10))


def test_hardware_support_follows_the_catalog():
    rows = {r["id"]: r for r in explain.hardware_support()}
    assert len(rows) == len(hardware.catalog()) + 1 and hardware.THIS_MACHINE_ID in rows
    for hw in hardware.catalog():
        assert {f for f in hardware.NATIVE_FORMATS if rows[hw.id][f]} == set(hw.native_formats)
    claims = explain.seed_hardware_claims()
    assert len(claims) == 4
    nvidia = [hw for hw in hardware.catalog() if hw.vendor == "NVIDIA"]
    assert f"int8: {sum('int8' in hw.native_formats for hw in nvidia)} of {len(nvidia)}" in claims[0]["catalog_says"]
