"""AWQ: a lower output error than round-to-nearest on a layer whose inputs have salient channels, never a
higher one on its calibration data, the input scale applied explicitly in the layer's forward, and its storage
counted."""

import dataclasses

import pytest
import torch

from qlab.core.algorithms import LayerStats, quantize_weight
from qlab.core.algorithms.awq import InputScaledQTensor, awq_quantize, output_error
from qlab.core.algorithms.gptq import hessian_from_inputs, reconstruction_error
from qlab.core.errors import QlabError
from qlab.core.plan import QuantizedLinear, quantized_copy
from qlab.core.quant import QuantScheme, quantize


def salient_inputs(tokens: int, features: int, seed: int, count: int = 8, factor: float = 20.0) -> torch.Tensor:
    """Inputs where ``count`` fixed channels are ``factor`` times larger than the rest, as LLM activations
    have a few outlier channels (the same channels for every seed: they belong to the layer)."""
    magnitude = torch.ones(features)
    magnitude[torch.randperm(features, generator=torch.Generator().manual_seed(0))[:count]] = factor
    return torch.randn(tokens, features, generator=torch.Generator().manual_seed(seed)) * magnitude


def weight(rows: int = 256, columns: int = 512) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(1)) * 0.02


def awq(scheme: QuantScheme) -> QuantScheme:
    return dataclasses.replace(scheme, algorithm="awq")


@pytest.mark.parametrize("scheme", [QuantScheme("int4", "group", 128), QuantScheme("int3", "group", 128, symmetric=False),
                                    QuantScheme("int4", "channel"), QuantScheme("nf4", "group", 64)],
                         ids=lambda s: s.label)
def test_awq_beats_rtn_on_salient_channels(scheme):
    calibration, held_out = salient_inputs(2048, 512, seed=2), salient_inputs(1024, 512, seed=3)
    w = weight()
    result = awq_quantize(w, calibration.abs().mean(dim=0), hessian_from_inputs(calibration), awq(scheme))
    rtn = reconstruction_error(w, quantize(w, scheme).dequantize(), held_out)
    error = reconstruction_error(w, result.dequantize(), held_out)
    assert error < 0.6 * rtn, (error, rtn)
    # The salient inputs were scaled up (their 1/s is the smallest), the others down.
    salient = calibration.abs().mean(dim=0) > 5
    assert result.input_scale[salient].max() < result.input_scale[~salient].min()
    assert result.input_scale.dtype == torch.float16
    packed = result.packed()
    assert sum(t.numel() * t.element_size() for t in packed.values()) == result.nbytes
    assert result.nbytes - quantize(w, scheme).nbytes == 2 * 512  # one fp16 input scale per input
    assert result.bits_per_weight == pytest.approx(quantize(w, scheme).bits_per_weight + 16 / 256)


def test_the_search_never_loses_to_rtn_on_its_calibration_data():
    # Without salient channels there is little to gain, but alpha = 0 (all scales 1) is plain RTN.
    x = torch.randn(1024, 256, generator=torch.Generator().manual_seed(4))
    w = weight(64, 256)
    hessian = hessian_from_inputs(x)
    for scheme in (QuantScheme("int4", "group", 64), QuantScheme("int3", "channel", symmetric=False)):
        result = awq_quantize(w, x.abs().mean(dim=0), hessian, awq(scheme))
        assert output_error(w, result.dequantize(), hessian) <= output_error(w, quantize(w, scheme).dequantize(),
                                                                             hessian)


def test_the_layer_applies_the_input_scale_explicitly():
    calibration = salient_inputs(1024, 512, seed=5)
    stats = LayerStats(hessian_from_inputs(calibration), calibration.abs().mean(dim=0))
    model = torch.nn.Sequential(torch.nn.Linear(512, 256))
    with torch.no_grad():
        model[0].weight.copy_(weight())
    scheme = awq(QuantScheme("int4", "group", 128))
    shadow = quantized_copy(model, scheme, {"0": stats})
    layer = shadow[0]
    assert isinstance(layer, QuantizedLinear) and isinstance(layer.qweight, InputScaledQTensor)
    assert torch.equal(layer.input_scale, layer.qweight.input_scale)
    x = salient_inputs(16, 512, seed=6)
    # x (1/s) against Q(W s): the stored weight is the scaled one; the effective weight folds 1/s back in.
    assert not torch.allclose(layer.qweight.dequantize_scaled(), layer.qweight.dequantize())
    expected = torch.nn.functional.linear(x, layer.qweight.dequantize(), model[0].bias)
    assert torch.allclose(shadow(x), expected, rtol=1e-4, atol=1e-4)  # the same product, summed in another order
    assert torch.equal(model[0].weight, weight())  # the base model is only read


def test_bad_calibration_inputs():
    w = weight(16, 64)
    scheme = awq(QuantScheme("int4", "group", 32))
    with pytest.raises(QlabError, match="calibration inputs"):
        quantize_weight(w, scheme)
    with pytest.raises(QlabError, match="mean"):
        quantize_weight(w, scheme, LayerStats(torch.eye(64)))
    with pytest.raises(QlabError, match="64"):
        awq_quantize(w, torch.ones(32), torch.eye(32), scheme)
    assert awq(QuantScheme("int4", "group", 32)).label == "int4 g32 awq"
    assert awq(QuantScheme("int4", "group", 32)).storage_bytes((16, 64))["input_scales"] == 128


@pytest.mark.slow
def test_sweep_runs_awq_with_calibration_and_beats_rtn(minilm, monkeypatch):
    from qlab.analyses import activations
    from qlab.analyses.sweep import run_sweep
    from qlab.models.evaluate import EvalSpec
    from qlab.models.loading import weights_digest

    monkeypatch.setattr(activations, "CALIBRATION_TOKENS", 512)
    before = weights_digest(minilm.model)
    schemes = [QuantScheme("int3", "group", 64), awq(QuantScheme("int3", "group", 64))]
    rows = [row.to_record() for row in run_sweep(minilm, schemes, EvalSpec(tokens=128))]
    assert weights_digest(minilm.model) == before
    rtn, result = rows
    assert result["algorithm"] == "awq" and result["calibration_tokens"] > 0
    assert result["size_bytes"] > rtn["size_bytes"]  # the input scales are stored
    assert result["cosine_mean"] > rtn["cosine_mean"]
