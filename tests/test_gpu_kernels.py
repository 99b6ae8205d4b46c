"""The GPU rounding kernel gives the bits of quantize(...).dequantize(...) and of torch's casts.

On a CUDA GPU with Triton the kernel runs compiled and is reached through ``fake_quantize_unchecked``; on a
machine with Triton but no GPU it runs in Triton's interpreter on CPU tensors (the same code, value by value in
numpy); without Triton (CI) the module skips.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:  # read when the kernel is defined: before qlab.core.triton_kernels is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from qlab.core import gpu_kernels, quant  # noqa: E402
from qlab.core.algorithms import ReusedBuffers, dequantized_weights_unchecked  # noqa: E402
from qlab.core.formats import format_names, get_format  # noqa: E402
from qlab.core.quant import QuantScheme, fake_quantize, fake_quantize_unchecked, quantize  # noqa: E402
from tests.test_cpu_kernels import nan_as_one  # noqa: E402
from tests.test_quant_fake import bits, sample, schemes  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
ROUNDED = [name for name in format_names() if get_format(name).scaled and gpu_kernels.rounds(get_format(name))]
CAST_FORMATS = [name for name in format_names() if get_format(name).kind == "float"
                and get_format(name).cast_dtype != torch.bfloat16 and gpu_kernels.rounds(get_format(name))]
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def kernel_values(x: torch.Tensor, scheme: QuantScheme, out_dtype: torch.dtype) -> torch.Tensor:
    """The kernel's values of ``x`` under ``scheme``, given torch's scales of its blocks."""
    blocks = quant._as_blocks(x, scheme)
    scale, inverse, zero, suspect = quant._block_scales(x, blocks, scheme)
    assert not suspect
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    search = quant._lut_search(scheme.fmt.name, x.device) if scheme.fmt.kind == "lut" else None
    assert gpu_kernels.dequantize_blocks(blocks, out.view(blocks.shape), scale, inverse, zero, scheme.fmt, search)
    return out


def fused_values(x: torch.Tensor, scheme: QuantScheme, out_dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """The fused kernel's values of ``x`` under ``scheme`` (its own scales) and its flag of untrusted values."""
    blocks = quant._as_blocks(x, scheme)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    search = quant._lut_search(scheme.fmt.name, x.device) if scheme.fmt.kind == "lut" else None
    suspect = gpu_kernels.round_groups(blocks, out.view(blocks.shape), scheme.fmt,
                                       quant.SCALE_DTYPES[scheme.scale_dtype], scheme.symmetric, search)
    assert suspect is not None
    return out, bool(suspect)


def test_integers_tables_and_small_floats_are_rounded_here():
    assert {"int8", "int4", "int3", "nf4", "fp4_e2m1", "fp8_e4m3", "fp8_e5m2"} <= set(ROUNDED)


@pytest.mark.parametrize("fmt", ROUNDED)
def test_kernel_matches_quantize_bit_for_bit(fmt):
    cases = [((7, 96), 1.0), ((33, 64), 1e-3), ((40, 128), 300.0)]
    for seed, scheme in enumerate(schemes(fmt)):
        for shape, magnitude in cases:
            for dtype in DTYPES:
                x = sample(shape, dtype, magnitude, seed).to(DEVICE)
                for out in DTYPES:
                    expected = quantize(x, scheme).dequantize(out)
                    assert torch.equal(bits(kernel_values(x, scheme, out)), bits(expected)), \
                        (scheme.label, dtype, out)


@pytest.mark.parametrize("fmt", ROUNDED)
def test_fused_kernel_makes_quantizes_scales_and_values_bit_for_bit(fmt):
    # Widths that are not a power of two (96: padded lanes) and ranges from tiny to past fp16's largest scale.
    cases = [((7, 96), 1.0), ((33, 64), 1e-3), ((40, 128), 300.0), ((6, 64), 1e-30)]
    for seed, scheme in enumerate(s for s in schemes(fmt) if s.granularity != "tensor"):
        for shape, magnitude in cases:
            for dtype in DTYPES:
                x = sample(shape, dtype, magnitude, seed).to(DEVICE)
                for out in DTYPES:
                    values, suspect = fused_values(x, scheme, out)
                    blocks = quant._as_blocks(x, scheme)
                    assert suspect == bool(quant._block_scales(x, blocks, scheme)[3]), (scheme.label, dtype)
                    if not suspect:
                        expected = quantize(x, scheme).dequantize(out)
                        assert torch.equal(bits(values), bits(expected)), (scheme.label, dtype, out, magnitude)


