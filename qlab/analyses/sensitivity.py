"""Per-layer sensitivity: which linears and blocks lose the most when quantized, and why.

Two measures per scheme, both against the FP32 model on the baseline's own tokens:

1. **Per-linear error** (cheap). One FP32 pass captures every linear layer's real input activations with hooks;
   each linear's output error from quantizing that layer alone is ``X (W_q - W)^T`` on those inputs, reported
   as relative MSE and SQNR, with weight and activation statistics that explain it.
2. **Per-block end-to-end** change of the model's metric (KL divergence for LMs, 1 - cosine for embedding
   models) with one block (or one linear) quantized. The same pass caches every block's input hidden state,
   so a measurement replays only the rest of the network: blocks before the one measured are replaced by a
   pass-through and the measured block reads its cached input (AIMET's per-layer analysis re-runs the whole
   model N+1 times). The reverse view, everything quantized except one block, replays the same way from the
   all-quantized model's cached hidden states.

Each layer is rounded by its scheme's algorithm (``qlab.core.algorithms.quantize_weight``); GPTQ and AWQ round
with the statistics ``calibrate`` collects from the end of the text, exactly as the sweep does, so a block
measured here is the block the sweep evaluates.

Over 500 lines on purpose: the probe pass, the per-linear errors, the block replays and their records share
the captured activations and one report type; the quick ranking lives in sensitivity_quick.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from qlab.analyses.activations import calibration_data
from qlab.analyses.calibration import calibration_stats
from qlab.core.algorithms import LayerStats, needs_calibration, quantize_weight
from qlab.core.errors import QlabError
from qlab.core.plan import QuantizedLinear
from qlab.core.quant import QTensor, QuantScheme, fake_quantize
from qlab.models.evaluate import (
    LM_TOKENS_PER_FORWARD,
    Baseline,
    CancelCheck,
    EvalSpec,
    Progress,
    _check_cancel,
    compute_view,
    evaluate,
    input_device,
)
from qlab.models.loading import LoadedModel, quantizable_linears

# A channel whose absmax exceeds this multiple of the median channel's absmax counts as an outlier. Scale-free
# on purpose: LLM.int8 (Dettmers et al. 2022) uses |x| > 6 on activations, whose scale varies between models.
OUTLIER_RATIO = 6.0
# Metric each model kind is judged by, and the error it becomes (0 for the FP32 model, larger is worse).
METRIC = {"causal-lm": "kld_mean", "embedding": "cosine_mean"}
# Suffixes of linear module names and the role they play, first match wins (Llama/Mistral/Qwen, BERT, GPT).
LAYER_TYPES = (
    ("attention.output.dense", "o"), ("intermediate.dense", "up"), ("output.dense", "down"),
    ("q_proj", "q"), ("query", "q"), ("k_proj", "k"), ("key", "k"), ("v_proj", "v"), ("value", "v"),
    ("o_proj", "o"), ("out_proj", "o"), ("gate_proj", "gate"), ("up_proj", "up"),
    ("down_proj", "down"), ("fc1", "up"), ("fc2", "down"), ("c_attn", "qkv"), ("c_proj", "o"),
)
VIEWS = ("forward", "reverse")
UNITS = ("block", "linear")


def error_of(metric: str, value: float) -> float:
    """The metric as an error that is 0 for the FP32 model and grows with damage (KLD as is, 1 - cosine)."""
    return 1.0 - value if metric == "cosine_mean" else value


def layer_type(name: str) -> str:
    """The role of a linear layer from its module name: q, k, v, o, gate, up, down, or other."""
    for suffix, kind in LAYER_TYPES:
        if name.endswith(suffix):
            return kind
    return "other"


@dataclass(frozen=True)
class BlockStack:
    """The repeated blocks of a model (decoder or encoder layers) and which linears each one holds."""

    path: str  # e.g. "model.layers" (Llama) or "encoder.layer" (BERT)
    linears: tuple[tuple[str, ...], ...]  # per block, the quantizable linear names inside it
    outside: tuple[str, ...]  # quantizable linears in no block (a pooler, an untied head)

    def block_of(self, name: str) -> int | None:
        prefix = self.path + "."
        if not name.startswith(prefix):
            return None
        return int(name[len(prefix):].split(".", 1)[0])


def block_stack(model: torch.nn.Module) -> BlockStack:
    """Find the ModuleList holding the most quantizable linears: the model's stack of blocks."""
    names = [name for name, _ in quantizable_linears(model)]
    best_path, best_count = None, 0
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList):
            count = sum(name.startswith(path + ".") for name in names)
            if count > best_count:
                best_path, best_count = path, count
    if best_path is None:
        raise QlabError("this model has no stack of repeated blocks holding linear layers, so block "
                        "sensitivity does not apply; use the per-linear measures only (blocks=False).")
    size = len(model.get_submodule(best_path))
    per_block: list[list[str]] = [[] for _ in range(size)]
    outside = []
    stack = BlockStack(best_path, (), ())
    for name in names:
        block = stack.block_of(name)
        (outside if block is None else per_block[block]).append(name)
    return BlockStack(best_path, tuple(tuple(b) for b in per_block), tuple(outside))


