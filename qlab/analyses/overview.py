"""The Overview's pieces, cheapest first: memory plans and predicted speed on the target (arithmetic), the
accuracy sweep, a quick per-layer sensitivity, then (``qlab.backends.format_speed``) a short speed measurement.

Each piece is a plain function of a loaded model, an ``OverviewRequest`` and the schemes still missing, takes
``progress(fraction, message)`` and ``cancel()`` callbacks, and gives JSON-ready records keyed by scheme label:
what the run store keeps (``qlab.store.overview``) and what the verdict (``qlab.analyses.verdict``) reads.
``estimate_seconds`` says beforehand how long a piece will take, so anything over ``ANNOUNCE_AFTER_S`` is
announced before it starts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from qlab.analyses import layer_rounding, memory, roofline, verdict
from qlab.analyses.activations import CALIBRATION_TOKENS
from qlab.analyses.sensitivity import _exact, replayed_shares
from qlab.analyses.sweep import check_schemes, run_sweep
from qlab.core.algorithms import awq, needs_calibration
from qlab.core.errors import Cancelled, QlabError
from qlab.core.quant import QuantScheme, block_of, grid_values
from qlab.models import architectures, hardware
from qlab.models.evaluate import Baseline, CancelCheck, EvalSpec, Progress, compute_dtype
from qlab.models.loading import LoadedModel, quantizable_linears

PIECES: tuple[str, ...] = ("memory", "predicted", "sweep", "sensitivity", "measured")
TITLES = {"memory": "Memory on the target", "predicted": "Speed predicted on the target",
          "sweep": "Accuracy of each format", "sensitivity": "Per-layer sensitivity (quick)",
          "measured": "Speed measured on this machine"}
ANNOUNCE_AFTER_S = 10.0
SPEED_CAP_S = 30.0  # the short speed measurement's time cap, all formats together
DEFAULT_CONTEXT_TOKENS = 4096
# The 16-bit baseline every speed is compared with, predicted on the target and measured here.
REFERENCE = QuantScheme("bf16")
# An embedding model's predicted throughput: one batch of this many texts of this many tokens.
EMBED_BATCH, EMBED_TOKENS = 32, 128
EMBED_FORMULA = ("sentences/s = batch / max(weight bytes read / bandwidth, FLOPs of the batch / peak FLOPS of "
                 "the compute dtype (this machine: its measured FP32 matmul rate)); a format without a kernel "
                 "reads the dense weights")
# On a CPU, fitted on the quiet 2-core AMD EPYC with AVX512-BF16 (``bench/estimates.py``,
# bench/results/estimates_cpu.json): an evaluation costs about 1.5x its matmul FLOPs at the probe's rate in the
# model's compute dtype (bf16 ran about 4x fp32's rate there) plus 0.15 s: MiniLM 0.27 s, SmolLM2 1.4 s (fp32), the
# random Llama-3.2-1B 11.3 s in fp32 and 2.7 s in bf16. An LM's baseline took 1.05-1.25 evaluations. A sweep rounds
# through the compiled kernels, about 3 ms a linear and 0.3 ns a weight (0.3-0.5 s for the 1B's 0.97 B weights;
# 0.4-0.7 s on an AVX2-only EPYC), and each scheme spends about 0.3 s more on its own (swapping layers in and
# out, its records): MiniLM's four took 0.66 s each for a 0.27 s evaluation. The full analysis's replays round
# through ``quantize``, about 10 ns a weight.
CPU_EVAL_OVERHEAD = 1.5
CPU_EVAL_FIXED_S = 0.15
CPU_BASELINE_EVALS = 1.3
CPU_SCHEME_FIXED_S = 0.3
SWEEP_ROUNDING_S_PER_LINEAR = 3e-3
SWEEP_ROUNDING_S_PER_WEIGHT = 3e-10
ROUNDING_S_PER_WEIGHT = 1e-8
# On a GPU (lent H100 and H200 runs, the figures of the section below): an evaluation about 3x its matmul FLOPs
# at the bf16 probe's rate plus a second of host work, an LM baseline about 2.5 evaluations.
GPU_EVAL_OVERHEAD = 3.0
GPU_EVAL_FIXED_S = 1.0
GPU_BASELINE_EVALS = {"causal-lm": 2.5, "embedding": 1.3}
# On a GPU (the H200, random Llama-3.1-8B, bench/results/real_model_gpu.json run 3): rounding to nearest took
# 0.43-0.48 s a scheme for 7.5 B weights, block copies included, so about 60 ps a weight; the quick sensitivity
# 4.7 s for two schemes, about 3 evaluations and 0.1 ns a weight and scheme.
GPU_ROUNDING_S_PER_WEIGHT = 6e-11
GPU_QUICK_S_PER_WEIGHT = 1e-10
# The other algorithms, fitted to the random 1B Llama at int4 g128 on the quiet 2-core CPU
# (bench/results/rounding_methods_1b_cpu.json) against this machine's probe rate: GPTQ's column-by-column solve
# (2 out in^2 FLOPs a linear, on one thread in narrow blocks) ran at about a tenth of the probe's rate; AWQ scores
# GRID_POINTS candidate scales a linear, each as tr(dW H dW^T) (the same FLOPs), at about 0.7 of it; HQQ's twenty
# element-wise steps took about 0.7 us per weight.
GPTQ_RATE = 0.1
AWQ_RATE = 0.7
HQQ_S_PER_WEIGHT = 7e-7
# On a GPU they are not bound by the matmul rate (bench/results/rounding_methods_8b_gpu.json, random Llama-3.1-8B at
# int4 g128 on a lent H100): GPTQ took 264 s and act-order 276 s for 1.25 M input columns, about 0.21 ms a column
# (a dozen small kernels each, launch-bound); AWQ's float32 scoring ran at about 37 TFLOP/s (54 s), a twentieth
# of the bf16 rate; HQQ 12.3 s for 7.5 B weights, about 1.6 ns a weight.
GPU_GPTQ_S_PER_COLUMN = 2.1e-4
GPU_AWQ_FLOPS_PER_S = 3.7e13
GPU_HQQ_S_PER_WEIGHT = 1.6e-9
# The quick sensitivity (no baseline): one forward and one backward pass, plus per scheme that rounds each
# linear's rounding and its output error's product on every batch. Fitted to the quiet AVX512-BF16 EPYC
# (bench/results/estimates_cpu.json: fp16, int8, int4 and nf4 g64 at 512 tokens; MiniLM 0.9 s, SmolLM2 7.2 s, the
# random 1B Llama in bf16 16.8 s): the pass about 1.6 evaluations, each product with its element-wise work about
# 2.3x its FLOPs at the probe's rate in the model's compute dtype, the rounding at the sweep's rate per weight.
# On a GPU (the H200 run of the section above) the pass was about 3 evaluations and the rest 0.1 ns a weight and
# scaled scheme, with the products then in FP32 (bf16 since: this overshoots).
QUICK_PASS_EVALS = 1.6
QUICK_PRODUCT_OVERHEAD = 2.3
GPU_QUICK_PASS_EVALS = 3.0
# The full analysis (the Sensitivity page), int8 and int4 g64 at 512 tokens on the same quiet CPU: the capture pass
# about one evaluation E plus, per scheme, each linear's output error (an fp32 matmul of its inputs with the
# weight's error) and its rounding, plus the weights' statistics (about one rounding); the curvature pass about
# 2.5 E (2.2-2.7 measured); each replay the blocks from its unit on and the head, as that share of E.
CURVATURE_EVALS = 2.5


@dataclass(frozen=True)
class OverviewRequest:
    """What the Overview answers for: schemes, the target, the evaluation text, the serving shape, and the time
    cap of the speed measurement here."""

    schemes: tuple[QuantScheme, ...]
    hardware_id: str
    spec: EvalSpec = field(default_factory=EvalSpec)
    context_tokens: int | None = None  # None: DEFAULT_CONTEXT_TOKENS, capped at the model's maximum
    batch: int = 1
    kv_dtype: str = "fp16"
    speed_cap_s: float = SPEED_CAP_S

    def __post_init__(self) -> None:
        if not self.schemes:
            raise QlabError("no formats to compare; pick at least one format.")
        if isinstance(self.speed_cap_s, bool) or not isinstance(self.speed_cap_s, int | float) or not (
                math.isfinite(self.speed_cap_s) and self.speed_cap_s > 0):
            raise QlabError(f"the speed measurement's time cap must be a positive number of seconds, got "
                            f"{self.speed_cap_s!r}.")
        labels = [s.label for s in self.schemes]
        if len(set(labels)) != len(labels):
            raise QlabError(f"a format is listed twice ({', '.join(labels)}); give each format once.")

    @property
    def target(self) -> hardware.Hardware:
        return hardware.get(self.hardware_id)

    def context_for(self, loaded: LoadedModel) -> int:
        """The context length the memory plan and the decode prediction use for this model."""
        if self.context_tokens:
            return self.context_tokens
        maximum = getattr(loaded.model.config, "max_position_embeddings", None) or DEFAULT_CONTEXT_TOKENS
        return min(DEFAULT_CONTEXT_TOKENS, int(maximum))


@dataclass
class Pieces:
    """What is known so far, per piece: records keyed by scheme label (sensitivity: a list per label)."""

    memory: dict[str, dict] = field(default_factory=dict)
    predicted: dict[str, dict] = field(default_factory=dict)
    sweep: dict[str, dict] = field(default_factory=dict)
    sensitivity: dict[str, list[dict]] = field(default_factory=dict)
    measured: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # piece -> why it cannot run here

    def wanted(self, piece: str, request: OverviewRequest) -> list[QuantScheme]:
        """The schemes a piece covers: the request's, plus the 16-bit reference for speeds."""
        schemes = list(request.schemes)
        if piece in ("predicted", "measured") and REFERENCE not in schemes:
            schemes.append(REFERENCE)
        return schemes

    def missing(self, piece: str, request: OverviewRequest) -> list[QuantScheme]:
        if piece in self.skipped:
            return []
        held = getattr(self, piece)
        return [s for s in self.wanted(piece, request) if s.label not in held]


