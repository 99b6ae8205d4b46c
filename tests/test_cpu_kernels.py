"""The compiled CPU kernels give the bits of quantize(...).dequantize(...), and only large CPU tensors use them."""

from __future__ import annotations

import pytest
import torch

from qlab.core import cpu_kernels, quant
from qlab.core.formats import format_names, get_format
from qlab.core.quant import QuantScheme, fake_quantize, fake_quantize_unchecked, quantize
from tests.test_quant_fake import bits, sample, schemes

pytest.importorskip("numba")

# Scaled formats with several rows of scales: what the kernels take.
COMPILED_FORMATS = [name for name in format_names() if get_format(name).scaled]
# Casts the float kernel makes: every format whose step's inverse is a float32 (not bf16's subnormals).
CAST_FORMATS = [name for name in format_names() if get_format(name).kind == "float" and get_format(name).bits < 16
                or name == "fp16"]


@pytest.fixture
def every_size(monkeypatch):
    """Kernels for tensors of any size, and a record of the calls that reached them."""
    monkeypatch.setattr(cpu_kernels, "MIN_VALUES", 1)
    calls = []
    real = cpu_kernels.dequantize_blocks
    monkeypatch.setattr(cpu_kernels, "dequantize_blocks", lambda *args: calls.append(args[5].name) or real(*args))
    return calls


@pytest.mark.parametrize("fmt", COMPILED_FORMATS)
def test_kernels_match_quantize_bit_for_bit(fmt, every_size):
    cases = [((7, 96), 1.0), ((33, 64), 1e-3), ((40, 128), 300.0)]
    for seed, scheme in enumerate(s for s in schemes(fmt) if s.granularity != "tensor"):
        for calibration in ("minmax", "mse", "percentile"):
            scheme = QuantScheme.from_dict({**scheme.to_dict(), "calibration": calibration})
            for shape, magnitude in cases:
                for dtype in (torch.bfloat16, torch.float32):
                    x = sample(shape, dtype, magnitude, seed)
                    for out in (torch.float32, torch.bfloat16):
                        expected = quantize(x, scheme).dequantize(out)
                        got, suspect = fake_quantize_unchecked(x, scheme, out)
                        assert not suspect
                        assert torch.equal(bits(got), bits(expected)), (scheme.label, dtype, out)
    assert fmt in every_size


@pytest.mark.parametrize("fmt", ["int8", "int4", "int3", "nf4", "fp8_e4m3"])
def test_block_scales_are_torchs_for_ranges_from_subnormal_to_huge(fmt):
    generator = torch.Generator().manual_seed(7)
    rows = 1 << 16
    magnitudes = torch.logspace(-44, 38, rows).reshape(-1, 1)[torch.randperm(rows, generator=generator)]
    blocks = (torch.randn(rows, 32, generator=generator, dtype=torch.float64) * magnitudes).to(torch.float32)
    blocks[::5] = blocks[::5].abs()  # ranges on one side of zero, for the zero points
    blocks[1::7] = 0.0
    blocks[2::11, 3] = -3e38  # spans wider than float32's largest number
    blocks[2::11, 4] = 3e38
    blocks[3::13, 5] = float("nan")
    for scheme in schemes(fmt):
        if scheme.granularity != "group":
            continue
        for dtype in (torch.float32, torch.bfloat16):
            x = blocks.to(dtype)
            scale_dtype = quant.SCALE_DTYPES[scheme.scale_dtype]
            got = cpu_kernels.block_scales(x, scheme.symmetric, get_format(fmt), scale_dtype)
            expected = quant._block_scales(x, x, scheme)
            assert got[3] and expected[3]  # the NaN rows: their values are not used, only the flag
            finite = x.isfinite().all(dim=1)
            got = cpu_kernels.block_scales(x[finite], scheme.symmetric, get_format(fmt), scale_dtype)
            expected = quant._block_scales(x[finite], x[finite], scheme)
            for name, a, b in zip(("scale", "inverse", "zero"), got[:3], expected[:3], strict=True):
                assert (a is None) == (b is None), name
                assert a is None or torch.equal(bits(a), bits(b)), (scheme.label, dtype, name)
            assert bool(got[3]) == bool(expected[3])  # scales past fp16 or bf16, grids past float32


