"""HQQ (Badri & Shaji, 2023, "Half-Quadratic Quantization of Large Machine Learning Models"): calibration-free
rounding that fits each block's zero-point to the weights alone.

The error ``W - dequantize(quantize(W))`` is heavy-tailed, so HQQ minimises its lp-norm with p < 1, which
tolerates a few large errors (the outliers) to make the many small ones smaller. Half-quadratic splitting adds
an auxiliary error ``E`` and alternates two closed-form steps: ``E`` = the generalised soft-threshold of the
current error (the proximal operator of |.|^p), then the zero-point = the mean that makes the dequantized
weights match ``W - E``; the penalty ``beta`` grows by ``kappa`` each step. As in the authors' implementation
(mobiusml/hqq, ``optimize_weights_proximal``: p = 0.7, beta = 10, kappa = 1.01, 20 steps), the scale stays at its
min-max value and only the zero-point moves, which is why it is a float (stored like the scale, in fp16 for
groups) rather than an integer code. Unlike that implementation, each block keeps its own best step (by mean
absolute error) instead of the whole tensor stopping at its first worse step.
"""

from __future__ import annotations

import dataclasses

import torch

from qlab.core.errors import QlabError
from qlab.core.quant import SCALE_DTYPES, QTensor, QuantScheme, block_count, compute_scale, encode
from qlab.core.threads import one_thread

LP_NORM = 0.7
BETA = 10.0
KAPPA = 1.01
STEPS = 20


@dataclasses.dataclass(frozen=True)
class FloatZeroQTensor(QTensor):
    """A QTensor whose zero-point is a float per block (HQQ), stored at the scale's dtype."""

    def packed(self) -> dict[str, torch.Tensor]:
        return {**QTensor.packed(dataclasses.replace(self, zero_point=None)), "zero_points": self.zero_point}


def _shrink(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised soft-thresholding: the proximal operator of |x|^p / beta, as HQQ approximates it."""
    magnitude = x.abs()
    return torch.sign(x) * torch.relu(magnitude - magnitude.clamp(min=1e-12).pow(LP_NORM - 1) / beta)


def hqq_quantize(weight: torch.Tensor, scheme: QuantScheme, steps: int = STEPS) -> QTensor:
    """Quantize a weight under an integer ``scheme`` with HQQ's optimised float zero-points (no calibration)."""
    if scheme.algorithm != "hqq":
        raise QlabError(f"{scheme.label} is not an hqq scheme; pass algorithm hqq.")
    # Twenty passes of element-wise work: threads add hand-offs, not speed, on a shared CPU (see threads.py).
    with one_thread():
        return _hqq(weight, scheme, steps)


def _hqq(weight: torch.Tensor, scheme: QuantScheme, steps: int) -> QTensor:
    fmt = scheme.fmt
    x = weight.detach().to(torch.float32)
    blocks = x.reshape(block_count(x.shape, scheme), -1)
    # Round-to-nearest's own scale (the scheme's calibration, at the stored scale dtype), and the float
    # zero-point that maps each block's minimum exactly onto the lowest code, as HQQ starts.
    scale, _ = compute_scale(x, dataclasses.replace(scheme, algorithm="rtn"))
    step = scale.to(torch.float32)[:, None]
    zero_dtype = SCALE_DTYPES[scheme.scale_dtype]
    current = fmt.qmin - blocks.amin(dim=1, keepdim=True).clamp(max=0) / step
    best = current.clone()
    best_error = torch.full_like(best, float("inf"))
    beta = BETA
    for _ in range(steps):
        stored = current.to(zero_dtype).to(torch.float32)  # judge the zero-point as it will be stored
        codes = encode(blocks, scale, stored[:, 0], fmt).to(torch.float32)
        residual = blocks - (codes - stored) * step
        error = residual.abs().mean(dim=1, keepdim=True)
        better = error < best_error
        best = torch.where(better, stored, best)
        best_error = torch.where(better, error, best_error)
        target = blocks - _shrink(residual, beta)
        current = (codes - target / step).mean(dim=1, keepdim=True)
        beta *= KAPPA
    zero_point = best[:, 0].to(zero_dtype)
    codes = encode(blocks, scale, zero_point, fmt)
    return FloatZeroQTensor(codes.reshape(x.shape), scale, zero_point, scheme, x.shape)
