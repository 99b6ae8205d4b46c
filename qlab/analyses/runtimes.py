"""How each runtime allocates memory: the prefill peak and the steady decode state, component by component.

A runtime is named by the user; its model is the allocation its code makes, read from that code:

- ``transformers``: ``generate`` with its DynamicCache. Every layer's cache grows by ``torch.cat``; a
  sliding-window layer keeps a *view* of the last window of the concatenation, so after the prefill it still
  holds the whole prompt and is trimmed to the window only by the first decode step
  (``DynamicSlidingWindowLayer.update``). The prefill peak is the largest working set of one layer on top of
  every layer's cache. Measured on a GPU (``bench/memory_gpu.py``).
- ``transformers-static``: ``StaticCache`` preallocates the whole context for global layers and the window for
  sliding ones (``StaticSlidingWindowLayer``); a prefill longer than the window passes one layer's full keys
  and values through as activations. Measured.
- ``transformers-offloaded``: ``DynamicCache(offloading=True)`` moves each layer's cache to the CPU after its
  update and prefetches the next one: two layers on the GPU while decoding. Measured.
- ``vllm``: paged KV blocks in the memory ``gpu_memory_utilization`` reserves, as ``Worker.
  determine_available_memory`` sizes it (formulas reproduced, not measured).
- ``llama.cpp``: a KV cache of ``n_ctx`` cells allocated at start, GGUF weights, a compute buffer for one ubatch
  (formulas reproduced, not measured).

Over 500 lines on purpose: one section per runtime, each with the formulas and citations of that runtime's
allocation; they are read side by side when a plan's peak is explained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qlab.core.errors import QlabError
from qlab.core.kv_formats import KVFormat, kv_format_names
from qlab.core.layouts import ggml_row_bytes, ggml_type_size
from qlab.core.registry import Registry
from qlab.models import architectures
from qlab.models.architectures import Architecture

CUBLAS_WORKSPACE_BYTES = 32 * 2**20  # torch's default cuBLAS workspace on Hopper (CUBLAS_WORKSPACE_CONFIG :4096:8)
ENCODER_MODEL_TYPES = frozenset({"bert"})  # one pass over the whole input, no cache between tokens
_MIB = 2**20


@dataclass(frozen=True)
class Runtime:
    """A runtime the planner models: its name, whether qlab measured it, and where its formulas come from."""

    name: str
    label: str
    measured: bool
    source: str
    description: str


_RUNTIMES: Registry[Runtime] = Registry("runtime")
RUNTIMES = _RUNTIMES.entries
register = _RUNTIMES.register
get_runtime = _RUNTIMES.get
runtime_names = _RUNTIMES.names  # in the order the page offers them


register(Runtime("transformers", "Hugging Face transformers generate (dynamic cache)", True,
                 "transformers cache_utils.py DynamicLayer / DynamicSlidingWindowLayer.update, masking_utils.py "
                 "sdpa_mask, integrations/sdpa_attention.py; measured by bench/memory_gpu.py",
                 "prefill holds every layer's keys for the whole prompt; decode trims sliding layers to the window"))
register(Runtime("transformers-static", "transformers with a static cache", True,
                 "transformers cache_utils.py StaticLayer / StaticSlidingWindowLayer; measured by "
                 "bench/memory_gpu.py", "the whole context preallocated, sliding layers at their window"))
register(Runtime("transformers-offloaded", "transformers with an offloaded cache", True,
                 "transformers cache_utils.py Cache.update with offloading=True (offload after update, "
                 "prefetch the next layer); measured by bench/memory_gpu.py",
                 "the cache lives in CPU memory; two layers at a time on the GPU"))
register(Runtime("vllm", "vLLM (paged KV)", False,
                 "vllm/v1/worker/gpu_worker.py Worker.determine_available_memory; vllm/v1/kv_cache_interface.py "
                 "AttentionSpec.page_size_bytes, FullAttentionSpec / SlidingWindowSpec.max_memory_usage_bytes",
                 "gpu_memory_utilization of the device reserved at start; the KV pool is what weights, the "
                 "profiled activations and non-torch memory leave of it"))
register(Runtime("llama.cpp", "llama.cpp (GGUF, n_ctx cells)", False,
                 "llama.cpp src/llama-context.cpp (n_ctx = GGML_PAD(n_ctx, 256)), src/llama-kv-cache.cpp "
                 "(ggml_row_size(type_k, n_embd_k_gqa) per cell), src/llama-kv-cache-iswa.cpp (SWA size), "
                 "src/llama-quant.cpp llama_tensor_get_type (Q4_K_M / Q5_K_M tensor types)",
                 "KV for every cell of n_ctx allocated at start, in the cache type asked for"))


@dataclass(frozen=True)
class Component:
    """One allocation of a memory state, with the formula that gives it.

    ``in_allocator`` marks what the framework's own allocator hands out (what torch.cuda.max_memory_allocated
    reports for transformers); ``on_device`` is False for what lives in host memory (an offloaded cache).
    """

    name: str
    bytes: int
    formula: str
    kind: str = "activations"  # "weights", "kv", "activations", "overhead" or "reserve" (vLLM's unused pool)
    in_allocator: bool = True
    on_device: bool = True


@dataclass(frozen=True)
class MemoryState:
    """What a runtime holds at one moment: the prefill peak, or the steady decode state."""

    label: str
    components: tuple[Component, ...]

    @property
    def device_bytes(self) -> int:
        return sum(c.bytes for c in self.components if c.on_device)

    @property
    def allocated_bytes(self) -> int:
        """The framework allocator's share (no CUDA context): what ``max_memory_allocated`` would report."""
        return sum(c.bytes for c in self.components if c.on_device and c.in_allocator)

    @property
    def host_bytes(self) -> int:
        return sum(c.bytes for c in self.components if not c.on_device)

    @property
    def kv_bytes(self) -> int:
        return self.kind_bytes("kv")

    def kind_bytes(self, kind: str) -> int:
        """Device bytes of one kind of component (weights, kv, activations, overhead, reserve)."""
        return sum(c.bytes for c in self.components if c.kind == kind and c.on_device)

    def bytes_of(self, *names: str) -> int:
        return sum(c.bytes for c in self.components if c.name in names)