# --- estimates ---------------------------------------------------------------------------------------------


@functools.cache
def matmul_flops_per_s(device: str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """This process's matmul rate where a model runs (what every estimate scales with), measured once per device
    and dtype: on a CPU from a probe of about a tenth of a second in ``dtype`` (a CPU with AVX512-BF16 or AMX runs
    bf16 several times faster than fp32); on a GPU bfloat16 at a size that fills it."""
    if device != "cpu":
        return _gpu_matmul_flops_per_s(torch.device("cuda" if device == "auto" else device))
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    a @ b
    # The best of three rounds: a bf16 kernel warms up over its first calls, and a shared machine's neighbours
    # slow some rounds down.
    best, repeats = 0.0, 4
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, repeats * 2 * 1024**3 / max(time.perf_counter() - started, 1e-6))
    return best


def _gpu_matmul_flops_per_s(device: torch.device) -> float:
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    a @ a
    torch.cuda.synchronize(device)
    started, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        a @ a
    torch.cuda.synchronize(device)
    return repeats * 2 * 4096**3 / max(time.perf_counter() - started, 1e-6)


def _on_gpu(loaded: LoadedModel) -> bool:
    return loaded.device != "cpu"


def matmul_params(loaded: LoadedModel) -> int:
    """Weights a forward pass multiplies with: the quantizable linears and an LM's output head (embedding rows
    are looked up, which costs nothing next to a matmul)."""
    linears = sum(m.weight.numel() for _, m in quantizable_linears(loaded.model))
    head = loaded.model.get_output_embeddings() if loaded.kind == "causal-lm" else None
    quantized = {id(m.weight) for _, m in quantizable_linears(loaded.model)}
    return linears + (head.weight.numel() if head is not None and id(head.weight) not in quantized else 0)