def shared_copy(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A structural copy of ``model`` whose parameters and buffers are the base's own tensors, computing in
    ``dtype`` when given (``compute_view``: 16-bit weights on a CPU without native 16-bit math compute in fp32, as
    every evaluation does, not in emulated bf16, several times slower).

    Modules of the copy can be swapped freely (replays, quantized layers) without touching the cached base.
    """
    if dtype is not None and (view := compute_view(model, dtype)) is not model:
        return view  # already a structural copy sharing the weights: no second one
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class _PassThrough(torch.nn.Module):
    """Stands in for a block before the one measured: hands its input on, computing nothing."""

    def __init__(self, returns_tuple: bool) -> None:
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return (hidden_states,) if self.returns_tuple else hidden_states


@dataclass(frozen=True)
class _Capture:
    """Block inputs of one pass, all batches concatenated in order (rows = windows or texts)."""

    inputs: list[torch.Tensor]
    returns_tuple: bool


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class _Replay:
    """A forward pre-hook that swaps a block's input for the cached one, batch by batch in row order."""

    def __init__(self, cached: torch.Tensor) -> None:
        self.cached = cached
        self.cursor = 0

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        hidden = _hidden_arg(args, kwargs)
        rows = hidden.shape[0]
        replacement = self.cached[self.cursor: self.cursor + rows]
        if replacement.shape != hidden.shape:
            raise RuntimeError(f"cached block input {tuple(replacement.shape)} does not match the replayed batch "
                               f"{tuple(hidden.shape)}; the evaluation inputs changed since the capture")
        self.cursor += rows
        if args:
            return (replacement, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": replacement}


@contextmanager
def _swapped(model: torch.nn.Module, replacements: dict[str, torch.nn.Module]) -> Iterator[None]:
    """Put modules into the (shared-copy) model for the duration, then put the originals back."""
    originals = {name: model.get_submodule(name) for name in replacements}
    try:
        for name, module in replacements.items():
            model.set_submodule(name, module)
        yield
    finally:
        for name, module in originals.items():
            model.set_submodule(name, module)


def _batches(baseline: Baseline, windows_per_batch: int | None = None, device: torch.device | None = None
             ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
    """The baseline's inputs in forward-sized batches, with the mask of real (non-padding) tokens if any, on
    ``device`` (a forward's: the model's ``input_device``; None leaves them where the baseline keeps them)."""
    if baseline.kind == "causal-lm":
        windows = baseline.inputs["windows"]
        per_forward = windows_per_batch or max(1, LM_TOKENS_PER_FORWARD // windows.shape[1])
        for start in range(0, windows.shape[0], per_forward):
            batch = windows[start: start + per_forward].to(device)
            yield {"input_ids": batch}, None  # every position of a window is a real token
        return
    from qlab.models.evaluate import EMBED_BATCH

    total = baseline.inputs["input_ids"].shape[0]
    for start in range(0, total, EMBED_BATCH):
        part = {k: v[start: start + EMBED_BATCH].to(device) for k, v in baseline.inputs.items()}
        yield part, part["attention_mask"].bool()


def _forward(model: torch.nn.Module, baseline: Baseline, batch: dict[str, torch.Tensor]) -> None:
    """Run the part of the model the metric depends on (an LM's decoder without its vocabulary head)."""
    with torch.inference_mode():
        if baseline.kind == "causal-lm":
            model.base_model(**batch)
        else:
            model(**batch)


def _product_in_bf16(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a layer's output error ``x (W_q - W)^T`` is computed in bf16: a bf16 model's, as its own matmuls
    run (accumulated in FP32 by the matmul). Each output error then carries a relative error of a few
    thousandths, and the sums of squares over hundreds of tokens far less, against 4x the time in FP32 on a CPU
    with bf16 instructions. Every sum of squares is taken in FP32 (a bf16 sum of 512 products keeps 3 digits)."""
    return x.dtype == weight.dtype == torch.bfloat16


def _exact(scheme: QuantScheme) -> bool:
    """The fp32 cast is the identity on FP32 weights: nothing to measure (unless it prunes)."""
    return not scheme.fmt.scaled and scheme.fmt.bits >= 32 and scheme.sparsity == "none"


class _Rounder:
    """Each linear's weight rounded by a scheme's algorithm, with that layer's calibration statistics.

    Round to nearest is redone whenever asked: it is cheap, and keeping every layer's rounding for every scheme
    would hold a copy of the model per scheme. Any other algorithm costs one to two orders of magnitude more
    (GPTQ walks the inputs one by one), and the probe pass and the replays ask for the same layer several
    times, so its QTensor (one byte per weight) is kept.
    """

    def __init__(self, calibration: Mapping[str, LayerStats] | None) -> None:
        self.calibration = calibration or {}
        self.kept: dict[tuple[str, QuantScheme], QTensor] = {}

    def __call__(self, name: str, weight: torch.Tensor, scheme: QuantScheme) -> QTensor:
        key = (name, scheme)
        if key in self.kept:
            return self.kept[key]
        qtensor = quantize_weight(weight, scheme, self.calibration.get(name))
        if self.keeps(scheme):
            self.kept[key] = qtensor
        return qtensor

    def round_once(self, weights: Mapping[str, torch.Tensor], schemes: Sequence[QuantScheme],
                   progress: Progress | None = None, cancel: CancelCheck | None = None) -> float:
        """Round every named weight in each of ``schemes`` (ones this rounder ``keeps``) and keep it, scheme by
        scheme, with progress and Cancel, so the passes that read them pay the algorithms once; its seconds."""
        started = time.perf_counter()
        for index, (scheme, name) in enumerate(itertools.product(schemes, weights)):
            _check_cancel(cancel)
            if progress:
                progress(index / (len(schemes) * len(weights)), f"{scheme.label}: rounding {name}")
            self(name, weights[name], scheme)
        return time.perf_counter() - started

    def rounded(self, name: str, weight: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
        """``weight`` as ``scheme`` rounds it, in the weight's dtype (the values a sweep evaluates): the kept codes
        dequantized, or rounded to nearest through ``fake_quantize`` (the same bits, through the compiled kernels
        on a CPU: about 30x ``quantize``'s route there). A new tensor the caller may write into."""
        if self.keeps(scheme):
            return self(name, weight, scheme).dequantize(weight.dtype)
        return fake_quantize(weight, scheme, weight.dtype)

    @staticmethod
    def keeps(scheme: QuantScheme) -> bool:
        """Whether this scheme's rounding is kept rather than redone (anything but plain round to nearest)."""
        return scheme.algorithm != "rtn" or scheme.sparsity != "none"


@dataclass
class _LinearProbe:
    """Accumulates, over captured batches, one linear's output error for each scheme and its input stats.

    Every pass over a weight or an activation costs about as much as the layer itself, so each statistic is one
    fused reduction (``vector_norm``) rather than square-then-sum temporaries.
    """

    name: str
    weight: torch.Tensor
    schemes: Sequence[QuantScheme]
    mask: list[torch.Tensor | None]  # one shared slot: the current batch's real-token mask, set by the pass
    rounder: _Rounder
    tokens: int = 0
    # Sums stay float64 tensors on the layer's device until the records read them: a float() per layer and batch
    # would stop a GPU's queue at every linear of the pass.
    output_energy: torch.Tensor = field(init=False)
    error_channels: list[torch.Tensor] = field(default_factory=list)  # per scheme: squared output error per channel
    weight_error: list[torch.Tensor] = field(default_factory=list)  # relative MSE of the weights themselves
    input_absmax: torch.Tensor | None = None
    weight_energy: float = field(init=False)

    def __post_init__(self) -> None:
        device = self.weight.device
        self.output_energy = torch.zeros((), dtype=torch.float64, device=device)
        self.error_channels = [torch.zeros(self.weight.shape[0], dtype=torch.float64, device=device)
                               for _ in self.schemes]
        self.weight_energy = max(float(torch.linalg.vector_norm(self.weight, dtype=torch.float32)) ** 2, 1e-30)

    def __call__(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = args[0].reshape(-1, self.weight.shape[1])
        y = output.reshape(-1, self.weight.shape[0])
        keep = self.mask[0]
        if keep is not None and keep.numel() == x.shape[0]:  # a pooler sees one token per text: nothing to mask
            keep = keep.reshape(-1).to(x.device)  # a model spread over GPUs runs this layer on its own one
            x, y = x[keep], y[keep]
        x = x if _product_in_bf16(x, self.weight) else x.float()
        self.tokens += x.shape[0]
        self.output_energy += torch.linalg.vector_norm(y.float()).double().square()
        absmax = torch.maximum(x.amax(dim=0), x.amin(dim=0).neg_()).float()  # no |x| temporary
        self.input_absmax = absmax if self.input_absmax is None else torch.maximum(self.input_absmax, absmax)
        first = not self.weight_error
        for index, scheme in enumerate(self.schemes):
            if _exact(scheme):
                if first:
                    self.weight_error.append(torch.zeros((), dtype=torch.float64, device=self.weight.device))
                continue
            # Rounding is recomputed per batch rather than kept for all layers at once: ΔW of every layer in
            # every format would hold a second FP32 model per format, and an LM budget is usually one batch.
            delta = self._delta(scheme)
            if first:
                self.weight_error.append(torch.linalg.vector_norm(delta).double().square() / self.weight_energy)
            error = (x @ delta.to(x.dtype).T).float()
            self.error_channels[index] += torch.linalg.vector_norm(error, dim=0).double().square()

    def _delta(self, scheme: QuantScheme) -> torch.Tensor:
        # In fp32 whatever the weights are stored in: a bf16 difference would round the error it measures.
        return self.rounder.rounded(self.name, self.weight, scheme).float().sub_(self.weight)

    def weight_errors(self) -> list[float]:
        """Relative MSE of the quantized weights per scheme (computed here if the pass never ran the layer)."""
        if self.weight_error:
            return [float(error) for error in self.weight_error]
        return [
            0.0 if _exact(s) else float(torch.linalg.vector_norm(self._delta(s))) ** 2 / self.weight_energy
            for s in self.schemes]


def weight_stats(weight: torch.Tensor) -> dict[str, float]:
    """Statistics that explain a weight's quantization error: absmax/std, excess kurtosis, outlier rows."""
    w = weight.detach().float()
    std, mean = torch.std_mean(w)
    std = std.clamp(min=1e-30)
    row_absmax = torch.linalg.vector_norm(w, ord=math.inf, dim=1)
    fourth_moment = (w - mean).div_(std).square_().square_().mean()
    return {
        "weight_absmax_over_std": float(row_absmax.max() / std),
        "weight_kurtosis": float(fourth_moment - 3.0),
        "weight_outlier_rows": int((row_absmax > OUTLIER_RATIO * row_absmax.median()).sum()),
    }


@dataclass(frozen=True)
class SensitivityReport:
    """Per-linear and per-block sensitivity of one model for several schemes, as flat records.

    ``linears``: one record per (linear, scheme) with the output error and the statistics behind it.
    ``blocks``: one record per (unit, scheme) with the end-to-end metric and its ``delta`` (error added by
    quantizing the unit; in the reverse view, error removed by keeping the unit in FP32).
    """

    model: str
    kind: str
    metric: str
    schemes: tuple[QuantScheme, ...]
    linears: list[dict]
    blocks: list[dict]
    seconds: dict[str, float]
    tokens: int
    view: str = "forward"
    unit: str = "block"
    calibration: dict = field(default_factory=dict)  # how GPTQ/AWQ were calibrated (tokens...), empty for none

    def rows(self) -> list[dict]:
        """One row per linear and scheme with its end-to-end measures.

        ``block_delta`` (or ``linear_delta`` with ``unit="linear"``) is the measured delta of the unit the layer
        was measured in (a linear outside the block stack is its own unit). ``estimated_delta`` shares that
        measurement among the unit's linears by their ``predicted_delta`` (by squared weight error without
        it), so each unit's total stays what was measured: the per-layer error the recommender minimises.
        Without end-to-end measurements it is ``predicted_delta`` itself.
        """
        linears = {(r["layer"], r["label"]): r for r in self.linears}
        column = "linear_delta" if self.unit == "linear" else "block_delta"
        measured: dict[tuple[str, str], dict] = {}
        for unit in self.blocks:
            members = [linears[(name, unit["label"])] for name in unit["layers"]]
            weights = [m.get("predicted_delta", m["params"] * m["weight_relative_mse"]) for m in members]
            total = sum(weights)
            delta = max(0.0, unit["delta"])  # below zero is noise (the metric improved): no damage predicted
            for member, weight in zip(members, weights, strict=True):
                share = weight / total if total > 0 else 1 / len(members)
                measured[(member["layer"], unit["label"])] = {column: unit["delta"], "estimated_delta": delta * share}
        rows = []
        for row in self.linears:
            # Without end-to-end measurements (blocks=False) the second-order prediction is the estimate.
            unmeasured = {column: None, "estimated_delta": None if self.blocks else row.get("predicted_delta")}
            rows.append({**row, "metric": self.metric, **measured.get((row["layer"], row["label"]), unmeasured)})
        return rows


def _check_schemes(model: torch.nn.Module, schemes: Sequence[QuantScheme],
                   calibration: Mapping[str, LayerStats] | None = None) -> None:
    """Every check that can fail before any work: each layer is rounded by its scheme's algorithm, so GPTQ and
    AWQ need ``calibration`` for every linear."""
    if not schemes:
        raise QlabError("no schemes to analyse; pick at least one format.")
    linears = quantizable_linears(model)
    calibrated = [s.label for s in schemes if needs_calibration(s)]
    missing = [name for name, _ in linears if name not in (calibration or {})]
    if calibrated and missing:
        raise QlabError(f"{calibrated[0]} rounds each layer with its calibration statistics, and none were given "
                        f"for '{missing[0]}'; collect them with qlab.analyses.sensitivity.calibrate first.")
    for _, module in linears:
        for scheme in schemes:
            scheme.storage_bytes(tuple(module.weight.shape))  # raises a one-line error on a bad group size


def _capture(shadow: torch.nn.Module, stack: BlockStack, baseline: Baseline, probes: dict[str, _LinearProbe],
             mask_slot: list, cancel: CancelCheck | None) -> _Capture:
    """One pass over the baseline's inputs that records every block's input and feeds the linear probes."""
    blocks = shadow.get_submodule(stack.path)
    inputs: list[list[torch.Tensor]] = [[] for _ in blocks]
    returns_tuple = [False]
    handles = []
    for index, block in enumerate(blocks):
        def record(module, args, kwargs, index=index):
            inputs[index].append(_hidden_arg(args, kwargs).detach())
        handles.append(block.register_forward_pre_hook(record, with_kwargs=True))
    handles.append(blocks[0].register_forward_hook(
        lambda module, args, output: returns_tuple.__setitem__(0, isinstance(output, tuple))))
    modules = dict(shadow.named_modules())
    handles += [modules[name].register_forward_hook(probe) for name, probe in probes.items()]
    try:
        for batch, mask in _batches(baseline, device=input_device(shadow)):
            _check_cancel(cancel)
            mask_slot[0] = mask
            _forward(shadow, baseline, batch)
    finally:
        for handle in handles:
            handle.remove()
    return _Capture([torch.cat(parts) for parts in inputs], returns_tuple[0])


def _output_curvature(shadow: torch.nn.Module, baseline: Baseline, names: Sequence[str],
                      cancel: CancelCheck | None, seed: int = 0) -> tuple[dict[str, torch.Tensor], int]:
    """Per linear, the mean over tokens of the metric's curvature along each output channel (a diagonal
    Gauss-Newton / Fisher estimate), and the number of items the metric averages over.

    One backward pass of a pseudo-loss whose gradient at the model output has the metric's Hessian as its
    covariance: for an LM, log q(y) with y drawn from the FP32 next-token distribution (covariance
    diag(p) - pp^T, the Hessian of KL at q = p); for embeddings, a random direction orthogonal to each
    embedding scaled by 1/|pooled| (the Hessian of 1 - cosine). Squared gradients at a linear's output then
    estimate how much a unit of squared error there costs at the output, to second order.
    """
    # An embedding's directions are drawn on the CPU whatever the model runs on, then moved: the probe a seed gives
    # stays the CPU run's. An LM's tokens are drawn on the logits' device: with the CPU's generator they had to
    # come to the CPU, and on a lent H100 a 1B model's 2048 x 128,256 probabilities took a 1 GB copy and a
    # weighted draw over every entry on one core, 9.2 of the quick pass's 10.5 s.
    generator = torch.Generator(device="cpu").manual_seed(seed)
    generators = {generator.device: generator}
    modules = dict(shadow.named_modules())
    sums = {name: torch.zeros(modules[name].out_features, dtype=torch.float64, device=modules[name].weight.device)
            for name in names}
    counts = dict.fromkeys(names, 0)
    mask_slot: list[torch.Tensor | None] = [None]

    def watch(name: str):
        def hook(module, args, output):
            if output.requires_grad:
                mask = mask_slot[0]

                def accumulate(grad: torch.Tensor) -> None:
                    flat = grad.reshape(-1, grad.shape[-1])
                    if mask is not None and mask.numel() == flat.shape[0]:
                        flat = flat[mask.reshape(-1).to(flat.device)]
                    sums[name] += flat.double().square().sum(dim=0)
                    counts[name] += flat.shape[0]
                output.register_hook(accumulate)
        return hook

    embedding = shadow.get_input_embeddings()
    handles = [embedding.register_forward_hook(lambda module, args, output: output.detach().requires_grad_())]
    handles += [modules[name].register_forward_hook(watch(name)) for name in names]
    items = 0
    try:
        with torch.enable_grad():
            # One window per pass: bounded autograd memory.
            for batch, mask in _batches(baseline, windows_per_batch=1, device=input_device(shadow)):
                _check_cancel(cancel)
                mask_slot[0] = mask
                if baseline.kind == "causal-lm":
                    hidden = shadow.base_model(**batch, use_cache=False).last_hidden_state
                    log_q = torch.log_softmax(shadow.get_output_embeddings()(hidden).float(), dim=-1)
                    log_q = log_q.reshape(-1, log_q.shape[-1])
                    probabilities = log_q.detach().exp()
                    if probabilities.device not in generators:  # a GPU's own generator, of the same seed
                        generators[probabilities.device] = torch.Generator(device=probabilities.device).manual_seed(seed)
                    sampled = torch.multinomial(probabilities, 1, generator=generators[probabilities.device])
                    pseudo_loss = log_q.gather(1, sampled).sum()
                    items += log_q.shape[0]
                else:
                    hidden = shadow(**batch).last_hidden_state
                    weights = mask.unsqueeze(-1).to(hidden.device, hidden.dtype)
                    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
                    with torch.no_grad():
                        norm = pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)
                        unit = pooled / norm
                        z = torch.randn(pooled.shape, generator=generator, device="cpu").to(pooled.device)
                        direction = (z - (z * unit).sum(dim=-1, keepdim=True) * unit) / norm
                    pseudo_loss = (direction * pooled).sum()
                    items += pooled.shape[0]
                pseudo_loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / max(1, counts[name]) for name in names}, items


def _replay(shadow: torch.nn.Module, stack: BlockStack, capture: _Capture | None, start: int | None,
            replacements: dict[str, torch.nn.Module], baseline: Baseline, cancel: CancelCheck | None
            ) -> dict[str, float]:
    """Metrics of the shadow with ``replacements`` swapped in, running only from block ``start`` on.

    ``start=None`` runs the whole model (a unit outside the block stack).
    """
    swaps = dict(replacements)
    if start is not None and capture is not None:
        swaps.update({f"{stack.path}.{index}": _PassThrough(capture.returns_tuple) for index in range(start)})
    with _swapped(shadow, swaps):
        handle = None
        if start is not None and capture is not None:
            block = shadow.get_submodule(f"{stack.path}.{start}")
            handle = block.register_forward_pre_hook(_Replay(capture.inputs[start]), with_kwargs=True)
        try:
            return evaluate(shadow, baseline, cancel=cancel)
        finally:
            if handle is not None:
                handle.remove()


def _quantized(modules: dict[str, torch.nn.Module], names: Sequence[str], scheme: QuantScheme, rounder: _Rounder
               ) -> dict[str, torch.nn.Module]:
    return {name: QuantizedLinear(rounder(name, modules[name].weight, scheme), modules[name].bias) for name in names}


class _RoundedLinear(torch.nn.Module):
    """A linear whose weight is already rounded, in the weight's own dtype (the values a sweep evaluates)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape  # an untied head's are read by the evaluation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


def _unit_rounded(modules: dict[str, torch.nn.Module], names: Sequence[str], scheme: QuantScheme, rounder: _Rounder
                  ) -> dict[str, torch.nn.Module]:
    """One unit's linears for a replay. Rounded to nearest as the rounder rounds it, materialised in the weight's
    dtype for the one unit (a 1B model's replays rounded 0.97 B weights per format in about 10 s through
    ``quantize``); other algorithms' kept codes stay codes."""
    if rounder.keeps(scheme):
        return _quantized(modules, names, scheme, rounder)
    return {name: _RoundedLinear(rounder.rounded(name, modules[name].weight.detach(), scheme), modules[name].bias)
            for name in names}


def check_calibration(loaded: LoadedModel, schemes: Sequence[QuantScheme], spec: EvalSpec) -> None:
    """Refuse, before any work, a text too short to calibrate the schemes' algorithms on: a Hessian from n
    tokens has rank at most n, so a layer with more inputs than calibration tokens would be rounded by GPTQ's
    damping (or AWQ's search) along directions the text never reached."""
    calibrated = [s for s in schemes if needs_calibration(s)]
    if not calibrated:
        return
    widest = max(module.in_features for _, module in quantizable_linears(loaded.model))
    tokens = calibration_data(loaded, spec).tokens
    if tokens < widest:
        raise QlabError(f"{calibrated[0].label} calibrates on the end of the text, which gives {tokens} tokens, "
                        f"fewer than the {widest} inputs of {loaded.name}'s widest layer; give a text of at least "
                        f"{widest} tokens or use algorithm rtn or hqq.")


def calibrate(loaded: LoadedModel, schemes: Sequence[QuantScheme], spec: EvalSpec,
              progress: Progress | None = None, cancel: CancelCheck | None = None
              ) -> tuple[dict[str, LayerStats] | None, dict]:
    """The per-layer statistics the schemes' algorithms round with (None when every scheme rounds without
    them) and the record of how they were calibrated, to store with the run as the sweep stores it."""
    if not any(needs_calibration(s) for s in schemes):
        return None, {}
    check_calibration(loaded, schemes, spec)
    return calibration_stats(loaded, spec, progress, cancel)


def analyze(loaded: LoadedModel, schemes: Sequence[QuantScheme], baseline: Baseline, *, blocks: bool = True,
            unit: str = "block", view: str = "forward", predict: bool = True, progress: Progress | None = None,
            cancel: CancelCheck | None = None, on_records: Callable[[str, list[dict]], None] | None = None,
            calibration: Mapping[str, LayerStats] | None = None, calibration_record: dict | None = None
            ) -> SensitivityReport:
    """Per-linear output error for every scheme and, with ``blocks``, the end-to-end delta per unit.

    Args:
        unit: ``"block"`` quantizes one block at a time; ``"linear"`` one linear at a time (one replay per
            linear: about as many replays as the model has linears, so several times slower).
        view: ``"forward"`` quantizes only the unit; ``"reverse"`` quantizes everything except the unit.
        predict: also estimate each linear's own end-to-end delta from its output error and the metric's
            curvature there (one backward pass; ``predicted_delta``), which the recommender uses.
        progress: ``progress(fraction, message)``; ``cancel()`` returning True stops with ``Cancelled``.
        on_records: ``on_records(part, records)`` as records finish: ``"linear"`` once with every per-linear
            record, then ``"block"`` with each unit's record as soon as it is measured (so a caller can store
            them and a killed analysis keeps what it finished).
        calibration: each linear's statistics (``calibrate``), needed when a scheme's algorithm rounds with
            them (GPTQ, AWQ, SparseGPT); ``calibration_record`` is ``calibrate``'s record of them, kept in the report.
    """
    if unit not in UNITS:
        raise QlabError(f"unknown unit '{unit}'; use one of {', '.join(UNITS)}.")
    if view not in VIEWS:
        raise QlabError(f"unknown view '{view}'; use one of {', '.join(VIEWS)}.")
    if baseline.kind != loaded.kind:
        raise QlabError(f"the baseline is for a {baseline.kind} model but {loaded.name} is a {loaded.kind}; "
                        "compute the baseline on this model.")
    schemes = tuple(dict.fromkeys(schemes))
    model = loaded.model
    _check_schemes(model, schemes, calibration)
    metric = METRIC[loaded.kind]
    stack = block_stack(model)
    modules = dict(model.named_modules())
    linear_names = [name for name, _ in quantizable_linears(model)]
    units = _units(stack, unit) if blocks else []
    replays_per_scheme = len(units) + (1 if view == "reverse" else 0)
    kept = [s for s in schemes if _Rounder.keeps(s)]
    total = (1 + predict + bool(kept) + len(schemes) * replays_per_scheme
             + (len(schemes) if blocks and view == "reverse" else 0))
    done = [0]

    def step(message: str) -> None:
        done[0] += 1
        if progress:
            progress(min(1.0, done[0] / total), message)

    _check_cache_fits(model, stack, baseline)
    shadow = shared_copy(model, baseline.compute_dtype)
    mask_slot: list = [None]
    rounder = _Rounder(calibration)
    probes = {name: _LinearProbe(name, modules[name].weight.detach(), schemes, mask_slot, rounder)
              for name in linear_names}
    seconds = {}
    if kept:  # GPTQ, AWQ, HQQ, 2:4: rounded once here, then reused by every pass
        rounding = None if progress is None else (
            lambda fraction, message: progress((done[0] + fraction) / total, message))
        seconds["rounding_s"] = rounder.round_once({name: modules[name].weight.detach() for name in linear_names},
                                                   kept, rounding, cancel)
        step("rounded every layer")
    started = time.perf_counter()
    capture = _capture(shadow, stack, baseline, probes, mask_slot, cancel)
    seconds["capture_and_linear_error_s"] = time.perf_counter() - started
    step("captured activations and block inputs")
    curvature, items = None, 0
    if predict:
        started = time.perf_counter()
        curvature, items = _output_curvature(shadow, baseline, linear_names, cancel)
        seconds["curvature_s"] = time.perf_counter() - started
        step("estimated output curvature")
    started = time.perf_counter()
    linear_records = _linear_records(loaded, stack, probes, schemes, curvature, items)
    seconds["capture_and_linear_error_s"] += time.perf_counter() - started
    finished = on_records or (lambda part, records: None)
    finished("linear", linear_records)

    block_records: list[dict] = []
    started = time.perf_counter()
    for scheme in schemes if blocks else ():
        if view == "forward":
            block_records += _forward_view(shadow, stack, capture, units, modules, scheme, rounder, baseline,
                                           metric, loaded.name, step, cancel, finished)
        else:
            block_records += _reverse_view(shadow, stack, units, modules, linear_names, scheme, rounder, baseline,
                                           metric, loaded.name, step, cancel, finished)
    seconds["blocks_s"] = time.perf_counter() - started
    return SensitivityReport(loaded.name, loaded.kind, metric, schemes, linear_records, block_records, seconds,
                             baseline.tokens, view, unit, dict(calibration_record or {}))


def _check_cache_fits(model: torch.nn.Module, stack: BlockStack, baseline: Baseline) -> None:
    """Refuse before any work when every block's cached input would not fit in half the free memory of the device
    the blocks run on (RAM, or the GPU the inputs go to)."""
    import psutil

    positions = (baseline.inputs["windows"] if baseline.kind == "causal-lm" else baseline.inputs["input_ids"]).numel()
    width = model.get_input_embeddings().embedding_dim
    needed = len(stack.linears) * positions * width * 4  # FP32 hidden states, one per block
    device = input_device(model)
    if device.type == "cuda":  # the cache stays beside the blocks, on the GPU
        available, where = torch.cuda.mem_get_info(device)[0], "GPU memory"
    else:
        available, where = psutil.virtual_memory().available, "RAM"
    if needed > available / 2:
        raise QlabError(f"caching every block's input for {positions} tokens needs {needed / 1e9:.1f} GB, more than "
                        f"half the {available / 1e9:.1f} GB of free {where}; lower the token budget.")


def replayed_shares(model: torch.nn.Module, unit: str) -> list[float]:
    """For each unit ``analyze`` measures end to end per scheme (``unit``: "block" or "linear"), the share of the
    block stack's linear weights its replay runs through: from its own block on, or all of them for a unit outside
    the stack, which runs the whole model."""
    stack = block_stack(model)
    sizes = {name: module.weight.numel() for name, module in quantizable_linears(model)}
    per_block = [sum(sizes[name] for name in names) for names in stack.linears]
    total = sum(per_block) or 1
    return [1.0 if start is None else sum(per_block[start:]) / total for start, _, _ in _units(stack, unit)]


def _units(stack: BlockStack, unit: str) -> list[tuple[int | None, str, tuple[str, ...]]]:
    """(start block, label, linear names) of each unit measured end to end."""
    if unit == "block":
        units = [(index, f"{stack.path}.{index}", names) for index, names in enumerate(stack.linears) if names]
    else:
        units = [(index, name, (name,)) for index, names in enumerate(stack.linears) for name in names]
    # Linears outside the stack (a pooler, an untied head) run through the whole model: no block to start at.
    return units + [(None, name, (name,)) for name in stack.outside]


def _block_record(model_name: str, label: str, names: Sequence[str], start: int | None, unit_kind: str,
                  scheme: QuantScheme, metrics: dict[str, float], metric: str, delta: float, view: str,
                  seconds: float) -> dict:
    return {"model": model_name, "unit": unit_kind, "name": label, "block": start, "layers": list(names),
            "view": view, "format": scheme.format, "label": scheme.label, "metric": metric,
            "value": metrics[metric], "delta": delta, **{f"metric_{k}": v for k, v in metrics.items()},
            "seconds": round(seconds, 3)}


def _forward_view(shadow, stack, capture, units, modules, scheme, rounder, baseline, metric, model_name, step,
                  cancel, finished) -> list[dict]:
    records = []
    for start, label, names in units:
        started = time.perf_counter()
        metrics = _replay(shadow, stack, capture, start, _unit_rounded(modules, names, scheme, rounder), baseline,
                          cancel)
        unit_kind = "linear" if len(names) == 1 and label == names[0] else "block"
        records.append(_block_record(model_name, label, names, start, unit_kind, scheme, metrics, metric,
                                     error_of(metric, metrics[metric]), "forward", time.perf_counter() - started))
        finished("block", records[-1:])
        step(f"{scheme.label}: {label}")
    return records


def _reverse_view(shadow, stack, units, modules, linear_names, scheme, rounder, baseline, metric, model_name,
                  step, cancel, finished) -> list[dict]:
    """Everything at ``scheme`` except one unit: how much error keeping that unit in FP32 removes."""
    everything = _quantized(modules, linear_names, scheme, rounder)
    own = {name: shadow.get_submodule(name) for name in linear_names}  # the shadow's, computing as it does
    records = []
    with _swapped(shadow, everything):
        all_quantized = error_of(metric, evaluate(shadow, baseline, cancel=cancel)[metric])
        step(f"{scheme.label}: everything quantized")
        # The all-quantized model's own block inputs: the prefix every reverse measurement shares.
        capture = _capture(shadow, stack, baseline, {}, [None], cancel)
        step(f"{scheme.label}: captured quantized block inputs")
        for start, label, names in units:
            started = time.perf_counter()
            metrics = _replay(shadow, stack, capture, start, {name: own[name] for name in names}, baseline, cancel)
            unit_kind = "linear" if len(names) == 1 and label == names[0] else "block"
            records.append(_block_record(model_name, label, names, start, unit_kind, scheme, metrics, metric,
                                         all_quantized - error_of(metric, metrics[metric]), "reverse",
                                         time.perf_counter() - started))
            finished("block", records[-1:])
            step(f"{scheme.label}: all but {label}")
    return records


def _linear_records(loaded: LoadedModel, stack: BlockStack, probes: dict[str, _LinearProbe],
                    schemes: Sequence[QuantScheme], curvature: dict[str, torch.Tensor] | None, items: int
                    ) -> list[dict]:
    records = []
    for name, probe in probes.items():
        weight = probe.weight
        stats = weight_stats(weight)
        absmax = (probe.input_absmax if probe.input_absmax is not None
                  else torch.zeros(weight.shape[1], device=weight.device))
        activation = {"input_absmax": float(absmax.max()),
                      "input_outlier_channels": int((absmax > OUTLIER_RATIO * absmax.median()).sum())}
        shape = tuple(weight.shape)
        output_energy = float(probe.output_energy)
        for scheme, channels, weight_mse in zip(schemes, probe.error_channels, probe.weight_errors(), strict=True):
            error_energy = float(channels.sum())
            relative = error_energy / output_energy if output_energy > 0 else 0.0
            record = {
                "model": loaded.name, "layer": name, "block": stack.block_of(name), "layer_type": layer_type(name),
                "format": scheme.format, "label": scheme.label, "params": weight.numel(), "shape": list(shape),
                "bits_per_weight": scheme.bits_per_weight(shape),
                "size_bytes": sum(scheme.storage_bytes(shape).values()),
                "relative_mse": relative,
                "sqnr_db": -10 * math.log10(relative) if relative > 0 else None,  # None: exact (fp32)
                "output_sq_error": error_energy,  # summed over tokens and output channels
                "output_mse": error_energy / max(1, probe.tokens * shape[0]),
                "weight_relative_mse": weight_mse,
                "tokens": probe.tokens,
                **stats, **activation,
            }
            if curvature is not None:
                # Second order: error = 1/2 sum_j curvature_j * (squared output error)_j, per metric item.
                record["predicted_delta"] = 0.5 * float((curvature[name] * channels).sum()) / max(1, items)
            records.append(record)
    return records


# --- the stored form: settings and records out, the report back -------------------------------------------------


def sensitivity_settings(loaded: LoadedModel, schemes: Sequence[QuantScheme], baseline: Baseline, *, unit: str,
                         view: str = "forward", blocks: bool = True, predict: bool = True) -> dict:
    """The JSON-ready settings of an ``analyze`` call that ``report_from_records`` needs to rebuild its report
    (``calibrate``'s record goes beside them as ``calibration``)."""
    return {"schemes": [s.to_dict() for s in schemes], "unit": unit, "view": view, "blocks": blocks,
            "predict": predict, "model_kind": loaded.kind, "metric": METRIC[loaded.kind],
            "eval_tokens": baseline.tokens}


def report_from_records(model: str, settings: dict, linears: list[dict], blocks: list[dict],
                        seconds: dict | None = None, tokens: int | None = None) -> SensitivityReport:
    """The SensitivityReport of ``sensitivity_settings`` and the (non-empty) per-linear and per-unit records
    ``analyze`` handed to ``on_records``; an analysis stopped half-way gives the units it finished. ``tokens``
    stands in for settings written without ``eval_tokens``."""
    schemes = tuple(QuantScheme.from_dict(s) for s in settings.get("schemes", []))
    return SensitivityReport(model, settings.get("model_kind", "causal-lm"),
                             settings.get("metric") or linears[0].get("metric", "kld_mean"), schemes, linears,
                             blocks, dict(seconds or {}), int(settings.get("eval_tokens") or tokens or 0),
                             settings.get("view", "forward"), settings.get("unit", "block"),
                             dict(settings.get("calibration") or {}))
