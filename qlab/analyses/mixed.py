"""Mixed precision: one format per linear layer under a size budget, chosen by predicted error, then measured.

The choice is a multiple-choice knapsack: every linear takes exactly one of the analysed schemes, each with an
exact storage cost (``QuantScheme.storage_bytes``) and a predicted error from ``qlab.analyses.sensitivity``; a dynamic
programme over bytes finds the assignment of least total predicted error that fits the budget. Predictions
are only a guide, so every recommended mix is then quantized and evaluated end to end like any other scheme.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from qlab.analyses.sensitivity import METRIC, SensitivityReport, error_of
from qlab.analyses.streamed import evaluate_streamed, streamable_stack
from qlab.core.algorithms import LayerStats
from qlab.core.errors import QlabError
from qlab.core.plan import (
    SchemePlan,
    plan_record,
    quantized_copy,
    size_report,
    unquantized_format,
    weights_dtype,
)
from qlab.core.quant import QuantScheme
from qlab.models.evaluate import Baseline, CancelCheck, Progress, evaluate
from qlab.models.loading import LoadedModel, model_sha256, quantizable_linears

# The knapsack runs over at most this many capacity states; a finer byte grid is rounded (costs up, so the
# budget still holds exactly) to keep the table at L x MAX_STATES.
MAX_STATES = 1 << 16


@dataclass(frozen=True)
class Budget:
    """A size budget: average bits per quantized weight (scales included), or the whole model in bytes."""

    bits_per_weight: float | None = None
    size_bytes: int | None = None

    def __post_init__(self) -> None:
        if (self.bits_per_weight is None) == (self.size_bytes is None):
            raise QlabError("give exactly one budget: bits per weight (e.g. 4.5) or a model size in bytes/GB.")
        if self.bits_per_weight is not None and not 0 < self.bits_per_weight <= 64:
            raise QlabError(f"a budget of {self.bits_per_weight} bits per weight is out of range; use e.g. 4.5.")
        if self.size_bytes is not None and self.size_bytes <= 0:
            raise QlabError("the size budget must be positive.")

    @property
    def label(self) -> str:
        if self.bits_per_weight is not None:
            return f"{self.bits_per_weight:g} bits/weight"
        return f"{self.size_bytes / 1e9:.4g} GB"


@dataclass(frozen=True)
class Choices:
    """The knapsack instance: per linear (rows) and scheme (columns) its exact bytes and predicted error."""

    layers: tuple[str, ...]
    schemes: tuple[QuantScheme, ...]
    params: np.ndarray  # (L,) weights per layer
    size_bytes: np.ndarray  # (L, F) int64, codes + scales + zero-points
    error: np.ndarray  # (L, F) float64, predicted contribution to the model's error
    other_bytes: int  # everything that is not a quantized linear, stored at fp16
    predictor: str  # how ``error`` was predicted, for people

    def budget_bytes(self, budget: Budget) -> int:
        """Bytes the quantized linears may take under ``budget``."""
        if budget.bits_per_weight is not None:
            # The epsilon keeps a budget typed as exactly some scheme's bits per weight from flooring one byte
            # below that scheme's size through float rounding.
            return math.floor(budget.bits_per_weight * int(self.params.sum()) / 8 + 1e-6)
        return budget.size_bytes - self.other_bytes

    def predicted(self, choice: np.ndarray) -> float:
        return float(self.error[np.arange(len(self.layers)), choice].sum())

    def bytes_of(self, choice: np.ndarray) -> int:
        return int(self.size_bytes[np.arange(len(self.layers)), choice].sum())

    def assignment(self, choice: np.ndarray) -> dict[str, QuantScheme]:
        return {layer: self.schemes[index] for layer, index in zip(self.layers, choice.tolist(), strict=True)}


def choices_from(loaded: LoadedModel, report: SensitivityReport) -> Choices:
    """The knapsack instance of a sensitivity report: exact bytes, and as predicted error each linear's
    ``estimated_delta`` (its measured block delta shared by curvature-weighted output error, its own measured
    delta with ``unit="linear"``, or with ``blocks=False`` the second-order prediction alone: cheaper, less
    sure), in the metric's units (nats of KLD, or 1 - cosine)."""
    predicted_only = not report.blocks
    if predicted_only and not any("predicted_delta" in r for r in report.linears):
        raise QlabError("the sensitivity report has neither end-to-end measurements nor predictions; run it with "
                        "blocks or with predict on.")
    if report.view != "forward":
        raise QlabError("the recommender needs the forward view (each unit quantized alone).")
    layers = tuple(name for name, _ in quantizable_linears(loaded.model))
    schemes = report.schemes
    column = {scheme.label: index for index, scheme in enumerate(schemes)}
    row = {layer: index for index, layer in enumerate(layers)}
    error = np.full((len(layers), len(schemes)), np.nan)
    size = np.zeros((len(layers), len(schemes)), dtype=np.int64)
    params = np.zeros(len(layers), dtype=np.int64)
    for record in report.rows():
        i, j = row[record["layer"]], column[record["label"]]
        error[i, j] = np.nan if record["estimated_delta"] is None else record["estimated_delta"]
        size[i, j] = record["size_bytes"]
        params[i] = record["params"]
    if np.isnan(error).any():
        missing = layers[int(np.argwhere(np.isnan(error))[0][0])]
        raise QlabError(f"the report has no end-to-end measurement covering '{missing}'; re-run the analysis.")
    if predicted_only:
        predictor = "second-order predictions only (curvature-weighted output error, nothing replayed)"
    elif report.unit == "linear":
        predictor = "each linear's own measured end-to-end delta"
    elif any("predicted_delta" in r for r in report.linears):
        predictor = "measured block deltas, shared by curvature-weighted output error"
    else:
        predictor = "measured block deltas, shared by squared weight error"
    other_params = sum(p.numel() for p in loaded.model.parameters()) - int(params.sum())
    return Choices(layers, schemes, params, size, error, other_params * 2, predictor)


