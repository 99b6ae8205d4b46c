"""PTQ vs QAT on the bundled digits: real training in this test's own run, QAT must win at 2 bits."""

import pytest
import torch

from qlab.analyses import qat
from qlab.core.errors import QlabError
from qlab.core.quant import QuantScheme, fake_quantize


def test_qat_beats_ptq_at_two_bits():
    (result,) = qat.ptq_vs_qat((2,))
    assert result.fp32_accuracy > 0.93  # the FP32 model really learned the digits
    assert result.qat_accuracy > result.ptq_accuracy + 0.02
    assert result.ptq_accuracy < result.fp32_accuracy
    assert result.history[0] == {"step": 0, "qat_accuracy": result.ptq_accuracy}
    assert len(result.history) == 1 + qat.QAT_STEPS // 10


def test_straight_through_estimator_passes_gradients_through_rounding():
    model = qat.MLP(seed=0)
    scheme = QuantScheme("int2", "channel")
    x = torch.randn(8, 64)
    model(x, scheme).sum().backward()
    assert model.hidden.weight.grad is not None and model.hidden.weight.grad.abs().sum() > 0
    # The forward pass really used the quantized weights.
    with torch.no_grad():
        expected = torch.nn.functional.linear(
            torch.relu(torch.nn.functional.linear(x, fake_quantize(model.hidden.weight, scheme), model.hidden.bias)),
            fake_quantize(model.out.weight, scheme), model.out.bias)
        assert torch.allclose(model(x, scheme), expected)


def test_digits_split_is_disjoint_and_standardised():
    data = qat.digits()
    assert data.x_train.shape == (1437, 64) and data.x_test.shape == (360, 64)
    assert data.x_train.mean().abs() < 1e-5
    with pytest.raises(QlabError, match="bit widths"):
        qat.ptq_vs_qat((5,))
