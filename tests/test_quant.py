"""Quantization schemes and tensor functions checked against torch's quantizer and first principles.

References: ``torch.quantize_per_tensor`` / ``torch.quantize_per_channel`` for int8 codes, numpy float32
arithmetic for scales and group codes, ``np.packbits`` for the bit layout, and plain formulas for storage.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings

import numpy as np
import pytest
import torch

from qlab.core.algorithms.awq import awq_quantize
from qlab.core.algorithms.gptq import gptq_quantize, hessian_from_inputs
from qlab.core.errors import QlabError
from qlab.core.formats import format_names, get_format
from qlab.core.quant import (
    QuantScheme,
    block_of,
    error_stats,
    fake_quantize,
    grid_values,
    pack_codes,
    quantize,
    unpack_codes,
)

SCALED = [n for n in format_names() if get_format(n).scaled]
INTEGERS = ["int8", "int4", "int3", "int2"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def torch_qint8(x: torch.Tensor, scale, zero_point, axis: int | None = None) -> torch.Tensor:
    """torch's reference int8 codes (its quantized-tensor constructors warn that they are deprecated)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if axis is None:
            q = torch.quantize_per_tensor(x, scale, zero_point, torch.qint8)
        else:
            q = torch.quantize_per_channel(x, scale, zero_point, axis, torch.qint8)
    return q.int_repr()


def blocks_of(x: torch.Tensor, qt) -> torch.Tensor:
    return x.reshape(qt.scale.numel(), -1)


def round_up(values: np.ndarray, dtype) -> np.ndarray:
    """The smallest value of ``dtype`` at or above each float32 value (a stored scale never clips)."""
    nearest = values.astype(dtype)
    return np.where(nearest.astype(np.float32) < values, np.nextafter(nearest, dtype(np.inf)), nearest)


# ---------------------------------------------------------------- the seed example


def test_seed_example():
    x = torch.tensor([-2.45, 1.32, 0.67, -0.89])
    scheme = QuantScheme("int8", granularity="tensor")
    assert quantize(x, scheme, scale=0.019).codes.tolist() == [-128, 69, 35, -47]
    qt = quantize(x, scheme)
    assert qt.codes.tolist() == [-127, 68, 35, -46]
    assert float(qt.scale) == float(np.float32(2.45) / np.float32(127))
    assert x.numel() * x.element_size() == 16
    assert qt.nbytes == 8 == 4 * 1 + 4
    packed = qt.packed()
    assert packed["codes"].numel() == 4 and packed["scales"].dtype == torch.float32


# ---------------------------------------------------------------- int8 codes against torch's quantizer


@pytest.mark.parametrize("scale", [0.019, 0.1, 1 / 3, 2.0**-5, 0.0071, 0.75])
def test_int8_per_tensor_matches_torch(scale):
    x = torch.cat([torch.randn(20000, generator=gen(1)) * 50 * scale,
                   torch.empty(2000).uniform_(-200 * scale, 200 * scale, generator=gen(2)),
                   torch.tensor([0.0, -0.0, 127 * scale, -128 * scale, 1e-30])])
    symmetric = quantize(x, QuantScheme("int8", granularity="tensor"), scale=scale)
    assert symmetric.zero_point is None
    assert torch.equal(symmetric.codes, torch_qint8(x, scale, 0))
    for zero_point in (-77, -1, 0, 1, 3, 100):
        qt = quantize(x, QuantScheme("int8", granularity="tensor", symmetric=False), scale=scale,
                      zero_point=zero_point)
        assert torch.equal(qt.codes, torch_qint8(x, scale, zero_point)), zero_point


