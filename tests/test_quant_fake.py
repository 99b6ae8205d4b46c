"""fake_quantize's fused route gives quantize(...).dequantize(...)'s bits exactly, and refuses what it refuses."""

from __future__ import annotations

import logging

import pytest
import torch

from qlab.core import quant
from qlab.core.errors import QlabError
from qlab.core.formats import format_names, get_format
from qlab.core.quant import QuantScheme, fake_quantize, fake_quantize_unchecked, quantize

# (shape, input dtype, magnitude): odd row counts, a 3-D tensor and a vector, each input dtype, tiny to large.
INPUTS = [((7, 96), torch.bfloat16, 1.0), ((33, 64), torch.float16, 1e-3), ((3, 2, 64), torch.float32, 300.0),
          ((96,), torch.bfloat16, 0.02), ((5, 32), torch.float64, 7.0)]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that -0 and +0 (and NaN payloads) count as different."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same(x: torch.Tensor, scheme: QuantScheme, dtype: torch.dtype | None = None) -> None:
    expected = quantize(x, scheme).dequantize(x.dtype if dtype is None else dtype)
    got = fake_quantize(x, scheme, dtype)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(bits(got), bits(expected)), (scheme.label, x.dtype, dtype)


def schemes(fmt: str) -> list[QuantScheme]:
    """Every granularity, both zero-point choices where the format has them, and each scale dtype."""
    if not get_format(fmt).scaled:
        return [QuantScheme(fmt)]
    symmetric = (True, False) if get_format(fmt).kind == "integer" else (True,)
    return [QuantScheme(fmt, granularity, 32, symmetric=s, scale_dtype=scale_dtype)
            for granularity in ("tensor", "channel", "group") for s in symmetric
            for scale_dtype in ("auto", "bf16", "fp32")]


def sample(shape, dtype, magnitude, seed) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * magnitude
    x.view(-1)[::7] = 0.0
    x.view(-1)[3::13] = -0.0
    return x.to(dtype)


@pytest.mark.parametrize("fmt", format_names())
@pytest.mark.parametrize("chunk", [40, 1 << 18])  # many chunks per tensor (mid-block too) and one
def test_every_format_and_scheme_matches_bit_for_bit(fmt, chunk, monkeypatch):
    monkeypatch.setitem(quant.FAKE_QUANTIZE_CHUNK_ELEMENTS, "cpu", chunk)
    if chunk == 40:  # and the GPU's ops: mixed-dtype kernels, tables by bucketize
        monkeypatch.setattr(quant, "CAST_FIRST_DEVICES", frozenset())
        monkeypatch.setattr(quant, "PREFIX_TABLE_DEVICES", frozenset())
    for seed, scheme in enumerate(schemes(fmt)):
        for shape, dtype, magnitude in INPUTS:
            x = sample(shape, dtype, magnitude, seed)
            for out in (None, torch.float32, torch.bfloat16, torch.float16):
                assert_same(x, scheme, out)


