"""Real activations of a loaded model: calibration inputs, linear-layer inputs captured with hooks, and what
a fixed (static) activation scale clips compared with a dynamic per-token one.

Calibration text is taken from the *end* of the evaluation text, so that calibrating (GPTQ's Hessians, a static
activation scale) and evaluating use different tokens whenever the text is long enough; ``overlaps_eval`` says
when it is not.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qlab.core.errors import QlabError
from qlab.core.quant import QuantScheme, quantize
from qlab.models.evaluate import (
    LM_WINDOW,
    EvalSpec,
    _embedding_inputs,
    _paragraphs,
    compute_dtype,
    compute_view,
    input_device,
)
from qlab.models.loading import LoadedModel

# GPTQ's paper calibrates on 128 x 2048 tokens. On SmolLM2's 1536-wide down_proj, 1024 tokens made GPTQ worse
# than RTN on held-out text (it fits the calibration tokens); 4096 with 10% damping beat RTN on every layer tried.
CALIBRATION_TOKENS = 4096
EMBED_CALIBRATION_MAX_TOKENS = 128


@dataclass(frozen=True)
class CalibrationData:
    """Model inputs to calibrate on: ``batches`` are keyword arguments of the model's forward."""

    kind: str
    batches: tuple[dict[str, torch.Tensor], ...]
    tokens: int
    overlaps_eval: bool


def calibration_data(loaded: LoadedModel, spec: EvalSpec, tokens: int | None = None) -> CalibrationData:
    """``tokens`` (default ``CALIBRATION_TOKENS``) tokens from the end of the spec's text; the evaluation reads
    the text from the start."""
    tokens = CALIBRATION_TOKENS if tokens is None else tokens
    if tokens < 16:
        raise QlabError(f"calibration needs at least 16 tokens, got {tokens}.")
    text = spec.resolved_text()
    if loaded.kind == "causal-lm":
        ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
        if ids.numel() < 16:
            raise QlabError(f"the text has only {ids.numel()} tokens; calibration needs at least 16.")
        used = min(tokens, ids.numel())
        tail = ids[ids.numel() - used:]
        batches = tuple({"input_ids": window[None]} for window in tail.split(LM_WINDOW))
        return CalibrationData(loaded.kind, batches, used, ids.numel() < spec.tokens + used)
    paragraphs = _paragraphs(text)
    chosen, used = [], 0
    for paragraph in reversed(paragraphs):
        count = min(EMBED_CALIBRATION_MAX_TOKENS, len(loaded.tokenizer(paragraph, verbose=False).input_ids))
        if used + count > tokens and chosen:
            break
        chosen.append(paragraph)
        used += count
    if not chosen:
        raise QlabError("the text has no paragraph of 40+ characters to calibrate on; give a longer text.")
    encoded = loaded.tokenizer(chosen, padding=True, truncation=True, max_length=EMBED_CALIBRATION_MAX_TOKENS,
                               return_tensors="pt")
    batches = tuple({k: v[i: i + 32] for k, v in encoded.items()} for i in range(0, len(chosen), 32))
    # The evaluation takes paragraphs from the start until its budget; count tokens the same way.
    eval_tokens = spec.tokens
    overlaps = sum(min(EMBED_CALIBRATION_MAX_TOKENS, len(loaded.tokenizer(p, verbose=False).input_ids))
                   for p in paragraphs) < eval_tokens + used
    return CalibrationData(loaded.kind, batches, used, overlaps)


