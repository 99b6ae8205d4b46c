"""A model too large for one GPU: accelerate's placement over N GPUs with budgets from the memory planner, and
the planner's tensor-parallel figures beside the N-GPU roofline.

Placement (what sweep and sensitivity do with ``--device-map auto``): accelerate places weights only, so each
GPU's ``max_memory`` leaves room for what the planner says runs beside them during the evaluation: the runtime
overhead and one layer's activations on every GPU, and each placed decoder layer's KV cache. A layer's KV is at
most ``r`` times its weights (``r`` = the largest KV/weights ratio of any decoder layer), so

    max_memory = floor((GPU memory - overhead - activations) / (1 + r))

keeps weights + KV + activations + overhead within the GPU whatever layers accelerate puts there. Nothing here
allocates, so it runs on a CPU for any number of GPUs; nothing here has been measured on several GPUs yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from qlab.analyses import memory, roofline
from qlab.core.errors import QlabError
from qlab.core.formats import get_format
from qlab.core.quant import QuantScheme
from qlab.models import architectures, hardware
from qlab.models import placement as model_placement
from qlab.models.architectures import Architecture

MAX_GPUS = 64
TP_GROUP_SIZE = 128  # per-group scales of the int4/fp8 weight-only checkpoints served with tensor parallelism
FORMULAS = {
    "max_memory": "floor((GPU memory - overhead - activations) / (1 + r)), r = max over decoder layers of "
                  "(KV bytes of the layer / its weight bytes); accelerate's get_balanced_memory may lower it",
    "per_gpu": "weights accelerate placed there + KV bytes per layer x decoder layers placed there + activations "
               "(one layer's working set, counted on every GPU) + runtime overhead",
    **{key: memory.FORMULAS[key] for key in ("kv_cache", "activations", "tensor_parallel")},
    "tp_decode_tokens_per_s": "the roofline with N x one GPU's bandwidth (each GPU streams 1/N of the weights); "
                              "all-reduces between layers are not counted, so it is an upper bound",
}


@dataclass(frozen=True)
class GpuEstimate:
    """The planner's estimate for one GPU of a placement."""

    gpu: int
    decoder_layers: int
    first_layer: str | None
    last_layer: str | None
    weights_bytes: int
    kv_bytes: int
    activations_bytes: int
    overhead_bytes: int
    total_bytes: int
    max_memory_bytes: int  # the weights budget accelerate was given for this GPU
    memory_bytes: int


@dataclass(frozen=True)
class Placement:
    """Where each module of a model goes on N GPUs, each GPU's estimate, and the planner's inputs."""

    model: str
    hardware_id: str
    gpus: int
    dtype: str
    context_tokens: int
    batch: int
    kv_dtype: str
    params: int
    active_params: int
    planner_weights_bytes: int
    kv_bytes_per_layer: int
    kv_to_weights_ratio: float
    max_memory: dict[int, int]
    device_map: dict[str, int]
    per_gpu: tuple[GpuEstimate, ...]

    def to_record(self) -> dict:
        """JSON-ready: every field, per-GPU rows as dicts, GPU keys as strings."""
        record = asdict(self)
        record["max_memory"] = {str(k): v for k, v in self.max_memory.items()}
        record["kv_to_weights_ratio"] = round(self.kv_to_weights_ratio, 6)
        record["per_gpu"] = [asdict(g) for g in self.per_gpu]
        record["measured"] = False
        return record


