"""Weight rounding algorithms: ``rtn`` (``qlab.core.quant.quantize``), ``hqq`` (calibration-free), ``gptq`` and
``gptq-act-order`` (need calibration Hessians), ``awq`` (needs the Hessian and mean |x| of each input), and 2:4
sparsity before rounding (by magnitude, or SparseGPT from the Hessian).

``quantize_weight`` is the one verb the sweep calls; it dispatches on ``QuantScheme.algorithm``.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from qlab.core.algorithms.awq import awq_quantize
from qlab.core.algorithms.gptq import gptq_quantize
from qlab.core.algorithms.hqq import hqq_quantize
from qlab.core.algorithms.sparsity import sparse_quantize
from qlab.core.errors import QlabError
from qlab.core.quant import QTensor, QuantScheme, combined_flag, fake_quantize_together_unchecked, quantize

CALIBRATED_ALGORITHMS = frozenset({"gptq", "gptq-act-order", "awq"})

__all__ = ["CALIBRATED_ALGORITHMS", "LayerStats", "ReusedBuffers", "dequantized_weights",
           "dequantized_weights_unchecked", "needs_calibration", "quantize_weight"]


@dataclass(frozen=True)
class LayerStats:
    """What calibration measured at one linear's input: H = 2 X^T X / n (GPTQ's and SparseGPT's Hessian, the
    loss AWQ searches on) and the mean |x| of each input channel (AWQ's salience)."""

    hessian: torch.Tensor
    input_abs_mean: torch.Tensor | None = None


def needs_calibration(schemes: QuantScheme | Iterable[QuantScheme]) -> bool:
    """Whether any of these schemes rounds or prunes with calibration inputs (a plain cast rounds without them,
    but SparseGPT prunes it with them and GPTQ compensates its 2:4 mask with them; ``QuantScheme`` keeps no other
    algorithm on a cast)."""
    schemes = [schemes] if isinstance(schemes, QuantScheme) else list(schemes)
    return any(s.algorithm in CALIBRATED_ALGORITHMS or s.sparsity == "2:4-sparsegpt" for s in schemes)


def quantize_weight(weight: torch.Tensor, scheme: QuantScheme, stats: LayerStats | None = None) -> QTensor:
    """A linear weight (out x in) quantized by the scheme's algorithm; calibrated algorithms need that layer's
    ``stats``."""
    if scheme.algorithm == "hqq" and scheme.fmt.scaled:
        return hqq_quantize(weight, scheme)
    if not needs_calibration(scheme):
        if scheme.sparsity != "none":
            return sparse_quantize(weight, scheme)
        return quantize(weight, scheme)
    if stats is None:
        raise QlabError(f"{scheme.label} needs calibration inputs for every layer; run it through the sweep, "
                        "which collects them, or use algorithm rtn.")
    if scheme.algorithm == "awq":
        if stats.input_abs_mean is None:
            raise QlabError(f"{scheme.label} needs each input's mean |x| as well as the Hessian; collect both "
                            "with qlab.analyses.calibration.")
        return awq_quantize(weight, stats.input_abs_mean, stats.hessian, scheme)
    return gptq_quantize(weight, stats.hessian, scheme)


class ReusedBuffers:
    """Tensors lent for materialised weights and taken back together, to be lent again: the streamed sweep's
    blocks all have the same shapes, so each block's weights go into the previous block's tensors. On a CPU a
    fresh tensor of this size is fresh pages from the kernel, and faulting them in cost 3-5x the copy itself
    (the linears of a 1B model: 0.40-0.87 s to clone into new tensors, 0.13 s to copy into reused ones). The
    borrower only reads what it is lent, so a weight its scheme leaves unchanged is lent as the weight itself."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = collections.defaultdict(list)
        self._lent: list[tuple[tuple, torch.Tensor]] = []

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (tuple(shape), dtype, device)
        free = self._free[key]
        tensor = free.pop() if free else torch.empty(shape, dtype=dtype, device=device)
        self._lent.append((key, tensor))
        return tensor

    def take_back(self) -> None:
        """Everything lent is free again: call it once nothing uses those values any more."""
        for key, tensor in self._lent:
            self._free[key].append(tensor)
        self._lent.clear()


def dequantized_weights(layers: Sequence[tuple[torch.Tensor, QuantScheme, LayerStats | None]], dtype: torch.dtype,
                        buffers: ReusedBuffers | None = None) -> list[torch.Tensor]:
    """Each (weight, scheme, stats) rounded by its scheme and dequantized once into ``dtype``: the values of
    ``quantize_weight(...).dequantize(dtype)``. Round to nearest takes ``fake_quantize``'s route (no codes
    kept, no device sync per weight); the checks of every weight then wait for the device once. With
    ``buffers`` the values are written into lent tensors (or are the weight itself where the scheme changes no
    value): only read them."""
    values, suspect = dequantized_weights_unchecked(layers, dtype, buffers)
    return values if suspect is None or not suspect.item() else _exact_weights(layers, values, dtype)


def dequantized_weights_unchecked(layers: Sequence[tuple[torch.Tensor, QuantScheme, LayerStats | None]],
                                  dtype: torch.dtype, buffers: ReusedBuffers | None = None
                                  ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """``dequantized_weights`` without waiting for the device: the values, and a one-value tensor (or None)
    that is nonzero when some of them cannot be trusted (then ``dequantized_weights`` gives the exact ones or the
    error). The weights a scheme rounds to nearest are rounded together (one GPU launch for a block's)."""
    values: list[torch.Tensor | None] = [None] * len(layers)
    rounded: dict[QuantScheme, list[int]] = collections.defaultdict(list)
    for index, (weight, scheme, stats) in enumerate(layers):
        if buffers is not None and _leaves_unchanged(scheme, weight.dtype, dtype):
            values[index] = weight.detach()
        elif _rounds_to_nearest(scheme):
            rounded[scheme].append(index)
        else:
            values[index] = quantize_weight(weight, scheme, stats).dequantize(dtype)
    suspect = None
    for scheme, indices in rounded.items():
        weights = [layers[index][0] for index in indices]
        outs = None if buffers is None else [buffers.take(weight.shape, dtype, weight.device) for weight in weights]
        made, flag = fake_quantize_together_unchecked(weights, scheme, dtype, outs, suspect)
        suspect = combined_flag(suspect, flag)
        for index, value in zip(indices, made, strict=True):
            values[index] = value
    return values, suspect


def _leaves_unchanged(scheme: QuantScheme, stored: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether the scheme maps every weight stored in ``stored`` to itself, in ``dtype``: a cast to a float
    type that holds every value of the stored one (bf16 or fp16 weights at bf16/fp16 and fp32)."""
    if scheme.fmt.scaled or scheme.sparsity != "none" or stored != dtype:
        return False
    cast = scheme.fmt.cast_dtype
    return cast == stored or (cast == torch.float32 and stored in (torch.float16, torch.bfloat16))


def _exact_weights(layers: Sequence[tuple[torch.Tensor, QuantScheme, LayerStats | None]],
                   values: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """``values`` with every round-to-nearest weight done again by ``quantize_weight``, which gives its exact
    values or raises its error: what unchecked values fall back to when some cannot be trusted (rare: a weight
    not finite, a scale its dtype cannot hold)."""
    return [quantize_weight(weight, scheme, stats).dequantize(dtype) if _rounds_to_nearest(scheme) else value
            for (weight, scheme, stats), value in zip(layers, values, strict=True)]


def _rounds_to_nearest(scheme: QuantScheme) -> bool:
    """Whether ``fake_quantize``'s unchecked route gives this scheme's values (rounding to nearest, no pruning)."""
    return scheme.algorithm == "rtn" and scheme.sparsity == "none"