def default_layer(names: Sequence[str]) -> str:
    """A middle layer's FFN down-projection: in transformers its inputs have the widest per-token ranges."""
    candidates = [n for n in names if n.endswith(("down_proj", "output.dense")) and "attention" not in n]
    pool = candidates or list(names)
    return pool[len(pool) // 2]


# hook(name, inputs, shared_with): inputs as (tokens, features); shared_with names the previous hooked linear
# when this one receives the very same tensor object (q/k/v after one norm, gate/up of a SwiGLU MLP), else None.
Hook = Callable[[str, torch.Tensor, str | None], None]


def run_with_input_hooks(loaded: LoadedModel, data: CalibrationData, names: Sequence[str], hook: Hook,
                         progress: Callable[[float, str], None] | None = None,
                         cancel: Callable[[], bool] | None = None) -> None:
    """Run the model on the calibration batches, computing in what its evaluations do (fp32 for 16-bit weights on
    a CPU without native 16-bit math, not emulated bf16); ``hook(name, x)`` gets each named linear's input as
    (tokens, features), padding removed."""
    model = compute_view(loaded.model, compute_dtype(loaded.model))
    modules = dict(model.named_modules())
    missing = [name for name in names if name not in modules]
    if missing:
        raise QlabError(f"the model has no module '{missing[0]}'; pick a layer from the Model page's table.")
    mask: list[torch.Tensor | None] = [None]
    previous: list = [None, None]  # the last hooked input tensor and its layer's name
    forward, head = _calibrated_forward(model, loaded.kind, [modules[name] for name in names])

    def make(name: str):
        def pre_hook(module: torch.nn.Module, args: tuple) -> None:
            raw = x = args[0]
            # Identity, not equality: only the same object proves the same input, and it costs nothing.
            shared_with = previous[1] if raw is previous[0] else None
            previous[0], previous[1] = raw, shared_with or name
            if mask[0] is not None and x.dim() == 3 and x.shape[:2] == mask[0].shape:
                x = x[mask[0]]
            hook(name, x.reshape(-1, x.shape[-1]), shared_with)
            if module is head:  # its input is all a pass needs of it: skip the vocabulary-wide matmul
                raise _Captured
        return pre_hook

    handles = [modules[name].register_forward_pre_hook(make(name)) for name in names]
    device = input_device(model)
    try:
        for index, batch in enumerate(data.batches):
            if cancel is not None and cancel():
                from qlab.core.errors import Cancelled

                raise Cancelled("cancelled; results finished so far are kept.")
            batch = {key: value.to(device) for key, value in batch.items()}  # token ids to a GPU model's embedding
            attention = batch.get("attention_mask")
            mask[0] = attention.bool() if attention is not None else None
            with contextlib.suppress(_Captured), torch.inference_mode():
                forward(**batch)
            previous[0] = previous[1] = None
            if progress:
                progress((index + 1) / len(data.batches), f"calibration batch {index + 1}/{len(data.batches)}")
    finally:
        for handle in handles:
            handle.remove()


def _calibrated_forward(model: torch.nn.Module, kind: str, hooked: Sequence[torch.nn.Module]
                        ) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """What to run so every hooked module sees its input, and a causal LM's output head when it is hooked.

    A causal LM's decoder alone when nothing hooked lies outside it: the head's vocabulary-wide matmul would
    dominate. An untied head is quantized like any linear, so it is calibrated like one: then the whole model runs
    and the head's hook ends the pass once it has the final norm's output."""
    if kind != "causal-lm":
        return model, None
    decoder = model.base_model
    inside = {id(module) for module in decoder.modules()}
    if all(id(module) in inside for module in hooked):
        return decoder, None
    head = model.get_output_embeddings()
    return model, head if any(module is head for module in hooked) else None


class _Captured(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward pass would be wasted work."""


def capture_inputs(loaded: LoadedModel, name: str, data: CalibrationData) -> torch.Tensor:
    """The inputs one linear layer sees on the calibration batches, as (tokens, in_features) float32."""
    captured: list[torch.Tensor] = []

    def keep(_: str, x: torch.Tensor, __: str | None) -> None:
        captured.append(x.float().clone())
        raise _Captured

    run_with_input_hooks(loaded, data, [name], keep)
    return torch.cat(captured)


def text_batches(loaded: LoadedModel, text: str, tokens: int) -> CalibrationData:
    """The first ``tokens`` tokens of a text as model inputs: the tokens the evaluation reads first."""
    if loaded.kind == "causal-lm":
        ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False).input_ids[0]
        ids = ids[:tokens]
        batches = tuple({"input_ids": window[None]} for window in ids.split(LM_WINDOW))
        return CalibrationData(loaded.kind, batches, ids.numel(), True)
    batch = _embedding_inputs(loaded, EvalSpec(tokens=max(16, tokens), text=text))
    return CalibrationData(loaded.kind, (batch,), int(batch["attention_mask"].sum()), True)


@dataclass(frozen=True)
class ActivationComparison:
    """Static (one calibrated scale) against dynamic (one scale per token) quantization of real activations."""

    per_token: list[dict]  # token index, absmax, static clipped share, relative MSE static / dynamic
    static_scale: float
    calibration_absmax: float
    summary: dict[str, float]


def static_vs_dynamic(calibration: torch.Tensor, evaluation: torch.Tensor, fmt: str = "int8",
                      calibration_method: str = "minmax", percentile: float = 99.9) -> ActivationComparison:
    """Quantize ``evaluation`` activations (tokens x features) with a scale fixed from ``calibration``
    activations, and with a per-token scale computed at run time; both symmetric, through ``qlab.core.quant``."""
    if calibration.dim() != 2 or evaluation.dim() != 2 or calibration.shape[1] != evaluation.shape[1]:
        raise QlabError("activations must be (tokens, features) with the same features for calibration "
                        "and evaluation.")
    static_scheme = QuantScheme(fmt, "tensor", calibration=calibration_method, percentile=percentile)
    static_scale = quantize(calibration, static_scheme).scale
    static = quantize(evaluation, static_scheme, scale=static_scale)
    # One row per token: "channel" granularity of a (tokens, features) tensor is exactly per-token scaling.
    dynamic = quantize(evaluation, QuantScheme(fmt, "channel"))
    x = evaluation.float()
    energy = (x**2).mean(dim=1).clamp(min=1e-30)
    static_error = ((static.dequantize() - x) ** 2).mean(dim=1) / energy
    dynamic_error = ((dynamic.dequantize() - x) ** 2).mean(dim=1) / energy
    limit = static_scheme.fmt.max_abs * static_scale.float().item()
    clipped = (x.abs() > limit * (1 + 0.5 / static_scheme.fmt.max_abs)).float().mean(dim=1)
    absmax = x.abs().amax(dim=1)
    per_token = [{"token": i, "absmax": a, "static_clipped_fraction": c, "static_relative_mse": s,
                  "dynamic_relative_mse": d}
                 for i, (a, c, s, d) in enumerate(zip(absmax.tolist(), clipped.tolist(), static_error.tolist(),
                                                      dynamic_error.tolist(), strict=True))]
    total = (x**2).sum().clamp(min=1e-30)
    summary = {
        "static_relative_mse": (((static.dequantize() - x) ** 2).sum() / total).item(),
        "dynamic_relative_mse": (((dynamic.dequantize() - x) ** 2).sum() / total).item(),
        "tokens_with_clipping": (clipped > 0).float().mean().item(),
        "values_clipped": (x.abs() > limit * (1 + 0.5 / static_scheme.fmt.max_abs)).float().mean().item(),
        "largest_token_absmax_over_static_range": (absmax.max() / limit).item() if limit > 0 else math.inf,
    }
    return ActivationComparison(per_token, static_scale.float().item(),
                                calibration.abs().max().item(), summary)

