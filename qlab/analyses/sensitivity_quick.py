"""Quick sensitivity: a per-linear ranking from one forward and one backward pass, no end-to-end replays.

Each linear's score is the second-order estimate of how much the model's metric (KL divergence for LMs,
1 - cosine for embedding models) grows when that linear alone is quantized: ``1/2 e^T H e`` per metric item,
with ``e = X (W_q - W)^T`` the layer's output error on the baseline's own tokens and ``H`` the metric's
Gauss-Newton curvature at that output. The backward pass is the full analysis's own
(``qlab.analyses.sensitivity._output_curvature``): the gradient ``g`` of its pseudo-loss has covariance ``H``,
so ``(g . e)^2`` estimates ``e^T H e``.

How ``g . e`` is reduced decides whether the ranking holds. The full analysis multiplies squared errors by a
per-channel curvature averaged over tokens (the diagonal of ``H``); that treats the error at each token as
independent, but a weight error shifts every token's output the same way, and pooling (embeddings) or
attention (LMs) adds those shifts up. The quick score keeps the token coupling and drops only the coupling
between channels: ``sum_channels (sum_tokens g * e)^2`` per text or run of COUPLED_TOKENS tokens of a window,
averaged over hundreds of channels.

Cost, counted rather than timed (``evaluations_per_format``: matmul FLOPs against one evaluation of the same
tokens): the pass reads only the baseline's tokens, so without a baseline nothing else runs; one forward with
autograd, one backward to the activations (no weight needs a gradient), and per format one product
``X (W_q - W)^T`` per linear on the real (non-padding) tokens, in bf16 for a bf16 model as its evaluations are.
That is under 3 evaluations for one format alone and falls per format as formats are added. A scheme whose algorithm is not round to nearest is rounded once before
the pass by the full analysis's rounder; GPTQ and AWQ first need its calibration pass (``calibrate``: a forward over
the calibration tokens from the end of the text), which these counts leave out.

Checked against the full analysis's measured per-block deltas (``agreement``; the tests and
``bench/sensitivity_quick.py``, which also reports the full analysis's own diagonal estimate beside it). The one
random probe moves the figures by a few hundredths, most on SmolLM2, whose 8-bit block deltas lie within a
factor of two of each other: at 128 tokens its 8-bit ranking scored 0.59-0.74 over nine probes, so SmolLM2 is
checked at 512.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from qlab.analyses.sensitivity import (
    METRIC,
    SensitivityReport,
    _batches,
    _check_schemes,
    _exact,
    _output_curvature,
    _product_in_bf16,
    _Rounder,
    block_stack,
    calibrate,
    layer_type,
    shared_copy,
)
from qlab.analyses.sweep import check_schemes
from qlab.core.algorithms import needs_calibration
from qlab.core.errors import QlabError
from qlab.core.quant import QuantScheme
from qlab.models.evaluate import (
    Baseline,
    CancelCheck,
    EvalSpec,
    Progress,
    _check_cancel,
    _embedding_inputs,
    _lm_windows,
    compute_dtype,
    evaluate,
)
from qlab.models.loading import LoadedModel, quantizable_linears

# Tokens whose errors' costs are summed before squaring: a text (MiniLM reads at most 128) or a run of a window.
# Pairs of tokens further apart add mostly probe noise (attention weighs near tokens most): on SmolLM2 at 512
# tokens, runs of 128 ranked int4 blocks at Spearman 0.90/0.91 against whole windows' 0.85/0.90 (two probes),
# int8 blocks at 0.85/0.81 either way.
COUPLED_TOKENS = 128
# Prefix of the keys of ``calibrate``'s record (calibration_tokens...), which a calibrated scheme's records carry.
CALIBRATION = "calibration_"


@dataclass(frozen=True)
class QuickSensitivity:
    """Per (linear, scheme) quick scores of one model, as flat records.

    Each record: ``layer``, ``scheme`` (the scheme's label), ``score`` (the predicted metric increase from
    quantizing that layer alone; higher is more sensitive) and its parts, ``output_error`` (relative squared
    output error ``||X (W_q - W)^T||^2 / ||X W^T||^2``) times ``error_cost`` (metric increase per unit of it).
    """

    model: str
    kind: str
    metric: str
    schemes: tuple[QuantScheme, ...]
    records: list[dict]
    tokens: int
    seconds: dict[str, float] = field(default_factory=dict, compare=False)
    calibration: dict = field(default_factory=dict, compare=False)  # how GPTQ/AWQ calibrated (tokens...), or empty

    def top(self, n: int, scheme: QuantScheme | str | None = None) -> list[dict]:
        """The ``n`` most sensitive layers for ``scheme`` (a scheme or its label); without one, each layer once,
        ranked by its most damaging scheme."""
        if scheme is None:
            worst: dict[str, dict] = {}
            for record in self.records:
                kept = worst.get(record["layer"])
                if kept is None or record["score"] > kept["score"]:
                    worst[record["layer"]] = record
            chosen = list(worst.values())
        else:
            label = self._label(scheme)
            chosen = [r for r in self.records if r["scheme"] == label]
        return sorted(chosen, key=lambda r: r["score"], reverse=True)[:n]

    def block_scores(self, scheme: QuantScheme | str) -> dict[int, float]:
        """Summed score per block (block index -> score): the quick estimate of each block's measured delta."""
        label = self._label(scheme)
        totals: dict[int, float] = {}
        for record in self.records:
            if record["scheme"] == label and record["block"] is not None:
                totals[record["block"]] = totals.get(record["block"], 0.0) + record["score"]
        return dict(sorted(totals.items()))

    def to_records(self) -> list[dict]:
        """JSON-ready records, each carrying what ``from_records`` needs to rebuild this result; a calibrated
        scheme's records also carry how it was calibrated (``calibration_tokens``...), as the sweep's rows do, so
        a stored ranking says which tokens it was calibrated on."""
        settings = {s.label: s.to_dict() for s in self.schemes}
        calibrated = {s.label for s in self.schemes if needs_calibration(s)}
        return [{**r, "model": self.model, "model_kind": self.kind, "metric": self.metric, "tokens": self.tokens,
                 "scheme_settings": settings[r["scheme"]], **(self.calibration if r["scheme"] in calibrated else {})}
                for r in self.records]

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> QuickSensitivity:
        """Inverse of ``to_records`` (stored records, e.g. read back from a run database)."""
        if not records:
            raise QlabError("no quick sensitivity records to rebuild from; run the quick analysis first.")
        first = records[0]
        schemes = tuple(QuantScheme.from_dict(s) for s in
                        {r["scheme"]: r["scheme_settings"] for r in records}.values())
        shared = ("model", "model_kind", "metric", "tokens", "scheme_settings")
        rows = [{k: v for k, v in r.items() if k not in shared and not k.startswith(CALIBRATION)} for r in records]
        calibration = next(({k: v for k, v in r.items() if k.startswith(CALIBRATION)} for r in records
                            if any(k.startswith(CALIBRATION) for k in r)), {})
        return cls(first["model"], first["model_kind"], first["metric"], schemes, rows, int(first["tokens"]),
                   calibration=calibration)

    def _label(self, scheme: QuantScheme | str) -> str:
        label = scheme.label if isinstance(scheme, QuantScheme) else scheme
        if label not in {s.label for s in self.schemes}:
            raise QlabError(f"no quick sensitivity for '{label}'; analysed: "
                            f"{', '.join(s.label for s in self.schemes)}.")
        return label


