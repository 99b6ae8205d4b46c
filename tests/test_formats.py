"""The format registry checked against references that do not come from qlab.

Float formats are compared with torch's casts *and* with a first-principles rounding written here (value
enumeration from the bit layout, round-to-nearest-even on the integer significand, numpy's IEEE half for fp16),
so a wrong torch cast or a wrong registry entry both show up. NF4 is rebuilt from the QLoRA definition, FP4
E2M1 from the OCP MX spec.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from qlab.core import formats
from qlab.core.errors import QlabError
from qlab.core.formats import format_names, get_format

# name -> (torch dtype, exponent bits, mantissa bits, "fn" style: no inf, only the all-ones pattern is NaN)
FLOAT_LAYOUTS = {
    "fp16": (torch.float16, 5, 10, False),
    "bf16": (torch.bfloat16, 8, 7, False),
    "fp8_e4m3": (torch.float8_e4m3fn, 4, 3, True),
    "fp8_e5m2": (torch.float8_e5m2, 5, 2, False),
}
BIT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}

# QLoRA (Dettmers et al. 2023), appendix E / bitsandbytes `get_4bit_type("nf4")`: the published NF4 levels.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


# ---------------------------------------------------------------- first-principles float arithmetic


def layout_params(name: str) -> tuple[int, int, int, bool]:
    _, ebits, mbits, fn = FLOAT_LAYOUTS[name]
    return ebits, mbits, 2 ** (ebits - 1) - 1, fn


def decode_all(name: str) -> np.ndarray:
    """Every finite value of the format, decoded from its bit fields (sorted, +0/-0 collapsed)."""
    ebits, mbits, bias, fn = layout_params(name)
    values = []
    for exponent in range(2**ebits):
        for mantissa in range(2**mbits):
            if exponent == 2**ebits - 1 and (not fn or mantissa == 2**mbits - 1):
                continue  # inf / NaN patterns
            if exponent == 0:
                magnitude = mantissa * 2.0 ** (1 - bias - mbits)
            else:
                magnitude = (1 + mantissa / 2**mbits) * 2.0 ** (exponent - bias)
            values += [magnitude, -magnitude]
    return np.unique(np.array(values, dtype=np.float64))


def max_finite(name: str) -> float:
    ebits, mbits, bias, fn = layout_params(name)
    if fn:  # the all-ones exponent is a normal binade whose top mantissa is NaN
        return (2 - 2 * 2.0**-mbits) * 2.0 ** (2**ebits - 1 - bias)
    return (2 - 2.0**-mbits) * 2.0 ** (2**ebits - 2 - bias)


def reference_round(name: str, x: np.ndarray, saturate: bool) -> np.ndarray:
    """Round-to-nearest-even of float32 values onto the format, computed in float64 from its layout."""
    ebits, mbits, bias, _ = layout_params(name)
    x = x.astype(np.float64)
    magnitude = np.abs(x)
    _, exp2 = np.frexp(magnitude)  # magnitude = f * 2**exp2, f in [0.5, 1)
    exponent = np.maximum(exp2 - 1, 1 - bias)  # subnormals share the smallest normal exponent's quantum
    quantum = np.ldexp(1.0, exponent - mbits)
    rounded = np.rint(magnitude / quantum) * quantum  # np.rint: ties to even significand
    top = max_finite(name)
    rounded = np.where(rounded > top, top if saturate else np.inf, rounded)
    return np.copysign(rounded, x)


def float32_bits(values: torch.Tensor) -> np.ndarray:
    return values.to(torch.float32).contiguous().numpy().view(np.uint32)


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor | np.ndarray, what: str) -> None:
    """Bit-exact on float32 views (so -0 != +0); NaN only where NaN is expected."""
    expected = torch.as_tensor(np.asarray(expected, dtype=np.float32)) if isinstance(expected, np.ndarray) \
        else expected.to(torch.float32)
    actual = actual.to(torch.float32)
    assert actual.shape == expected.shape
    nan_actual, nan_expected = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_actual, nan_expected), f"{what}: NaN positions differ"
    a_bits = float32_bits(actual[~nan_actual])
    e_bits = float32_bits(expected[~nan_expected])
    mismatch = np.nonzero(a_bits != e_bits)[0]
    if mismatch.size:
        i = mismatch[0]
        raise AssertionError(f"{what}: {mismatch.size} values differ, e.g. {a_bits[i]:#010x} vs {e_bits[i]:#010x}")


def sample_values(name: str, n: int, seed: int) -> np.ndarray:
    """Log-uniform magnitudes from below half the smallest subnormal to beyond the max, random signs."""
    _, mbits, bias, _ = layout_params(name)
    rng = np.random.default_rng(seed)
    low = (1 - bias - mbits) - 4
    high = min(math.log2(max_finite(name)) + 3, 127.9)
    magnitudes = 2.0 ** rng.uniform(low, high, n)
    signs = rng.choice([-1.0, 1.0], n)
    values = (signs * magnitudes).astype(np.float32)
    return values[np.isfinite(values)]


def midpoints(levels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact midpoints between adjacent levels (checked to be float32-exact) and the two neighbours."""
    lower, upper = levels[:-1], levels[1:]
    mids = (lower + upper) / 2
    assert np.array_equal(mids.astype(np.float32).astype(np.float64), mids)
    return mids.astype(np.float32), lower, upper