@pytest.mark.parametrize("scale", [2.0**-4, 2.0**-7, 0.5, 4.0])
def test_int8_per_tensor_ties_match_torch(scale):
    # (k + 0.5) * scale is exact for a power-of-two scale, so x / scale lands exactly on .5
    halves = torch.arange(-140, 140, dtype=torch.float32) + 0.5
    x = halves * scale
    assert torch.equal(x * (1 / torch.tensor(scale)), halves)
    codes = quantize(x, QuantScheme("int8", granularity="tensor"), scale=scale).codes
    assert torch.equal(codes, torch_qint8(x, scale, 0))
    assert torch.equal(codes.float(), torch.clamp(torch.from_numpy(np.rint(halves.numpy())), -128, 127))
    for zero_point in (-3, -1, 1, 2, 7):  # odd zero-points are where "round then add" differs
        qt = quantize(x, QuantScheme("int8", granularity="tensor", symmetric=False), scale=scale,
                      zero_point=zero_point)
        assert torch.equal(qt.codes, torch_qint8(x, scale, zero_point)), zero_point
        expected = np.clip(np.rint(halves.numpy() + zero_point), -128, 127)  # round(x / s + z)
        assert np.array_equal(qt.codes.numpy().astype(np.float32), expected)


def test_int8_per_channel_matches_torch():
    rows, cols = 24, 300
    scales = (torch.rand(rows, generator=gen(3)) * 0.05 + 1e-3).float()
    scales[::3] = 2.0 ** -torch.randint(1, 9, (len(scales[::3]),), generator=gen(4)).float()
    halves = torch.randint(-140, 140, (rows, cols), generator=gen(5)).float() + 0.5
    noise = torch.randn(rows, cols, generator=gen(6)) * 60
    x = torch.where(torch.rand(rows, cols, generator=gen(7)) < 0.4, halves, noise) * scales[:, None]
    zero_points = torch.randint(-128, 128, (rows,), generator=gen(8))

    symmetric = quantize(x, QuantScheme("int8", granularity="channel"), scale=scales)
    reference = torch_qint8(x, scales.double(), torch.zeros(rows, dtype=torch.long), axis=0)
    assert torch.equal(symmetric.codes, reference)
    qt = quantize(x, QuantScheme("int8", granularity="channel", symmetric=False), scale=scales,
                  zero_point=zero_points)
    assert torch.equal(qt.codes, torch_qint8(x, scales.double(), zero_points, axis=0))
    assert torch.equal(qt.scale, scales) and torch.equal(qt.zero_point.long(), zero_points)


# ---------------------------------------------------------------- calibration from first principles


def test_symmetric_minmax_scale_is_absmax_over_qmax():
    x = torch.randn(48, 96, generator=gen(10)) * 3
    xn = x.numpy()
    tensor = quantize(x, QuantScheme("int8", granularity="tensor"))
    assert tensor.scale.dtype == torch.float32
    assert tensor.scale.item() == np.abs(xn).max() / np.float32(127)
    channel = quantize(x, QuantScheme("int8", granularity="channel"))
    assert np.array_equal(channel.scale.numpy(), np.abs(xn).max(axis=1) / np.float32(127))
    group = quantize(x, QuantScheme("int4", granularity="group", group_size=32))
    assert group.scale.dtype == torch.float16  # "auto" stores group scales in fp16
    exact = np.abs(xn.reshape(-1, 32)).max(axis=1) / np.float32(7)
    expected = round_up(exact, np.float16)
    assert np.array_equal(group.scale.numpy(), expected)
    assert np.any(expected != exact.astype(np.float16))  # some groups really were rounded up
    # and the codes follow: round(x * (1 / scale)), half to even, saturated to [-8, 7]
    inverse = np.float32(1) / expected.astype(np.float32)
    codes = np.clip(np.rint(xn.reshape(-1, 32) * inverse[:, None]), -8, 7)
    assert np.array_equal(group.codes.numpy().reshape(-1, 32).astype(np.float32), codes)
    bf16 = quantize(x, QuantScheme("int8", granularity="channel", scale_dtype="bf16"))
    exact = torch.from_numpy(np.abs(xn).max(axis=1) / np.float32(127))
    nearest = exact.to(torch.bfloat16)
    above = torch.where(nearest.float() < exact, torch.nextafter(nearest, torch.tensor(math.inf,
                                                                                  dtype=torch.bfloat16)), nearest)
    assert torch.equal(bf16.scale, above)


