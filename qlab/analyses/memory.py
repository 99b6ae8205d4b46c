"""The VRAM planner: weights (with their scales), KV cache, activations and runtime overhead, and fit verdicts.

Every component is arithmetic on named inputs; the formulas are stated once, in ``FORMULAS``, and shown by the
page and the CLI. Weight bytes come from ``QuantScheme.storage_bytes`` per matrix shape, so scale and
zero-point overhead is exact; for a loaded model they equal ``qlab.core.plan.size_report`` to the byte.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

from qlab.core.errors import QlabError
from qlab.core.formats import get_format
from qlab.core.plan import SizeReport, unquantized_format
from qlab.core.quant import QuantScheme, check_group_sizes
from qlab.models import architectures, hardware
from qlab.models.architectures import Architecture
from qlab.models.loading import ASSETS_DIR, LoadedModel, quantizable_linears

GIB = 2**30
KV_DTYPES: tuple[str, ...] = ("fp16", "bf16", "fp8", "int8", "int4")
# Encoders run one pass over the whole input and keep no cache between tokens.
ENCODER_MODEL_TYPES = frozenset({"bert"})
UNBOUNDED_CONTEXT = 2**24  # upper end of the largest-context search when a config states no maximum
SEED_FACTS_PATH = ASSETS_DIR / "seed_facts.json"

FORMULAS: dict[str, str] = {
    "weights": "sum over quantized matrices of scheme.storage_bytes((out, in)) (codes + scales + zero-points) "
               "x count, plus every other parameter (embeddings, untied lm_head, norms, biases, routers) "
               "x bits of the unquantized format / 8",
    "kv_cache": "layers x batch x tokens held x kv_heads x head_dim x 2 (K and V) at the KV dtype's storage "
                "(scales included); sliding-window layers hold min(context, window) tokens; MLA holds one "
                "latent of kv_lora_rank + qk_rope_head_dim per token per layer; encoders hold none",
    "activations": "bytes per value x batch x chunk x (2 x hidden + max(attention width, 3 x MLP width)) "
                   "+ attention scores (only if materialised: 2 x heads x chunk x context) + logits "
                   "(4 bytes, fp32, x batch x logits positions x vocab); attention width = (heads + kv_heads) x head_dim "
                   "+ (kv_heads + heads) x v_head_dim; MLP width = intermediate (dense) or "
                   "(experts per token + shared experts) x expert width (MoE)",
    "overhead": "a fixed runtime allowance per device: CUDA context, cuBLAS workspaces and caching-allocator "
                "slack on GPUs; 0 on CPUs and SoCs",
    "total": "weights + KV cache + activations + overhead; fits when total <= the target's memory",
    "tensor_parallel": "per GPU = ceil(weights / n) + KV / min(n, kv_heads) (MLA latents are replicated) "
                       "+ activations (replicated, conservative) + overhead; n divides the attention heads",
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
        gpu_overhead_bytes: runtime overhead per GPU. A CUDA context with cuBLAS/cuDNN handles takes about
            0.5 GiB on Hopper; the rest covers caching-allocator fragmentation.
        host_overhead_bytes: the same for CPUs and SoCs (the OS and runtime live outside the model budget).
        activation_bytes_per_value: None follows the weights: 4 when everything is fp32, 2 otherwise.
        logits_bytes_per_value: logits are upcast to fp32 before sampling.
        logits_positions: positions per sequence whose logits are computed; generate() and serving engines
            compute only the last one.
        prefill_chunk_tokens: None prefills the whole prompt in one pass (transformers); vLLM/SGLang chunk it.
        attention_scores_materialised: False for FlashAttention/SDPA, True for eager attention.
        kv_group_size: values per scale for int8/int4 KV caches (KIVI uses 32).
        quantize_lm_head: whether an untied output head is quantized with the blocks (AWQ/GPTQ keep it at 16
            bits). Loaded models follow ``qlab.models.loading.quantizable_linears`` instead, as the sweep does.
        max_gpus: the largest tensor-parallel degree considered.
    """

    gpu_overhead_bytes: int = GIB
    host_overhead_bytes: int = 0
    activation_bytes_per_value: int | None = None
    logits_bytes_per_value: int = 4
    logits_positions: int = 1
    prefill_chunk_tokens: int | None = None
    attention_scores_materialised: bool = False
    kv_group_size: int = 32
    quantize_lm_head: bool = False
    max_gpus: int = 64

    def __post_init__(self) -> None:
        for name in ("gpu_overhead_bytes", "host_overhead_bytes"):
            _check_count(getattr(self, name), name.replace("_", " "), minimum=0)
        for name in ("logits_bytes_per_value", "logits_positions", "kv_group_size", "max_gpus"):
            _check_count(getattr(self, name), name.replace("_", " "), minimum=1)
        if self.activation_bytes_per_value is not None:
            _check_count(self.activation_bytes_per_value, "activation bytes per value", minimum=1)
        if self.prefill_chunk_tokens is not None:
            _check_count(self.prefill_chunk_tokens, "prefill chunk tokens", minimum=1)

    def overhead_bytes(self, kind: str) -> int:
        return self.gpu_overhead_bytes if kind == "gpu" else self.host_overhead_bytes


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
class Activations:
    """Peak live activations of one prefill chunk (``FORMULAS["activations"]``)."""

    chunk_tokens: int
    bytes_per_value: int
    hidden_bytes: int
    sublayer_bytes: int
    scores_bytes: int
    logits_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.hidden_bytes + self.sublayer_bytes + self.scores_bytes + self.logits_bytes