def test_fused_kernel_flags_what_quantize_refuses():
    x = sample((8, 64), torch.float32, 1.0, 3).to(DEVICE)
    assert not fused_values(x, QuantScheme("int4", "group", 64), torch.float32)[1]
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[5, 7] = bad
        assert fused_values(y, QuantScheme("int4", "group", 64), torch.float32)[1]
    # An fp16 scale cannot hold 1e6 / 7: flagged, and quantize refuses it.
    big = x * 1e6
    scheme = QuantScheme("int4", "group", 64, scale_dtype="fp16")
    assert fused_values(big, scheme, torch.float32)[1]
    with pytest.raises(Exception, match="scale"):
        quantize(big, scheme)
    # All-zero blocks take a scale of 1 and stay zero.
    zeros = torch.zeros(4, 64, device=DEVICE)
    values, suspect = fused_values(zeros, QuantScheme("int8", "group", 64, symmetric=False), torch.bfloat16)
    assert not suspect and not values.any()


def test_a_given_flag_is_raised_in_place_and_never_cleared():
    scheme = QuantScheme("int4", "group", 64)
    good = sample((8, 64), torch.float32, 1.0, 4).to(DEVICE)
    bad = good.clone()
    bad[2, 3] = float("nan")

    def round_into(x, flag):
        out = torch.empty_like(x)
        return gpu_kernels.round_groups(x, out, scheme.fmt, quant.SCALE_DTYPES[scheme.scale_dtype], True, None, flag)

    flag = round_into(good, None)
    assert flag.dtype == torch.int32 and not flag.item()
    assert round_into(bad, flag) is flag and flag.item()
    assert round_into(good, flag) is flag and flag.item()  # a later good weight leaves it raised
    # A flag of another kind (torch's route gives a bool) is not written into: a new one comes back.
    other = torch.zeros((), dtype=torch.bool, device=DEVICE)
    fresh = round_into(good, other)
    assert fresh is not other and not fresh.item() and not other.item()


@pytest.mark.parametrize("fmt", ["int4", "nf4", "fp8_e4m3"])
def test_weights_rounded_together_equal_each_rounded_alone(fmt, monkeypatch):
    scheme = QuantScheme(fmt, "group", 64, symmetric=fmt != "int4")
    search = quant._lut_search(fmt, DEVICE) if scheme.fmt.kind == "lut" else None
    # Weights of different lengths in one storage: the third starts 8 values off the grid of 16, so it cannot
    # join the first two's launch and gets its own.
    rows, starts = (3, 40, 7, 5), (0, 3 * 64, 43 * 64 + 8, 50 * 64 + 8)
    values = sample((60 * 64,), torch.bfloat16, 1.0, 6).to(DEVICE)
    outs_storage = torch.empty(60 * 64, dtype=torch.float32, device=DEVICE)
    weights = [values[start:start + 64 * n].view(n, 64) for start, n in zip(starts, rows)]
    outs = [outs_storage[start:start + 64 * n].view(n, 64) for start, n in zip(starts, rows)]
    launches = []
    real = gpu_kernels._kernels().round_groups
    monkeypatch.setattr(gpu_kernels._kernels(), "round_groups", lambda *args: launches.append(args[4]) or real(*args))
    flag = gpu_kernels.round_groups_together(weights, outs, scheme.fmt, quant.SCALE_DTYPES[scheme.scale_dtype],
                                             scheme.symmetric, search)
    assert launches == [2, 2] and not flag.item()
    for weight, out in zip(weights, outs):
        alone = torch.empty_like(out)
        gpu_kernels.round_groups(weight, alone, scheme.fmt, quant.SCALE_DTYPES[scheme.scale_dtype],
                                 scheme.symmetric, search)
        assert torch.equal(bits(out), bits(alone))
        assert torch.equal(bits(out), bits(quantize(weight, scheme).dequantize(torch.float32)))
    values[starts[3] + 70] = float("inf")  # in the last weight: the launch it shares raises the one flag
    assert gpu_kernels.round_groups_together(weights, outs, scheme.fmt, quant.SCALE_DTYPES[scheme.scale_dtype],
                                             scheme.symmetric, search).item()


