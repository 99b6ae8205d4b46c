"""PTQ against QAT, live: a small classifier trained on scikit-learn's bundled handwritten digits (1,797 8x8
images, no download), then quantized to a few bits after training (PTQ) or fine-tuned with its weights fake-
quantized in the forward pass and gradients passed straight through the rounding (QAT, the straight-through
estimator of Bengio et al. 2013). Both use ``qlab.core.quant.fake_quantize``, so the grid is the sweep's own.
Runs on a CPU in seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qlab.core.errors import QlabError
from qlab.core.quant import QuantScheme, fake_quantize
from qlab.core.threads import one_thread

HIDDEN = 64
FP32_STEPS = 300
QAT_STEPS = 200


@dataclass(frozen=True)
class Digits:
    """Standardised 64-pixel digit images, split 80/20 the same way on every run."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def digits(seed: int = 0) -> Digits:
    """scikit-learn's bundled digits dataset as tensors (the features standardised on the training split)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    train, test = order[:cut], order[cut:]
    mean, std = x[train].mean(dim=0), x[train].std(dim=0).clamp(min=1e-3)
    return Digits((x[train] - mean) / std, y[train], (x[test] - mean) / std, y[test])


class MLP(torch.nn.Module):
    """64 -> HIDDEN -> 10; ``scheme`` fake-quantizes both weight matrices in the forward pass (STE)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = torch.nn.Linear(64, HIDDEN)
        self.out = torch.nn.Linear(HIDDEN, 10)

    def forward(self, x: torch.Tensor, scheme: QuantScheme | None = None) -> torch.Tensor:
        hidden = torch.relu(torch.nn.functional.linear(x, self._weight(self.hidden, scheme), self.hidden.bias))
        return torch.nn.functional.linear(hidden, self._weight(self.out, scheme), self.out.bias)

    @staticmethod
    def _weight(layer: torch.nn.Linear, scheme: QuantScheme | None) -> torch.Tensor:
        if scheme is None:
            return layer.weight
        # Straight-through estimator: the forward sees the quantized weight, the backward treats rounding as
        # the identity, so gradients reach the full-precision weights that QAT keeps updating.
        return layer.weight + (fake_quantize(layer.weight, scheme) - layer.weight).detach()


def accuracy(model: MLP, x: torch.Tensor, y: torch.Tensor, scheme: QuantScheme | None = None) -> float:
    with torch.no_grad():
        return (model(x, scheme).argmax(dim=1) == y).float().mean().item()


def train(model: MLP, data: Digits, steps: int, lr: float, scheme: QuantScheme | None = None,
          every: int = 0, on_step: Callable[[int, float], None] | None = None) -> None:
    """Full-batch Adam on cross-entropy; ``on_step(step, test_accuracy)`` every ``every`` steps."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(data.x_train, scheme), data.y_train)
        loss.backward()
        optimizer.step()
        if on_step is not None and every and step % every == 0:
            on_step(step, accuracy(model, data.x_test, data.y_test, scheme))


@dataclass(frozen=True)
class QATResult:
    """Test accuracy of one bit width: FP32, PTQ (round the trained weights) and QAT (fine-tuned with STE)."""

    bits: int
    scheme: str
    fp32_accuracy: float
    ptq_accuracy: float
    qat_accuracy: float
    fp32_seconds: float
    qat_seconds: float
    history: list[dict] = field(default_factory=list)  # QAT test accuracy during fine-tuning

    def to_record(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "history"}


def ptq_vs_qat(bits: tuple[int, ...] = (2, 3, 4), seed: int = 0, fp32_steps: int = FP32_STEPS,
               qat_steps: int = QAT_STEPS, granularity: str = "channel") -> list[QATResult]:
    """Train one FP32 model, then for each bit width: PTQ it, and QAT a copy of it; real training, real numbers."""
    if not bits or any(b not in (2, 3, 4, 8) for b in bits):
        raise QlabError(f"bit widths must be among 2, 3, 4, 8; got {list(bits)}.")
    with one_thread():
        return _ptq_vs_qat(bits, seed, fp32_steps, qat_steps, granularity)


def _ptq_vs_qat(bits: tuple[int, ...], seed: int, fp32_steps: int, qat_steps: int,
                granularity: str) -> list[QATResult]:
    data = digits(seed)
    base = MLP(seed)
    started = time.perf_counter()
    train(base, data, fp32_steps, lr=1e-2)
    fp32_seconds = time.perf_counter() - started
    fp32_accuracy = accuracy(base, data.x_test, data.y_test)
    results = []
    for width in bits:
        scheme = QuantScheme(f"int{width}", granularity)
        ptq = accuracy(base, data.x_test, data.y_test, scheme)
        model = MLP(seed)
        model.load_state_dict(base.state_dict())
        history = [{"step": 0, "qat_accuracy": ptq}]
        started = time.perf_counter()
        train(model, data, qat_steps, lr=2e-3, scheme=scheme, every=10,
              on_step=lambda step, acc, history=history: history.append({"step": step, "qat_accuracy": acc}))
        results.append(QATResult(width, scheme.label, fp32_accuracy, ptq,
                                 accuracy(model, data.x_test, data.y_test, scheme), fp32_seconds,
                                 time.perf_counter() - started, history))
    return results