@dataclass(frozen=True)
class TargetFit:
    """Whether a plan fits one target, with how much room, how far it stretches, and how many GPUs it needs."""

    hardware_id: str
    hardware_name: str
    kind: str
    memory_bytes: int
    overhead_bytes: int
    total_bytes: int
    headroom_bytes: int  # negative when it does not fit
    fits: bool
    max_context: int  # 0 when the weights alone do not fit
    max_context_is_model_limit: bool  # True when the model's own maximum, not memory, is the limit
    max_batch: int
    gpus_needed: int | None  # tensor-parallel degree; None when max_gpus do not suffice (or not a GPU)
    per_gpu_bytes: int | None
    runs_natively: bool  # every format of the scheme is in the target's native_formats


@dataclass(frozen=True)
class MemoryPlan:
    """Memory needed to serve a model under a scheme, by component, and its verdict for each target."""

    model: str
    scheme_label: str
    unquantized_format: str
    params: int
    active_params: int  # per token; differs from params only for MoE (every expert stays resident)
    context_tokens: int
    batch: int
    weights: SizeReport
    kv: KVCache
    activations: Activations
    assumptions: Assumptions
    targets: tuple[TargetFit, ...]
    notes: tuple[str, ...]
    arch: Architecture = field(repr=False, compare=False)
    formats: tuple[str, ...] = ()

    @property
    def weights_bytes(self) -> int:
        return self.weights.size_bytes

    @property
    def scales_bytes(self) -> int:
        return self.weights.scale_bytes

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv.total_bytes

    @property
    def activations_bytes(self) -> int:
        return self.activations.total_bytes

    @property
    def allocated_bytes(self) -> int:
        """What the framework allocates (weights + KV + activations): torch.cuda.max_memory_allocated's view."""
        return self.weights_bytes + self.kv_cache_bytes + self.activations_bytes

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

    def allocated_bytes_at(self, context_tokens: int, batch: int) -> int:
        """Weights + KV + activations at another context or batch (weights do not change)."""
        kv = kv_cache(self.arch, context_tokens, batch, self.kv.kv_dtype, self.assumptions.kv_group_size)
        acts = activations(self.arch, context_tokens, batch, self.assumptions, self.activations.bytes_per_value)
        return self.weights_bytes + kv.total_bytes + acts.total_bytes

    def to_record(self) -> dict:
        """Flat JSON-ready row: every component, the primary target's verdict, then all targets."""
        fit = self.primary
        return {
            "model": self.model, "scheme": self.scheme_label, "formats": list(self.formats),
            "unquantized_format": self.unquantized_format,
            "params": self.params, "active_params": self.active_params,
            "quantized_params": self.weights.quantized_params, "unquantized_params": self.weights.other_params,
            "context_tokens": self.context_tokens, "batch": self.batch,
            "weights_bytes": self.weights_bytes,
            "quantized_weights_bytes": self.weights.quantized_bytes,
            "scales_bytes": self.scales_bytes,
            "weights_before_scales_bytes": self.weights_bytes - self.scales_bytes,
            "unquantized_bytes": self.weights.other_bytes,
            "bits_per_weight": round(self.weights.bits_per_weight, 6),
            "kv_dtype": self.kv.kv_dtype, "kv_scheme": self.kv.scheme_label,
            "kv_bits_per_value": round(self.kv.bits_per_value, 6),
            "kv_cache_bytes": self.kv_cache_bytes, "kv_scales_bytes": self.kv.scales_bytes,
            "activations_bytes": self.activations_bytes,
            "activations_hidden_bytes": self.activations.hidden_bytes,
            "activations_sublayer_bytes": self.activations.sublayer_bytes,
            "activations_scores_bytes": self.activations.scores_bytes,
            "activations_logits_bytes": self.activations.logits_bytes,
            "prefill_chunk_tokens": self.activations.chunk_tokens,
            "allocated_bytes": self.allocated_bytes,
            "hardware": fit.hardware_id, "memory_bytes": fit.memory_bytes,
            "overhead_bytes": fit.overhead_bytes, "total_bytes": fit.total_bytes,
            "headroom_bytes": fit.headroom_bytes, "fits": fit.fits, "max_context": fit.max_context,
            "max_context_is_model_limit": fit.max_context_is_model_limit, "max_batch": fit.max_batch,
            "gpus_needed": fit.gpus_needed, "per_gpu_bytes": fit.per_gpu_bytes,
            "runs_natively": fit.runs_natively,
            "targets": [asdict(t) for t in self.targets],
            "assumptions": asdict(self.assumptions),
            "notes": list(self.notes),
        }