@pytest.mark.parametrize("fmt", ["nf4", "fp4_e2m1", "int4", "int3", "int2", "int8", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("prefix_table", [True, False])  # the CPU's ops, or the GPU's (run here on the CPU)
def test_ties_and_signed_zeros_round_as_quantize_rounds_them(fmt, prefix_table, monkeypatch):
    monkeypatch.setattr(quant, "PREFIX_TABLE_DEVICES", frozenset({"cpu"} if prefix_table else ()))
    monkeypatch.setattr(quant, "CAST_FIRST_DEVICES", frozenset({"cpu"} if prefix_table else ()))
    info = get_format(fmt)
    if info.kind == "lut":  # 4-bit levels lie far enough apart that no float32 prefix straddles two boundaries
        assert quant._prefix_tables(fmt) is not None
    levels = info.levels()
    midpoints = (levels[1:] + levels[:-1]) / 2
    # The block's largest magnitude is the grid's: its scale is exactly 1, so every midpoint is a true tie.
    values = torch.cat([levels, midpoints, torch.nextafter(midpoints, midpoints + 1),
                        torch.nextafter(midpoints, midpoints - 1), torch.tensor([-0.0, 0.0, -0.25, 0.25])])
    values = torch.cat([values, torch.full((64 - len(values) % 64,), info.max_abs)])
    x = values.reshape(-1, 64)
    for symmetric in (True, False) if info.kind == "integer" else (True,):
        scheme = QuantScheme(fmt, "channel", symmetric=symmetric)
        assert_same(x, scheme)
        assert_same(x, scheme, torch.bfloat16)


def test_other_calibrations_and_constant_blocks():
    x = sample((6, 64), torch.bfloat16, 1.0, 5)
    for scheme in (QuantScheme("int4", "group", 32, calibration="mse"),
                   QuantScheme("int8", "channel", symmetric=False, calibration="percentile", percentile=99.0),
                   QuantScheme("nf4", "group", 32, calibration="percentile")):
        assert_same(x, scheme)
    constants = torch.zeros(4, 64)
    constants[1] = -2.7
    constants[2] = 3.0
    for fmt in ("int4", "nf4", "fp8_e4m3"):
        assert_same(constants, QuantScheme(fmt, "group", 32))


def test_a_plain_cast_of_the_same_dtype_is_a_copy():
    weight = torch.randn(4, 8).to(torch.bfloat16)
    before = weight.clone()
    fake_quantize(weight, QuantScheme("bf16")).add_(1)  # the quick sensitivity subtracts in place
    assert torch.equal(weight, before)


def test_rare_ranges_fall_back_to_quantize_and_bad_ones_raise_its_errors():
    # A range under 1e-36: its scale's reciprocal overflows float32, and quantize divides instead.
    tiny = torch.randn(4, 64, generator=torch.Generator().manual_seed(3)) * 1e-40
    assert_same(tiny, QuantScheme("int8", "channel", scale_dtype="fp32"))
    assert_same(tiny, QuantScheme("nf4", "group", 32, scale_dtype="fp32"))
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    cases = []
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[2, 5] = bad
        cases += [(y, QuantScheme("int8")), (y.to(torch.bfloat16), QuantScheme("nf4", "group", 32)),
                  (y, QuantScheme("fp8_e4m3", "tensor")), (y, QuantScheme("int4", "group", 32, symmetric=False))]
    extreme = x.clone()
    extreme[0, :2] = torch.tensor([torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max])
    cases += [(x * 1e8, QuantScheme("int8", "group", 32)),  # a scale past fp16's 65504
              (extreme, QuantScheme("int8", "tensor", symmetric=False)),  # grid ends past float32
              (torch.empty(0, 64), QuantScheme("int8")),
              (x, QuantScheme("int4", "group", 32, algorithm="hqq")),
              (x, QuantScheme("int8", sparsity="2:4"))]
    for tensor, scheme in cases:
        with pytest.raises(QlabError) as expected:
            quantize(tensor, scheme)
        with pytest.raises(QlabError) as got:
            fake_quantize(tensor, scheme)
        assert str(got.value) == str(expected.value)


def test_the_unchecked_route_reads_nothing_back_from_the_device():
    # Meta tensors hold no values: any read-back (a sync on a GPU) would fail here.
    weight = torch.empty(64, 128, dtype=torch.bfloat16, device="meta")
    for scheme in (QuantScheme("int4", "group", 32), QuantScheme("int4", "group", 32, symmetric=False),
                   QuantScheme("nf4", "group", 64), QuantScheme("fp4_e2m1", "channel"),
                   QuantScheme("fp8_e4m3", "tensor"), QuantScheme("int8", "channel", scale_dtype="bf16")):
        values, suspect = fake_quantize_unchecked(weight, scheme, torch.float16)
        assert values.shape == weight.shape and values.dtype == torch.float16 and suspect.shape == ()


@pytest.mark.parametrize("scheme, kernel", [
    (QuantScheme("int4", "group", 32, symmetric=False), "round_groups"),  # min-max scales: the fused kernel
    (QuantScheme("int4", "group", 32, calibration="percentile", percentile=99.0), "dequantize"),  # torch's scales
])
def test_a_gpu_kernel_that_fails_to_compile_hands_the_rounding_to_torch_for_good(scheme, kernel, monkeypatch,
                                                                                  caplog):
    """A Triton failure (a GPU model or release the kernel never ran on) is logged and costs speed, not the
    sweep: torch's route writes the same bits, and the kernels are not tried again."""
    from qlab.core import cpu_kernels, gpu_kernels

    caplog.set_level(logging.WARNING, logger=gpu_kernels.__name__)  # the CLI's tests quiet the root logger
    calls = []

    class Uncompilable:
        def dequantize(self, *args):
            calls.append("dequantize")
            raise RuntimeError("PTX assembly failed")

        def round_groups(self, *args):
            calls.append("round_groups")
            raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(gpu_kernels, "_kernels", Uncompilable)
    monkeypatch.setattr(gpu_kernels, "MIN_VALUES", 1)
    monkeypatch.setattr(cpu_kernels, "usable", lambda blocks, dtype: False)
    monkeypatch.setattr(gpu_kernels, "usable", lambda blocks, dtype: gpu_kernels.MIN_VALUES <= blocks.numel())
    x = sample((7, 96), torch.bfloat16, 1.0, 0)
    for _ in range(2):
        values, _ = fake_quantize_unchecked(x, scheme, torch.bfloat16)
        assert torch.equal(bits(values), bits(quantize(x, scheme).dequantize(torch.bfloat16)))
    assert calls == [kernel] and gpu_kernels.MIN_VALUES == float("inf")
    assert "GPU rounding kernel failed" in caplog.text and "PTX assembly failed" in caplog.text


def test_the_gpu_kernel_lets_out_of_memory_through(monkeypatch):
    from qlab.core import gpu_kernels

    class OutOfMemory:
        def dequantize(self, *args):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(gpu_kernels, "_kernels", OutOfMemory)
    x = torch.ones(4, 32)
    ones = torch.ones(4, 1)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        gpu_kernels.dequantize_blocks(x, torch.empty_like(x), ones, ones, None, get_format("int8"), None)