# ---------------------------------------------------------------- float formats


@pytest.mark.parametrize("name", list(FLOAT_LAYOUTS))
def test_float_levels_match_the_bit_layout(name):
    expected = decode_all(name)
    levels = get_format(name).levels()
    assert levels.dtype == torch.float32
    assert np.array_equal(levels.numpy().astype(np.float64), expected)
    assert float(levels.max()) == max_finite(name) == get_format(name).max_abs


def test_level_counts_from_first_principles():
    # E4M3fn: 256 codes, S.1111.111 is NaN for both signs -> 254 finite; +0 and -0 are one value -> 253.
    assert 2**8 - 2 - 1 == 253
    assert len(get_format("fp8_e4m3").levels()) == 253
    # E5M2: exponent 11111 is inf (mantissa 0) or NaN: 2 signs x 4 mantissas = 8 codes; minus the -0 duplicate.
    assert len(get_format("fp8_e5m2").levels()) == 256 - 8 - 1
    # fp16: 2 x 31 finite binades x 1024 mantissas, minus -0.
    assert len(get_format("fp16").levels()) == 2 * 31 * 1024 - 1
    assert len(get_format("bf16").levels()) == 2 * 255 * 128 - 1


def test_float_extremes():
    e4m3, e5m2, fp16 = (get_format(n).levels() for n in ("fp8_e4m3", "fp8_e5m2", "fp16"))
    assert float(e4m3.max()) == 448.0 and float(e4m3.min()) == -448.0
    assert float(e4m3[e4m3 > 0].min()) == 2.0**-9
    assert float(e5m2.max()) == 57344.0 and float(e5m2[e5m2 > 0].min()) == 2.0**-16
    assert float(fp16.max()) == 65504.0 and float(fp16[fp16 > 0].min()) == 2.0**-24
    assert get_format("fp8_e4m3").max_abs == 448.0 and get_format("fp8_e5m2").max_abs == 57344.0
    with pytest.raises(QlabError):
        get_format("fp32").levels()


@pytest.mark.parametrize("name", list(FLOAT_LAYOUTS))
def test_float_rounding_matches_torch_cast_and_first_principles(name):
    dtype, _, _, fn = FLOAT_LAYOUTS[name]
    levels = decode_all(name)
    mids, _, _ = midpoints(levels)
    ulp_top = max_finite(name) - levels[-2]
    special = np.array([0.0, -0.0, max_finite(name), -max_finite(name),
                        max_finite(name) + ulp_top / 2, -(max_finite(name) + ulp_top / 2),  # overflow tie
                        max_finite(name) + ulp_top / 4, max_finite(name) * 1.5, -max_finite(name) * 4,
                        levels[levels > 0].min() / 2, -levels[levels > 0].min() / 2,  # tie with zero
                        levels[levels > 0].min() * 1.5, levels[levels > 0].min() / 3], dtype=np.float64)
    special = special[np.abs(special) <= np.finfo(np.float32).max].astype(np.float32)
    x_np = np.concatenate([sample_values(name, 30000, seed=len(name)), mids, levels.astype(np.float32), special])
    x = torch.from_numpy(x_np)

    got = get_format(name).round(x)
    assert got.dtype == dtype
    cast = x.to(dtype)
    assert_bit_equal(got.float(), cast.float(), f"{name} vs torch cast")
    assert_bit_equal(cast.float(), reference_round(name, x_np, saturate=fn), f"torch {name} cast vs reference")
    if name == "fp16":  # numpy's IEEE half conversion is a third, independent implementation
        with np.errstate(over="ignore"):
            half = x_np.astype(np.float16)
        assert_bit_equal(got.float(), half.astype(np.float32), "fp16 vs numpy")