def matmul_seconds(loaded: LoadedModel, tokens: int) -> float:
    """About how long the matmuls of a forward pass over ``tokens`` tokens take here, overheads included."""
    flops = 2.0 * matmul_params(loaded) * tokens
    if _on_gpu(loaded):
        return GPU_EVAL_OVERHEAD * flops / matmul_flops_per_s(loaded.device)
    return CPU_EVAL_OVERHEAD * flops / matmul_flops_per_s(loaded.device, compute_dtype(loaded.model))


def evaluation_seconds(loaded: LoadedModel, tokens: int) -> float:
    """About how long one evaluation of ``tokens`` tokens takes here, in the model's compute dtype."""
    return matmul_seconds(loaded, tokens) + (GPU_EVAL_FIXED_S if _on_gpu(loaded) else CPU_EVAL_FIXED_S)


def rounding_seconds(loaded: LoadedModel, scheme: QuantScheme) -> float:
    """About how long rounding every linear of the model by ``scheme``'s algorithm takes here."""
    linears = [module for _, module in quantizable_linears(loaded.model)]
    solve_flops = sum(2.0 * m.out_features * m.in_features**2 for m in linears)
    on_gpu = _on_gpu(loaded)
    if scheme.algorithm in ("gptq", "gptq-act-order") or scheme.sparsity == "2:4-sparsegpt":
        if on_gpu:
            return GPU_GPTQ_S_PER_COLUMN * sum(m.in_features for m in linears)
        return solve_flops / (GPTQ_RATE * matmul_flops_per_s(loaded.device))
    if scheme.algorithm == "awq":
        rate = GPU_AWQ_FLOPS_PER_S if on_gpu else AWQ_RATE * matmul_flops_per_s(loaded.device)
        return awq.GRID_POINTS * solve_flops / rate
    if scheme.algorithm == "hqq":
        per_weight = GPU_HQQ_S_PER_WEIGHT if on_gpu else HQQ_S_PER_WEIGHT
    else:
        per_weight = GPU_ROUNDING_S_PER_WEIGHT if on_gpu else ROUNDING_S_PER_WEIGHT
    return per_weight * sum(m.weight.numel() for m in linears)