def budget_range(choices: Choices) -> tuple[float, float]:
    """Average bits per quantized weight (scales included) with every linear at its smallest, and at its largest,
    analysed format: the budgets a mix can be asked for."""
    low = float(choices.size_bytes.min(axis=1).sum() * 8 / choices.params.sum())
    high = float(choices.size_bytes.max(axis=1).sum() * 8 / choices.params.sum())
    return low, high


def budget_steps(low: float, high: float, chosen: float, points: int = 4) -> list[float]:
    """``chosen`` and ``points`` budgets evenly inside (low, high), rounded to 1e-4 bits and sorted: the mixes a
    Pareto curve is measured at. Rounding never goes below ``low``, whose plan would not fit."""
    budgets = sorted({round(chosen, 4)} | {round(low + (high - low) * k / (points + 1), 4)
                                           for k in range(1, points + 1)})
    return [max(b, math.ceil(low * 1e4) / 1e4) for b in budgets]


def solve(choices: Choices, budget_bytes: int) -> np.ndarray:
    """The scheme index per layer with least total predicted error whose bytes do not exceed the budget.

    A dynamic programme over the bytes each layer spends above its cheapest scheme. Exact when those extras
    are multiples of a common grid of at most ``MAX_STATES`` steps (true for grouped formats: layers are whole
    multiples of a group); otherwise extras are rounded up, which keeps the budget and may leave a little of it
    unused.
    """
    costs = choices.size_bytes
    floor = costs.min(axis=1)
    slack = budget_bytes - int(floor.sum())
    if slack < 0:
        raise QlabError(f"the budget leaves {budget_bytes / 1e6:.2f} MB for the linear layers but even the "
                        f"smallest formats need {floor.sum() / 1e6:.2f} MB; raise the budget or add a lower-bit "
                        "format.")
    extra = costs - floor[:, None]
    unit = max(1, int(np.gcd.reduce(extra.reshape(-1))))
    if slack // unit > MAX_STATES:
        unit = -(-slack // MAX_STATES)
    weights = -(-extra // unit)  # ceil: a rounded cost is never below the true one
    capacity = slack // unit
    n_layers, n_schemes = costs.shape
    best = np.full(capacity + 1, np.inf)
    best[0] = 0.0  # best[c]: least error of the layers so far spending exactly c units above their floor
    picked = np.zeros((n_layers, capacity + 1), dtype=np.int16)
    for i in range(n_layers):
        candidates = np.full((n_schemes, capacity + 1), np.inf)
        for j in range(n_schemes):
            w = int(weights[i, j])
            if w <= capacity:
                candidates[j, w:] = best[: capacity + 1 - w] + choices.error[i, j]
        picked[i] = candidates.argmin(axis=0)
        best = candidates[picked[i], np.arange(capacity + 1)]
    used = int(np.argmin(best))  # the cheapest-everywhere assignment is always finite; ties go to less size
    choice = np.zeros(n_layers, dtype=np.int64)
    for i in range(n_layers - 1, -1, -1):
        choice[i] = picked[i, used]
        used -= int(weights[i, choice[i]])
    return choice


@dataclass(frozen=True)
class Mix:
    """A recommended per-layer assignment and what it costs."""

    budget: Budget
    assignment: dict[str, QuantScheme]
    bits_per_weight: float
    size_bytes: int
    predicted_error: float

    @property
    def label(self) -> str:
        """The row label of this mix when measured."""
        return f"mix @ {self.budget.label}"


def recommend(loaded: LoadedModel, choices: Choices, budget: Budget) -> Mix:
    """Solve the knapsack for ``budget`` and size the resulting plan exactly."""
    choice = solve(choices, choices.budget_bytes(budget))
    assignment = choices.assignment(choice)
    size = size_report(loaded.model, assignment)
    return Mix(budget, assignment, size.bits_per_weight, size.size_bytes, choices.predicted(choice))


def measure(loaded: LoadedModel, plans: Mapping[str, SchemePlan], baseline: Baseline,
            progress: Progress | None = None, cancel: CancelCheck | None = None,
            on_row: Callable[[dict], None] | None = None,
            calibration: Mapping[str, LayerStats] | None = None) -> list[dict]:
    """Quantize and evaluate each plan (uniform scheme or per-layer mix) end to end: one row per plan, also
    handed to ``on_row`` as soon as it is measured. ``calibration`` (``qlab.analyses.sensitivity.calibrate``)
    is what plans rounded by GPTQ or AWQ round with, the statistics their analysis used."""
    metric = METRIC[baseline.kind]
    rows = []
    shells: dict = {}  # the blocks made runnable, lent to each plan in turn
    for index, (label, plan) in enumerate(plans.items()):
        started = time.perf_counter()

        def stage(fraction: float, message: str, index: int = index, label: str = label) -> None:
            if progress:
                progress((index + fraction) / len(plans), f"{label}: {message}")

        if streamable_stack(loaded.model) is not None:  # one block's weights at a time, as the sweep runs
            metrics = evaluate_streamed(loaded, plan, baseline, calibration, stage, cancel, shells=shells)
        else:
            metrics = evaluate(quantized_copy(loaded.model, plan, calibration), baseline, stage, cancel)
        size = size_report(loaded.model, plan)
        uniform = isinstance(plan, QuantScheme)
        rows.append({"model": loaded.name, "label": label, "kind": "uniform" if uniform else "mix",
                     "format": plan.format if uniform else "mixed", "bits_per_weight": size.bits_per_weight,
                     "size_bytes": size.size_bytes, "unquantized_format": unquantized_format(plan, weights_dtype(loaded.model)),
                     "metric": metric, "error": error_of(metric, metrics[metric]), **metrics,
                     "seconds": round(time.perf_counter() - started, 3)})
        if on_row:
            on_row(rows[-1])
    return rows


def compare(loaded: LoadedModel, choices: Choices, budgets: Sequence[Budget], baseline: Baseline,
            progress: Progress | None = None, cancel: CancelCheck | None = None,
            on_row: Callable[[dict], None] | None = None,
            calibration: Mapping[str, LayerStats] | None = None) -> tuple[list[Mix], list[dict]]:
    """Recommend a mix per budget and measure the mixes next to every uniform scheme of the analysis;
    ``on_row`` receives each measured row (with its ``predicted_error``) as soon as it is finished;
    ``calibration`` as ``measure`` takes it."""
    mixes = [recommend(loaded, choices, budget) for budget in budgets]
    plans: dict[str, SchemePlan] = {scheme.label: scheme for scheme in choices.schemes}
    for mix in mixes:
        plans.setdefault(mix.label, mix.assignment)
    predicted = {mix.label: mix.predicted_error for mix in mixes}

    def finished(row: dict) -> None:
        row["predicted_error"] = predicted.get(row["label"])
        if on_row:
            on_row(row)

    return mixes, measure(loaded, plans, baseline, progress, cancel, finished, calibration)


def recommendation_record(loaded: LoadedModel, report: SensitivityReport, choices: Choices, mix: Mix,
                          rows: list[dict]) -> dict:
    """The recommendation as JSON (what ``qlab recommend`` prints and the page downloads): the assignment
    (module -> format), its size, and the measured metric of the mix and of each uniform format."""
    by_label = {row["label"]: row for row in rows}
    measured = {"mix": by_label[mix.label][report.metric]}
    errors = {"mix": by_label[mix.label]["error"]}
    for scheme in report.schemes:
        measured[scheme.format] = by_label[scheme.label][report.metric]
        errors[scheme.format] = by_label[scheme.label]["error"]
    budget = {"bits_per_weight": mix.budget.bits_per_weight, "size_bytes": mix.budget.size_bytes}
    return {
        "model": loaded.name,
        "budget": budget,
        "assignment": {name: scheme.format for name, scheme in mix.assignment.items()},
        "bits_per_weight": mix.bits_per_weight,
        "size_bytes": mix.size_bytes,
        "metric": report.metric,
        "measured": measured,
        "error": errors,  # the metric as damage: KLD itself, or 1 - cosine
        "predicted_error": mix.predicted_error,
        "predictor": choices.predictor,
        "rows": rows,
        # The plan alone (``recommend --plan``): what it stores, torchao / optimum-quanto spellings, and how it fared.
        "plan": plan_record(loaded.model, mix.assignment, loaded.name, model_sha256(loaded), budget=budget,
                            metric=report.metric, measured=measured["mix"], predicted_error=mix.predicted_error,
                            eval_tokens=report.tokens),
        "caveat": loaded.source.caveat,
        "eval_tokens": report.tokens,
        **({"calibration": report.calibration} if report.calibration else {}),  # GPTQ/AWQ: their tokens
    }
