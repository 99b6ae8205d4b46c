"""Packed INT4 linears (``qlab.backends.packed_int4``): the codes a word holds, what they dequantize to, and the
one-row product inductor compiles, against qlab's int4 scheme and plain matmuls."""

import pytest
import torch
from torch import nn

from qlab.backends.packed_int4 import NIBBLES, PackedInt4Linear, pack_model
from qlab.core.errors import QlabError
from qlab.core.quant import QuantScheme, quantize

SCHEME = QuantScheme("int4", "group", 64, symmetric=False)


def linear(out_features: int = 48, in_features: int = 1024) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.02)
        layer.weight[3, 100] = 0.5  # one outlier widens its group's range
    return layer


def test_each_nibble_holds_the_code_of_its_input_slice():
    layer = linear()
    packed = PackedInt4Linear.from_linear(layer)
    codes = quantize(layer.weight, SCHEME).codes.to(torch.int64) - SCHEME.fmt.qmin  # 0..15
    words = packed.words.reshape(layer.out_features, -1)
    slice_width = layer.in_features // NIBBLES
    for row, column in ((0, 0), (3, 100), (47, 1023), (20, 555)):
        word = int(words[row, column % slice_width]) & 0xFFFFFFFF  # its bits, as an unsigned number
        assert (word >> (4 * (column // slice_width))) & 0xF == codes[row, column]


def test_dequantizes_to_exactly_what_the_int4_scheme_gives():
    layer = linear()
    packed = PackedInt4Linear.from_linear(layer)
    assert torch.equal(packed.dequantized(), quantize(layer.weight, SCHEME).dequantize())
    assert packed.dequantized(torch.bfloat16).dtype == torch.bfloat16


def test_holds_half_a_byte_per_weight_plus_two_fp16_numbers_per_group():
    layer = linear()
    packed = PackedInt4Linear.from_linear(layer)
    stored = sum(b.numel() * b.element_size() for b in packed.buffers())
    weights = layer.weight.numel()
    assert stored == weights // 2 + (weights // 64) * 2 * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_and_a_prompt_multiply_by_the_dequantized_weight(dtype):
    layer = linear()
    packed = PackedInt4Linear.from_linear(layer)
    weight = quantize(layer.weight, SCHEME).dequantize()
    torch.manual_seed(1)
    for shape in ((1, 1, 1024), (1, 7, 1024), (1024,)):
        x = torch.randn(shape).to(dtype)
        expected = x.float() @ weight.t()
        got = packed(x)
        assert got.dtype == dtype and got.shape == (*shape[:-1], 48)
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2 * expected.abs().max().item()
        torch.testing.assert_close(got.float(), expected, rtol=0, atol=tolerance)


def test_the_compiled_one_row_product_matches_eager():
    packed = PackedInt4Linear.from_linear(linear())
    x = torch.randn(1, 1, 1024)
    compiled = torch.compile(packed, fullgraph=True)
    torch.testing.assert_close(compiled(x), packed(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [896, 192])
def test_a_width_eight_slices_of_groups_do_not_fill_is_padded_with_zeros(width):
    layer = linear(16, width)
    packed = PackedInt4Linear.from_linear(layer)
    weight = quantize(layer.weight, SCHEME).dequantize()
    assert torch.equal(packed.dequantized(), weight)
    x = torch.randn(1, 1, width)
    torch.testing.assert_close(packed(x), x @ weight.t(), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.compile(packed, fullgraph=True)(x), packed(x), rtol=1e-5, atol=1e-5)


def test_refuses_a_bias_and_an_input_width_of_part_groups():
    with pytest.raises(QlabError, match="bias"):
        PackedInt4Linear.from_linear(nn.Linear(1024, 8))
    with pytest.raises(QlabError, match="multiple of its group of 64; a 8 x 100 weight"):
        PackedInt4Linear.from_linear(nn.Linear(100, 8, bias=False))


def test_pack_model_replaces_every_linear_but_the_skipped():
    model = nn.Sequential(nn.Linear(512, 512, bias=False), nn.ReLU(), nn.Linear(512, 1024, bias=False))
    assert pack_model(model, skip=("2",)) == 1
    assert isinstance(model[0], PackedInt4Linear) and isinstance(model[2], nn.Linear)