def _to_nearest(scheme: QuantScheme) -> bool:
    """Plain rounding to nearest: no algorithm beyond it and no pruning (what ``fake_quantize`` does itself)."""
    return scheme.algorithm == "rtn" and scheme.sparsity == "none"


def sweep_rounding_seconds(loaded: LoadedModel, scheme: QuantScheme) -> float:
    """``rounding_seconds`` as a sweep rounds: to nearest on a CPU through the compiled kernels."""
    if _on_gpu(loaded) or not _to_nearest(scheme):
        return rounding_seconds(loaded, scheme)
    linears = [module for _, module in quantizable_linears(loaded.model)]
    return (SWEEP_ROUNDING_S_PER_LINEAR * len(linears)
            + SWEEP_ROUNDING_S_PER_WEIGHT * sum(m.weight.numel() for m in linears))


def analysis_seconds(loaded: LoadedModel, schemes: Sequence[QuantScheme], spec: EvalSpec, *, unit: str = "block",
                     view: str = "forward", blocks: bool = True, predict: bool = True) -> float:
    """About how long the full sensitivity analysis (``sensitivity.analyze``) takes here: the capture pass with
    each scheme's per-linear errors, the curvature pass if asked, one calibration pass if an algorithm needs it,
    and per scheme one replay per unit end to end, each unit rounded again (the reverse view first evaluates and
    captures the all-quantized model)."""
    evaluation = evaluation_seconds(loaded, spec.tokens)
    linears = [module for _, module in quantizable_linears(loaded.model)]
    weights = sum(m.weight.numel() for m in linears)
    overhead = GPU_EVAL_OVERHEAD if _on_gpu(loaded) else CPU_EVAL_OVERHEAD
    linear_errors = overhead * 2.0 * weights * spec.tokens / matmul_flops_per_s(loaded.device, compute_dtype(loaded.model))
    statistics = (GPU_ROUNDING_S_PER_WEIGHT if _on_gpu(loaded) else ROUNDING_S_PER_WEIGHT) * weights
    replays = 0.0
    if blocks:
        stack_share = weights / matmul_params(loaded)
        replays = sum(evaluation * (1 - stack_share + stack_share * share)
                      for share in replayed_shares(loaded.model, unit))
    reverse = 2 * evaluation if blocks and view == "reverse" else 0.0
    return (evaluation + statistics + CURVATURE_EVALS * evaluation * predict + calibration_seconds(loaded, schemes)
            + sum(linear_errors + replays + reverse + _analysis_rounding_seconds(loaded, s, blocks, view)
                  for s in schemes))


