"""GPTQ: equal to RTN when inputs are uncorrelated, equal to the unbatched algorithm of the paper, better than
RTN on correlated inputs and on a real SmolLM2 layer at 4 and 3 bits, and usable from the sweep."""

import dataclasses

import pytest
import torch

from qlab.core.algorithms import needs_calibration, quantize_weight
from qlab.core.algorithms.gptq import (
    GroupIndexedQTensor,
    gptq_quantize,
    hessian_from_inputs,
    reconstruction_error,
)
from qlab.core.errors import QlabError
from qlab.core.quant import QTensor, QuantScheme, compute_scale, quantize


def correlated_inputs(tokens: int, features: int, seed: int) -> torch.Tensor:
    """Inputs with a few dominant directions plus noise, as LLM activations have (low effective rank)."""
    # One fixed mixing (the "layer's input distribution"); the seed only draws the samples from it.
    mixing = torch.randn(features // 8, features, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, features // 8, generator=generator) @ mixing + 0.3 * torch.randn(
        tokens, features, generator=generator)


def weight(rows: int, columns: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)) * 0.05


def gptq(scheme: QuantScheme) -> QuantScheme:
    return dataclasses.replace(scheme, algorithm="gptq")


@pytest.mark.parametrize("scheme", [QuantScheme("int4", "channel"), QuantScheme("int3", "group", 32),
                                    QuantScheme("int4", "group", 32, symmetric=False),
                                    QuantScheme("nf4", "group", 64), QuantScheme("int8", "tensor")])
def test_identity_hessian_gives_exactly_rtn(scheme):
    # Uncorrelated inputs of equal size: the inverse Hessian is diagonal, no error is propagated, and GPTQ
    # must reduce to round-to-nearest bit for bit (same scales, same codes).
    w = weight(48, 128)
    result = gptq_quantize(w, torch.eye(128), gptq(scheme))
    reference = quantize(w, scheme)
    assert torch.equal(result.codes, reference.codes)
    assert torch.equal(result.scale, reference.scale)
    assert (result.zero_point is None) == (reference.zero_point is None)
    if reference.zero_point is not None:
        assert torch.equal(result.zero_point, reference.zero_point)
    assert result.bits_per_weight == reference.bits_per_weight


def unbatched_gptq(w: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, damp: float) -> torch.Tensor:
    """The paper's Algorithm 1 without lazy batches: update every later column after each column, using the
    inverse Hessian recomputed by Gaussian elimination (the OBQ update), not the Cholesky shortcut."""
    w = w.double().clone()
    h = hessian.double() + damp * torch.diagonal(hessian).double().mean() * torch.eye(hessian.shape[0])
    h_inv = torch.linalg.inv(h)
    scale, _ = compute_scale(w.float(), dataclasses.replace(scheme, algorithm="rtn"))
    out = torch.empty_like(w)
    for j in range(w.shape[1]):
        q = quantize(w[:, j: j + 1].float(), dataclasses.replace(scheme, algorithm="rtn"),
                     scale=scale).dequantize().double()[:, 0]
        out[:, j] = q
        error = (w[:, j] - q) / h_inv[j, j]
        w[:, j + 1:] -= error[:, None] * h_inv[j, j + 1:][None, :]
        # Remove column j from the problem: the inverse of H without row/column j.
        h_inv = h_inv - h_inv[:, j: j + 1] @ h_inv[j: j + 1, :] / h_inv[j, j]
    return out.float()


def test_lazy_batches_and_cholesky_match_the_unbatched_algorithm():
    x = correlated_inputs(512, 96, seed=0)
    hessian = hessian_from_inputs(x)
    w = weight(32, 96)
    scheme = QuantScheme("int4", "channel")
    fast = gptq_quantize(w, hessian, gptq(scheme), damp_percent=0.01, block_size=32).dequantize()
    slow = unbatched_gptq(w, hessian, scheme, damp=0.01)
    step = compute_scale(w, scheme)[0][:, None]
    # Same algorithm up to float rounding: a rare code may flip by one level, nothing more.
    assert ((fast - slow).abs() <= step * 1.001).all()
    assert (fast == slow).float().mean() > 0.98


@pytest.mark.parametrize("scheme", [QuantScheme("int4", "channel"), QuantScheme("int3", "channel"),
                                    QuantScheme("int4", "group", 32), QuantScheme("int3", "group", 32),
                                    QuantScheme("nf4", "group", 32), QuantScheme("fp8_e4m3", "channel")])