@dataclass
class _Probe:
    """Per linear, what the backward pass adds up: the output error's energy and its token-coupled cost."""

    name: str
    weight: torch.Tensor
    schemes: Sequence[QuantScheme]
    rounder: _Rounder
    mask: list[torch.Tensor | None]  # shared slot: the current batch's real-token mask (None: all real)
    # float64 sums on the layer's device, read once by the records: a float() in every backward hook would stop a
    # GPU's queue at each linear.
    output_energy: torch.Tensor = field(init=False)
    error_energy: list[torch.Tensor] = field(default_factory=list)
    coupled: list[torch.Tensor] = field(default_factory=list)  # sum over token runs and channels of (sum g*e)^2
    reached: bool = False  # the metric's gradient arrived here (a BERT pooler's output never reaches it)
    finished: Callable[[], None] | None = None  # told after each batch's accumulation (progress)

    def __post_init__(self) -> None:
        device = self.weight.device
        self.output_energy = torch.zeros((), dtype=torch.float64, device=device)
        self.error_energy = [torch.zeros((), dtype=torch.float64, device=device) for _ in self.schemes]
        self.coupled = [torch.zeros((), dtype=torch.float64, device=device) for _ in self.schemes]

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if not output.requires_grad:
            return
        x, y, keep = args[0].detach(), output.detach(), self.mask[0]
        output.register_hook(lambda grad: self._accumulate(x, y, grad.detach(), keep))

    def _accumulate(self, x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor, keep: torch.Tensor | None) -> None:
        self.reached = True
        # Rows: (items, tokens) flattened, a text or a window per item; a 2-D output has one token per item.
        rows = grad.shape[:-1] if grad.dim() > 2 else (grad.shape[0], 1)
        x, y, grad = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), grad.reshape(-1, grad.shape[-1]).float()
        # Each item's tokens in runs of COUPLED_TOKENS, the unit the score sums g * e over.
        runs = -(-rows[1] // COUPLED_TOKENS)
        device = grad.device
        item_of = (torch.arange(rows[0], device=device).unsqueeze(1) * runs
                   + torch.arange(rows[1], device=device) // COUPLED_TOKENS).reshape(-1)
        if keep is not None and keep.shape == rows:
            # Padding rows carry no error (their gradient is zero) and are not the model's outputs: left out of
            # the products, which are most of this probe's cost.
            flat = keep.reshape(-1).to(device)
            x, y, grad, item_of = x[flat], y[flat], grad[flat], item_of[flat]
        self.output_energy += _energy(y.float())
        # Each run's sum over its tokens as one product with a 0/1 matrix: index_add_ on a CPU took a 1B model's
        # pass 40 ms per linear and format, about as long as the product of the error itself.
        runs_of_rows = torch.zeros(rows[0] * runs, item_of.numel(), device=device)
        runs_of_rows[item_of, torch.arange(item_of.numel(), device=device)] = 1.0
        native = _product_in_bf16(x, self.weight)
        weight = self.weight if native else self.weight.float()
        x = x if native else x.float()
        for index, scheme in enumerate(self.schemes):
            if _exact(scheme):
                continue
            # Rounded to nearest again per batch rather than kept: a rounded copy of every linear in every format
            # would be one more model per format, and one window is the usual budget. Other algorithms keep
            # their codes (the rounder's), computed once before the pass. In the weight's own dtype: the values a
            # sweep evaluates (a bf16 weight's int8 grid rounded to bf16 moves its error by a tenth).
            rounded = self.rounder.rounded(self.name, self.weight, scheme)
            rounded = rounded if native else rounded.float()
            error = (x @ rounded.sub_(weight).T).float()
            self.error_energy[index] += _energy(error)
            # Per run of tokens and channel, the sum of g * e: the token coupling the score keeps.
            self.coupled[index] += _energy(runs_of_rows @ error.mul_(grad))
        if self.finished:
            self.finished()


def _energy(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t).double().square()


def quick_sensitivity(loaded: LoadedModel, schemes: Sequence[QuantScheme], spec: EvalSpec,
                      baseline: Baseline | None = None, progress: Progress | None = None,
                      cancel: CancelCheck | None = None) -> QuickSensitivity:
    """Score every linear for every scheme from one forward and one backward pass over the spec's tokens, each
    linear rounded by its scheme's algorithm (GPTQ and AWQ with the statistics ``calibrate`` collects from the
    end of the text, as the sweep and the full analysis round it: one more pass of the model, no backward).

    ``baseline``: a baseline of ``spec`` already computed (a sweep's); only its inputs are read, so without one
    the text is only tokenized.
    ``progress(fraction, message)`` names the step that is running; ``cancel()`` returning True stops with
    ``Cancelled`` (nothing partial is returned: the pass is the whole cost).
    """
    schemes = tuple(dict.fromkeys(schemes))
    model = loaded.model
    check_schemes(loaded, list(schemes))  # sizes first: a bad group size costs no calibration pass
    if baseline is not None and baseline.kind != loaded.kind:
        raise QlabError(f"the baseline is for a {baseline.kind} model but {loaded.name} is a {loaded.kind}; "
                        "compute the baseline on this model.")
    _check_cancel(cancel)
    kept = [s for s in schemes if _Rounder.keeps(s) and not _exact(s)]
    phases = [*(["calibration"] if needs_calibration(schemes) else []), *(["rounding"] if kept else []), "pass"]

    def phase_progress(phase: str) -> Progress | None:
        # Each phase gets an equal share of the bar, in order; with rounding to nearest the pass is all of it.
        index = phases.index(phase)
        return None if progress is None else (
            lambda fraction, message: progress((index + fraction) / len(phases), message))

    seconds = {}
    started = time.perf_counter()
    calibration, calibration_record = calibrate(loaded, schemes, spec, phase_progress("calibration")
                                                if "calibration" in phases else None, cancel)
    _check_schemes(model, schemes, calibration)
    rounder = _Rounder(calibration)
    if calibration is not None:
        seconds["calibration_s"] = time.perf_counter() - started
    if baseline is None:
        baseline = _token_inputs(loaded, spec)
    total = sum(1 for _ in _batches(baseline, windows_per_batch=1))
    unit = "window" if baseline.kind == "causal-lm" else "batch of texts"

    # In the evaluations' dtype: a 1B model's pass in emulated bf16 on an AVX2-only CPU ran over 14 minutes.
    shadow = shared_copy(model, compute_dtype(model))
    modules = dict(shadow.named_modules())
    names = [name for name, _ in quantizable_linears(shadow)]
    if kept:  # GPTQ, AWQ, HQQ, 2:4: rounded once here, then read by every batch
        seconds["rounding_s"] = rounder.round_once({name: modules[name].weight.detach() for name in names}, kept,
                                                   phase_progress("rounding"), cancel)
    mask_slot: list[torch.Tensor | None] = [None]
    position = [0, 0]  # batches started, linears of the current batch scored (the backward pass goes by them)
    passing = phase_progress("pass")

    def report() -> None:
        if passing:
            batch, scored = position
            fraction = (batch - 1 + scored / len(names)) / total
            passing(fraction, f"quick sensitivity: {unit} {batch}/{total}")

    def batch_starts(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        mask_slot[0] = None if mask is None else mask.bool()
        position[:] = [position[0] + 1, 0]
        report()

    def scored() -> None:
        position[1] += 1
        report()

    probes = {name: _Probe(name, modules[name].weight.detach(), schemes, rounder, mask_slot, finished=scored)
              for name in names}

    # The decoder (an LM's base model) or the encoder itself: both receive the batch's attention mask, if any.
    handles = [shadow.base_model.register_forward_pre_hook(batch_starts, with_kwargs=True)]
    handles += [modules[name].register_forward_hook(probe) for name, probe in probes.items()]
    started = time.perf_counter()
    try:
        # Its own per-channel curvature hooks are not needed here (no names): only the pass and its item count.
        _, items = _output_curvature(shadow, baseline, (), cancel)
    finally:
        for handle in handles:
            handle.remove()
    seconds["pass_s"] = time.perf_counter() - started
    if progress:
        progress(1.0, "quick sensitivity: done")
    return QuickSensitivity(loaded.name, loaded.kind, METRIC[loaded.kind], schemes,
                            _records(shadow, probes, schemes, items), baseline.tokens, seconds, calibration_record)


def _token_inputs(loaded: LoadedModel, spec: EvalSpec) -> Baseline:
    """The spec's tokens, as a baseline holds them, without running the model: the pass draws its probe from the
    model's own outputs in its one forward, so a baseline's reference outputs would cost a forward unused."""
    if loaded.kind == "causal-lm":
        windows = _lm_windows(loaded, spec)
        return Baseline("causal-lm", {"windows": windows}, torch.empty(0, device="cpu"), {}, windows.numel())
    inputs = _embedding_inputs(loaded, spec)
    return Baseline("embedding", inputs, torch.empty(0, device="cpu"), {}, int(inputs["attention_mask"].sum()))


def evaluations_per_format(loaded: LoadedModel, schemes: Sequence[QuantScheme], spec: EvalSpec,
                           baseline: Baseline) -> float:
    """The quick analysis's cost in FP32 evaluations per format, counted, not timed: the matmul FLOPs of
    ``quick_sensitivity`` (its forward, its backward and every format's products; no baseline given) over those
    of one ``evaluate`` of the FP32 model on ``baseline``'s tokens, divided by the number of formats."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as evaluation:
        evaluate(loaded.model, baseline)
    with FlopCounterMode(display=False) as quick:
        quick_sensitivity(loaded, schemes, spec)
    return quick.get_total_flops() / evaluation.get_total_flops() / len(tuple(dict.fromkeys(schemes)))


def agreement(quick: QuickSensitivity, report: SensitivityReport) -> dict[str, float]:
    """Per scheme label, the Spearman rank correlation between the quick block scores and the block deltas the
    full analysis measured (forward view, ``unit="block"``): how well the quick ranking orders blocks."""
    if report.unit != "block" or report.view != "forward":
        raise QlabError("the quick ranking is checked against measured block deltas; run the full analysis with "
                        "unit block and the forward view.")
    result = {}
    for scheme in quick.schemes:
        measured = {r["block"]: r["delta"] for r in report.blocks
                    if r["label"] == scheme.label and r["block"] is not None}
        if len(measured) < 2:
            continue
        estimated = quick.block_scores(scheme)
        blocks = sorted(measured)
        result[scheme.label] = spearman([estimated.get(b, 0.0) for b in blocks], [measured[b] for b in blocks])
    return result


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two equally long sequences (ties ranked by position)."""
    ranks = [torch.tensor(v, dtype=torch.float64, device="cpu").argsort(stable=True).argsort().double()
             for v in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def _records(model: torch.nn.Module, probes: dict[str, _Probe], schemes: Sequence[QuantScheme], items: int
             ) -> list[dict]:
    try:
        block_of = block_stack(model).block_of
    except QlabError:  # no repeated blocks: the per-linear scores stand without a block
        def block_of(name: str) -> None:
            return None
    records = []
    for name, probe in probes.items():
        output_energy = float(probe.output_energy)
        for scheme, error_energy, coupled in zip(schemes, probe.error_energy, probe.coupled, strict=True):
            # Second order: metric increase = 1/2 e^T H e per metric item (token for LMs, text for embeddings).
            score = 0.5 * float(coupled) / max(1, items)
            output_error = float(error_energy) / output_energy if output_energy > 0 else 0.0
            records.append({
                "layer": name, "scheme": scheme.label, "format": scheme.format, "block": block_of(name),
                "layer_type": layer_type(name), "params": probe.weight.numel(), "score": score,
                "output_error": output_error if probe.reached else None,
                "sqnr_db": -10 * math.log10(output_error) if probe.reached and output_error > 0 else None,
                "error_cost": score / output_error if output_error > 0 else 0.0,
            })
    return records