def _analysis_rounding_seconds(loaded: LoadedModel, scheme: QuantScheme, blocks: bool, view: str) -> float:
    """An algorithm other than rounding to nearest rounds once, and is kept. To nearest rounds as a sweep does
    for each linear's error and again for each unit's replay; the reverse view's all-quantized model, codes of
    every linear at once, goes through ``quantize``."""
    if not _to_nearest(scheme):
        return rounding_seconds(loaded, scheme)
    return (sweep_rounding_seconds(loaded, scheme) * (2 if blocks else 1)
            + (rounding_seconds(loaded, scheme) if blocks and view == "reverse" else 0.0))


def sweep_seconds(loaded: LoadedModel, schemes: Sequence[QuantScheme], spec: EvalSpec,
                  baseline_ready: bool = False) -> float:
    """About how long a sweep of ``schemes`` takes here: the baseline (unless ready), one calibration pass if an
    algorithm needs it, and per scheme its rounding and one evaluation."""
    evaluation = evaluation_seconds(loaded, spec.tokens)
    evaluations = GPU_BASELINE_EVALS.get(loaded.kind, 2.0) if _on_gpu(loaded) else CPU_BASELINE_EVALS
    baseline = 0.0 if baseline_ready else evaluations * evaluation
    return (baseline + calibration_seconds(loaded, schemes)
            + sum(evaluation + sweep_rounding_seconds(loaded, s) + (0.0 if _on_gpu(loaded) else CPU_SCHEME_FIXED_S)
                  for s in schemes))


def quick_seconds(loaded: LoadedModel, schemes: Sequence[QuantScheme], spec: EvalSpec) -> float:
    """About how long the quick sensitivity of ``schemes`` takes here (it needs no baseline)."""
    weights = sum(m.weight.numel() for _, m in quantizable_linears(loaded.model))
    beyond_nearest = [s for s in schemes if not _to_nearest(s)]
    fixed = calibration_seconds(loaded, schemes) + sum(rounding_seconds(loaded, s) for s in beyond_nearest)
    evaluation = evaluation_seconds(loaded, spec.tokens)
    if _on_gpu(loaded):
        scaled = sum(1 for s in schemes if s.fmt.scaled)
        return GPU_QUICK_PASS_EVALS * evaluation + GPU_QUICK_S_PER_WEIGHT * weights * scaled + fixed
    product = (QUICK_PRODUCT_OVERHEAD * 2.0 * weights * spec.tokens
               / matmul_flops_per_s(loaded.device, compute_dtype(loaded.model)))
    rounding = sum(1 for s in schemes if not _exact(s))
    return QUICK_PASS_EVALS * evaluation + fixed + rounding * (product + SWEEP_ROUNDING_S_PER_WEIGHT * weights)