@pytest.mark.parametrize("fmt", INTEGERS)
@pytest.mark.parametrize("granularity,scale_dtype", [("tensor", "fp32"), ("channel", "fp32"),
                                                     ("group", "fp16"), ("group", "bf16")])
def test_asymmetric_minmax_scale_and_zero_point(fmt, granularity, scale_dtype):
    info = get_format(fmt)
    x = torch.randn(16, 128, generator=gen(12)) * 2 + 0.7
    x[3] = x[3].abs() + 0.1  # an all-positive row: the range must still contain 0
    scheme = QuantScheme(fmt, granularity=granularity, group_size=32, symmetric=False, scale_dtype=scale_dtype)
    qt = quantize(x, scheme)
    blocks = blocks_of(x, qt).double()
    low = blocks.min(dim=1).values.clamp(max=0)
    high = blocks.max(dim=1).values.clamp(min=0)
    ideal = (high - low) / (info.qmax - info.qmin)
    scale = qt.scale.double()
    ulp = torch.finfo(qt.scale.dtype).eps * 2.0 ** torch.floor(torch.log2(ideal))
    assert torch.all((scale - ideal).abs() <= ulp * 1.001)
    # the stored grid spans the whole range (a scale rounded down would clip its ends)
    assert torch.all(scale * (info.qmax - info.qmin) >= (high - low) * (1 - 1e-6))
    zero = qt.zero_point.double()
    assert torch.equal(zero, (info.qmin - torch.round(low / scale)).clamp(info.qmin, info.qmax))
    dq = blocks_of(qt.dequantize(), qt).double()
    assert torch.all((dq.min(dim=1).values - blocks.min(dim=1).values).abs() <= scale)
    assert torch.all((dq.max(dim=1).values - blocks.max(dim=1).values).abs() <= scale)
    # zero is exactly representable
    z = x.clone()
    z[:, 0] = 0.0
    assert torch.all(quantize(z, scheme).dequantize()[:, 0] == 0)


def test_percentile_clips_an_outlier():
    x = torch.randn(4000, generator=gen(13))
    x[17] = 1000.0
    minmax = quantize(x, QuantScheme("int8", granularity="tensor"))
    pct = quantize(x, QuantScheme("int8", granularity="tensor", calibration="percentile", percentile=99.93))
    assert pct.scale.item() < minmax.scale.item() / 100
    # nearest-rank percentile of |x|: the ceil(p / 100 * n)-th smallest magnitude, 3998 of 4000 here
    k = 3998
    expected = np.sort(np.abs(x.numpy()))[k - 1] / np.float32(127)
    assert pct.scale.item() == expected
    s = pct.scale.item()
    clipped = (x.abs() > 127 * s + s / 2).float().mean().item()
    assert clipped > 0
    assert pct.dequantize()[17].item() == pytest.approx(127 * s)
    asym_minmax = quantize(x, QuantScheme("int8", granularity="tensor", symmetric=False))
    asym_pct = quantize(x, QuantScheme("int8", granularity="tensor", symmetric=False,
                                       calibration="percentile", percentile=99.93))
    assert asym_pct.scale.item() < asym_minmax.scale.item() / 10


@pytest.mark.parametrize("fmt,symmetric", [("int4", True), ("int4", False), ("int3", True), ("nf4", True),
                                           ("fp4_e2m1", True), ("int8", False)])
