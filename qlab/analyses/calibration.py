"""Calibration that runs a model: each linear's input statistics (the Hessian GPTQ, SparseGPT and AWQ use, and
AWQ's mean |x| per input channel) from captured inputs, and RTN vs GPTQ on one layer.

The rounding itself is pure tensor work in ``qlab.core.algorithms``; this module feeds it real activations.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import torch

from qlab.analyses.activations import calibration_data, capture_inputs, run_with_input_hooks, text_batches
from qlab.core.algorithms import LayerStats
from qlab.core.algorithms.gptq import gptq_quantize, hessian_from_inputs, reconstruction_error
from qlab.core.errors import QlabError
from qlab.core.plan import quantizable_linears
from qlab.core.quant import QuantScheme, quantize


def calibration_stats(loaded, spec, progress: Callable[[float, str], None] | None = None,
                      cancel: Callable[[], bool] | None = None) -> tuple[dict[str, LayerStats], dict]:
    """Every quantizable linear's input statistics from calibration text (the end of the spec's text), and a
    record of how it was calibrated for the result row."""
    started = time.perf_counter()
    data = calibration_data(loaded, spec)
    names = [name for name, _ in quantizable_linears(loaded.model)]
    stats = collect_layer_stats(loaded, data, names, progress, cancel)
    record = {"calibration_tokens": data.tokens, "calibration_overlaps_eval": data.overlaps_eval,
              "calibration_seconds": round(time.perf_counter() - started, 3)}
    return stats, record


def collect_layer_stats(loaded, data, names: Sequence[str],
                        progress: Callable[[float, str], None] | None = None,
                        cancel: Callable[[], bool] | None = None) -> dict[str, LayerStats]:
    """H = 2 X^T X / n and mean |x| per input channel for each named linear, from the FP32 model run on
    calibration data.

    Linears fed the very same tensor (q/k/v after one norm, gate/up in a SwiGLU MLP) share one statistics
    object, which keeps SmolLM2-135M's Hessians near 0.4 GB instead of 0.7 GB.
    """
    sums: dict[str, torch.Tensor] = {}
    abs_sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    owner: dict[str, str] = {}

    def hook(name: str, x: torch.Tensor, shared_with: str | None) -> None:
        if shared_with is not None:
            owner.setdefault(name, shared_with)
            return
        x = x.to(torch.float32)
        if name not in sums:
            with torch.inference_mode(False):  # normal tensors, so they can be averaged in place after the pass
                sums[name] = torch.zeros(x.shape[-1], x.shape[-1], device=x.device)
                abs_sums[name] = torch.zeros(x.shape[-1], device=x.device)
            counts[name] = 0
        sums[name].addmm_(x.T, x)
        abs_sums[name] += x.abs().sum(dim=0)
        counts[name] += x.shape[0]

    run_with_input_hooks(loaded, data, names, hook, progress, cancel)
    # Scaled in place: a scaled copy beside the sums would double the Hessians' memory (5 GB more on a 1B model).
    # Doubling first is exact, so the values are 2 * total / n's to the bit.
    stats = {name: LayerStats(total.mul_(2).div_(max(1, counts[name])), abs_sums[name].div_(max(1, counts[name])))
             for name, total in sums.items()}
    for name, source in owner.items():
        if name not in stats:
            stats[name] = stats[source]
    absent = [name for name in names if name not in stats]
    if absent:
        raise QlabError(f"no calibration input reached '{absent[0]}'; that layer is not used by a forward pass, "
                        "so it cannot be calibrated (use rtn or hqq).")
    return stats


def layer_comparison(loaded, layer: str, schemes: Sequence[QuantScheme], spec,
                     calibration_tokens: int = 2048) -> list[dict]:
    """RTN against GPTQ on one linear layer of a loaded model: weight error, and output error on the
    calibration tokens (the end of the text) and on held-out tokens (its start, as the evaluation reads it)."""
    weight = loaded.model.get_submodule(layer).weight.detach()
    calibration = capture_inputs(loaded, layer, calibration_data(loaded, spec, calibration_tokens))
    held_out = capture_inputs(loaded, layer, text_batches(loaded, spec.resolved_text(), spec.tokens))
    hessian = hessian_from_inputs(calibration)
    energy = (weight.float() ** 2).mean().clamp(min=1e-30).item()
    records = []
    for scheme in schemes:
        for algorithm in ("rtn", "gptq"):
            variant = dataclasses.replace(scheme, algorithm=algorithm)
            qtensor = quantize(weight, variant) if algorithm == "rtn" else gptq_quantize(weight, hessian, variant)
            dequantized = qtensor.dequantize()
            records.append({
                "scheme": scheme.label, "algorithm": algorithm, "bits_per_weight": qtensor.bits_per_weight,
                "weight_relative_mse": ((dequantized - weight.float()) ** 2).mean().item() / energy,
                "output_error_calibration": reconstruction_error(weight, dequantized, calibration),
                "output_error_held_out": reconstruction_error(weight, dequantized, held_out),
                "calibration_tokens": calibration.shape[0], "held_out_tokens": held_out.shape[0],
            })
    return records