def calibration_seconds(loaded: LoadedModel, schemes: Sequence[QuantScheme]) -> float:
    """The one forward pass over the calibration tokens (no backward, no head) GPTQ and AWQ share, or 0."""
    return evaluation_seconds(loaded, CALIBRATION_TOKENS) if needs_calibration(schemes) else 0.0


def estimate_seconds(piece: str, loaded: LoadedModel, request: OverviewRequest, schemes: Sequence[QuantScheme],
                     baseline_ready: bool = False) -> float:
    """About how long ``piece`` takes for ``schemes`` (``measured``: ``qlab.backends.format_speed``)."""
    if not schemes or piece in ("memory", "predicted"):
        return 0.0
    if piece == "sweep":
        return sweep_seconds(loaded, schemes, request.spec, baseline_ready)
    if piece == "sensitivity":
        return quick_seconds(loaded, schemes, request.spec)
    raise QlabError(f"no estimate for the piece '{piece}' here; the measured speed estimates itself.")


# --- the pieces -------------------------------------------------------------------------------------------


def memory_piece(loaded: LoadedModel, request: OverviewRequest, schemes: Sequence[QuantScheme],
                 progress: Progress | None = None, cancel: CancelCheck | None = None) -> dict[str, dict]:
    """Memory plan of each scheme on the target (weights with scales, KV cache, activations, overhead)."""
    check_schemes(loaded, list(schemes))
    plans = {}
    for index, scheme in enumerate(schemes):
        _check(cancel)
        plan = memory.plan_loaded(loaded, scheme, request.context_for(loaded), request.batch, request.kv_dtype,
                                  [request.hardware_id])
        plans[scheme.label] = {**plan.to_record(), "label": scheme.label, "format": scheme.format}
        if progress:
            progress((index + 1) / len(schemes), f"memory plan of {scheme.label}")
    return plans


def predicted_piece(loaded: LoadedModel, request: OverviewRequest, schemes: Sequence[QuantScheme],
                    bandwidth_bytes_per_s: float | None = None, progress: Progress | None = None,
                    cancel: CancelCheck | None = None) -> dict[str, dict]:
    """Roofline speed of each scheme on the target: decode tokens/s for LMs, sentences/s for embedding models.

    ``bandwidth_bytes_per_s`` stands in for a target the catalog has no bandwidth for (this machine's, measured).
    """
    target = request.target
    if not (bandwidth_bytes_per_s or target.bandwidth_bytes_per_s):
        raise QlabError(f"{target.name} has no known memory bandwidth; measure it or pick a catalog target.")
    arch = architectures.from_config(loaded.model.config.to_dict(), slug=loaded.name)
    if loaded.kind == "embedding":
        # An encoder looks its embedding rows up and has no output head: a tied table is not streamed per batch.
        arch = dataclasses.replace(arch, tie_word_embeddings=False)
    context = request.context_for(loaded)
    records = {}
    for index, scheme in enumerate(schemes):
        _check(cancel)
        if loaded.kind == "causal-lm":
            prediction = roofline.predict(arch, scheme, target, context_tokens=context,
                                          prompt_tokens=min(512, context), batch=request.batch,
                                          bandwidth_bytes_per_s=bandwidth_bytes_per_s)
            speed, unit = prediction.decode_tokens_per_s, "decode tokens/s"
        else:
            prediction = roofline.predict(arch, scheme, target, prompt_tokens=EMBED_TOKENS, batch=EMBED_BATCH,
                                          context_tokens=EMBED_TOKENS, bandwidth_bytes_per_s=bandwidth_bytes_per_s)
            speed, unit = embedding_throughput(arch, scheme, prediction), "sentences/s"
        records[scheme.label] = {**prediction.to_record(), "label": scheme.label, "format": scheme.format,
                                 "speed": speed, "speed_unit": unit, "target": target.name}
        if progress:
            progress((index + 1) / len(schemes), f"roofline of {scheme.label}")
    return records


