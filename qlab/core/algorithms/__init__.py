"""Weight rounding algorithms: ``rtn`` (``qlab.core.quant.quantize``) and ``gptq`` (needs calibration Hessians).

``quantize_weight`` is the one verb the sweep calls; it dispatches on ``QuantScheme.algorithm``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch

from qlab.core.errors import QlabError
from qlab.core.quant import QTensor, QuantScheme, quantize

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


def calibration_hessians(loaded, spec, progress: Callable[[float, str], None] | None = None,
                         cancel: Callable[[], bool] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Every quantizable linear's Hessian from calibration text (the end of the spec's text), and a record of
    how it was calibrated for the result row."""
    from qlab.analyses.activations import calibration_data
    from qlab.core.algorithms.gptq import collect_hessians
    from qlab.models.loading import quantizable_linears

    started = time.perf_counter()
    data = calibration_data(loaded, spec)
    names = [name for name, _ in quantizable_linears(loaded.model)]
    hessians = collect_hessians(loaded, data, names, progress, cancel)
    record = {"calibration_tokens": data.tokens, "calibration_overlaps_eval": data.overlaps_eval,
              "calibration_seconds": round(time.perf_counter() - started, 3)}
    return hessians, record
