"""AWQ (Lin et al., 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"):
protect the weights of salient input channels by scaling them up before rounding.

A linear computes ``x W^T = (x / s) (W diag(s))^T`` for any positive per-input scale ``s``; rounding
``W diag(s)`` instead of ``W`` makes the relative rounding error of a channel scaled up smaller, at the cost of
the channels that share its groups. AWQ picks ``s = mean|x|^alpha`` (inputs that are large on average matter
most), normalised so that ``max(s) * min(s) = 1``, with ``alpha`` from a grid over [0, 1) that minimises the
layer's output error on calibration inputs, as llm-awq's ``auto_scale`` does (20 points; alpha = 0 is plain
round-to-nearest, so the search never does worse on its own calibration data). The output error of a candidate
is ``tr(dW H dW^T)`` with the calibration Hessian ``H = 2 X^T X / n``: the same squared error over the
calibration tokens, without keeping them. Unlike llm-awq, each linear gets its own scales (they are kept as an
explicit fp16 input scale ``1 / s``, not folded into the norm before q/k/v, which needs one ``s`` for all three),
and the clipping search (``auto_clip``) is left to the scheme's own calibration (``mse``).
"""

from __future__ import annotations

import dataclasses

import torch

from qlab.core.errors import QlabError
from qlab.core.quant import QTensor, QuantScheme, quantize

GRID_POINTS = 20
MIN_SCALE = 1e-4  # llm-awq's floor, so an input that never fires does not zero its weights


@dataclasses.dataclass(frozen=True)
class InputScaledQTensor(QTensor):
    """Codes of ``W diag(s)`` and the input scale ``1 / s`` (fp16, one per input) the layer multiplies its input
    by. ``dequantize`` is the effective weight ``Q(W diag(s)) diag(1 / s)``; ``dequantize_scaled`` the stored one."""

    input_scale: torch.Tensor

    def dequantize_scaled(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The rounded ``W diag(s)``, as a kernel reads it."""
        return QTensor.dequantize(self, dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (QTensor.dequantize(self) * self.input_scale.to(torch.float32)).to(dtype)

    def packed(self) -> dict[str, torch.Tensor]:
        return {**super().packed(), "input_scales": self.input_scale}

    def input_scales(self) -> torch.Tensor:
        return self.input_scale


def output_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """Squared output error ``tr(dW H dW^T)`` of a linear whose inputs have Hessian ``H = 2 X^T X / n``."""
    delta = dequantized.to(torch.float32) - weight.to(torch.float32)
    return ((delta @ hessian.to(torch.float32)) * delta).sum().item()


def awq_quantize(weight: torch.Tensor, input_abs_mean: torch.Tensor, hessian: torch.Tensor,
                 scheme: QuantScheme, grid_points: int = GRID_POINTS) -> InputScaledQTensor:
    """Quantize a 2-D weight (out x in) with the AWQ scale that minimises the calibration output error."""
    if weight.dim() != 2:
        raise QlabError(f"AWQ scales the inputs of 2-D linear weights; got a tensor of shape {tuple(weight.shape)}.")
    columns = weight.shape[1]
    if input_abs_mean.shape != (columns,) or hessian.shape != (columns, columns):
        raise QlabError(f"the calibration statistics are for {input_abs_mean.numel()} inputs but the weight has "
                        f"{columns}; collect them from this layer's inputs.")
    w = weight.detach().to(torch.float32)
    salience = input_abs_mean.detach().to(torch.float32)
    rtn_scheme = dataclasses.replace(scheme, algorithm="rtn")
    best: tuple[float, QTensor, torch.Tensor] | None = None
    for alpha in (i / grid_points for i in range(grid_points)):
        scales = salience.pow(alpha).clamp(min=MIN_SCALE)
        scales = scales / (scales.max() * scales.min()).sqrt()
        # The scale as stored (fp16 1/s) is the scale the codes are made with.
        input_scale = (1 / scales).to(torch.float16)
        qtensor = quantize(w / input_scale.to(torch.float32), rtn_scheme)
        error = output_error(w, qtensor.dequantize() * input_scale.to(torch.float32), hessian)
        if best is None or error < best[0]:
            best = (error, qtensor, input_scale)
    _, qtensor, input_scale = best
    return InputScaledQTensor(qtensor.codes, qtensor.scale, qtensor.zero_point, scheme, qtensor.shape, input_scale)