def place(model: str | Architecture, hardware_id: str, gpus: int, dtype: str = "bf16",
          context_tokens: int = 2048, batch: int = 1,
          assumptions: memory.Assumptions = memory.Assumptions()) -> Placement:
    """accelerate's ``device_map="auto"`` for a catalog model over ``gpus`` GPUs of ``hardware_id``, with
    ``max_memory`` from the memory planner (``FORMULAS``); a model that does not fit is a QlabError."""
    arch = model if isinstance(model, Architecture) else architectures.get(model)
    target = hardware.get(hardware_id)
    if target.kind != "gpu":
        raise QlabError(f"{target.name} is not a GPU; pick a GPU id from the hardware catalog.")
    if isinstance(gpus, bool) or not isinstance(gpus, int) or not 1 <= gpus <= MAX_GPUS:
        raise QlabError(f"the number of GPUs must be a whole number from 1 to {MAX_GPUS}, got {gpus!r}.")
    kv_dtype = dtype if dtype in memory.KV_DTYPES else "fp16"  # transformers caches K and V in the model's dtype
    plan = memory.plan(arch, QuantScheme(dtype), context_tokens, batch, kv_dtype, hardware_id, assumptions)
    fixed = plan.overhead_bytes + plan.activations_bytes
    kv_per_layer = math.ceil(plan.kv_cache_bytes / arch.num_layers)

    model_ = model_placement.empty_model(arch, dtype)
    sizes = model_placement.module_sizes(model_)
    layers = model_placement.decoder_layers(model_)
    ratio = kv_per_layer / min(sizes[name] for name in layers)
    budget = math.floor((target.memory_bytes - fixed) / (1 + ratio))
    weights = sizes[""]
    placed = model_placement.infer_device_map(model_, {gpu: max(budget, 0) for gpu in range(gpus)})
    if budget <= 0 or any(not isinstance(d, int) for d in placed.device_map.values()):
        more = f"{math.ceil(weights / budget)} or more GPUs" if budget > 0 else "a GPU with more memory"
        raise QlabError(f"{arch.slug} in {dtype} ({weights / 1e9:.1f} GB of weights, plus {fixed / 1e9:.1f} GB per "
                        f"GPU of activations and overhead, plus the evaluation's KV) does not fit on {gpus} x "
                        f"{target.name}; use {more}, a smaller dtype or a shorter evaluation.")
    per_gpu = []
    for gpu in range(gpus):
        on_gpu = [name for name in layers if placed.device_of(name) == gpu]
        weights_here = sum(size for name, size in placed.module_bytes.items() if placed.device_map[name] == gpu)
        kv_here = kv_per_layer * len(on_gpu)
        total = weights_here + kv_here + plan.activations_bytes + plan.overhead_bytes
        per_gpu.append(GpuEstimate(gpu, len(on_gpu), on_gpu[0] if on_gpu else None, on_gpu[-1] if on_gpu else None,
                                   weights_here, kv_here, plan.activations_bytes, plan.overhead_bytes, total,
                                   placed.max_memory.get(gpu, budget), target.memory_bytes))
    return Placement(arch.slug, target.id, gpus, dtype, context_tokens, batch, kv_dtype, plan.params,
                     plan.active_params, plan.weights_bytes, kv_per_layer, ratio,
                     {gpu: placed.max_memory.get(gpu, budget) for gpu in range(gpus)},
                     {k: int(v) for k, v in placed.device_map.items()}, tuple(per_gpu))


def weight_scheme(name: str) -> QuantScheme:
    """A weight-only scheme by format name: scaled formats in groups of ``TP_GROUP_SIZE``, 16-bit ones plain."""
    fmt = get_format(name)
    return QuantScheme(fmt.name, "group", TP_GROUP_SIZE) if fmt.scaled else QuantScheme(fmt.name)


def tensor_parallel(model: str | Architecture, hardware_id: str, gpus: int, formats: Sequence[str],
                    context_tokens: int = 2048, batches: Sequence[int] = (1, 16),
                    runtime: str = "transformers") -> list[dict]:
    """Per weight format and batch: the planner's per-GPU memory under ``gpus``-way tensor parallelism
    (``memory.FORMULAS["tensor_parallel"]``) and the N-GPU roofline's decode tokens/s."""
    arch = model if isinstance(model, Architecture) else architectures.get(model)
    target = hardware.get(hardware_id)
    if arch.num_attention_heads % gpus:
        raise QlabError(f"{gpus} GPUs do not divide {arch.slug}'s {arch.num_attention_heads} attention heads, "
                        "which tensor parallelism splits; pick a divisor.")
    rows = []
    for name in formats:
        scheme = weight_scheme(name)
        for batch in batches:
            plan = memory.plan(arch, scheme, context_tokens, batch, "bf16", hardware_id,
                               memory.Assumptions(runtime=runtime))
            weights, kv = plan.peak.kind_bytes("weights"), plan.peak.kv_bytes
            rest = plan.peak.device_bytes - plan.peak.kind_bytes("reserve") - weights - kv
            kv_share = math.ceil(kv * plan.kv.per_gpu_bytes(gpus) / max(plan.kv.total_bytes, 1))
            per_gpu = math.ceil(weights / gpus) + kv_share + rest
            prediction = roofline.predict(arch, scheme, target, context_tokens=context_tokens, batch=batch,
                                          prompt_tokens=context_tokens,
                                          bandwidth_bytes_per_s=gpus * target.bandwidth_bytes_per_s)
            rows.append({"format": scheme.format, "scheme": scheme.label, "batch": batch, "runtime": runtime,
                         "weights_bytes": weights, "weights_per_gpu_bytes": math.ceil(weights / gpus),
                         "kv_bytes": kv, "kv_per_gpu_bytes": kv_share, "per_gpu_bytes": per_gpu,
                         "memory_bytes": target.memory_bytes, "fits": per_gpu <= target.memory_bytes,
                         "roofline_decode_tokens_per_s": round(prediction.decode_tokens_per_s, 2),
                         "roofline_native": prediction.native})
    return rows


def kv_bytes_per_token(model: str | Architecture, kv_dtype: str = "bf16") -> dict[str, int]:
    """KV bytes one token adds over all layers, as serving engines and as transformers store it (for MLA both
    cache the compressed latent)."""
    arch = model if isinstance(model, Architecture) else architectures.get(model)
    return {runtime: memory.kv_cache(arch, 1, 1, kv_dtype, runtime=runtime).total_bytes
            for runtime in ("vllm", "transformers")}