def embedding_throughput(arch: architectures.Architecture, scheme: QuantScheme,
                         prediction: roofline.Prediction) -> float:
    """Sentences/s of one encoder batch (``EMBED_FORMULA``): bandwidth or compute bound, whichever is slower."""
    read = roofline.weight_bytes_read(arch, scheme if prediction.native else QuantScheme(prediction.dense_format),
                                      prediction.dense_format)
    seconds = read / prediction.bandwidth_bytes_per_s
    if prediction.prefill_ms is not None:
        seconds = max(seconds, prediction.prefill_ms / 1000.0)
    elif hardware.get(prediction.hardware_id).is_detected:
        # This machine has no catalog TFLOPS: its measured matmul rate bounds the compute instead.
        seconds = max(seconds, prediction.prefill_flops / matmul_flops_per_s())
    return prediction.batch / seconds


def sweep_piece(loaded: LoadedModel, request: OverviewRequest, schemes: Sequence[QuantScheme],
                baseline: Baseline | None = None, progress: Progress | None = None,
                cancel: CancelCheck | None = None) -> Iterator[dict]:
    """The accuracy sweep of ``schemes``: one sweep record per scheme, yielded as each finishes."""
    for row in run_sweep(loaded, list(schemes), request.spec, baseline=baseline, progress=progress, cancel=cancel):
        yield row.to_record()


def sensitivity_available() -> bool:
    """Whether the quick per-layer sensitivity is installed in this version of qlab."""
    try:
        from qlab.analyses import sensitivity_quick  # noqa: F401
    except ImportError:
        return False
    return True


def sensitivity_piece(loaded: LoadedModel, request: OverviewRequest, schemes: Sequence[QuantScheme],
                      baseline: Baseline | None = None, progress: Progress | None = None,
                      cancel: CancelCheck | None = None) -> dict[str, list[dict]]:
    """Quick per-layer sensitivity (one forward and one backward pass; GPTQ and AWQ add a calibration pass), each
    layer rounded by its scheme's algorithm: records per scheme label."""
    from qlab.analyses.sensitivity_quick import quick_sensitivity

    result = quick_sensitivity(loaded, list(schemes), request.spec, baseline=baseline, progress=progress,
                               cancel=cancel)
    by_label: dict[str, list[dict]] = {s.label: [] for s in schemes}
    for record in result.to_records():
        by_label[record["scheme"]].append(record)
    return by_label


def _check(cancel: CancelCheck | None) -> None:
    if cancel is not None and cancel():
        raise Cancelled("cancelled; the formats finished so far are kept.")


# --- what the panels and the verdict read ------------------------------------------------------------------


def decide(pieces: Pieces, request: OverviewRequest, kind: str, bound: float) -> verdict.Verdict:
    """The verdict on what is known so far (pieces not computed yet count as unknown, never as zero)."""
    labels = [s.label for s in request.schemes]
    target = request.target
    # Lookups by label only: a worker thread may be adding results to these dicts meanwhile.
    here = {label: pieces.measured.get(label) for label in labels}
    measured = {label: {"speed": r.get("speed"), "backend": r.get("backend")} for label, r in here.items()
                if r and r.get("speed")}
    found = verdict.candidates(
        [pieces.sweep[label] for label in labels if label in pieces.sweep],
        plans={label: pieces.memory[label] for label in labels if label in pieces.memory},
        predicted={label: pieces.predicted[label]["speed"] for label in labels if label in pieces.predicted},
        measured=measured,
        native={label: native_on_target(pieces.predicted[label]) for label in labels if label in pieces.predicted},
        formats={s.label: s.format for s in request.schemes})
    reference_predicted = pieces.predicted.get(REFERENCE.label, {}).get("speed")
    reference_measured = pieces.measured.get(REFERENCE.label, {}).get("speed")
    return verdict.decide(found, bound=bound, kind=kind, target=target.name, memory_bytes=target.memory_bytes,
                          baseline_predicted=reference_predicted, baseline_measured=reference_measured,
                          baseline_name=REFERENCE.label)