@dataclass(frozen=True)
class Inputs:
    """Everything a runtime's states depend on, as plain data."""

    arch: Architecture
    weights_bytes: int
    kernels: frozenset[str]  # weight layouts with a known kernel transient ("torchao-int8-weight-only", ...)
    largest_matrix: tuple[int, int]  # (out, in) of the largest quantized matrix: int8 dequantizes one at a time
    context: int
    prompt: int
    batch: int
    kv: KVFormat
    kv_group_size: int
    act_bytes: int
    overhead_bytes: int
    device_memory: int
    options: dict = field(default_factory=dict)
    chunk: int = 0  # tokens per prefill forward; 0: the whole prompt at once
    tensor_sizes: tuple[tuple[int, int], ...] = ()  # (bytes, how many) of every stored weight tensor
    # (bf16 bytes, code bytes, how many) of the matrices torchao's quantize_ converts in place on the device
    requantized: tuple[tuple[int, int, int], ...] = ()


def allocator_rounding(sizes: tuple[tuple[int, int], ...]) -> int:
    """Bytes PyTorch's CUDA caching allocator hands out beyond the tensors themselves, allocated fresh.

    c10/cuda/CUDACachingAllocator.cpp: every block is a multiple of 512 B; a request of 10 MB or more gets a
    segment rounded up to 2 MiB, and a rest of at most 1 MiB is not split off (should_split) but stays in the
    block, so it counts as allocated.
    """
    return sum((_fresh_block(size) - size) * count for size, count in sizes)