SchemeSpec = QuantScheme | Mapping[str, QuantScheme]


def plan(model: str | Architecture | Mapping, scheme: SchemeSpec, context_tokens: int, batch: int = 1,
         kv_dtype: str = "fp16", hardware_ids: str | Sequence[str] = "h100-sxm-80gb",
         assumptions: Assumptions = Assumptions()) -> MemoryPlan:
    """Plan a catalog model (slug or HF id), an Architecture or a config.json dict under a scheme or a mix.

    A mix maps fnmatch globs over the architecture's matrix names (``model.layers.*.mlp.down_proj``) to
    schemes; the first matching glob wins, and every matrix must match one (``"*"`` catches the rest).
    """
    arch = _architecture(model)
    counts = architectures.count_params(arch)
    notes = []
    if arch.num_mtp_layers:
        notes.append(f"The checkpoint's {arch.num_mtp_layers} multi-token-prediction layer(s) are not "
                     "counted: transformers and most engines do not load them.")
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
    return _weights(arch.slug, scheme, matrices, architectures.count_params(arch).total)[0]


def kv_scheme(kv_dtype: str, group_size: int = 32) -> QuantScheme:
    """How a KV cache of this dtype is stored, as a QuantScheme so its bits come from the format registry.

    fp8: one fp32 scale per layer tensor (vLLM's per-tensor scale); int8/int4: an fp16 scale and an integer
    zero-point per ``group_size`` values of a head vector (KIVI-style asymmetric groups).
    """
    kv_dtype = str(kv_dtype).strip().lower()
    if kv_dtype in ("fp16", "bf16"):
        return QuantScheme(kv_dtype)
    if kv_dtype == "fp8":
        return QuantScheme("fp8_e4m3", "tensor")
    if kv_dtype in ("int8", "int4"):
        return QuantScheme(kv_dtype, "group", group_size, symmetric=False, scale_dtype="fp16")
    raise QlabError(f"unknown KV-cache dtype '{kv_dtype}'; use one of {', '.join(KV_DTYPES)}.")