@pytest.mark.parametrize("name", list(FLOAT_LAYOUTS))
def test_float_ties_go_to_the_even_mantissa(name):
    dtype = FLOAT_LAYOUTS[name][0]
    mids, lower, upper = midpoints(decode_all(name))
    codes = get_format(name).round(torch.from_numpy(mids))
    values = codes.float().numpy().astype(np.float64)
    assert np.all((values == lower) | (values == upper))
    stored_bits = codes.view(BIT_VIEW[dtype]).numpy().astype(np.int64)
    assert np.all(stored_bits % 2 == 0), "a tie went to an odd mantissa"
    # Both neighbours occur: ties are not all rounded in one direction.
    assert np.any(values == lower) and np.any(values == upper)
    if name == "fp16":  # read the half's bits independently of torch
        half_bits = values.astype(np.float16).view(np.uint16)
        assert np.all(half_bits & 1 == 0)


def test_float_ties_read_with_struct():
    # 1 + 2**-11 is halfway between 1 and 1 + 2**-10 in fp16: goes down to 1.0 (mantissa 0);
    # 1 + 3 * 2**-11 is halfway between 1 + 2**-10 (odd) and 1 + 2**-9 (even): goes up.
    down, up = get_format("fp16").round(torch.tensor([1 + 2**-11, 1 + 3 * 2**-11]))
    assert struct.unpack("<H", struct.pack("<e", float(down)))[0] == 0x3C00
    assert struct.unpack("<H", struct.pack("<e", float(up)))[0] == 0x3C02


def test_overflow_behaviour():
    big = torch.tensor([449.0, 463.9, 464.0, 465.0, 479.0, 480.0, 1e4, 3e38, -500.0, -1e30])
    e4m3 = get_format("fp8_e4m3").round(big).float()
    # torch 2.13's CPU cast to float8_e4m3fn saturates (no NaN for large finite values); qlab follows it.
    assert torch.equal(big.to(torch.float8_e4m3fn).float(), e4m3)
    assert e4m3.tolist() == [448.0] * 8 + [-448.0, -448.0]
    e5m2 = get_format("fp8_e5m2").round(torch.tensor([61439.0, 61440.0, 1e5, -1e5])).float()
    assert e5m2.tolist() == [57344.0, math.inf, math.inf, -math.inf]
    fp16 = get_format("fp16").round(torch.tensor([65519.0, 65520.0, -1e6])).float()
    assert fp16.tolist() == [65504.0, math.inf, -math.inf]
    bf16_max = float(torch.finfo(torch.bfloat16).max)
    bf16 = get_format("bf16").round(torch.tensor([bf16_max + 2.0**119, bf16_max + 2.0**118])).float()
    assert bf16.tolist() == [math.inf, bf16_max]


def test_nan_and_negative_zero_pass_through_plain_casts():
    x = torch.tensor([float("nan"), -0.0, 0.0, -1e-30])
    for name, (dtype, *_rest) in FLOAT_LAYOUTS.items():
        got = get_format(name).round(x).float()
        assert_bit_equal(got, x.to(dtype).float(), name)
        assert math.isnan(got[0]) and math.copysign(1.0, got[1]) == -1.0 and math.copysign(1.0, got[3]) == -1.0


# ---------------------------------------------------------------- NF4


def test_nf4_table_is_the_published_one():
    assert len(formats.NF4_TABLE) == 16
    assert list(formats.NF4_TABLE) == PUBLISHED_NF4
    assert get_format("nf4").levels().tolist() == [float(np.float32(v)) for v in PUBLISHED_NF4]


def test_nf4_table_follows_from_its_definition():
    # bitsandbytes create_normal_map(offset=0.9677083, use_extra_value=True)
    offset = 0.9677083
    v1 = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    v3 = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([v1, torch.zeros(1, dtype=torch.float64), v3]).sort().values
    values = values / values.max()
    table = torch.tensor(formats.NF4_TABLE, dtype=torch.float64)
    assert torch.allclose(table, values, rtol=0, atol=1e-6)
    assert values[7] == 0 and table[7] == 0  # zero is exact


