"""One linear's weights rounded by each scheme's algorithm, as the Weights page and the Overview's weight histogram
show them. GPTQ and AWQ round with that layer's calibration statistics, collected from the end of the text as
the sweep and the sensitivity analyses collect every layer's (``qlab.analyses.calibration``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qlab.analyses.activations import calibration_data
from qlab.analyses.calibration import collect_layer_stats
from qlab.analyses.sensitivity import check_calibration
from qlab.core.algorithms import LayerStats, needs_calibration, quantize_weight
from qlab.core.errors import QlabError
from qlab.core.quant import QTensor, QuantScheme
from qlab.models.evaluate import CancelCheck, EvalSpec, Progress
from qlab.models.loading import LoadedModel, quantizable_linears


def layer_stats(loaded: LoadedModel, layer: str, schemes: Sequence[QuantScheme], spec: EvalSpec,
                progress: Progress | None = None, cancel: CancelCheck | None = None) -> LayerStats | None:
    """``layer``'s calibration statistics (one pass of the model over the calibration text), or None when no
    scheme's algorithm needs them."""
    layer_weight(loaded, layer)
    if not needs_calibration(schemes):
        return None
    check_calibration(loaded, schemes, spec)
    return collect_layer_stats(loaded, calibration_data(loaded, spec), [layer], progress, cancel)[layer]


def round_layer(loaded: LoadedModel, layer: str, schemes: Sequence[QuantScheme], stats: LayerStats | None = None
                ) -> dict[QuantScheme, QTensor]:
    """``layer``'s weight quantized by each scheme's algorithm; the calibrated ones need ``layer_stats``."""
    weight = layer_weight(loaded, layer)
    return {scheme: quantize_weight(weight, scheme, stats) for scheme in dict.fromkeys(schemes)}


def layer_weight(loaded: LoadedModel, layer: str) -> torch.Tensor:
    """The weight of one of the model's quantizable linears (a one-line error for any other name)."""
    linears = dict(quantizable_linears(loaded.model))
    if layer not in linears:
        raise QlabError(f"{loaded.name} has no linear layer '{layer}'; pick one of its quantized layers.")
    return linears[layer].weight.detach()


def columns_label(columns: torch.Tensor) -> str:
    """The input columns of a block in words: a span when consecutive, else how many (act-order's groups)."""
    first, last = int(columns[0]), int(columns[-1])
    if last - first + 1 == len(columns):
        return f"columns {first}-{last}"
    return f"{len(columns)} columns from {first} to {last} (act-order groups inputs by their calibration order)"