def test_mse_calibration_never_loses_to_minmax(fmt, symmetric):
    g = gen(14)  # heavy-tailed: Gaussian over sqrt(uniform)
    x = torch.randn(32, 256, generator=g) / torch.rand(32, 256, generator=g).clamp(min=0.05).sqrt()
    errors = {}
    scales = {}
    for calibration in ("minmax", "mse"):
        qt = quantize(x, QuantScheme(fmt, granularity="group", group_size=64, symmetric=symmetric,
                                     calibration=calibration))
        errors[calibration] = ((blocks_of(qt.dequantize(), qt) - blocks_of(x, qt)) ** 2).sum(dim=1)
        scales[calibration] = qt.scale.float()
    assert torch.all(errors["mse"] <= errors["minmax"] * (1 + 1e-6))
    if get_format(fmt).bits <= 4:  # at 8 bits clipping an outlier costs more than the finer step saves
        assert errors["mse"].sum() < errors["minmax"].sum()
    assert torch.all(scales["mse"] <= scales["minmax"] * (1 + 2**-10))


# ---------------------------------------------------------------- dequantization error and grids


@pytest.mark.parametrize("fmt", INTEGERS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_minmax_error_is_at_most_half_a_step(fmt, symmetric):
    for seed, (granularity, scale_dtype) in enumerate([("tensor", "auto"), ("channel", "auto"),
                                                       ("channel", "bf16"), ("group", "auto"),
                                                       ("group", "bf16"), ("group", "fp32")]):
        for group_size in (32, 64):
            g = gen(100 + seed)
            x = torch.randn(32, 128, generator=g) * 10 ** (seed - 3) + torch.randn(32, 1, generator=g) * 10 ** (
                seed - 3) * (seed % 3)
            qt = quantize(x, QuantScheme(fmt, granularity=granularity, group_size=group_size,
                                         symmetric=symmetric, scale_dtype=scale_dtype))
            error = (blocks_of(x, qt) - blocks_of(qt.dequantize(), qt)).abs().double()
            step = qt.scale.double()[:, None]
            assert torch.all(error <= step / 2 * (1 + 1e-5)), (granularity, scale_dtype, group_size)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_half_a_step_also_with_tiny_and_bf16_scales(fmt, symmetric):
    # fp16 scales below 2**-14 are subnormal (few significant bits); bf16 keeps 8. Rounding such a scale
    # down would clip the block's extremes by several steps.
    for magnitude in (3e-4, 1e-4, 3e-5, 1e-5, 1e-6):
        for scale_dtype in ("fp16", "bf16"):
            x = torch.randn(16, 128, generator=gen(50)) * magnitude
            qt = quantize(x, QuantScheme(fmt, granularity="group", group_size=32, symmetric=symmetric,
                                         scale_dtype=scale_dtype))
            error = (blocks_of(x, qt) - blocks_of(qt.dequantize(), qt)).abs().double()
            assert torch.all(error <= qt.scale.double()[:, None] / 2 * (1 + 1e-5)), (magnitude, scale_dtype)


@pytest.mark.parametrize("scheme", [QuantScheme("int4", granularity="group", group_size=32, symmetric=False),
                                    QuantScheme("nf4", granularity="group", group_size=64),
                                    QuantScheme("fp8_e4m3", granularity="channel"),
                                    QuantScheme("fp4_e2m1", granularity="tensor"),
                                    QuantScheme("int3", granularity="channel", symmetric=False)])
def test_dequantized_values_lie_on_the_grid(scheme):
    x = torch.randn(8, 128, generator=gen(20))
    qt = quantize(x, scheme)
    dq = blocks_of(qt.dequantize(), qt)
    for block in range(qt.scale.numel()):
        grid = grid_values(qt, block)
        assert torch.isin(dq[block], grid).all(), block
        assert len(grid) == len(get_format(scheme.format).levels())
    assert torch.equal(fake_quantize(x, scheme), qt.dequantize())
    assert fake_quantize(x.to(torch.bfloat16), scheme).dtype == torch.bfloat16


def test_relative_error_grows_as_bits_shrink():
    x = torch.randn(256, 512, generator=gen(21))

    def relative_mse(scheme: QuantScheme) -> float:
        return (((fake_quantize(x, scheme) - x) ** 2).mean() / (x**2).mean()).item()

    ints = [relative_mse(QuantScheme(f, granularity="group", group_size=64)) for f in INTEGERS]
    assert 0 < ints[0] < ints[1] < ints[2] < ints[3]
    floats = [relative_mse(QuantScheme(f)) for f in ("fp16", "bf16", "fp8_e4m3")]
    assert 0 < floats[0] < floats[1] < floats[2]
    assert relative_mse(QuantScheme("fp32")) == 0


def test_plain_casts_store_the_cast():
    x = torch.randn(5, 7, generator=gen(22))
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        qt = quantize(x, QuantScheme(name))
        assert qt.scale is None and qt.zero_point is None
        assert qt.codes.dtype == dtype and torch.equal(qt.codes, x.to(dtype))
        assert torch.equal(qt.dequantize(), x.to(dtype).float())


# ---------------------------------------------------------------- storage


def expected_nbytes(fmt: str, granularity: str, group_size: int, symmetric: bool, shape) -> int:
    info = get_format(fmt)
    numel = math.prod(shape)
    if not info.scaled:
        return numel * info.bits // 8
    blocks = {"tensor": 1, "channel": shape[0] if len(shape) > 1 else 1,
              "group": numel // group_size}[granularity]
    scale_bytes = 2 if granularity == "group" else 4
    zero_bytes = 0 if symmetric else math.ceil(blocks * info.bits / 8)
    return math.ceil(numel * info.bits / 8) + blocks * scale_bytes + zero_bytes


@pytest.mark.parametrize("shape", [(48, 96), (3, 64), (96,), (5, 3, 32)])
def test_packed_size_is_nbytes(shape):
    x = torch.randn(*shape, generator=gen(30))
    checked = 0
    for fmt in format_names():
        info = get_format(fmt)
        for granularity, group_size in [("tensor", 128), ("channel", 128), ("group", 32), ("group", 64),
                                        ("group", 128)]:
            for symmetric in (True, False):
                if not symmetric and info.kind != "integer":
                    continue
                scheme = QuantScheme(fmt, granularity=granularity, group_size=group_size, symmetric=symmetric)
                if info.scaled and granularity == "group" and shape[-1] % group_size:
                    with pytest.raises(QlabError):
                        quantize(x, scheme)
                    continue
                qt = quantize(x, scheme)
                packed = qt.packed()
                stored = sum(t.numel() * t.element_size() for t in packed.values())
                assert stored == qt.nbytes == expected_nbytes(fmt, granularity, group_size, symmetric, shape)
                assert qt.bits_per_weight == 8 * qt.nbytes / x.numel()
                if info.kind != "float":
                    unsigned = qt.codes.reshape(-1).to(torch.int16) - (info.qmin if info.kind == "integer" else 0)
                    assert torch.equal(unpack_codes(packed["codes"], info.bits, x.numel()).to(torch.int16),
                                       unsigned)
                checked += 1
    assert checked > 50


def reference_pack(values: np.ndarray, bits: int) -> np.ndarray:
    """LSB-first bit stream: bit j of value i is stream bit i * bits + j."""
    stream = ((values[:, None].astype(np.uint16) >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little")


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_roundtrip_and_layout(bits):
    rng = np.random.default_rng(bits)
    for count in [1, 2, 3, 7, 8, 9, 13, 64, 100, 1001, *rng.integers(1, 3000, 5).tolist()]:
        values = rng.integers(0, 2**bits, count).astype(np.uint8)
        packed = pack_codes(torch.from_numpy(values), bits)
        assert packed.dtype == torch.uint8
        assert packed.numel() == math.ceil(count * bits / 8)
        assert np.array_equal(packed.numpy(), reference_pack(values, bits)), count
        assert np.array_equal(unpack_codes(packed, bits, count).numpy(), values), count


def test_bits_per_weight():
    assert QuantScheme("int4", granularity="group", group_size=128).bits_per_weight((4096, 4096)) == 4.125
    assert QuantScheme("int4", granularity="group", group_size=128, symmetric=False).bits_per_weight(
        (4096, 4096)) == 4.125 + 4 / 128 == 4.15625
    assert QuantScheme("nf4", granularity="group", group_size=64).bits_per_weight((4096, 4096)) == 4.25
    assert QuantScheme("int8", granularity="channel").bits_per_weight((4096, 4096)) == 8 + 32 / 4096
    assert QuantScheme("fp16").bits_per_weight((4096, 4096)) == 16
    assert QuantScheme("fp8_e4m3", granularity="tensor").bits_per_weight((64, 64)) == 8 + 32 / 4096
    qt = quantize(torch.randn(16, 256, generator=gen(31)), QuantScheme("int4", granularity="group"))
    assert qt.bits_per_weight == 4.125


# ---------------------------------------------------------------- bad inputs and edge cases


@pytest.mark.parametrize("kwargs", [
    dict(format="int5"), dict(format="float8"), dict(granularity="row"), dict(group_size=0),
    dict(group_size=-1), dict(group_size=1.5), dict(group_size=True), dict(format="nf4", symmetric=False),
    dict(format="fp8_e4m3", symmetric=False), dict(format="fp4_e2m1", symmetric=False),
    dict(percentile=101), dict(percentile=50), dict(calibration="kl"), dict(scale_dtype="fp8"),
    dict(algorithm="spqr"), dict(sparsity="1:2"), dict(format="nf4", algorithm="hqq"),
    dict(targets=("activations",)), dict(targets=()),
])
def test_bad_schemes_raise_qlab_error(kwargs):
    with pytest.raises(QlabError):
        QuantScheme(**kwargs)


def test_bad_tensors_and_overrides_raise_qlab_error():
    x = torch.randn(4, 96, generator=gen(40))
    with pytest.raises(QlabError):
        quantize(x, QuantScheme("int4", granularity="group", group_size=64))  # 64 does not divide 96
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[2, 5] = bad
        for scheme in (QuantScheme("int8"), QuantScheme("int4", granularity="group", group_size=32),
                       QuantScheme("nf4", granularity="tensor"), QuantScheme("fp8_e4m3")):
            with pytest.raises(QlabError):
                quantize(y, scheme)
    tensor = QuantScheme("int8", granularity="tensor")
    asym = QuantScheme("int8", granularity="tensor", symmetric=False)
    for scale in (0.0, -0.1, float("nan"), float("inf"), 1e-50, [0.1, 0.2]):
        with pytest.raises(QlabError):
            quantize(x, tensor, scale=scale)
    for zero_point in (128, -129, 1.5, float("nan"), [1, 2]):
        with pytest.raises(QlabError):
            quantize(x, asym, scale=0.1, zero_point=zero_point)
    with pytest.raises(QlabError):
        quantize(x, QuantScheme("int4", granularity="tensor", symmetric=False), scale=0.1, zero_point=8)
    with pytest.raises(QlabError):
        quantize(x, tensor, scale=0.1, zero_point=0)  # a zero-point needs an asymmetric scheme
    with pytest.raises(QlabError):
        quantize(x, QuantScheme("fp16"), scale=0.1)


@pytest.mark.parametrize("fmt", SCALED)
def test_zero_and_constant_tensors(fmt):
    for granularity in ("tensor", "channel", "group"):
        for symmetric in (True, False) if get_format(fmt).kind == "integer" else (True,):
            scheme = QuantScheme(fmt, granularity=granularity, group_size=32, symmetric=symmetric)
            zeros = torch.zeros(4, 64)
            qt = quantize(zeros, scheme)
            assert torch.equal(qt.dequantize(), zeros)
            assert torch.all(torch.isfinite(qt.scale.float())) and torch.all(qt.scale.float() > 0)
            # a constant whose scale (max / grid max) is a power of two dequantizes exactly
            info = get_format(fmt)
            top = info.max_abs if symmetric else info.qmax - info.qmin
            for power in (-6, 0, 3):
                value = top * 2.0**power
                for sign in ((1.0, -1.0) if symmetric else (1.0,)):
                    constant = torch.full((4, 64), sign * value)
                    assert torch.equal(quantize(constant, scheme).dequantize(), constant), (value, sign)
            # any other constant dequantizes to within a rounding of its scale
            constant = torch.full((4, 64), -2.7)
            qt = quantize(constant, scheme)
            assert torch.allclose(qt.dequantize(), constant, rtol=2**-8, atol=0)


# ---------------------------------------------------------------- the scheme value object


def test_scheme_is_frozen_hashable_and_round_trips():
    scheme = QuantScheme("int4", granularity="group", group_size=64, symmetric=False, calibration="mse")
    with pytest.raises(dataclasses.FrozenInstanceError):
        scheme.group_size = 32
    with pytest.raises(dataclasses.FrozenInstanceError):
        scheme.format = "int8"
    same = QuantScheme("INT4", granularity="group", group_size=64, symmetric=False, calibration="mse")
    assert scheme == same and hash(scheme) == hash(same) and len({scheme, same}) == 1
    assert scheme.scale_dtype == "fp16"
    for s in (scheme, QuantScheme(), QuantScheme("fp16"), QuantScheme("nf4", granularity="tensor"),
              QuantScheme("int8", calibration="percentile", percentile=99.5, scale_dtype="bf16"),
              QuantScheme("fp8_e5m2", granularity="channel")):
        record = s.to_dict()
        assert QuantScheme.from_dict(record) == s
        assert set(record) == {f.name for f in dataclasses.fields(QuantScheme)}
    with pytest.raises(QlabError):
        QuantScheme.from_dict({**scheme.to_dict(), "bogus": 1})
    assert QuantScheme("int4", granularity="group", group_size=64) != QuantScheme("int4", granularity="group",
                                                                                  group_size=32)


def test_plain_cast_schemes_normalise():
    a = QuantScheme("fp16", granularity="group", group_size=64, calibration="mse", symmetric=False)
    b = QuantScheme("half", granularity="channel")
    assert a == b == QuantScheme("fp16") and hash(a) == hash(b)
    assert a.label == "fp16"
    # a scaled format keeps its granularity; group_size only matters for groups
    assert QuantScheme("int8", granularity="channel", group_size=32) == QuantScheme("int8", granularity="channel")


def _clipped_by_hand(x: torch.Tensor, qt, group_of, input_scales: torch.Tensor | None = None) -> int:
    """Values past their own block's grid by more than half the outermost step, counted element by element from
    the packed scales (and zero-points, and AWQ's input scales)."""
    fmt, stored = qt.scheme.fmt, qt.packed()
    rows = x.shape[0]
    scales = stored["scales"].float().reshape(rows, -1)
    zeros = None if qt.zero_point is None else qt.zero_point.float().reshape(rows, -1)
    half_step = (fmt.levels()[-1] - fmt.levels()[-2]).item() / 2
    count = 0
    for row, column in itertools.product(range(rows), range(x.shape[1])):
        group = group_of(column)
        scale = scales[row, group].item()
        zero = 0.0 if zeros is None else zeros[row, group].item()
        low, high = ((-fmt.max_abs, fmt.max_abs) if zeros is None else (fmt.qmin - zero, fmt.qmax - zero))
        value = x[row, column].item() / (1.0 if input_scales is None else input_scales[column].item())
        count += value < (low - half_step) * scale or value > (high + half_step) * scale
    return count


def test_consecutive_groups_cover_consecutive_columns():
    qt = quantize(torch.randn(4, 64, generator=gen(39)), QuantScheme("int4", "group", 16))
    block, columns = block_of(qt, 1, 2)
    assert block == 6 and torch.equal(columns, torch.arange(32, 48))
    assert torch.equal(qt.input_groups(), torch.arange(64) // 16)
    assert block_of(quantize(torch.randn(4, 64), QuantScheme("int8")), 3)[0] == 3


def test_act_order_blocks_grids_and_clipping_follow_the_group_index():
    g = gen(40)
    w = torch.randn(8, 64, generator=g)
    inputs = torch.randn(256, 64, generator=g) * torch.logspace(-1, 1, 64)[torch.randperm(64, generator=g)]
    # A percentile range clips each group's largest weights: the count then depends on which scale is whose.
    scheme = QuantScheme("int4", "group", 16, calibration="percentile", percentile=90, algorithm="gptq-act-order")
    qt = gptq_quantize(w, hessian_from_inputs(inputs), scheme)
    index = qt.packed()["group_index"].long()
    assert not torch.equal(index, torch.arange(64) // 16)  # the groups really are scattered
    assert torch.equal(qt.input_groups(), index)
    dequantized = qt.dequantize()
    for row, group in ((0, 0), (5, 3), (7, 1)):
        block, columns = block_of(qt, row, group)
        assert block == 4 * row + group and torch.equal(columns, (index == group).nonzero()[:, 0])
        assert torch.isin(dequantized[row, columns], grid_values(qt, block)).all()
    planted = w.clone()
    planted[2, 7], planted[6, 40] = 50.0, -50.0
    for x in (w, planted):
        by_hand = _clipped_by_hand(x, qt, lambda column: index[column].item())
        consecutive = _clipped_by_hand(x, qt, lambda column: column // 16)
        assert by_hand != consecutive  # the test tells the group index from consecutive groups
        assert error_stats(x, qt)["clipped_fraction"] == pytest.approx(by_hand / x.numel(), abs=1e-12)
    assert _clipped_by_hand(planted, qt, lambda column: index[column].item()) >= 2


def test_awq_clipping_and_grids_are_on_the_scaled_weights():
    g = gen(41)
    w = torch.randn(8, 64, generator=g)
    inputs = torch.randn(256, 64, generator=g) * torch.logspace(-1.5, 1.5, 64)
    scheme = QuantScheme("int4", "group", 16, algorithm="awq")
    qt = awq_quantize(w, inputs.abs().mean(dim=0), hessian_from_inputs(inputs), scheme)
    input_scales = qt.packed()["input_scales"].float()
    assert input_scales.max() > 2 * input_scales.min()  # AWQ chose a salience scale, not plain rounding
    assert torch.equal(qt.input_groups(), torch.arange(64) // 16)
    assert error_stats(w, qt)["clipped_fraction"] == 0.0  # min-max ranges of the scaled weights clip nothing
    larger = w * 1.5
    by_hand = _clipped_by_hand(larger, qt, lambda column: column // 16, input_scales)
    assert by_hand != _clipped_by_hand(larger, qt, lambda column: column // 16)
    assert error_stats(larger, qt)["clipped_fraction"] == pytest.approx(by_hand / w.numel(), abs=1e-12)
    dequantized = qt.dequantize()
    block, columns = block_of(qt, 3, 2)
    for column in columns.tolist():  # each input's grid in weight space is the block's times its input scale
        assert torch.isin(dequantized[3, column], grid_values(qt, block, column))
    assert torch.isin(qt.dequantize_scaled()[3, columns], grid_values(qt, block)).all()


def test_dequantized_values_never_alias_the_codes():
    """An fp32 cast's codes are float32 values already: what dequantize hands out is a copy, so writing into it
    (as an error measurement might) leaves the quantized tensor as it was."""
    qtensor = quantize(torch.randn(8, 32), QuantScheme("fp32"))
    before = qtensor.codes.clone()
    qtensor.dequantize(torch.float32).zero_()
    assert torch.equal(qtensor.codes, before)