@pytest.mark.parametrize("width", [4, 64, 2048])
def test_bf16_ranges_on_16_bits_are_the_float32_kernels_and_torchs(width):
    """The bf16 kernel orders 16-bit patterns; the float32 one, their widened 32-bit ones: the same ranges, bit
    for bit, over every finite bf16 value in shuffled rows, and NaN for each row that holds a NaN or an
    infinity. torch.aminmax agrees wherever it can (it may pick either zero where -0 and +0 tie)."""
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = every[every.isfinite()]
    generator = torch.Generator().manual_seed(width)
    rows = finite[torch.randperm(finite.numel(), generator=generator)][: finite.numel() // width * width]
    rows = rows.reshape(-1, width).clone()
    rows[1, -1], rows[2, 0], rows[3, width // 2] = float("nan"), float("inf"), -float("inf")
    rows[4] = torch.tensor([-0.0, 0.0] * (width // 2), dtype=torch.bfloat16)
    rows[5] = 2.0 ** -133  # bf16's smallest subnormal
    low, high = cpu_kernels.block_ranges(rows)
    wide_low, wide_high = cpu_kernels.block_ranges(rows.float())
    assert torch.equal(bits(low), bits(wide_low)) and torch.equal(bits(high), bits(wide_high))
    bad = ~rows.isfinite().all(dim=1)
    assert bad[1:4].all() and low[bad].isnan().all() and high[bad].isnan().all()
    expected_low, expected_high = torch.aminmax(rows[~bad].float(), dim=1)
    assert torch.equal(low[~bad], expected_low) and torch.equal(high[~bad], expected_high)


def nan_as_one(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, with every NaN alike: torch's casts keep NaN payloads that no model's weights carry."""
    return torch.where(t.isnan(), torch.full_like(bits(t), -1), bits(t))


@pytest.mark.parametrize("fmt", CAST_FORMATS)
def test_float_rounding_matches_torchs_casts_for_every_bf16_and_many_float32_values(fmt):
    cast_dtype = get_format(fmt).cast_dtype
    every_bf16 = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    generator = torch.Generator().manual_seed(5)
    any_float32 = torch.randint(-(1 << 31), (1 << 31) - 1, (1 << 20,), generator=generator).to(torch.int32)
    around_one = torch.randn(1 << 20, generator=generator) * torch.logspace(-12, 6, 1 << 20)
    for x in (every_bf16, any_float32.view(torch.float32), around_one):
        x = x.reshape(-1, 256)
        for out_dtype in (torch.bfloat16, torch.float32):
            out = torch.empty(x.shape, dtype=out_dtype)
            cpu_kernels.cast(x, out, get_format(fmt))
            assert torch.equal(nan_as_one(out), nan_as_one(x.to(cast_dtype).to(out_dtype))), (x.dtype, out_dtype)


def test_a_plain_cast_of_a_large_bf16_tensor_takes_the_kernel(monkeypatch):
    x = sample((256, 512), torch.bfloat16, 1e-4, 6)  # many values in fp16's subnormals
    calls = []
    real = cpu_kernels.cast
    monkeypatch.setattr(cpu_kernels, "cast", lambda *args: calls.append(args[2].name) or real(*args))
    monkeypatch.setattr(cpu_kernels, "MIN_VALUES", 1)
    for out in (None, torch.empty_like(x)):
        values, suspect = fake_quantize_unchecked(x, QuantScheme("fp16"), torch.bfloat16, out=out)
        assert suspect is None and torch.equal(bits(values), bits(x.to(torch.float16).to(torch.bfloat16)))
    assert calls == ["fp16", "fp16"]
    transposed = x.t()  # not contiguous: torch's route
    assert torch.equal(bits(fake_quantize(transposed, QuantScheme("fp16"))),
                       bits(transposed.to(torch.float16).to(torch.bfloat16)))
    fake_quantize(x.float(), QuantScheme("fp16"))  # fp32 (the bundled models): torch's one vectorised pass
    fake_quantize(x, QuantScheme("bf16"))
    assert calls == ["fp16", "fp16"]


def test_ties_round_to_even_and_signed_zeros_survive(every_size):
    # Scaled by 127 / 63.5 = 2 exactly: k + 0.5 steps land on ties, each rounded to the even code.
    x = torch.cat([torch.arange(-127, 128, dtype=torch.float32) / 2, torch.tensor([-0.0])]).reshape(-1, 64)
    for scheme in (QuantScheme("int8", "group", 64), QuantScheme("int8", "group", 64, symmetric=False)):
        expected = quantize(x, scheme).dequantize(torch.float32)
        assert torch.equal(bits(fake_quantize(x, scheme, torch.float32)), bits(expected))
    assert every_size


def test_blocks_that_are_not_finite_are_flagged_and_then_refused_like_quantize(every_size):
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = sample((16, 64), torch.bfloat16, 1.0, 0)
        x[9, 17] = bad
        _, suspect = fake_quantize_unchecked(x, QuantScheme("int4", "group", 32), torch.bfloat16)
        assert suspect
        with pytest.raises(Exception) as expected:
            quantize(x, QuantScheme("int4", "group", 32))
        with pytest.raises(type(expected.value), match="NaN or infinite"):
            fake_quantize(x, QuantScheme("int4", "group", 32), torch.bfloat16)


def test_a_given_output_tensor_receives_the_values():
    x = sample((64, 256), torch.bfloat16, 0.02, 3)
    for scheme in (QuantScheme("int4", "group", 64), QuantScheme("fp16"), QuantScheme("fp8_e4m3", "channel")):
        out = torch.full_like(x, 7.0)
        values, _ = fake_quantize_unchecked(x, scheme, torch.bfloat16, out=out)
        assert values is out and torch.equal(bits(out), bits(quantize(x, scheme).dequantize(torch.bfloat16)))
    with pytest.raises(Exception, match="contiguous"):
        fake_quantize_unchecked(x, QuantScheme("int8"), torch.bfloat16, out=torch.empty(256, 64).t())


def test_small_tensors_fp16_weights_and_one_scale_per_tensor_keep_torchs_route():
    weight = torch.zeros(1 << 12, 1 << 10, dtype=torch.bfloat16)
    assert cpu_kernels.usable(weight.reshape(-1, 64), torch.bfloat16)
    assert not cpu_kernels.usable(weight[:64].reshape(-1, 64), torch.bfloat16)  # 64 K values
    bundled_largest = torch.zeros(1536, 576)  # SmolLM2's largest linear, and more than MiniLM's
    assert not cpu_kernels.usable(bundled_largest.reshape(-1, 32), torch.float32)
    assert not cpu_kernels.usable(weight.half().reshape(-1, 64), torch.bfloat16)
    assert not cpu_kernels.usable(weight.reshape(-1, 64), torch.float16)
    assert not cpu_kernels.usable(weight.reshape(1, -1), torch.bfloat16)


def test_without_numba_torchs_route_gives_the_same_values(monkeypatch):
    x = sample((64, 256), torch.bfloat16, 0.02, 4)
    monkeypatch.setattr(cpu_kernels, "MIN_VALUES", 1)
    scheme = QuantScheme("nf4", "group", 64)
    compiled = fake_quantize(x, scheme)
    monkeypatch.setattr(cpu_kernels, "_kernels", lambda: None)
    assert not cpu_kernels.usable(x.reshape(-1, 64), torch.bfloat16)
    assert torch.equal(bits(fake_quantize(x, scheme)), bits(compiled))