@pytest.mark.parametrize("fmt", CAST_FORMATS)
def test_float_rounding_matches_torchs_casts_for_every_bf16_and_many_float32_values(fmt):
    """With a scale of 1 the kernel is the format's cast: compared with torch's on every bf16 value, random
    float32 bit patterns (NaN, infinities, subnormals) and values from 1e-12 to 1e6. The reference is torch's CPU
    cast, which saturates E4M3 at 448 past its range; qlab rounds alike on every device."""
    fmt = get_format(fmt)
    every_bf16 = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    generator = torch.Generator().manual_seed(5)
    any_float32 = torch.randint(-(1 << 31), (1 << 31) - 1, (1 << 18,), generator=generator).to(torch.int32)
    around_one = torch.randn(1 << 18, generator=generator) * torch.logspace(-12, 6, 1 << 18)
    for x in (every_bf16, any_float32.view(torch.float32), around_one):
        x = x.reshape(-1, 256).to(DEVICE)
        ones = torch.ones(x.shape[0], 1, device=DEVICE)
        for out_dtype in DTYPES:
            out = torch.empty(x.shape, dtype=out_dtype, device=DEVICE)
            assert gpu_kernels.dequantize_blocks(x, out, ones, ones, None, fmt, None)
            expected = x.cpu().to(fmt.cast_dtype).to(out_dtype)
            assert torch.equal(nan_as_one(out.cpu()), nan_as_one(expected)), (x.dtype, out_dtype)


@pytest.mark.parametrize("fmt", [name for name in ROUNDED if get_format(name).kind == "lut"])
def test_table_search_in_buckets_matches_torchs_bucketize_for_every_bf16_and_each_boundarys_neighbours(fmt):
    """With a scale of 1 the kernel gives each value its table level: compared with torch's ``bucketize`` over the
    format's boundaries on every bf16 value and on each boundary and the float32 values either side of it."""
    boundaries, levels = quant._lut_search(fmt, torch.device("cpu"))
    every_bf16 = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    every_bf16 = every_bf16[every_bf16.isfinite()]
    near = torch.cat([torch.nextafter(boundaries, torch.full_like(boundaries, -math.inf)), boundaries,
                      torch.nextafter(boundaries, torch.full_like(boundaries, math.inf))])
    x = torch.cat([every_bf16, near])
    x = torch.cat([x, x.new_zeros(-x.numel() % 256)]).reshape(-1, 256)
    expected = levels[torch.bucketize(x, boundaries)]
    ones = torch.ones(x.shape[0], 1, device=DEVICE)
    out = torch.empty(x.shape, dtype=torch.float32, device=DEVICE)
    assert gpu_kernels.dequantize_blocks(x.to(DEVICE), out, ones, ones, None, get_format(fmt),
                                         quant._lut_search(fmt, DEVICE))
    assert torch.equal(bits(out.cpu()), bits(expected))


def test_a_table_the_kernel_cannot_bucket_goes_torchs_route_and_leaves_the_kernel_on(monkeypatch):
    monkeypatch.setattr(gpu_kernels, "MAX_BUCKETS", 8)  # nf4 needs 32
    gpu_kernels._bucketed.cache_clear()
    kernel_from = gpu_kernels.MIN_VALUES
    try:
        scheme = QuantScheme("nf4", "group", 64)
        x = sample((64, 256), torch.bfloat16, 1.0, 3).to(DEVICE)
        out = torch.empty(x.shape, dtype=torch.float32, device=DEVICE)
        assert gpu_kernels.round_groups(x.view(-1, 64), out.view(-1, 64), scheme.fmt, torch.float16, True,
                                        quant._lut_search("nf4", DEVICE)) is None
        assert gpu_kernels.MIN_VALUES == kernel_from  # declined, not failed
        values, _ = fake_quantize_unchecked(x, scheme, torch.float32)
        assert torch.equal(bits(values), bits(quantize(x, scheme).dequantize(torch.float32)))
    finally:
        gpu_kernels._bucketed.cache_clear()


