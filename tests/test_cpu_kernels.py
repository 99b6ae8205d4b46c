"""The compiled CPU kernels give the bits of quantize(...).dequantize(...), and only large CPU tensors use them."""

from __future__ import annotations

import pytest
import torch

from qlab.core import cpu_kernels
from qlab.core.formats import format_names, get_format
from qlab.core.quant import QuantScheme, fake_quantize, fake_quantize_unchecked, quantize
from tests.test_quant_fake import bits, sample, schemes

pytest.importorskip("numba")

# Integer and table formats with several rows of scales: what the kernels take.
COMPILED_FORMATS = [name for name in format_names() if get_format(name).scaled and get_format(name).kind != "float"]


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