def kv_cache(arch: Architecture, context_tokens: int, batch: int, kv_dtype: str = "fp16",
             group_size: int = 32) -> KVCache:
    """KV-cache bytes (``FORMULAS["kv_cache"]``) for ``batch`` sequences of ``context_tokens`` each."""
    kv_dtype = str(kv_dtype).strip().lower()
    scheme = kv_scheme(kv_dtype, group_size)
    if arch.model_type in ENCODER_MODEL_TYPES:
        return KVCache(kv_dtype, scheme.label, 0, 0, 0, 1)
    if arch.uses_mla:
        # K and V are both rebuilt from one compressed latent plus the shared RoPE key (DeepSeek-V2 paper).
        widths, heads, shards = ((arch.kv_lora_rank or 0) + (arch.qk_rope_head_dim or 0),), 1, 1
    else:
        widths, heads, shards = (arch.head_dim, arch.head_dim), arch.num_kv_heads, arch.num_kv_heads
    if scheme.granularity == "group" and any(w % group_size for w in widths):
        raise QlabError(f"KV group size {group_size} does not divide the head width {widths[0]} of "
                        f"{arch.slug}; set a KV group size that divides it.")
    window = arch.sliding_window_tokens or context_tokens
    held = ((arch.num_global_layers, context_tokens), (arch.num_sliding_layers, min(context_tokens, window)))
    values = total = scales = 0
    for layers, tokens in held:
        for width in widths:
            rows = batch * tokens * heads
            if not layers or not rows:
                continue
            parts = scheme.storage_bytes((rows, width))
            values += layers * rows * width
            total += layers * sum(parts.values())
            scales += layers * (parts["scales"] + parts["zero_points"])
    return KVCache(kv_dtype, scheme.label, values, total, scales, shards)


def activations(arch: Architecture, context_tokens: int, batch: int, assumptions: Assumptions = Assumptions(),
                bytes_per_value: int = 2) -> Activations:
    """Peak prefill activations (``FORMULAS["activations"]``) of one chunk of the prompt."""
    chunk = min(context_tokens, assumptions.prefill_chunk_tokens or context_tokens)
    tokens = batch * chunk
    heads, kv_heads = arch.num_attention_heads, arch.num_kv_heads
    v_dim = arch.v_head_dim or arch.head_dim
    attention_width = (heads + kv_heads) * arch.head_dim + (kv_heads + heads) * v_dim
    mlp_widths = []
    if arch.num_dense_layers:
        mlp_widths.append(arch.intermediate_size)
    if arch.is_moe and arch.num_moe_layers:
        mlp_widths.append((arch.experts_per_token + arch.num_shared_experts) * arch.moe_intermediate_size)
    # A gated MLP holds gate, up and their product at once before down_proj runs.
    sublayer_width = max(attention_width, 3 * max(mlp_widths, default=0))
    scores = (2 * bytes_per_value * batch * heads * chunk * context_tokens
              if assumptions.attention_scores_materialised else 0)
    logits = (0 if arch.model_type in ENCODER_MODEL_TYPES else
              assumptions.logits_bytes_per_value * batch * min(assumptions.logits_positions, chunk)
              * arch.vocab_size)
    return Activations(chunk, bytes_per_value, bytes_per_value * tokens * 2 * arch.hidden_size,
                       bytes_per_value * tokens * sublayer_width, scores, logits)