def _fresh_block(size: int) -> int:
    block, segment = -(-size // 512) * 512, -(-size // (2 * _MIB)) * (2 * _MIB)
    return segment if size >= 10 * 10**6 and segment - size <= _MIB else block


def requantized_rounding(replaced: tuple[tuple[int, int, int], ...]) -> int:
    """Bytes the codes torchao's ``quantize_`` makes on the device hold beyond their size.

    quantize_ frees each bf16 matrix once its codes exist, so codes of that size land in the freed block (best
    fit): each splits it while more than 1 MiB would stay free, and the last that fits takes the whole rest
    (should_split). int8/fp8 codes are half a bf16 matrix, so every second one carries the 2 MiB rounding of
    the bf16 block it replaced (Gemma-3-1B's 6912 x 1152 MLP: 0.81 MiB each); a rest over 1 MiB stays free.
    """
    blocks: dict[tuple[int, int], int] = {}
    for bf16, codes, count in replaced:
        key = (_fresh_block(bf16), -(-codes // 512) * 512)
        blocks[key] = blocks.get(key, 0) + count
    extra = 0
    for (block, code), count in blocks.items():
        per_block = block // code if code > _MIB else 0
        rest = block - per_block * code
        if per_block >= 2 and 0 < rest <= _MIB:
            extra += count // per_block * rest
    return extra


def _fmt(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e7 else f"{n:,} B"


# --- the KV cache ------------------------------------------------------------------------------------------


def kv_widths(a: Architecture, runtime: str) -> tuple[tuple[int, ...], int]:
    """(widths of the vectors cached per token and layer, how many of them): K and V per KV head, or MLA's latent.

    MLA caches one latent per token whatever the runtime: transformers 5.x (DeepseekV3Attention.forward, "cache
    read / write is performed while latent KV is still compressed") stores the normalised kv_lora_rank part as
    keys and the rotated qk_rope_head_dim part as values, one head; vLLM one latent of kv_lora_rank +
    qk_rope_head_dim; llama.cpp that latent as K and kv_lora_rank as V.
    """
    if a.uses_mla:
        rank, rope = a.kv_lora_rank or 0, a.qk_rope_head_dim or 0
        if runtime.startswith("transformers"):
            return (rank, rope), 1
        return ((rank + rope,) if runtime == "vllm" else (rank + rope, rank)), 1
    return (a.head_dim, a.head_dim), a.num_kv_heads


def kv_vector_bytes(a: Architecture, kv: KVFormat, group: int, runtime: str) -> tuple[int, int, int]:
    """(K bytes, V bytes, vectors) per token and layer in the KV format (V is 0 where one latent serves both)."""
    widths, heads = kv_widths(a, runtime)
    sizes = [kv.bytes_per_vector(w, group) for w in widths]
    return sizes[0], sum(sizes[1:]), heads


def kv_bytes(a: Architecture, kv: KVFormat, group: int, runtime: str, tokens_full: int, tokens_local: int,
             sequences: int = 1) -> int:
    """Bytes of a cache holding ``tokens_full`` tokens in each global layer and ``tokens_local`` in each local
    (sliding or chunked) layer, for ``sequences`` sequences, with the format's per-layer scales."""
    if a.model_type in ENCODER_MODEL_TYPES:
        return 0
    k, v, heads = kv_vector_bytes(a, kv, group, runtime)
    per_token = heads * (k + v)
    layers = a.num_global_layers * tokens_full + a.num_sliding_layers * tokens_local
    return sequences * per_token * layers + 2 * a.num_layers * kv.per_layer_bytes


def _layer_kv(a: Architecture, kv: KVFormat, group: int, runtime: str, tokens: int, batch: int) -> tuple[int, int]:
    k, v, heads = kv_vector_bytes(a, kv, group, runtime)
    return batch * heads * k * tokens, batch * heads * v * tokens


# --- transformers: the working set of one layer ----------------------------------------------------------


def _widths(a: Architecture, grouped_experts: bool = False) -> dict[str, int]:
    """Values per token alive in one layer's stages. ``grouped_experts``: the routed experts run as transformers
    5.x runs them on a GPU (``integrations/moe.py grouped_mm_experts_forward``, its default
    experts_implementation), else as one MLP per routed expert (the engines' fused kernels, an estimate)."""
    heads, kv_heads = a.num_attention_heads, a.num_kv_heads
    v_dim = a.v_head_dim or a.head_dim
    family = architectures.family(a)
    h, width = a.hidden_size, a.moe_intermediate_size
    mlp = 0
    if a.num_dense_layers:
        mlp = (4 if family.fused else 3) * a.intermediate_size  # gate, act(gate), up, product (fused: gate_up too)
    if a.is_moe and a.num_moe_layers and grouped_experts:
        # grouped_mm keeps the gathered inputs (S x hidden, S = tokens x experts_per_token) for the whole call:
        # with the gate_up output and its masked_fill copy (+ the gathered biases), then at the end the down
        # output, its masked copy, the weighted copy and its unpermuted gather (+ the gathered down biases).
        # Weights in float32 (DeepSeek-V3) make the weighted copy and its gather float32: twice their values.
        bias = family.expert_bias
        weighted = 4 if family.fp32_routing_weights else 2
        routed = a.experts_per_token * max(h + (6 if bias else 4) * width, ((3 if bias else 2) + weighted) * h)
        # The shared experts run afterwards, beside the routed output.
        mlp = max(mlp, routed, h + 3 * a.num_shared_experts * width)
    elif a.is_moe and a.num_moe_layers:
        # Routed tokens run experts_per_token expert MLPs (each 3 x width, like a dense one) plus the shared ones.
        routed = a.experts_per_token * (2 * h + 3 * width)
        mlp = max(mlp, routed + 3 * a.num_shared_experts * width)
    mla = 0
    if a.uses_mla:
        # transformers' expand_kv decompresses the cached latents of every key token: kv_b_proj's output
        # (nope + v per head; V is a view of it) and the keys it concatenates with the rotated part.
        nope, rope = a.qk_nope_head_dim or 0, a.qk_rope_head_dim or 0
        mla = heads * (nope + v_dim + nope + rope)
    return {"mla_keys": mla,
            # MLA's queries: the rotated part and their concatenation; the output's contiguous copy.
            "mla_queries": heads * ((a.qk_rope_head_dim or 0) + a.head_dim + v_dim) if a.uses_mla else 0,
            "q": heads * a.head_dim, "out": heads * v_dim, "kv": kv_heads * (a.head_dim + v_dim),
            # repeat_kv copies keys and values per query head, except from one KV head (a stride-0 view).
            "repeat": 0 if kv_heads in (1, heads) else heads * (a.head_dim + v_dim), "mlp": mlp,
            "rope": 0 if family.encoder else 2 * (a.qk_rope_head_dim or a.head_dim) * (
                2 if family.sliding == "pattern" else 1)}


def _kernel_transients(i: Inputs) -> list[tuple[str, int, str, float]]:
    """What some weight kernels allocate while the MLP's largest linear runs: (name, bytes, formula, MLP
    intermediates alive then, as a fraction of the MLP's widths)."""
    a, t = i.arch, i.batch * (i.chunk or i.prompt)
    out, inp = i.largest_matrix
    extras = []
    if "torchao-int8-weight-only" in i.kernels:
        # Int8Tensor's weight-only linear: mm(x, qdata.t().to(bf16)): one matrix dequantized at a time, while
        # act(gate) and the up projection's output exist.
        extras.append(("int8 weight dequantized for its matmul", out * inp * i.act_bytes,
                       f"largest quantized matrix {out} x {inp} x {i.act_bytes} B", 2 / 3))
    if "torchao-fp8-per-row" in i.kernels:
        # _choose_scale_float8 + _quantize_affine_float8 (torch path): x.to(float32), / scale, clamp (3 x 4 B)
        # and the float8 result (1 B) live at once, per value of the down projection's input (the product).
        width = max(a.intermediate_size if a.num_dense_layers else 0, a.moe_intermediate_size, a.hidden_size)
        extras.append(("fp8 activation quantization", 13 * t * width,
                       f"13 B x tokens {t:,} x widest linear input {width}", 1 / 3))
    return extras


def _transformers_prefill(i: Inputs, static: bool, offloaded: bool) -> tuple[list[Component], int]:
    """The working set of the layer at the prefill peak (everything but weights and cache), and the prompt KV of
    one layer that static / offloaded caches hold as activations."""
    a, ab = i.arch, i.act_bytes
    q = i.chunk or i.prompt  # queries of one forward; keys span the prompt so far
    t = i.batch * q
    w = _widths(a, grouped_experts=True)
    eager = i.options.get("eager_attention", False)
    window = a.sliding_window_tokens
    masked_local = bool(a.num_sliding_layers) and window is not None and i.prompt >= window
    kv_k, kv_v = _layer_kv(a, i.kv, i.kv_group_size, "transformers", i.prompt, i.batch)
    layer_kv = kv_k + kv_v
    # Around every layer stay: the layer's input (the caller's variable), the embedding output (kept by the
    # model's forward), the residual and the normalised input; plus the rotary cos/sin of every position.
    base = ab * t * (4 * a.hidden_size) + ab * t * w["rope"]
    mlp_stage = base + ab * t * w["mlp"]
    # In attention the residual is still the layer's input: three hidden-sized tensors, then q and the output.
    attention = ab * t * (w["q"] + w["out"] - a.hidden_size + w["mla_queries"]) + ab * i.batch * i.prompt * w["mla_keys"]
    # Keys and values of the current layer are activations only where the cache does not own them.
    own_kv = layer_kv if (static and masked_local) or offloaded else 0
    comps: list[Component] = []
    masks = 0
    if eager:
        # Eager attention: scores in the compute dtype, their fp32 softmax and the probabilities (sinks: bf16).
        per_score = 3 * ab if architectures.family(a).sinks else 2 * ab + 4
        scores = per_score * i.batch * a.num_attention_heads * q * i.prompt
        types = (1 if a.num_global_layers else 0) + (1 if a.num_sliding_layers else 0)
        masks = types * ab * i.batch * q * i.prompt  # one float mask per layer type
        attention += ab * t * w["repeat"] + scores
        comps.append(Component("attention masks", masks, f"{types} x {ab} B x batch x prompt^2 (eager)"))
    elif masked_local:
        # SDPA gets a boolean sliding mask (batch x prompt x prompt, kept for the forward); PyTorch converts it
        # to the compute dtype inside each call, and GQA heads are repeated because a mask rules out enable_gqa.
        masks = i.batch * q * i.prompt
        attention += ab * t * w["repeat"] + ab * i.batch * q * i.prompt
        comps.append(Component("attention masks", masks, "1 B x batch x prompt^2 (bool sliding-window mask)"))
    # Offloading prefetches the next layer's cache (after the last layer: the first) while this one works.
    attention_stage = base + attention + (2 * own_kv if offloaded else own_kv) + masks
    mlp_stage += masks + (layer_kv if offloaded else 0)
    stages = [("attention", attention_stage, None), ("MLP", mlp_stage, None)]
    stages += [(f"MLP linear ({name})", base + masks + int(ab * t * w["mlp"] * alive) + b, (name, b, f))
               for name, b, f, alive in _kernel_transients(i)]
    stage, peak, kernel = max(stages, key=lambda s: s[1])
    if kernel is not None:
        comps.append(Component(*kernel))
    work = peak - sum(c.bytes for c in comps)
    comps.insert(0, Component("activations", work, f"{stage} stage of one layer: {ab} B x batch x prompt x "
                              f"(4 x hidden + rotary + that stage's widths) = {_fmt(work)}"))
    return comps, own_kv


def _transformers(i: Inputs, kind: str) -> tuple[MemoryState, MemoryState]:
    a, runtime = i.arch, f"transformers-{kind}" if kind != "dynamic" else "transformers"
    static, offloaded = kind == "static", kind == "offloaded"
    window = a.sliding_window_tokens or i.context
    rounding = allocator_rounding(i.tensor_sizes) + requantized_rounding(i.requantized)
    fixed = [Component("weights", i.weights_bytes, "exact bytes of the stored layout", "weights"),
             Component("cuBLAS workspace", CUBLAS_WORKSPACE_BYTES, "32 MiB from torch's caching allocator"),
             Component("runtime overhead", i.overhead_bytes, "CUDA context and allocator slack (assumption)",
                       "overhead", in_allocator=False)]
    full_cache = kv_bytes(a, i.kv, i.kv_group_size, runtime, i.context, min(i.context, window), i.batch)
    if static:
        prefill_kv = steady_kv = full_cache
        kv_formula = "global layers x context + sliding layers x min(context, window), preallocated"
    elif offloaded:
        layer = sum(_layer_kv(a, i.kv, i.kv_group_size, runtime, i.context, i.batch))
        prefill_kv, steady_kv = 0, layer
        kv_formula = "the next layer, prefetched back from the CPU"
    else:
        prefill_kv = kv_bytes(a, i.kv, i.kv_group_size, runtime, i.prompt, i.prompt, i.batch)
        steady_kv = full_cache
        kv_formula = "sliding layers still hold the whole prompt: every layer x prompt"
    work, _ = _transformers_prefill(i, static, offloaded)
    ids = Component("token ids and logits", 8 * i.batch * i.prompt + 4 * i.batch * a.vocab_size,
                    "int64 ids x batch x prompt + fp32 logits of the last position")
    fixed.insert(1, Component("allocator block rounding", rounding, "weight tensors of 10 MB or more rounded up "
                              "to 2 MiB when the rest is <= 1 MiB, others to 512 B; torchao codes made in freed bf16 "
                              "blocks: every block's last code keeps a rest of <= 1 MiB", "weights"))
    prefill = [*fixed[:2], Component("KV cache", prefill_kv, kv_formula, kind="kv"), *work, fixed[2], ids, fixed[3]]
    if offloaded:
        prefill.append(Component("KV cache (host)", full_cache, "every layer, in CPU memory", "kv",
                                 on_device=False))
    # Decoding: torch.cat copies one layer's keys (then values) into a tensor one token longer; a static cache
    # with a mask repeats one layer's keys and values over the query heads; int8 dequantizes one matrix.
    k_layer, v_layer = _layer_kv(a, i.kv, i.kv_group_size, runtime, i.context, i.batch)
    if static:
        step = (a.num_attention_heads // a.num_kv_heads) * (k_layer + v_layer)
        step_formula = "one layer's keys and values repeated over the query heads (masked SDPA)"
    else:
        step = max(k_layer, v_layer) + (k_layer + v_layer if offloaded else 0)
        step_formula = "torch.cat copies one layer's keys (or values), one token longer" + (
            ", beside the layer being decoded" if offloaded else "")
    if a.uses_mla:
        # Each decode step decompresses one layer's whole latent cache again (expand_kv), after the cache update.
        expanded = i.act_bytes * i.batch * i.context * _widths(a)["mla_keys"]
        if expanded > step:
            step, step_formula = expanded, (f"MLA: one layer's cached latents decompressed into per-head keys and "
                                            f"values: {i.act_bytes} B x batch x context x heads x (2 x nope + rope + v)")
    kernels = [(n, b, f) for n, b, f, _ in _kernel_transients(i) if n.startswith("int8")]
    steady = [*fixed[:2], Component("KV cache", steady_kv, "global layers x context + sliding layers x "
                                  "min(context, window)" if not offloaded else kv_formula, kind="kv"),
              Component("decode step", step, step_formula),
              *[Component(n, b, f) for n, b, f in kernels], fixed[2],
              Component("logits", 4 * i.batch * a.vocab_size, "fp32 x batch x vocab"), fixed[3]]
    if offloaded:
        steady.append(Component("KV cache (host)", full_cache, "every layer, in CPU memory", "kv",
                                on_device=False))
    return MemoryState("prefill peak", tuple(prefill)), MemoryState("steady decode", tuple(steady))


# --- vLLM ----------------------------------------------------------------------------------------------------


def _vllm(i: Inputs) -> tuple[MemoryState, MemoryState]:
    a, o = i.arch, i.options
    block, util, chunk = o.get("block_size", 16), o.get("gpu_memory_utilization", 0.9), o.get(
        "max_num_batched_tokens", 8192)
    max_seqs = o.get("max_num_seqs", 256)
    k, v, heads = kv_vector_bytes(a, i.kv, i.kv_group_size, "vllm")
    page = block * heads * (k + v)  # AttentionSpec.page_size_bytes per layer
    full_blocks = math.ceil(i.context / block)
    window = a.sliding_window_tokens
    # SlidingWindowSpec.max_memory_usage_bytes: the window's last sliding_window - 1 tokens plus one chunk,
    # +1 block because the window need not start on a block boundary.
    local_blocks = (math.ceil(min(i.context, (window or 0) - 1 + chunk) / block) + 1) if window else 0
    kv_need = i.batch * page * (a.num_global_layers * full_blocks + a.num_sliding_layers * local_blocks)
    w = _widths(a)
    tokens = min(chunk, i.batch * i.context)
    # profile_run: one forward of max_num_batched_tokens dummy tokens; vLLM's fused kernels keep the residual,
    # the hidden state and the wider of attention (q, k, v, out) and the MLP (gate_up + product) alive.
    profile = i.act_bytes * tokens * (2 * a.hidden_size + max(w["q"] + w["kv"] + w["out"], w["mlp"]))
    sampler = 4 * min(max_seqs, tokens) * a.vocab_size
    reserved = int(util * i.device_memory)
    pool = reserved - i.weights_bytes - profile - sampler - i.overhead_bytes
    spare = max(pool - kv_need, 0)
    comps = (Component("weights", i.weights_bytes, "exact bytes of the stored layout", "weights"),
             Component("activations", profile, f"profile run of {tokens:,} tokens (max_num_batched_tokens): "
                       f"{i.act_bytes} B x tokens x (2 x hidden + max(attention widths, MLP widths))"),
             Component("sampler", sampler, f"fp32 logits of min(max_num_seqs {max_seqs}, tokens) x vocab"),
             Component("KV cache", kv_need, f"batch x {page:,} B a {block}-token page per layer x (global layers x "
                       f"ceil(context / {block}) + sliding layers x (ceil(min(context, window - 1 + "
                       f"{chunk}) / {block}) + 1))", kind="kv"),
             Component("KV pool beyond this load", spare, f"gpu_memory_utilization {util} x device memory - the "
                       "rest: reserved at start-up whatever the load", "reserve"),
             Component("runtime overhead", i.overhead_bytes, "CUDA context, NCCL, CUDA graphs (assumption)",
                       "overhead", in_allocator=False))
    state = MemoryState("reserved at start-up", comps)
    return state, MemoryState("steady decode", comps)


def vllm_pool_tokens(i: Inputs, state: MemoryState) -> int:
    """Tokens of one sequence vLLM's KV pool holds (its start-up check compares this with max_model_len)."""
    pool = state.bytes_of("KV cache", "KV pool beyond this load")
    k, v, heads = kv_vector_bytes(i.arch, i.kv, i.kv_group_size, "vllm")
    per_token = heads * (k + v) * max(i.arch.num_global_layers, 1)
    return pool // per_token if per_token else 0


# --- llama.cpp -------------------------------------------------------------------------------------------


def _llamacpp(i: Inputs) -> tuple[MemoryState, MemoryState]:
    a, o = i.arch, i.options
    ubatch, flash = o.get("n_ubatch", 512), o.get("flash_attention", True)
    n_ctx = -(-(i.batch * i.context) // 256) * 256  # llama_context: n_ctx = GGML_PAD(n_ctx, 256), one unified cache
    window = a.sliding_window_tokens
    swa = -(-min(n_ctx, (window or 0) * i.batch + ubatch) // 256) * 256 if window else 0
    kv = kv_bytes(a, i.kv, i.kv_group_size, "llama.cpp", n_ctx, swa)
    w = _widths(a)
    # The graph allocator reserves the worst ubatch: f32 activations, logits for every token of it, and without
    # flash attention the KQ matrix of every head against every cell.
    act = 4 * ubatch * (2 * a.hidden_size + max(w["q"] + w["kv"] + w["out"], w["mlp"]))
    logits = 4 * ubatch * a.vocab_size
    kq = 0 if flash else 4 * ubatch * a.num_attention_heads * n_ctx
    comps = (Component("weights", i.weights_bytes, "GGUF tensors as llama-quantize types them", "weights"),
             Component("KV cache", kv, f"{n_ctx:,} cells (batch x context padded to 256) per global layer"
                       + (f", {swa:,} per sliding layer (window x batch + n_ubatch {ubatch}, padded to 256)"
                          if window else "") + f", {i.kv.name} rows", kind="kv"),
             Component("compute buffer", act + logits + kq, f"f32 x n_ubatch {ubatch} x (2 x hidden + widest "
                       "sublayer) + f32 logits x n_ubatch x vocab" + ("" if flash else
                                                                      " + f32 KQ x heads x n_ubatch x n_ctx")),
             Component("runtime overhead", i.overhead_bytes, "CUDA context (assumption)", "overhead",
                       in_allocator=False))
    state = MemoryState("allocated at start-up", comps)
    return state, MemoryState("steady decode", comps)


# --- GGUF files as llama-quantize writes them ------------------------------------------------------------

_GGUF_DEFAULT = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "Q8_0": "Q8_0"}
GGUF_FILE_TYPES: tuple[str, ...] = tuple(_GGUF_DEFAULT)


@dataclass(frozen=True)
class GGUFFile:
    """Weights as a GGUF file of one llama-quantize file type: every tensor typed by llama.cpp's own rules."""

    ftype: str

    def __post_init__(self) -> None:
        if self.ftype not in _GGUF_DEFAULT:
            raise QlabError(f"unknown GGUF file type '{self.ftype}'; choose one of {', '.join(_GGUF_DEFAULT)}.")

    @property
    def label(self) -> str:
        return f"GGUF {self.ftype}"
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # tensor_type_fallback: rows not whole K blocks


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def gguf_tensor_types(a: Architecture, ftype: str) -> list[tuple[str, tuple[int, ...], int, str]]:
    """(tensor, shape, count, ggml type) of every tensor of a GGUF file of this architecture and file type.

    llama.cpp src/llama-quant.cpp ``llama_tensor_get_type_impl`` for Q4_K_M / Q5_K_M (Q6_K and Q8_0 are uniform):
    attn_v and ffn_down of the use_more_bits layers go to Q6_K, the output head (or a tied embedding) to Q6_K
    (Q8_0 when its rows are not whole 256-blocks), 8-expert models keep attn_v/attn_k at Q8_0; rows that are not
    whole K blocks fall back (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0); 1-D tensors and routers stay F32.
    """
    ftype = ftype.strip().upper()
    if ftype not in _GGUF_DEFAULT:
        raise QlabError(f"unknown GGUF file type '{ftype}'; choose one of {', '.join(_GGUF_DEFAULT)}.")
    default = _GGUF_DEFAULT[ftype]
    mixture = ftype in ("Q4_K_M", "Q5_K_M")
    n = a.num_layers
    eight_experts = a.num_experts == 8
    out: list[tuple[str, tuple[int, ...], int, str]] = []

    def typed(kind: str, shape: tuple[int, ...]) -> str:
        row = shape[-1]
        chosen = kind
        block = ggml_type_size(chosen)[0]
        while row % block and chosen in _FALLBACK:
            chosen = _FALLBACK[chosen]
            block = ggml_type_size(chosen)[0]
        return chosen if row % block == 0 else "F16"

    for t in architectures.stored_tensors(a):
        if t.part in ("mtp", "fp8_scales", "vision"):
            continue
        name, shape = t.name, t.shape
        if len(shape) < 2 or t.part == "router" or t.part == "position_embedding":
            out.append((name, shape, t.count, "F32"))
            continue
        if t.part == "lm_head" or (t.part == "embedding" and a.tie_word_embeddings):
            head = "Q8_0" if ftype == "Q8_0" else "Q6_K"
            out.append((name, shape, t.count, "Q8_0" if shape[-1] % 256 else head))
            continue
        if not mixture:
            out.append((name, shape, t.count, typed(default, shape)))
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("v_proj", "qkv_proj", "kv_b_proj"):
            if leaf == "qkv_proj":
                kinds = [("Q5_K" if ftype == "Q4_K_M" else "Q6_K", t.count)]
            elif eight_experts:
                kinds = [("Q8_0", t.count)]
            else:
                more = sum(_use_more_bits(i, t.count) for i in range(t.count))
                kinds = [("Q6_K", more), (default, t.count - more)]
        elif leaf == "k_proj" and eight_experts:
            kinds = [("Q8_0", t.count)]
        elif leaf in ("down_proj", "w2") or leaf.endswith("down_proj"):
            per_layer = t.count // max(n, 1) if t.count >= n else 1
            layers = t.count // per_layer
            more = sum(_use_more_bits(i, n) for i in range(layers)) if layers == n else 0
            kinds = [("Q6_K", more * per_layer), (default, t.count - more * per_layer)]
        elif leaf == "o_proj" and eight_experts and ftype == "Q4_K_M":
            kinds = [("Q5_K", t.count)]
        else:
            kinds = [(default, t.count)]
        out += [(name, shape, count, typed(kind, shape)) for kind, count in kinds if count]
    return out


def gguf_bytes(a: Architecture, ftype: str) -> dict[str, int]:
    """Bytes of a GGUF file's tensors (what llama.cpp loads) by ggml type, and ``total``."""
    by_type: dict[str, int] = {}
    for _, shape, count, kind in gguf_tensor_types(a, ftype):
        rows = math.prod(shape[:-1])
        by_type[kind] = by_type.get(kind, 0) + count * rows * ggml_row_bytes(kind, shape[-1])
    return {**by_type, "total": sum(by_type.values())}


def states(runtime: str, i: Inputs) -> tuple[MemoryState, MemoryState]:
    """(prefill peak, steady decode) of a runtime for these inputs."""
    name = get_runtime(runtime).name
    if name not in i.kv.runtimes:
        offered = ", ".join(kv_format_names(name))
        raise QlabError(f"{name} does not store a '{i.kv.name}' KV cache; pick one of {offered}.")
    if name == "vllm":
        return _vllm(i)
    if name == "llama.cpp":
        return _llamacpp(i)
    return _transformers(i, name.removeprefix("transformers").removeprefix("-") or "dynamic")


def host_note(state: MemoryState) -> str:
    """A sentence for what a state keeps in host memory, or an empty string."""
    return f"{_fmt(state.host_bytes)} of KV cache stay in CPU memory." if state.host_bytes else ""