def test_gptq_beats_rtn_on_held_out_correlated_inputs(scheme):
    calibration, held_out = correlated_inputs(2048, 128, seed=2), correlated_inputs(1024, 128, seed=3)
    w = weight(64, 128)
    rtn = quantize(w, scheme).dequantize()
    result = gptq_quantize(w, hessian_from_inputs(calibration), gptq(scheme)).dequantize()
    assert reconstruction_error(w, result, held_out) < 0.8 * reconstruction_error(w, rtn, held_out)


def test_dead_inputs_and_bad_shapes():
    x = correlated_inputs(256, 64, seed=4)
    x[:, 5] = 0  # an input that never fires
    w = weight(16, 64)
    result = gptq_quantize(w, hessian_from_inputs(x), gptq(QuantScheme("int4", "channel")))
    assert torch.isfinite(result.dequantize()).all()
    assert (result.dequantize()[:, 5] == 0).all()
    with pytest.raises(QlabError, match="Hessian"):
        gptq_quantize(w, torch.eye(32), gptq(QuantScheme("int4", "channel")))
    with pytest.raises(QlabError, match="does not divide"):
        gptq_quantize(w, torch.eye(64), gptq(QuantScheme("int4", "group", 48)))
    with pytest.raises(QlabError, match="calibration inputs"):
        quantize_weight(w, gptq(QuantScheme("int4", "channel")))
    with pytest.raises(QlabError, match="calibration inputs"):  # never RTN under GPTQ's label
        quantize(w, gptq(QuantScheme("int4", "channel")))
    assert quantize(w, gptq(QuantScheme("fp16"))).dequantize().dtype == torch.float32  # a cast has no rounding choice
    assert not needs_calibration(gptq(QuantScheme("fp16")))
    assert needs_calibration([QuantScheme("int8"), gptq(QuantScheme("int4"))])
    assert gptq(QuantScheme("int4", "group", 64)).label == "int4 g64 gptq"


def with_outlier_inputs(x: torch.Tensor, count: int = 8, factor: float = 20.0) -> torch.Tensor:
    """The last ``count`` inputs 20x larger: plain GPTQ reaches them last, with no columns left to absorb
    their rounding error; act-order rounds them first."""
    x = x.clone()
    x[:, -count:] *= factor
    return x


@pytest.mark.parametrize("scheme", [QuantScheme("int4", "channel"), QuantScheme("int4", "group", 32),
                                    QuantScheme("int3", "group", 32, symmetric=False)])
@pytest.mark.parametrize("static_groups", [False, True])
def test_act_order_beats_plain_gptq_and_rtn_on_outlier_inputs(scheme, static_groups):
    calibration = with_outlier_inputs(correlated_inputs(2048, 128, seed=2))
    held_out = with_outlier_inputs(correlated_inputs(1024, 128, seed=3))
    w = weight(64, 128)
    hessian = hessian_from_inputs(calibration)
    act_order = dataclasses.replace(scheme, algorithm="gptq-act-order", static_groups=static_groups)
    result = gptq_quantize(w, hessian, act_order)
    plain = reconstruction_error(w, gptq_quantize(w, hessian, gptq(scheme)).dequantize(), held_out)
    rtn = reconstruction_error(w, quantize(w, scheme).dequantize(), held_out)
    error = reconstruction_error(w, result.dequantize(), held_out)
    assert error < 0.5 * plain < 0.5 * rtn, (error, plain, rtn)
    # A valid QTensor: codes on the grid, the scheme's storage, one scale per row and group.
    fmt = scheme.fmt
    assert result.codes.shape == w.shape and fmt.qmin <= result.codes.min() <= result.codes.max() <= fmt.qmax
    assert result.scale.numel() == quantize(w, scheme).scale.numel()
    assert result.nbytes == sum(act_order.storage_bytes(w.shape).values())
    assert torch.isfinite(result.dequantize()).all()