def context_curve(memory_plan: MemoryPlan, contexts: Sequence[int]) -> list[dict]:
    """Total memory on the primary target at each context length (weights fixed, KV and activations grow)."""
    overhead = memory_plan.primary.overhead_bytes
    rows = []
    for context in contexts:
        allocated = memory_plan.allocated_bytes_at(int(context), memory_plan.batch)
        rows.append({"model": memory_plan.model, "scheme": memory_plan.scheme_label,
                     "context_tokens": int(context), "total_bytes": allocated + overhead,
                     "memory_bytes": memory_plan.primary.memory_bytes})
    return rows


def seed_facts(group_size: int = 128) -> list[dict]:
    """The seeds' memory figures recomputed from the format registry, with the scales they leave out shown.

    ``codes_bytes`` is the seed's own arithmetic (params x bits / 8); ``scales_bytes`` adds a 16-bit scale per
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


def _assign(spec: SchemeSpec, names: list[str], model: str) -> dict[str, QuantScheme]:
    """The scheme of each matrix name: one scheme for all, or the first matching glob of a mix."""
    if isinstance(spec, QuantScheme):
        return dict.fromkeys(names, spec)
    if not isinstance(spec, Mapping) or not spec:
        raise QlabError("give a QuantScheme or a non-empty {glob: QuantScheme} mix for the weights.")
    bad = [key for key, value in spec.items() if not isinstance(value, QuantScheme)]
    if bad:
        raise QlabError(f"mix entry '{bad[0]}' is not a QuantScheme; map each glob to a QuantScheme.")
    chosen, used = {}, set()
    for name in names:
        pattern = next((p for p in spec if fnmatch.fnmatchcase(name, p)), None)
        if pattern is None:
            raise QlabError(f"no glob of the mix matches '{name}' of {model}; add a '*' entry for the rest.")
        chosen[name] = spec[pattern]
        used.add(pattern)
    unused = [p for p in spec if p not in used]
    if unused:
        raise QlabError(f"mix glob '{unused[0]}' matches no matrix of {model} (they are named like "
                        f"'{names[0]}'); fix or drop it.")
    return chosen


def _catalog_matrices(arch: Architecture, assumptions: Assumptions) -> list[tuple[str, tuple[int, ...], int]]:
    """(name glob, shape, count) of every matrix a scheme quantizes in a catalog architecture."""
    matrices = [(s.name_pattern, (s.out_features, s.in_features), s.count)
                for s in architectures.linear_shapes(arch)]
    if assumptions.quantize_lm_head and not arch.tie_word_embeddings:
        matrices.append(("lm_head", (arch.vocab_size, arch.hidden_size), 1))
    return matrices


def _weights(model: str, spec: SchemeSpec, matrices: list[tuple[str, tuple[int, ...], int]],
             total_params: int) -> tuple[SizeReport, str, str, tuple[str, ...]]:
    """Exact weight bytes, the scheme's label, the unquantized format and the formats the scheme uses."""
    chosen = _assign(spec, [m[0] for m in matrices], model)
    check_group_sizes(chosen, {m[0]: m[1][-1] for m in matrices}, model)
    schemes = list(dict.fromkeys(chosen.values()))
    rest_formats = {unquantized_format(s) for s in schemes}
    # A mix of casts and scaled formats keeps the other tensors at fp16, as a single scaled scheme does.
    rest = rest_formats.pop() if len(rest_formats) == 1 else "fp16"
    label = schemes[0].label if isinstance(spec, QuantScheme) else "mixed: " + ", ".join(s.label for s in schemes)
    quantized_params = quantized_bytes = scale_bytes = 0
    for name, shape, count in matrices:
        parts = chosen[name].storage_bytes(shape)
        quantized_params += math.prod(shape) * count
        quantized_bytes += sum(parts.values()) * count
        scale_bytes += (parts["scales"] + parts["zero_points"]) * count
    other_params = total_params - quantized_params
    report = SizeReport(quantized_params, quantized_bytes, scale_bytes, other_params,
                        other_params * get_format(rest).bits // 8)
    return report, label, rest, tuple(dict.fromkeys(s.format for s in schemes))


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


def _fit(memory_plan: MemoryPlan, target: hardware.Hardware) -> TargetFit:
    a = memory_plan.assumptions
    overhead = a.overhead_bytes(target.kind)
    memory = target.memory_bytes
    total = memory_plan.allocated_bytes + overhead
    model_max = memory_plan.arch.max_context_tokens or UNBOUNDED_CONTEXT
    max_context = _largest(lambda c: memory_plan.allocated_bytes_at(c, memory_plan.batch) + overhead <= memory,
                           model_max)
    max_batch = _largest(lambda b: memory_plan.allocated_bytes_at(memory_plan.context_tokens, b) + overhead
                         <= memory, MAX_BATCH)
    gpus = per_gpu = None
    if target.kind == "gpu":
        heads = memory_plan.arch.num_attention_heads
        for n in (n for n in range(1, a.max_gpus + 1) if heads % n == 0):
            need = (math.ceil(memory_plan.weights_bytes / n) + memory_plan.kv.per_gpu_bytes(n)
                    + memory_plan.activations_bytes + overhead)
            if need <= memory:
                gpus, per_gpu = n, need
                break
    elif total <= memory:
        gpus, per_gpu = 1, total
    return TargetFit(target.id, target.name, target.kind, memory, overhead, total, memory - total,
                     total <= memory, max_context, max_context == model_max and max_context > 0, max_batch,
                     gpus, per_gpu, all(f in target.native_formats for f in memory_plan.formats))


def _plan(arch: Architecture, name: str, spec: SchemeSpec, matrices: list[tuple[str, tuple[int, ...], int]],
          params: int, active_params: int, context_tokens: int, batch: int, kv_dtype: str,
          hardware_ids: str | Sequence[str], assumptions: Assumptions, notes: list[str]) -> MemoryPlan:
    _check_count(context_tokens, "context length (tokens)", maximum=MAX_CONTEXT_TOKENS)
    _check_count(batch, "batch size", maximum=MAX_BATCH)
    targets = _targets(hardware_ids)
    weights, label, rest, formats = _weights(name, spec, matrices, params)
    act_bytes = assumptions.activation_bytes_per_value or (4 if rest == "fp32" else 2)
    if arch.is_moe:
        notes.append(f"MoE: all {arch.num_experts} experts per layer are resident; each token runs "
                     f"{arch.experts_per_token}, so {active_params:,} of {params:,} parameters are active "
                     "(what decode speed depends on).")
    if arch.max_context_tokens and context_tokens > arch.max_context_tokens:
        notes.append(f"{context_tokens:,} tokens is beyond the model's max_position_embeddings "
                     f"({arch.max_context_tokens:,}); quality past it is not guaranteed.")
    if arch.uses_mla:
        notes.append("MLA: the cache holds the compressed latent, as vLLM and SGLang store it (transformers' "
                     "eager DeepSeek code caches decompressed K and V, far larger); it is replicated on "
                     "every tensor-parallel GPU.")
    memory_plan = MemoryPlan(
        model=name, scheme_label=label, unquantized_format=rest, params=params, active_params=active_params,
        context_tokens=context_tokens, batch=batch, weights=weights,
        kv=kv_cache(arch, context_tokens, batch, kv_dtype, assumptions.kv_group_size),
        activations=activations(arch, context_tokens, batch, assumptions, act_bytes),
        assumptions=assumptions, targets=(), notes=tuple(notes), arch=arch, formats=formats)
    return replace(memory_plan, targets=tuple(_fit(memory_plan, t) for t in targets))
