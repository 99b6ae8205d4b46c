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
    """Kernels for tensors of any size, in tasks of a few rows (several per tensor, the last one shorter, as a
    large weight's), and a record of the calls that reached them: (kernel, format)."""
    monkeypatch.setattr(cpu_kernels, "MIN_VALUES", 1)
    monkeypatch.setattr(cpu_kernels, "VALUES_PER_TASK", 200)
    calls = []
    for name, fmt_index in (("round_groups", 2), ("dequantize_blocks", 5)):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *args, name=name, fmt_index=fmt_index, real=real:
                            calls.append((name, args[fmt_index].name)) or real(*args))
    return calls


@pytest.mark.parametrize("fmt", COMPILED_FORMATS)
def test_kernels_match_quantize_bit_for_bit(fmt, every_size):
    """Min-max scales take the fused kernel, percentile and MSE ones (torch's) the rounding kernel."""
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
    assert set(every_size) == {("round_groups", fmt), ("dequantize_blocks", fmt)}


def test_min_max_blocks_take_the_fused_kernel_and_other_scales_the_rounding_one(every_size):
    x = sample((64, 256), torch.bfloat16, 0.02, 8)
    for calibration, kernel in (("minmax", "round_groups"), ("mse", "dequantize_blocks"),
                                ("percentile", "dequantize_blocks")):
        every_size.clear()
        fake_quantize_unchecked(x, QuantScheme("int4", "group", 64, calibration=calibration), torch.bfloat16)
        assert every_size == [(kernel, "int4")], calibration


def scales_then_rounding(blocks: torch.Tensor, out: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """The two-step route into ``out``: torch's min-max scales (``quant._block_scales``), then the rounding kernel;
    returns the flag."""
    scale, inverse, zero, suspect = quant._block_scales(blocks, blocks, scheme)
    search = quant._lut_search(scheme.fmt.name, blocks.device) if scheme.fmt.kind == "lut" else None
    cpu_kernels.dequantize_blocks(blocks, out, scale, inverse, zero, scheme.fmt, search)
    return suspect


def fused(blocks: torch.Tensor, out: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``cpu_kernels.round_groups`` of ``scheme``'s min-max blocks into ``out``; returns the flag."""
    search = quant._lut_search(scheme.fmt.name, blocks.device) if scheme.fmt.kind == "lut" else None
    return cpu_kernels.round_groups(blocks, out, scheme.fmt, quant.SCALE_DTYPES[scheme.scale_dtype],
                                    scheme.symmetric, search)


@pytest.mark.parametrize("fmt", COMPILED_FORMATS)
def test_the_fused_kernel_is_torchs_scales_then_the_rounding_kernel_bit_for_bit(fmt, every_size):
    for seed, scheme in enumerate(s for s in schemes(fmt) if s.granularity == "group"):
        for dtype in (torch.bfloat16, torch.float32):
            blocks = sample((45, 32), dtype, 10.0 ** (seed % 5 - 2), seed)
            for out_dtype in (torch.bfloat16, torch.float32):
                got, expected = (torch.full(blocks.shape, 7.0, dtype=out_dtype) for _ in range(2))
                assert not fused(blocks, got, scheme) and not scales_then_rounding(blocks, expected, scheme)
                assert torch.equal(bits(got), bits(expected)), (scheme.label, dtype, out_dtype)


@pytest.mark.parametrize("fmt", ["int8", "int4", "int3", "nf4", "fp8_e4m3"])
def test_the_fused_kernels_scales_are_torchs_for_ranges_from_subnormal_to_huge(fmt):
    """Scales, zero points and flags as torch makes them, seen through the values they give: ranges from float32's
    smallest subnormal to its largest number, on one side of zero, zero, and spans wider than float32 holds."""
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
            out = torch.empty_like(blocks)
            # the NaN rows: their values are not used, only the flag
            assert fused(x, out, scheme) and scales_then_rounding(x, out, scheme)
            x = x[x.isfinite().all(dim=1)]
            got, expected = torch.empty_like(x, dtype=torch.float32), torch.empty_like(x, dtype=torch.float32)
            # flagged alike: scales past fp16 or bf16, grids past float32
            assert bool(fused(x, got, scheme)) == bool(scales_then_rounding(x, expected, scheme))
            assert torch.equal(nan_as_one(got), nan_as_one(expected)), (scheme.label, dtype)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("width", [4, 64, 2048])
def test_bf16_ranges_on_16_bits_are_the_float32_kernels_and_torchs(width, symmetric):
    """The fused kernel orders bf16's 16-bit patterns, and float32's 32-bit ones (asymmetric: both ends count;
    symmetric: only the largest magnitude, one reduction): the same ranges, seen through the values they give
    (float32 scales), over every finite bf16 value in shuffled rows, and a flag for each row that holds a NaN or
    an infinity. torch.aminmax's ranges give the same values."""
    every = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    finite = every[every.isfinite()]
    generator = torch.Generator().manual_seed(width)
    rows = finite[torch.randperm(finite.numel(), generator=generator)][: finite.numel() // width * width]
    rows = rows.reshape(-1, width).clone()
    rows[1, -1], rows[2, 0], rows[3, width // 2] = float("nan"), float("inf"), -float("inf")
    rows.view(torch.int16)[0, 0] = -63  # 0xFFC1: a NaN with the sign bit set, below every other pattern's key
    rows[4] = torch.tensor([-0.0, 0.0] * (width // 2), dtype=torch.bfloat16)
    rows[5] = 2.0 ** -133  # bf16's smallest subnormal
    scheme = QuantScheme("int8", "group", width, symmetric=symmetric, scale_dtype="fp32")
    bad = ~rows.isfinite().all(dim=1)
    assert bad[:4].all() and not bad[4:].any()
    for row in range(5):  # (the subnormal row is flagged too: its scale's inverse leaves float32)
        for x in (rows[row:row + 1], rows[row:row + 1].float()):
            assert bool(fused(x, torch.empty(1, width), scheme)) == bool(bad[row]), (row, x.dtype)
    rows = rows[~bad]
    got, wide, expected = (torch.empty(rows.shape) for _ in range(3))
    flags = fused(rows, got, scheme), fused(rows.float(), wide, scheme), scales_then_rounding(rows, expected, scheme)
    assert len({bool(flag) for flag in flags}) == 1  # raised alike by grids past float32
    assert torch.equal(bits(got), bits(wide)) and torch.equal(bits(got), bits(expected))


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