def test_act_order_is_gptq_on_inputs_sorted_by_hessian_diagonal():
    # Act-order = plain GPTQ on the permuted layer, mapped back: bit for bit, groups formed in the new order.
    x = with_outlier_inputs(correlated_inputs(1024, 64, seed=5))
    hessian, w = hessian_from_inputs(x), weight(24, 64)
    order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    for scheme in (QuantScheme("int4", "channel"), QuantScheme("int4", "group", 16, symmetric=False)):
        result = gptq_quantize(w, hessian, dataclasses.replace(scheme, algorithm="gptq-act-order"))
        permuted = gptq_quantize(w[:, order], hessian[order][:, order], gptq(scheme)).dequantize()
        expected = torch.empty_like(permuted)
        expected[:, order] = permuted
        assert torch.equal(result.dequantize(), expected)
    assert isinstance(result, GroupIndexedQTensor)
    assert torch.equal(result.group_index.sort().values, torch.arange(64) // 16)  # 16 inputs per group
    assert result.group_index[order[:16]].eq(0).all()  # the largest-diagonal inputs form group 0


def test_static_groups_keep_rtn_scales_and_store_no_group_index():
    x = with_outlier_inputs(correlated_inputs(1024, 64, seed=6))
    w = weight(24, 64)
    scheme = QuantScheme("int4", "group", 16, symmetric=False)
    static = dataclasses.replace(scheme, algorithm="gptq-act-order", static_groups=True)
    dynamic = dataclasses.replace(static, static_groups=False)
    result = gptq_quantize(w, hessian_from_inputs(x), static)
    reference = quantize(w, scheme)
    assert type(result) is QTensor  # groups stay consecutive inputs
    assert torch.equal(result.scale, reference.scale) and torch.equal(result.zero_point, reference.zero_point)
    assert "group_index" not in static.storage_bytes(w.shape)
    assert dynamic.storage_bytes(w.shape)["group_index"] == 4 * 64  # int32 g_idx, as GPTQ checkpoints store
    assert static.label == "int4 g16 asym gptq-act-order static-groups"
    assert dataclasses.replace(static, granularity="channel").static_groups is False  # nothing to keep static
    with pytest.raises(QlabError, match="static groups"):
        QuantScheme("int4", "group", 16, algorithm="gptq", static_groups=True)
    assert QuantScheme.from_dict(static.to_dict()) == static
    old_record = {k: v for k, v in scheme.to_dict().items() if k not in ("static_groups", "sparsity")}
    assert QuantScheme.from_dict(old_record) == scheme  # records stored before these fields still load
    dynamic_result = gptq_quantize(w, hessian_from_inputs(x), dynamic)
    packed = dynamic_result.packed()
    assert sum(t.numel() * t.element_size() for t in packed.values()) == dynamic_result.nbytes
    assert needs_calibration(static)


@pytest.mark.slow
def test_gptq_beats_rtn_on_a_smollm_layer_at_4_and_3_bits(smollm):
    from qlab.analyses.activations import calibration_data, capture_inputs, text_batches
    from qlab.models.evaluate import EvalSpec, default_text

    name = "model.layers.2.self_attn.o_proj"
    calibration = capture_inputs(smollm, name, calibration_data(smollm, EvalSpec(tokens=512), 1536))
    held_out = capture_inputs(smollm, name, text_batches(smollm, default_text(), 256))
    w = smollm.model.get_submodule(name).weight
    hessian = hessian_from_inputs(calibration)
    for fmt in ("int4", "int3"):
        scheme = QuantScheme(fmt, "group", 64)
        rtn = reconstruction_error(w, quantize(w, scheme).dequantize(), held_out)
        result = reconstruction_error(w, gptq_quantize(w, hessian, gptq(scheme)).dequantize(), held_out)
        assert result < 0.85 * rtn, (fmt, result, rtn)


@pytest.mark.slow
def test_sweep_runs_gptq_with_calibration_and_beats_rtn(minilm, monkeypatch):
    from qlab.analyses import activations
    from qlab.analyses.sweep import run_sweep
    from qlab.models.evaluate import EvalSpec
    from qlab.models.loading import weights_digest

    monkeypatch.setattr(activations, "CALIBRATION_TOKENS", 512)
    before = weights_digest(minilm.model)
    schemes = [QuantScheme("int3", "group", 64), gptq(QuantScheme("int3", "group", 64))]
    rows = [row.to_record() for row in run_sweep(minilm, schemes, EvalSpec(tokens=128))]
    assert weights_digest(minilm.model) == before
    rtn, result = rows
    assert result["algorithm"] == "gptq" and result["label"] == "int3 g64 gptq"
    assert result["bits_per_weight"] == rtn["bits_per_weight"]
    assert result["calibration_tokens"] > 0 and result["calibration_overlaps_eval"] is False
    assert "calibration_tokens" not in rtn
    assert result["cosine_mean"] > rtn["cosine_mean"]