def test_ties_round_to_even_and_signed_zeros_survive():
    # Scaled by 127 / 63.5 = 2 exactly: k + 0.5 steps land on ties, each rounded to the even code.
    x = torch.cat([torch.arange(-127, 128, dtype=torch.float32) / 2, torch.tensor([-0.0])]).reshape(-1, 64)
    x = x.to(DEVICE)
    for scheme in (QuantScheme("int8", "group", 64), QuantScheme("int8", "group", 64, symmetric=False),
                   QuantScheme("fp8_e4m3", "group", 64), QuantScheme("nf4", "group", 64),
                   QuantScheme("fp4_e2m1", "group", 64)):
        expected = quantize(x, scheme).dequantize(torch.float32)
        assert torch.equal(bits(kernel_values(x, scheme, torch.float32)), bits(expected)), scheme.label


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_large_gpu_tensors_take_the_kernel_and_small_ones_torchs_route(monkeypatch):
    calls = []
    real = gpu_kernels.round_groups
    monkeypatch.setattr(gpu_kernels, "round_groups", lambda *args: calls.append(args[2].name) or real(*args))
    x = sample((1024, 2048), torch.bfloat16, 0.02, 9).to(DEVICE)
    for name in ("int4", "nf4", "fp8_e4m3"):
        scheme = QuantScheme(name, "group", 64)
        out = torch.empty_like(x)
        values, suspect = fake_quantize_unchecked(x, scheme, torch.bfloat16, out=out)
        assert values is out and not suspect.item()
        assert torch.equal(bits(values), bits(quantize(x, scheme).dequantize(torch.bfloat16)))
    assert calls == ["int4", "nf4", "fp8_e4m3"]
    fake_quantize(x[:16], QuantScheme("int4", "group", 64))  # 32 K values: torch's route
    fake_quantize(x, QuantScheme("fp16"))  # a plain cast: torch's
    assert calls == ["int4", "nf4", "fp8_e4m3"]
    assert not gpu_kernels.usable(x.cpu().reshape(-1, 64), torch.bfloat16)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_a_blocks_weights_are_rounded_in_one_launch(monkeypatch):
    launches = []
    real = gpu_kernels._kernels().round_groups
    monkeypatch.setattr(gpu_kernels._kernels(), "round_groups", lambda *args: launches.append(args[4]) or real(*args))
    shapes = [(1024, 2048), (512, 2048), (2048, 1024), (1024, 2048)]
    weights = [sample(shape, torch.bfloat16, 0.02, seed).to(DEVICE) for seed, shape in enumerate(shapes)]
    scheme = QuantScheme("int4", "group", 64)
    buffers = ReusedBuffers()
    values, suspect = dequantized_weights_unchecked([(w, scheme, None) for w in weights], torch.bfloat16, buffers)
    assert launches == [4] and not suspect.item()
    for weight, value in zip(weights, values):
        assert torch.equal(bits(value), bits(quantize(weight, scheme).dequantize(torch.bfloat16)))
    weights[2][5, 9] = float("nan")
    buffers.take_back()
    assert dequantized_weights_unchecked([(w, scheme, None) for w in weights], torch.bfloat16, buffers)[1].item()


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_values_that_are_not_finite_are_flagged_and_refused_like_quantize():
    x = sample((1024, 2048), torch.bfloat16, 1.0, 0).to(DEVICE)
    x[9, 17] = float("nan")
    _, suspect = fake_quantize_unchecked(x, QuantScheme("int4", "group", 64), torch.bfloat16)
    assert suspect.item()
    with pytest.raises(Exception, match="NaN or infinite"):
        fake_quantize(x, QuantScheme("int4", "group", 64), torch.bfloat16)
