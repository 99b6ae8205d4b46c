"""The VRAM planner: weights (with their scales), KV cache, activations and runtime overhead, and fit verdicts.

A plan models a named runtime (``qlab.analyses.runtimes``): its prefill peak and its steady decode state are
stated separately, component by component with the formula of each, and a target fits when the peak does.
Weight bytes come from ``QuantScheme.storage_bytes`` or a library's own layout (``qlab.core.layouts``) per
matrix shape, so scales, zero-points and padding are exact; for a loaded model they equal
``qlab.core.plan.size_report`` to the byte.

Over 500 lines on purpose: the plan's components, the fit verdicts and the searches over context, batch and
GPU count share one set of formulas; runtimes, layouts and KV formats already live in their own modules.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

from qlab.analyses import runtimes
from qlab.analyses import weights as weights_mod
from qlab.analyses.runtimes import ENCODER_MODEL_TYPES, GGUFFile, MemoryState
from qlab.analyses.weights import SchemeSpec
from qlab.core.errors import QlabError
from qlab.core.formats import get_format
from qlab.core.kv_formats import get_kv_format, kv_format_names
from qlab.core.layouts import Layout
from qlab.core.plan import SizeReport
from qlab.core.quant import QuantScheme
from qlab.models import architectures, hardware
from qlab.models.architectures import Architecture
from qlab.models.loading import ASSETS_DIR, LoadedModel, quantizable_linears

GIB = 2**30
KV_DTYPES: tuple[str, ...] = tuple(kv_format_names())
UNBOUNDED_CONTEXT = 2**24  # upper end of the largest-context search when a config states no maximum
SEED_FACTS_PATH = ASSETS_DIR / "seed_facts.json"

# The planner's weights come from qlab.analyses.weights; this name keeps one import for callers.
weight_spec = weights_mod.weight_spec

FORMULAS: dict[str, str] = {
    "weights": "sum over quantized matrices of the scheme's or the library layout's stored bytes for (out, in) "
               "(codes + scales + zero-points + padding) x count, plus every other parameter (embeddings, untied "
               "lm_head, norms, biases, routers, a vision tower) x bits of the unquantized format / 8; GGUF files: "
               "each tensor at the ggml type llama-quantize gives it",
    "kv_cache": "per layer and token: KV heads x (K + V bytes of one head vector in the KV format, scales "
                "included); MLA: one latent of kv_lora_rank + qk_rope_head_dim per token and layer (transformers "
                "5.x too: the latent as keys, the rotated part as values, decompressed per layer only while it "
                "attends). How many tokens each layer holds depends on the runtime: transformers' prefill holds the "
                "whole prompt in every layer (sliding ones too), its steady state min(context, window) in sliding "
                "layers; vLLM pages of block_size tokens; llama.cpp n_ctx cells padded to 256",
    "activations": "transformers: the largest working set of one layer on top of the cache: bytes x batch x "
                   "prompt x (4 x hidden + rotary + the attention or MLP widths alive at once), boolean sliding "
                   "masks (1 B x prompt^2) and their converted copy in SDPA, eager scores, MoE experts as grouped_mm "
                   "gathers them, MLA's decompressed keys and values, int8 weight "
                   "dequantization or fp8 activation quantization; vLLM: its profile run of "
                   "max_num_batched_tokens; llama.cpp: its compute buffer for one ubatch",
    "overhead": "a fixed runtime allowance per device: CUDA context, cuBLAS handles and caching-allocator "
                "slack on GPUs; 0 on CPUs and SoCs",
    "total": "the prefill peak: every component on the device; fits when it is <= the target's memory "
             "(vLLM: <= gpu_memory_utilization x memory, which it reserves whatever the load)",
    "tensor_parallel": "per GPU = ceil(weights / n) + KV / min(n, kv_heads) (MLA latents are replicated) "
                       "+ the rest replicated (conservative); n divides the attention heads",
}


# Guards against a typo, not physics: 64M tokens and a batch of 1M are beyond every public deployment. The batch
# cap is also the upper end of the largest-batch search.
MAX_CONTEXT_TOKENS = 64 * 1024 * 1024
MAX_BATCH = 1024 * 1024


def _check_count(value: object, what: str, minimum: int = 1, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise QlabError(f"{what} must be a whole number >= {minimum}, got {value!r}; fix that input.")
    if maximum is not None and value > maximum:
        raise QlabError(f"{what} of {value:,} is beyond the cap of {maximum:,}; check for a typo.")


@dataclass(frozen=True)
class Assumptions:
    """The editable assumptions behind the parts of a plan that are not pure shape arithmetic.

    Args:
        runtime: which runtime's allocation the plan models (``qlab.analyses.runtimes.runtime_names``).
        gpu_overhead_bytes: runtime overhead per GPU. A CUDA context with cuBLAS/cuDNN handles takes about
            0.55 GB on an H200 (measured); the rest covers caching-allocator fragmentation.
        host_overhead_bytes: the same for CPUs and SoCs (the OS and runtime live outside the model budget).
        activation_bytes_per_value: None follows the weights: 4 when everything is fp32, 2 otherwise.
        prompt_tokens: tokens prefilled at once; None takes the whole context as the prompt (the worst case).
        prefill_chunk_tokens: None prefills the whole prompt in one pass (transformers); smaller chunks shrink
            the working set, not the cache.
        attention_scores_materialised: True for eager attention (transformers' fallback for Gemma-2 and
            gpt-oss), False for SDPA / FlashAttention.
        kv_group_size: values per scale for int8/int4 KV caches (KIVI uses 32).
        quantize_lm_head: whether an untied output head is quantized with the blocks (AWQ/GPTQ keep it at 16
            bits). Loaded models follow ``qlab.models.loading.quantizable_linears`` instead, as the sweep does.
        max_gpus: the largest tensor-parallel degree considered.
        vllm_block_size, gpu_memory_utilization, max_num_batched_tokens, max_num_seqs: vLLM's engine arguments
            (defaults: vLLM's, for a 70+ GB GPU).
        llamacpp_ubatch, llamacpp_flash_attention: llama.cpp's -ub and -fa.
    """

    runtime: str = "transformers"
    gpu_overhead_bytes: int = GIB
    host_overhead_bytes: int = 0
    activation_bytes_per_value: int | None = None
    prompt_tokens: int | None = None
    prefill_chunk_tokens: int | None = None
    attention_scores_materialised: bool = False
    kv_group_size: int = 32
    quantize_lm_head: bool = False
    max_gpus: int = 64
    vllm_block_size: int = 16
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    llamacpp_ubatch: int = 512
    llamacpp_flash_attention: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "runtime", runtimes.get_runtime(self.runtime).name)
        for name in ("gpu_overhead_bytes", "host_overhead_bytes"):
            _check_count(getattr(self, name), name.replace("_", " "), minimum=0)
        for name in ("kv_group_size", "max_gpus", "vllm_block_size", "max_num_batched_tokens", "max_num_seqs",
                     "llamacpp_ubatch"):
            _check_count(getattr(self, name), name.replace("_", " "), minimum=1)
        for name in ("activation_bytes_per_value", "prompt_tokens", "prefill_chunk_tokens"):
            if getattr(self, name) is not None:
                _check_count(getattr(self, name), name.replace("_", " "), minimum=1)
        utilization = self.gpu_memory_utilization
        if isinstance(utilization, bool) or not isinstance(utilization, int | float) or not 0 < utilization <= 1:
            raise QlabError(f"gpu_memory_utilization must be in (0, 1], got {utilization!r}; vLLM's default is 0.9.")

    def overhead_bytes(self, kind: str) -> int:
        return self.gpu_overhead_bytes if kind == "gpu" else self.host_overhead_bytes

    def runtime_options(self) -> dict:
        return {"eager_attention": self.attention_scores_materialised, "block_size": self.vllm_block_size,
                "gpu_memory_utilization": self.gpu_memory_utilization,
                "max_num_batched_tokens": self.max_num_batched_tokens, "max_num_seqs": self.max_num_seqs,
                "n_ubatch": self.llamacpp_ubatch, "flash_attention": self.llamacpp_flash_attention}


@dataclass(frozen=True)
class KVCache:
    """KV-cache bytes for one context and batch; ``shards`` heads can be split across tensor-parallel GPUs."""

    kv_dtype: str
    scheme_label: str
    values: int
    total_bytes: int
    scales_bytes: int
    shards: int  # KV heads a tensor-parallel group can split; 1 when every GPU holds all of it (MLA)

    @property
    def bits_per_value(self) -> float:
        return 8 * self.total_bytes / self.values if self.values else 0.0

    def per_gpu_bytes(self, gpus: int) -> int:
        """Bytes each of ``gpus`` tensor-parallel ranks holds; heads are replicated once gpus > heads."""
        return math.ceil(self.total_bytes * math.ceil(self.shards / gpus) / self.shards)


@dataclass(frozen=True)
class TargetFit:
    """Whether a plan fits one target, with how much room, how far it stretches, and how many GPUs it needs."""

    hardware_id: str
    hardware_name: str
    kind: str
    memory_bytes: int
    budget_bytes: int  # what the runtime may use: the memory, or vLLM's gpu_memory_utilization share of it
    overhead_bytes: int
    total_bytes: int  # the prefill peak on this target
    steady_bytes: int
    headroom_bytes: int  # budget - peak; negative when it does not fit
    fits: bool
    max_context: int  # 0 when the weights alone do not fit
    max_context_is_model_limit: bool  # True when the model's own maximum, not memory, is the limit
    max_batch: int
    gpus_needed: int | None  # tensor-parallel degree; None when max_gpus do not suffice (or not a GPU)
    per_gpu_bytes: int | None
    runs_natively: bool  # every format of the scheme is in the target's native_formats


@dataclass(frozen=True)
class MemoryPlan:
    """Memory a runtime needs to serve a model under a scheme: its prefill peak and steady decode state, by
    component, and the verdict (on the peak) for each target."""

    model: str
    scheme_label: str
    unquantized_format: str
    params: int
    active_params: int  # per token; differs from params only for MoE (every expert stays resident)
    context_tokens: int
    batch: int
    weights: SizeReport
    kv: KVCache  # the cache at the prefill peak
    peak: MemoryState
    steady: MemoryState
    assumptions: Assumptions
    targets: tuple[TargetFit, ...]
    notes: tuple[str, ...]
    arch: Architecture = field(repr=False, compare=False)
    formats: tuple[str, ...] = ()
    inputs: runtimes.Inputs | None = field(default=None, repr=False, compare=False)

    @property
    def runtime(self) -> str:
        return self.assumptions.runtime

    @property
    def weights_bytes(self) -> int:
        return self.weights.size_bytes

    @property
    def scales_bytes(self) -> int:
        return self.weights.scale_bytes

    @property
    def algorithm_parts_bytes(self) -> dict[str, int]:
        """What rounding algorithms and sparsity store beside codes and scales: 2:4 positions, act-order's group
        index, AWQ's input scales (0 for schemes without them)."""
        return {"metadata_bytes": self.weights.metadata_bytes, "index_bytes": self.weights.index_bytes,
                "awq_scale_bytes": self.weights.awq_scale_bytes}

    @property
    def kv_cache_bytes(self) -> int:
        return self.peak.kv_bytes

    @property
    def activations_bytes(self) -> int:
        """Everything at the peak that is neither weights, cache, overhead nor vLLM's unused reserve: working
        sets, masks, workspaces, allocator rounding; the stacked components then add up to the peak."""
        return (self.peak.device_bytes - self.weights_bytes - self.kv_cache_bytes - self.peak.kind_bytes("overhead")
                - self.peak.kind_bytes("reserve"))

    @property
    def allocated_bytes(self) -> int:
        """What the framework allocates at the peak (no CUDA context): torch.cuda.max_memory_allocated's view."""
        return self.peak.allocated_bytes

    @property
    def primary(self) -> TargetFit:
        """The first target asked for; the flat fields (total, fits, ...) refer to it."""
        return self.targets[0]

    @property
    def overhead_bytes(self) -> int:
        return self.primary.overhead_bytes

    @property
    def total_bytes(self) -> int:
        return self.primary.total_bytes

    @property
    def fits(self) -> bool:
        return self.primary.fits

    @property
    def max_context(self) -> int:
        return self.primary.max_context

    @property
    def gpus_needed(self) -> int | None:
        return self.primary.gpus_needed

    def states_at(self, context_tokens: int, batch: int) -> tuple[MemoryState, MemoryState]:
        """(peak, steady) at another context or batch on the primary target (weights do not change)."""
        inputs = replace(_inputs_at(self.inputs, context_tokens, batch, self.assumptions),
                         overhead_bytes=self.primary.overhead_bytes, device_memory=self.primary.memory_bytes)
        return runtimes.states(self.runtime, inputs)

    def to_record(self) -> dict:
        """Flat JSON-ready row: every component, the primary target's verdict, then all targets."""
        fit = self.primary
        runtime = runtimes.get_runtime(self.runtime)
        return {
            "model": self.model, "scheme": self.scheme_label, "formats": list(self.formats),
            "runtime": runtime.name, "runtime_measured": runtime.measured, "runtime_source": runtime.source,
            "unquantized_format": self.unquantized_format,
            "params": self.params, "active_params": self.active_params,
            "quantized_params": self.weights.quantized_params, "unquantized_params": self.weights.other_params,
            "context_tokens": self.context_tokens, "batch": self.batch,
            "weights_bytes": self.weights_bytes,
            "quantized_weights_bytes": self.weights.quantized_bytes,
            "scales_bytes": self.scales_bytes, **self.algorithm_parts_bytes,
            "weights_before_scales_bytes": (self.weights_bytes - self.scales_bytes
                                            - sum(self.algorithm_parts_bytes.values())),
            "unquantized_bytes": self.weights.other_bytes,
            "bits_per_weight": round(self.weights.bits_per_weight, 6),
            "kv_dtype": self.kv.kv_dtype, "kv_scheme": self.kv.scheme_label,
            "kv_bits_per_value": round(self.kv.bits_per_value, 6),
            "kv_cache_bytes": self.kv_cache_bytes, "kv_scales_bytes": self.kv.scales_bytes,
            "kv_steady_bytes": self.steady.kv_bytes,
            "activations_bytes": self.activations_bytes,
            "reserved_bytes": self.peak.kind_bytes("reserve"),
            "allocated_bytes": self.allocated_bytes,
            "steady_allocated_bytes": self.steady.allocated_bytes,
            "host_bytes": self.peak.host_bytes,
            "peak_components": [asdict(c) for c in self.peak.components],
            "steady_components": [asdict(c) for c in self.steady.components],
            "hardware": fit.hardware_id, "memory_bytes": fit.memory_bytes, "budget_bytes": fit.budget_bytes,
            "overhead_bytes": fit.overhead_bytes, "total_bytes": fit.total_bytes,
            "steady_total_bytes": fit.steady_bytes,
            "headroom_bytes": fit.headroom_bytes, "fits": fit.fits, "max_context": fit.max_context,
            "max_context_is_model_limit": fit.max_context_is_model_limit, "max_batch": fit.max_batch,
            "gpus_needed": fit.gpus_needed, "per_gpu_bytes": fit.per_gpu_bytes,
            "runs_natively": fit.runs_natively,
            "targets": [asdict(t) for t in self.targets],
            "assumptions": asdict(self.assumptions),
            "notes": list(self.notes),
        }


def plan(model: str | Architecture | Mapping, scheme: SchemeSpec, context_tokens: int, batch: int = 1,
         kv_dtype: str = "fp16", hardware_ids: str | Sequence[str] = "h100-sxm-80gb",
         assumptions: Assumptions = Assumptions()) -> MemoryPlan:
    """Plan a catalog model (slug or HF id), an Architecture or a config.json dict under a scheme, a layout, a
    GGUF file type or a mix, for the runtime ``assumptions.runtime`` names.

    A mix maps fnmatch globs over the architecture's matrix names (``model.layers.*.mlp.down_proj``) to
    schemes or layouts; the first matching glob wins, and every matrix must match one (``"*"`` catches the rest).
    """
    arch = _architecture(model)
    counts = architectures.count_params(arch)
    notes = []
    if arch.num_mtp_layers:
        notes.append(f"The checkpoint's {arch.num_mtp_layers} multi-token-prediction layer(s) are not "
                     "counted: transformers and most engines do not load them.")
    if arch.vision is not None:
        notes.append(f"The vision tower ({counts.breakdown.get('vision', 0):,} parameters) stays resident at "
                     "16 bits; no text token runs it.")
    return _plan(arch, arch.slug, scheme, _catalog_matrices(arch, assumptions), counts.total,
                 counts.active_per_token, context_tokens, batch, kv_dtype, hardware_ids, assumptions, notes)


def plan_loaded(loaded: LoadedModel, scheme: SchemeSpec, context_tokens: int, batch: int = 1,
                kv_dtype: str = "fp16", hardware_ids: str | Sequence[str] = "h100-sxm-80gb",
                assumptions: Assumptions = Assumptions()) -> MemoryPlan:
    """Plan a loaded model: weights from its real tensors (equal to ``size_report``), the rest from its config.

    Mix globs match real module names, so ``model.layers.0.*`` picks one layer.
    """
    arch = architectures.from_config(loaded.model.config.to_dict(), slug=loaded.name)
    matrices = [(name, tuple(module.weight.shape), 1) for name, module in quantizable_linears(loaded.model)]
    params = sum(p.numel() for p in loaded.model.parameters())  # tied tensors once, as size_report counts
    counts = architectures.count_params(arch)
    active = params - counts.routed_experts_total + counts.routed_experts_active
    return _plan(arch, loaded.name, scheme, matrices, params, active, context_tokens, batch, kv_dtype,
                 hardware_ids, assumptions, [])


def model_weights(model: str | Architecture | Mapping, scheme: SchemeSpec,
                  assumptions: Assumptions = Assumptions()) -> SizeReport:
    """Weight bytes alone (no context, no target) of a catalog model under a scheme or a mix."""
    arch = _architecture(model)
    matrices = _catalog_matrices(arch, assumptions)
    return weights_mod.weights(arch, arch.slug, scheme, matrices, architectures.count_params(arch).total)[0]


def kv_cache(arch: Architecture, context_tokens: int, batch: int, kv_dtype: str = "fp16",
             group_size: int = 32, runtime: str = "vllm") -> KVCache:
    """The cache a decode step reads at ``context_tokens``: global layers hold the context, sliding ones
    min(context, window); MLA one latent per token (as serving engines store it)."""
    fmt = get_kv_format(kv_dtype)
    window = arch.sliding_window_tokens or context_tokens
    total = runtimes.kv_bytes(arch, fmt, group_size, runtime, context_tokens, min(context_tokens, window), batch)
    widths, heads = runtimes.kv_widths(arch, runtime)
    tokens = batch * (arch.num_global_layers * context_tokens + arch.num_sliding_layers * min(context_tokens, window))
    values = 0 if arch.model_type in ENCODER_MODEL_TYPES else tokens * heads * sum(widths)
    codes = -(-values * fmt.code_bits // 8)
    shards = 1 if arch.uses_mla else heads
    return KVCache(fmt.name, fmt.name, values, total, total - codes, shards)


def context_curve(memory_plan: MemoryPlan, contexts: Sequence[int]) -> list[dict]:
    """The prefill peak and the steady state on the primary target at each context length."""
    rows = []
    for context in contexts:
        peak, steady = memory_plan.states_at(int(context), memory_plan.batch)
        rows.append({"model": memory_plan.model, "scheme": memory_plan.scheme_label,
                     "context_tokens": int(context), "total_bytes": peak.device_bytes,
                     "steady_bytes": steady.device_bytes, "memory_bytes": memory_plan.primary.budget_bytes})
    return rows


def seed_facts(group_size: int = 128) -> list[dict]:
    """The commonly quoted memory figures recomputed from the format registry, with the scales they leave out shown.

    ``codes_bytes`` is the quoted figures' own arithmetic (params x bits / 8); ``scales_bytes`` adds a 16-bit scale per
    ``group_size`` weights; ``real_model_bytes`` is the catalog architecture with embeddings and head at fp16.
    """
    records = json.loads(SEED_FACTS_PATH.read_text(encoding="utf-8"))
    rows = []
    for fact in records["facts"]:
        fmt = get_format(fact["format"])
        scheme = QuantScheme(fmt.name, "group", group_size) if fmt.scaled else QuantScheme(fmt.name)
        params = int(fact["params"])
        if params % group_size:
            raise QlabError(f"group size {group_size} does not divide {params:,} parameters; pick 32, 64 or 128.")
        parts = scheme.storage_bytes((params // group_size, group_size))
        scales = parts["scales"] + parts["zero_points"]
        row = {"claim": fact["claim"], "params": params, "scheme": scheme.label,
               "claimed_bytes": int(fact["claimed_bytes"]), "codes_bytes": parts["codes"],
               "scales_bytes": scales, "total_bytes": parts["codes"] + scales,
               "bits_per_weight": scheme.bits_per_weight((params // group_size, group_size)),
               "real_model": fact.get("architecture"), "real_model_params": None, "real_model_bytes": None,
               "real_model_unquantized_bytes": None, "source": records["source"]}
        if fact.get("architecture"):
            weights = model_weights(fact["architecture"], scheme)
            row.update(real_model_params=weights.quantized_params + weights.other_params,
                       real_model_bytes=weights.size_bytes, real_model_unquantized_bytes=weights.other_bytes)
        rows.append(row)
    return rows


# --- internals ---------------------------------------------------------------------------------------------


def _architecture(model: str | Architecture | Mapping) -> Architecture:
    if isinstance(model, Architecture):
        return model
    if isinstance(model, Mapping):
        return architectures.from_config(dict(model))
    if isinstance(model, str):
        return architectures.get(model)
    raise QlabError(f"cannot plan a {type(model).__name__}; give a catalog slug, an HF id or a config.json.")


def _catalog_matrices(arch: Architecture, assumptions: Assumptions) -> list[tuple[str, tuple[int, ...], int]]:
    """(name glob, shape, count) of every matrix a scheme quantizes in a catalog architecture."""
    matrices = [(s.name_pattern, (s.out_features, s.in_features), s.count)
                for s in architectures.linear_shapes(arch)]
    if assumptions.quantize_lm_head and not arch.tie_word_embeddings:
        matrices.append(("lm_head", (arch.vocab_size, arch.hidden_size), 1))
    return matrices


def _requantized(arch: Architecture, chosen: Mapping[str, object],
                 matrices: list[tuple[str, tuple[int, ...], int]]) -> dict:
    """Inputs for the allocator rounding of a model torchao quantizes in place on the device (what
    ``quantize_`` does to a bf16 model): the untouched tensors as built, the converted matrices with the bf16
    size they replace. Empty for any other weights. Only one-byte codes (int8, fp8) are made straight from the
    weight; the int4 tile layout first pads a copy to 1024 columns, and its intermediates take the freed blocks
    (measured: no rounding left on its codes)."""
    if not chosen or not all(isinstance(s, Layout) and s.name.startswith("torchao-") for s in chosen.values()):
        return {}
    replaced = tuple((2 * math.prod(shape), chosen[name].storage_bytes(shape)["codes"], count)
                     for name, shape, count in matrices if chosen[name].bits == 8)
    sizes: dict[int, int] = {}
    for t in architectures.stored_tensors(arch):
        if t.name not in chosen and t.part not in ("mtp", "fp8_scales"):
            size = 2 * math.prod(t.shape)
            sizes[size] = sizes.get(size, 0) + t.count
    return {"tensor_sizes": tuple(sizes.items()), "requantized": replaced}


def _targets(hardware_ids: str | Sequence[str]) -> list[hardware.Hardware]:
    ids = [hardware_ids] if isinstance(hardware_ids, str) else list(hardware_ids)
    if not ids:
        raise QlabError("no target hardware given; pass at least one id from assets/hardware.json.")
    return [hardware.get(i) for i in ids]


def _largest(ok: Callable[[int], bool], upper: int) -> int:
    """Largest n in [1, upper] with ok(n), for ok monotone (true then false); 0 when ok(1) fails."""
    if not ok(1):
        return 0
    if ok(upper):
        return upper
    low, high = 1, upper
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if ok(middle) else (low, middle)
    return low


def _inputs_at(base: runtimes.Inputs, context: int, batch: int, a: Assumptions,
               target: hardware.Hardware | None = None) -> runtimes.Inputs:
    """The runtime inputs at another context, batch or target (the prompt follows the context unless fixed)."""
    prompt = min(a.prompt_tokens or context, context)
    changes = {"context": context, "prompt": prompt, "batch": batch,
               "chunk": min(prompt, a.prefill_chunk_tokens or prompt)}
    if target is not None:
        changes.update(overhead_bytes=a.overhead_bytes(target.kind), device_memory=target.memory_bytes)
    return replace(base, **changes)


def _budget(runtime: str, a: Assumptions, memory: int) -> int:
    # vLLM claims gpu_memory_utilization of the device at start-up and must fit everything inside it.
    return int(a.gpu_memory_utilization * memory) if runtime == "vllm" else memory


def _needed(state: MemoryState) -> int:
    return state.device_bytes - state.kind_bytes("reserve")


def _fit(memory_plan: MemoryPlan, target: hardware.Hardware) -> TargetFit:
    a, runtime = memory_plan.assumptions, memory_plan.runtime
    memory = target.memory_bytes
    budget = _budget(runtime, a, memory)

    def peak_at(context: int, batch: int) -> int:
        inputs = _inputs_at(memory_plan.inputs, context, batch, a, target)
        return _needed(runtimes.states(runtime, inputs)[0])

    inputs = _inputs_at(memory_plan.inputs, memory_plan.context_tokens, memory_plan.batch, a, target)
    peak, steady = runtimes.states(runtime, inputs)
    total, overhead = _needed(peak), a.overhead_bytes(target.kind)
    model_max = memory_plan.arch.max_context_tokens or UNBOUNDED_CONTEXT
    max_context = _largest(lambda c: peak_at(c, memory_plan.batch) <= budget, model_max)
    max_batch = _largest(lambda b: peak_at(memory_plan.context_tokens, b) <= budget, MAX_BATCH)
    gpus = per_gpu = None
    if target.kind == "gpu":
        heads = memory_plan.arch.num_attention_heads
        weights, kv = peak.kind_bytes("weights"), peak.kv_bytes
        for n in (n for n in range(1, a.max_gpus + 1) if heads % n == 0):
            need = math.ceil(weights / n) + math.ceil(kv * memory_plan.kv.per_gpu_bytes(n)
                                                      / max(memory_plan.kv.total_bytes, 1)) + total - weights - kv
            if need <= budget:
                gpus, per_gpu = n, need
                break
    elif total <= budget:
        gpus, per_gpu = 1, total
    return TargetFit(target.id, target.name, target.kind, memory, budget, overhead, total, _needed(steady),
                     budget - total, total <= budget, max_context,
                     max_context == model_max and max_context > 0, max_batch, gpus, per_gpu,
                     all(f in target.native_formats for f in memory_plan.formats))


def _plan(arch: Architecture, name: str, spec: SchemeSpec, matrices: list[tuple[str, tuple[int, ...], int]],
          params: int, active_params: int, context_tokens: int, batch: int, kv_dtype: str,
          hardware_ids: str | Sequence[str], assumptions: Assumptions, notes: list[str]) -> MemoryPlan:
    _check_count(context_tokens, "context length (tokens)", maximum=MAX_CONTEXT_TOKENS)
    _check_count(batch, "batch size", maximum=MAX_BATCH)
    targets = _targets(hardware_ids)
    runtime = runtimes.get_runtime(assumptions.runtime)
    if runtime.name == "llama.cpp" and not isinstance(spec, GGUFFile) and not (
            isinstance(spec, QuantScheme) and not spec.fmt.scaled):
        raise QlabError(f"llama.cpp loads GGUF files; plan weights as one of {', '.join(runtimes.GGUF_FILE_TYPES)} "
                        "(or a 16-bit cast) for it.")
    weights, label, rest, formats, chosen = weights_mod.weights(arch, name, spec, matrices, params)
    act_bytes = assumptions.activation_bytes_per_value or (4 if rest == "fp32" and runtime.name != "llama.cpp"
                                                           else 2)
    kv_format = get_kv_format(kv_dtype)
    kernels = frozenset(s.name for s in chosen.values() if isinstance(s, Layout))
    largest = weights_mod.largest_matrix(chosen, matrices, "torchao-int8-weight-only")
    base = runtimes.Inputs(arch, weights.size_bytes, kernels, largest, context_tokens, context_tokens,
                           batch, kv_format, assumptions.kv_group_size, act_bytes, 0, 0,
                           assumptions.runtime_options(), tensor_sizes=weights_mod.tensor_sizes(arch, chosen, rest, weights))
    base = replace(base, **_requantized(arch, chosen, matrices))
    inputs = _inputs_at(base, context_tokens, batch, assumptions, targets[0])
    peak, steady = runtimes.states(runtime.name, inputs)
    if arch.is_moe:
        notes.append(f"MoE: all {arch.num_experts} experts per layer are resident; each token runs "
                     f"{arch.experts_per_token}, so {active_params:,} of {params:,} parameters are active "
                     "(what decode speed depends on).")
        if runtime.name.startswith("transformers"):
            notes.append("MoE prefill: the experts' working set is modelled on transformers 5.x's default grouped_mm "
                         "experts (every routed token's input, gate_up output and down output gathered at once: "
                         f"{arch.experts_per_token} x max(hidden + 4 x expert width, 4 x hidden) values a token, "
                         "the last two of those hidden-sized copies in float32 where the router's weights are, as "
                         "DeepSeek-V3's), checked on Qwen3-30B-A3B and a 4-layer DeepSeek-V3 on an H200; the looped "
                         "eager experts (CPU, or "
                         "experts_implementation='eager') hold far less and are not modelled.")
        else:
            notes.append("MoE prefill: the experts' working set is an estimate (one MLP per routed expert), not "
                         f"read from {runtime.label}'s fused kernels.")
    if arch.max_context_tokens and context_tokens > arch.max_context_tokens:
        notes.append(f"{context_tokens:,} tokens is beyond the model's max_position_embeddings "
                     f"({arch.max_context_tokens:,}); quality past it is not guaranteed.")
    if arch.uses_mla:
        notes.append("MLA: every runtime caches the compressed latent (kv_lora_rank + qk_rope_head_dim values per "
                     "token and layer); transformers decompresses one layer's latents into per-head keys and values "
                     "while that layer attends, an activation counted in the prefill peak and in each decode step. A "
                     "latent is replicated on every tensor-parallel GPU.")
    if not runtime.measured:
        notes.append(f"{runtime.label}: these figures reproduce its own formulas ({runtime.source}); qlab has not "
                     "measured them.")
    if runtime.name == "vllm":
        tokens = runtimes.vllm_pool_tokens(inputs, peak)
        notes.append(f"vLLM refuses to start unless its KV pool holds max_model_len tokens of one request; this pool "
                     f"holds {tokens:,} (the model's maximum is {arch.max_context_tokens:,}): pass "
                     "--max-model-len accordingly.")
    if peak.host_bytes:
        notes.append(runtimes.host_note(peak))
    window = arch.sliding_window_tokens
    if runtime.name == "transformers" and window and inputs.prompt > window:
        notes.append(f"Sliding-window layers hold the whole {inputs.prompt:,}-token prompt until the first decode "
                     f"step trims them to {window:,}: the prefill peak, not the steady state, decides the fit.")
    kv = kv_cache(arch, inputs.prompt if runtime.name == "transformers" else context_tokens, batch,
                  kv_format.name, assumptions.kv_group_size, runtime.name)
    if runtime.name == "transformers":
        kv = replace(kv, total_bytes=peak.kv_bytes)
    memory_plan = MemoryPlan(
        model=name, scheme_label=label, unquantized_format=rest, params=params, active_params=active_params,
        context_tokens=context_tokens, batch=batch, weights=weights, kv=kv, peak=peak, steady=steady,
        assumptions=assumptions, targets=(), notes=tuple(notes), arch=arch, formats=formats, inputs=base)
    return replace(memory_plan, targets=tuple(_fit(memory_plan, t) for t in targets))
