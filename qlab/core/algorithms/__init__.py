"""Weight rounding algorithms: ``rtn`` (``qlab.core.quant.quantize``) and ``gptq`` (needs calibration Hessians).

``quantize_weight`` is the one verb the sweep calls; it dispatches on ``QuantScheme.algorithm``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from qlab.core.errors import QlabError
from qlab.core.quant import QTensor, QuantScheme, quantize

__all__ = ["CALIBRATED_ALGORITHMS", "needs_calibration", "quantize_weight"]

CALIBRATED_ALGORITHMS = frozenset({"gptq"})


def needs_calibration(schemes: QuantScheme | Iterable[QuantScheme]) -> bool:
    """Whether any of these schemes rounds with calibration inputs (a plain cast never does)."""
    schemes = [schemes] if isinstance(schemes, QuantScheme) else list(schemes)
    return any(s.algorithm in CALIBRATED_ALGORITHMS and s.fmt.scaled for s in schemes)


def quantize_weight(weight: torch.Tensor, scheme: QuantScheme, hessian: torch.Tensor | None = None) -> QTensor:
    """A linear weight (out x in) quantized by the scheme's algorithm; GPTQ needs that layer's Hessian."""
    if not needs_calibration(scheme):
        return quantize(weight, scheme)
    if hessian is None:
        raise QlabError(f"{scheme.label} needs calibration inputs for every layer; run it through the sweep, "
                        "which collects them, or use algorithm rtn.")
    from qlab.core.algorithms.gptq import gptq_quantize

    return gptq_quantize(weight, hessian, scheme)