def test_nf4_rounding_is_nearest_level():
    fmt = get_format("nf4")
    table = torch.tensor(PUBLISHED_NF4)
    # each level maps onto itself
    assert torch.equal(fmt.decode(fmt.round(table)), table)
    x = torch.empty(20000).uniform_(-1.3, 1.3, generator=torch.Generator().manual_seed(5))
    distances = (x[:, None] - table[None, :]).abs()
    best = distances.min(dim=1)
    second = distances.sort(dim=1).values[:, 1]
    clear = (second - best.values) > 1e-6
    got = fmt.decode(fmt.round(x))
    assert torch.equal(got[clear], table[best.indices][clear])
    assert clear.float().mean() > 0.99


# ---------------------------------------------------------------- FP4 E2M1


def test_fp4_levels():
    magnitudes = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    expected = sorted({float(s * m) for m in magnitudes for s in (1, -1)})
    assert get_format("fp4_e2m1").levels().tolist() == expected
    assert len(expected) == 15 and get_format("fp4_e2m1").max_abs == 6.0
    assert get_format("fp4").name == get_format("e2m1").name == "fp4_e2m1"


def test_fp4_ties_round_half_to_even_and_saturate():
    fmt = get_format("fp4_e2m1")
    ties = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0}
    beyond = {6.0: 6.0, 6.5: 6.0, 7.0: 6.0, 100.0: 6.0, 1e30: 6.0}
    cases = {**ties, **beyond}
    cases.update({-k: -v for k, v in list(cases.items())})
    x = torch.tensor(list(cases), dtype=torch.float32)
    got = fmt.decode(fmt.round(x))
    assert got.tolist() == list(cases.values())


def test_fp4_matches_brute_force_nearest():
    fmt = get_format("fp4_e2m1")
    levels = torch.tensor(sorted({s * m for m in (0, 0.5, 1, 1.5, 2, 3, 4, 6) for s in (1.0, -1.0)}))
    x = torch.empty(50000).uniform_(-8, 8, generator=torch.Generator().manual_seed(11))
    distances = (x[:, None] - levels[None, :]).abs()
    best = distances.min(dim=1)
    second = distances.sort(dim=1).values[:, 1]
    clear = (second - best.values) > 1e-6  # leave exact ties to the test above
    got = fmt.decode(fmt.round(x))
    assert torch.equal(got[clear], levels[best.indices][clear])
    # E2M1 codes: bit 3 sign, then 2 exponent bits and 1 mantissa bit (OCP MX), so an even code has mantissa 0.
    codes = torch.arange(16, dtype=torch.uint8)
    decoded = fmt.decode(codes).tolist()
    for code, value in zip(range(16), decoded):
        sign, exponent, mantissa = code >> 3, (code >> 1) & 3, code & 1
        magnitude = mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1)
        assert value == (-magnitude if sign else magnitude)


# ---------------------------------------------------------------- integers and the registry


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_integer_grid_rounds_half_even_and_saturates(bits):
    fmt = get_format(f"int{bits}")
    assert (fmt.qmin, fmt.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert fmt.levels().tolist() == list(range(fmt.qmin, fmt.qmax + 1))
    rng = np.random.default_rng(bits)
    x = np.concatenate([rng.uniform(-2 * 2**bits, 2 * 2**bits, 5000),
                        np.arange(-2**bits, 2**bits) + 0.5]).astype(np.float32)
    expected = np.clip(np.rint(x), fmt.qmin, fmt.qmax)
    got = fmt.round(torch.from_numpy(x))
    assert got.dtype == torch.int8
    assert np.array_equal(got.numpy().astype(np.float32), expected)


def test_registry_lookup():
    assert get_format("FP8").name == "fp8_e4m3" and get_format(" half ").name == "fp16"
    assert get_format("e5m2").name == "fp8_e5m2" and get_format("bfloat16").name == "bf16"
    assert set(format_names()) == {"fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8", "int4", "int3",
                                   "int2", "nf4", "fp4_e2m1"}
    for bad in ("int5", "fp6", "", "nf3"):
        with pytest.raises(QlabError):
            get_format(bad)


def test_table_formats_round_on_the_device_of_their_input():
    # On a GPU server (device_map="auto") weights and codes live on CUDA; the meta device stands in here:
    # any CPU-only constant in the rounding path would raise on it.
    x = torch.empty(8, 16, device="meta")
    for name in ("nf4", "fp4_e2m1"):
        codes = get_format(name).round(x)
        assert codes.device.type == "meta" and get_format(name).decode(codes).device.type == "meta"