def native_on_target(prediction: Mapping) -> bool | None:
    """Whether the target computes from the format directly; only a quantized format can lack a kernel."""
    if prediction.get("verdict") == "baseline":
        return True
    return prediction.get("native")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which (size, loss) points no other point beats on both (no larger and no worse, better in one)."""
    def beats(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] <= b[0] and a[1] <= b[1] and (a[0] < b[0] or a[1] < b[1])

    return [not any(beats(other, point) for other in points if other is not point) for point in points]


def most_sensitive_layer(pieces: Pieces, request: OverviewRequest) -> str | None:
    """The layer with the highest quick score in any chosen format (None before the sensitivity has run)."""
    records = [r for s in request.schemes for r in pieces.sensitivity.get(s.label, [])]
    scored = [r for r in records if r.get("score") is not None]
    return max(scored, key=lambda r: r["score"])["layer"] if scored else None


@dataclass(frozen=True)
class LayerGrids:
    """One block of a layer's weights and each scaled format's grid over it (as the Weights page draws them)."""

    layer: str
    values: torch.Tensor
    grids: dict[str, torch.Tensor]
    where: str


def layer_grids(loaded: LoadedModel, layer: str, schemes: Sequence[QuantScheme], spec: EvalSpec | None = None
                ) -> LayerGrids | None:
    """The block of ``layer`` with the widest range (largest scale of the first scaled scheme) and every scaled
    scheme's grid for that block, each rounded by its own algorithm (GPTQ and AWQ calibrate the layer on
    ``spec``'s text: one pass of the model); None when no chosen scheme has a grid (plain casts only)."""
    scaled = list(dict.fromkeys(s for s in schemes if s.fmt.scaled))
    if not scaled:
        return None
    weight = layer_rounding.layer_weight(loaded, layer)
    if spec is None and needs_calibration(scaled):
        raise QlabError(f"{scaled[0].label} rounds with calibration statistics; give the text to calibrate on.")
    stats = None if spec is None else layer_rounding.layer_stats(loaded, layer, scaled, spec)
    rounded = layer_rounding.round_layer(loaded, layer, scaled, stats)
    first, granularity = rounded[scaled[0]], scaled[0].granularity
    widest = int(first.scale.reshape(-1).float().argmax()) if first.scale is not None else 0
    per_row = weight.shape[1] // scaled[0].group_size if granularity == "group" else 1
    row, group = (0, 0) if granularity == "tensor" else divmod(widest, per_row)
    _, cover = block_of(first, row, group)
    values = weight.reshape(-1) if granularity == "tensor" else weight[row, cover]
    # AWQ's grid in weight space differs per input (each is scaled before rounding): drawn for the input that
    # holds the block's largest weight, the one nearest the grid's end.
    largest = int(values.abs().argmax()) % weight.shape[1] if granularity == "tensor" else int(
        cover[weight[row, cover].abs().argmax()])
    grids, scaled_inputs = {}, False
    for scheme, qtensor in rounded.items():
        # The block of this scheme that holds the chosen block's first weight (group sizes and orders may differ).
        block = block_of(qtensor, row, int(qtensor.input_groups()[cover[0]]))[0]
        scaled_inputs |= qtensor.input_scales() is not None
        grids[scheme.label] = grid_values(qtensor, block, largest)
    where = ("the whole tensor" if granularity == "tensor" else
             f"row {row}" + (f", {layer_rounding.columns_label(cover)}" if granularity == "group" else ""))
    where += f" (the block with the widest range, {values.numel()} weights)"
    if scaled_inputs:
        where += f"; AWQ scales each input before rounding, so its grid is drawn for input {largest}"
    return LayerGrids(layer, values, grids, where)
