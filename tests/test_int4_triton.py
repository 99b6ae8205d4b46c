"""qlab's int4 g64 Triton GEMV (format ``int4tq``): its packing against the codes, and its products against
the sweep's int4 weights. On a CUDA GPU it runs compiled; with Triton but no GPU it runs in Triton's
interpreter on CPU tensors; without Triton (CI) the module skips."""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:  # read when the kernel is defined
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from qlab.backends import gpu_recipe, int4_triton  # noqa: E402

DEVICE = torch.device("cuda" if ON_GPU else "cpu")


def sweep_weight(out_features: int, in_features: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """A random bf16 weight, its int4 g64 codes as the GPU recipe makes them, and the weight the sweep evaluates
    with the scales and zero-points rounded to bf16 as the kernel holds them."""
    torch.manual_seed(out_features + in_features)
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16)
    codes, scales, zeros = gpu_recipe.int4_groups(weight, 64)
    stored = (codes.float().reshape(out_features, -1, 64) - zeros.bfloat16().float()[..., None]) \
        * scales.bfloat16().float()[..., None]
    return stored.reshape(out_features, in_features), (codes, scales, zeros)


def test_packing_puts_input_8w_plus_i_in_nibble_i_of_word_w():
    _, (codes, scales, zeros) = sweep_weight(64, 128)
    packed, scale_rows, zero_rows = int4_triton.pack(codes, scales, zeros)
    assert packed.dtype == torch.int32 and packed.shape == (16, 64)
    assert scale_rows.shape == zero_rows.shape == (2, 64) and scale_rows.dtype == torch.bfloat16
    for nibble in range(8):
        torch.testing.assert_close((packed >> (4 * nibble)) & 0xF, codes[:, nibble::8].T.to(torch.int32))
    # a code of 15 in the top nibble makes the word negative, not an overflow
    assert (packed < 0).any()


@pytest.mark.parametrize("out_features, in_features, rows", [(256, 128, 1), (384, 640, 3), (96, 64, 1),
                                                             (1024, 4096, 1)])
def test_products_match_the_dequantized_weight(out_features, in_features, rows):
    stored, (codes, scales, zeros) = sweep_weight(out_features, in_features)
    layer = int4_triton.Int4Linear(*(t.to(DEVICE) for t in (codes, scales, zeros)))
    x = torch.randn(rows, in_features, dtype=torch.bfloat16, device=DEVICE)
    partial = int4_triton.gemv(x, layer.packed, layer.scales, layer.zeros, layer.block, layer.groups, layer.warps)
    expected = x.float() @ stored.to(DEVICE).T
    # float32 sums in another order: a few units in the last place of the largest product
    torch.testing.assert_close(partial.sum(0), expected, rtol=1e-5, atol=1e-4 * float(expected.abs().max()))
    out = layer(x.unsqueeze(0))
    assert out.shape == (1, rows, out_features) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float()[0], expected, rtol=1e-2, atol=1e-2 * float(expected.abs().max()))


@pytest.mark.parametrize("out_features, in_features", [(256, 128), (300, 192)])
def test_dequantized_weight_is_the_stored_one_in_bf16(out_features, in_features):
    stored, (codes, scales, zeros) = sweep_weight(out_features, in_features)
    layer = int4_triton.Int4Linear(*(t.to(DEVICE) for t in (codes, scales, zeros)))
    weight = int4_triton.dequantize(layer.packed, layer.scales, layer.zeros)
    assert weight.shape == (in_features, out_features) and weight.dtype == torch.bfloat16
    # (code - zero-point) * scale in float32, rounded once to bf16: to nearest on a GPU, toward zero in Triton's
    # interpreter, so within one bf16 step (2^-7 of the value) either way
    torch.testing.assert_close(weight.cpu().float(), stored.T, rtol=2**-7, atol=0)


def test_a_prompt_is_multiplied_by_the_dequantized_weight_not_one_gemv_per_row(monkeypatch):
    stored, (codes, scales, zeros) = sweep_weight(128, 256)
    layer = int4_triton.Int4Linear(*(t.to(DEVICE) for t in (codes, scales, zeros)))
    x = torch.randn(2, int4_triton.DEQUANTIZE_FROM_ROWS, 256, dtype=torch.bfloat16, device=DEVICE)
    monkeypatch.setattr(int4_triton, "gemv", lambda *a, **k: pytest.fail("a GEMV per row of a prompt"))
    out = layer(x)
    expected = x.float() @ stored.to(DEVICE).T
    assert out.shape == (2, int4_triton.DEQUANTIZE_FROM_ROWS, 128) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2 * float(expected.abs().max()))


def test_launch_shapes_split_the_input_into_whole_groups_until_there_are_enough_programs():
    # the shapes measured on an H100 (bench/results/int4tq_h100.json): the fastest or within 9 % of it
    assert int4_triton.launch_shape(4096, 4096) == (256, 1, 2)  # 1024 programs: as many as there can be
    assert int4_triton.launch_shape(28672, 4096) == (256, 4, 2)  # 1792
    assert int4_triton.launch_shape(4096, 14336) == (256, 2, 2)  # 1792
    assert int4_triton.launch_shape(128256, 4096) == (256, 16, 2)  # 2004
    for out_features, in_features in [(6144, 4096), (2048, 8192), (96, 64), (49152, 576)]:
        block, groups, warps = int4_triton.launch_shape(out_features, in_features)
        assert (in_features // 64) % groups == 0 and warps >= 1


def test_a_width_off_the_group_is_refused():
    with pytest.raises(ValueError, match="multiple of 64"):
        int4_triton.pack(torch.zeros(8, 96, dtype=torch.uint8), torch.ones(8, 1), torch.zeros(8, 1))
