"""The GPU decode benchmark's recipe: a random-initialised model from a catalog config, quantized by a library's
recipe, and one measured (format, code path) step. ``bench/gpu_speed.py`` is the program that runs the steps
(each in its own subprocess, with a time limit) and writes the JSON the Speed page shows.

Speed does not depend on weight values, so no checkpoint is needed: the model is built from
``assets/model_configs/<name>.json`` with random weights. Two code paths are measured because they disagree:

- ``hf-generate``: Hugging Face ``model.generate`` in eager mode, what most users run first;
- ``compiled-loop``: torchao's/gpt-fast's recipe: a compact Llama with a static KV cache, a one-token decode
  function under ``torch.compile(fullgraph=True)`` (CUDA graphs with ``reduce-overhead``), greedy loop.

Quantized weights only pay off on the second path: eagerly, each quantized matmul is a dequantize kernel plus a
BF16 matmul, so INT8/INT4 decode is *slower* than BF16 (the "quantized model slower than FP16" trap); compiled,
the dequantization fuses into the matmul and fewer bytes are read. The recipe follows torchao's generate.py
(every linear quantized, the output head too; coordinate-descent tuning, which also turns a one-row matmul into a
fused multiply + reduction; math attention in decode), plus one step it needs on torch 2.11: torchao's
tensor-subclass weights are unwrapped (``torchao.utils.unwrap_tensor_subclass``) before compiling, without which
the H100 spent ~7 ms of host time per INT4/INT8 decode step for 3.4-5.2 ms of GPU work
(path ``compiled-loop:subclass-weights`` in the results). Each row records the weight bytes a decode step reads,
the bandwidth that implies, a device-to-device copy's bandwidth, and with ``profile_steps`` the top kernels.
Only torch and transformers are imported at the top (torchao/bitsandbytes per step). Longer than 500 lines on
purpose: the model, its quantization and the timed step are one recipe, and every switch of it names the result
path it produces (``_path_name``), so they change together.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from qlab.core.quant import QuantScheme

log = logging.getLogger(__name__)  # progress of a step; bench/gpu_speed.py sends it to the step's log file

@dataclass(frozen=True)
class GpuFormat:
    """One format of the GPU decode benchmark (a ``--formats`` slug of the CLI): whose recipe runs it, what it
    stores and what the dashboard calls it."""

    backend: str  # the library recipe, as every result row records it
    library: str  # whose code quantizes it and runs its matmuls: torch, torchao, bitsandbytes, gemlite or qlab
    scheme: QuantScheme  # the weights a decode step reads; its format is the row's ``format``
    kernel: str  # what does a decode step's weight matmuls in the compiled loop (the profile's top kernels confirm it)
    label: str  # what the dashboard shows for it: the weights and whose kernel
    # Whether the scheme's bytes bound a decode step (its roofline): int8dq quantizes the activations too, so they
    # do not.
    bytes_bound: bool = True


INT4_GROUP_SIZE = 64  # torchao's README row for Llama-3.1-8B on H100 (int4wo-64)
_INT4_G64 = QuantScheme("int4", "group", INT4_GROUP_SIZE, symmetric=False)
_INT8_CHANNEL = QuantScheme("int8", "channel")
_FP8_CHANNEL = QuantScheme("fp8_e4m3", "channel")
FORMATS = {
    "bf16": GpuFormat("bf16", "torch", QuantScheme("bf16"),
                      "inductor Triton multiply-reduce (mm decomposed for one row)", "BF16, not quantized"),
    "int8wo": GpuFormat("torchao-int8wo", "torchao", _INT8_CHANNEL,
                        "inductor Triton multiply-reduce with the int8->bf16 cast and scale fused",
                        "INT8 weights, torchao"),
    "int4wo": GpuFormat("torchao-int4wo", "torchao", _INT4_G64,
                        "tinygemm aten._weight_int4pack_mm (torchao tile_packed_to_4d)",
                        "INT4 weights, torchao (tinygemm)"),
    "float8wo": GpuFormat("torchao-float8wo", "torchao", _FP8_CHANNEL,
                          "inductor Triton multiply-reduce with the fp8->bf16 cast and scale fused",
                          "FP8 weights, torchao"),
    # bitsandbytes' default block of 64.
    "nf4": GpuFormat("bnb-nf4", "bitsandbytes", QuantScheme("nf4", "group", 64), "bitsandbytes gemv_4bit",
                     "NF4 weights, bitsandbytes"),
    "int8dq": GpuFormat("torchao-int8dq", "torchao", _INT8_CHANNEL, "inductor int8 x int8 mm",
                        "INT8 weights and activations, torchao", bytes_bound=False),
    "int8gl": GpuFormat("gemlite-int8wo", "gemlite", _INT8_CHANNEL,
                        "gemlite GEMV_SPLITK Triton kernel (A16W8, int8 per channel)", "INT8 weights, gemlite"),
    "float8gl": GpuFormat("gemlite-float8wo", "gemlite", _FP8_CHANNEL,
                          "gemlite GEMV_SPLITK Triton kernel (A16W8, fp8 e4m3 per channel)", "FP8 weights, gemlite"),
    "int4gl": GpuFormat("gemlite-int4wo", "gemlite", _INT4_G64,
                        "gemlite GEMV_REVSPLITK Triton kernel (A16W4, int4 g64 asymmetric)", "INT4 weights, gemlite"),
    "int4tq": GpuFormat("qlab-int4-triton", "qlab", _INT4_G64,
                        "qlab Triton GEMV (A16W4, int4 g64 asymmetric, codes made floats by a bitwise OR)",
                        "INT4 weights, qlab's Triton kernel"),
}

# Path suffixes of the compiled loop's variants (``_path_name`` composes them).
FUSED = ":fused-projections"  # a step measured with ``Args.fuse_projections``
KEPT_WEIGHTS = ":subclass-weights"  # torchao's tensor-subclass weights left wrapped (``Args.unwrap_subclasses`` off)
# What the dashboard shows for each code path a step ran through (``step_path``'s names).
PATH_LABEL = {"compiled-loop": "compiled loop", "compiled-loop" + FUSED: "compiled loop, q/k/v and gate/up fused",
              "compiled-loop" + KEPT_WEIGHTS: "compiled loop, torchao's weight objects kept",
              "compiled-loop:skip-guards": "compiled loop, guards skipped", "eager-loop": "eager loop",
              "eager-loop" + FUSED: "eager loop, q/k/v and gate/up fused", "hf-generate": "transformers generate, eager"}


@dataclass(frozen=True)
class Args:
    """Shape of one measurement (shared by every step of a run)."""

    config: dict
    config_name: str
    device: str
    prompt_tokens: int
    new_tokens: int
    hf_new_tokens: int
    repetitions: int
    compile_mode: str
    dtype: torch.dtype
    quantize_head: bool = True
    profile_steps: int = 0
    all_directions: bool = False
    unwrap_subclasses: bool = True
    skip_guards: bool = False
    # gpt-fast's layout: q/k/v as one linear and gate/up as another, so a block runs four weight matmuls, not seven.
    fuse_projections: bool = False
    # Steps compiled side by side (``bench/gpu_speed.py --parallel``) time one at a time: each waits here for
    # its turn after compiling, so no other step's compile or autotuning shares the GPU while it is timed.
    turn_dir: str | None = None


# --- a compact Llama (the gpt-fast / torchao benchmark model), static KV cache --------------------------------


class KVCache(nn.Module):
    def __init__(self, batch: int, max_tokens: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        shape = (batch, kv_heads, max_tokens, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # In-place writes keep the cache a fixed-address buffer, which CUDA graphs need (gpt-fast's KVCache).
        self.k[:, :, positions] = k
        self.v[:, :, positions] = v
        return self.k, self.v


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Block(nn.Module):
    def __init__(self, c: dict, fused: bool = False) -> None:
        super().__init__()
        dim, heads = c["hidden_size"], c["num_attention_heads"]
        self.heads, self.kv_heads = heads, c.get("num_key_value_heads", heads)
        self.head_dim = c.get("head_dim") or dim // heads
        self.widths = (heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim)
        self.fused = fused
        if fused:
            # Each output row keeps its own scales in every format here, so stacking rows changes no rounding; it
            # only cuts a block's launches from seven to four and merges the small k/v matmuls, whose fixed cost
            # dominates them.
            self.wqkv = nn.Linear(dim, sum(self.widths), bias=False)
            self.w13 = nn.Linear(dim, 2 * c["intermediate_size"], bias=False)
        else:
            self.wq = nn.Linear(dim, self.widths[0], bias=False)
            self.wk = nn.Linear(dim, self.widths[1], bias=False)
            self.wv = nn.Linear(dim, self.widths[2], bias=False)
            self.w1 = nn.Linear(dim, c["intermediate_size"], bias=False)
            self.w3 = nn.Linear(dim, c["intermediate_size"], bias=False)
        self.wo = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.w2 = nn.Linear(c["intermediate_size"], dim, bias=False)
        eps = c.get("rms_norm_eps", 1e-5)
        self.attention_norm, self.ffn_norm = RMSNorm(dim, eps), RMSNorm(dim, eps)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, positions):
        b, t, _ = x.shape
        h = self.attention_norm(x)
        q, k, v = self.wqkv(h).split(self.widths, dim=-1) if self.fused else (self.wq(h), self.wk(h), self.wv(h))
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        k, v = self.cache.update(positions, k, v)
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.wo(y.transpose(1, 2).reshape(b, t, -1))
        h = self.ffn_norm(x)
        gate, up = self.w13(h).chunk(2, dim=-1) if self.fused else (self.w1(h), self.w3(h))
        return x + self.w2(nn.functional.silu(gate) * up)


class Llama(nn.Module):
    """Llama-family decoder with a static KV cache; ``forward(ids, positions) -> logits``."""

    def __init__(self, c: dict, fused: bool = False) -> None:
        super().__init__()
        self.config = c
        self.tok_embeddings = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(Block(c, fused) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c.get("rms_norm_eps", 1e-5))
        self.output = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        self.max_tokens = 0

    def setup_caches(self, batch: int, max_tokens: int, dtype: torch.dtype, device: str) -> None:
        block = self.layers[0]
        for layer in self.layers:
            layer.cache = KVCache(batch, max_tokens, block.kv_heads, block.head_dim, dtype).to(device)
        inv = 1.0 / (self.config.get("rope_theta", 10000.0) **
                     (torch.arange(0, block.head_dim, 2, device=device).float() / block.head_dim))
        angles = torch.outer(torch.arange(max_tokens, device=device).float(), inv)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("cos", angles.cos().to(dtype), persistent=False)
        self.register_buffer("sin", angles.sin().to(dtype), persistent=False)
        self.register_buffer("causal", torch.tril(torch.ones(max_tokens, max_tokens, dtype=torch.bool,
                                                             device=device)), persistent=False)
        self.max_tokens = max_tokens

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mask = self.causal[None, None, positions]
        cos, sin = self.cos[positions][None, None], self.sin[positions][None, None]
        x = self.tok_embeddings(ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, positions)
        return self.output(self.norm(x))


def _random_init_(model: nn.Module) -> None:
    # Random values: speed depends on shapes, not weights; std 0.02 keeps activations finite in BF16.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)


def build_compact(args: Args) -> Llama:
    with torch.device("meta"):
        model = Llama(args.config, args.fuse_projections).to(args.dtype)
    # Cast on the meta device first: to_empty then allocates the weights once, in their dtype (allocating FP32
    # and casting held 32 GB of an 8B model on the GPU at once).
    model = model.to_empty(device=args.device)
    _random_init_(model)
    return model.eval().requires_grad_(False)


def build_hf(args: Args) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in args.config.items() if not k.startswith("_")}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    # Built on the device itself (not meta + to_empty): the rotary inv_freq buffer is computed at init.
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=args.dtype)
    return model.eval().requires_grad_(False)


# --- quantization recipes -------------------------------------------------------------------------------------


def _linear_names(model: nn.Module, skip: tuple[str, ...]) -> list[str]:
    """The names of the model's linear layers a recipe replaces: all but ``skip``."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip]


def quantize(model: nn.Module, fmt: str, skip: tuple[str, ...]) -> None:
    """Apply the format's library recipe in place (the model is this step's own)."""
    if fmt == "bf16":
        return
    if fmt == "nf4":
        _bnb_nf4(model, skip)
        return
    if FORMATS[fmt].library == "gemlite":
        _gemlite(model, fmt, skip)
        return
    if fmt == "int4tq":
        from qlab.backends.int4_triton import Int4Linear

        for name in _linear_names(model, skip):
            model.set_submodule(name, Int4Linear(*int4_groups(model.get_submodule(name).weight.detach(),
                                                             INT4_GROUP_SIZE)))
        return
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    config = {
        "int8wo": lambda: Int8WeightOnlyConfig(),
        "int4wo": lambda: Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d"),
        "float8wo": lambda: Float8WeightOnlyConfig(),
        "int8dq": lambda: Int8DynamicActivationInt8WeightConfig(),
    }[fmt]()
    # torchao's generate.py quantizes every linear, the output head too (128256 x 4096, 1 GB in BF16).
    quantize_(model, config, filter_fn=lambda m, name: isinstance(m, nn.Linear) and name not in skip)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds on the device; a tensor subclass (torchao's quantized weights) counts its inner tensors
    (codes, scales, zero points), which is what a decode step reads."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def bytes_per_token(model: nn.Module) -> dict:
    """Weight bytes one decode step reads (every parameter but the embedding table, of which it reads one row, and
    the weight buffers of layers that keep them as buffers: gemlite's codes and scales) and the KV cache's size
    (math attention reads all of it, masked): the numerator of a bandwidth roofline."""
    runtime = (".k", ".v", "cos", "sin", "causal")  # the cache and the rotary / mask tables, not weights
    weights = sum(tensor_bytes(p) for name, p in model.named_parameters() if "embed" not in name)
    weights += sum(tensor_bytes(b) for name, b in model.named_buffers() if not name.endswith(runtime))
    cache = sum(tensor_bytes(b) for name, b in model.named_buffers() if name.endswith((".k", ".v")))
    return {"weight_bytes_per_token": weights, "kv_cache_bytes": cache}


def _bnb_nf4(model: nn.Module, skip: tuple[str, ...]) -> None:
    import bitsandbytes as bnb

    names = _linear_names(model, skip)
    for name in names:
        linear = model.get_submodule(name)
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                  compute_dtype=torch.bfloat16, quant_type="nf4", device="cpu")
        layer.weight = bnb.nn.Params4bit(linear.weight.data.cpu(), requires_grad=False, quant_type="nf4")
        model.set_submodule(name, layer.to(linear.weight.device))


def _gemlite(model: nn.Module, fmt: str, skip: tuple[str, ...]) -> None:
    """gemlite's weight-only recipes on every linear: 8-bit with one scale per output channel, or qlab's own int4
    g64 asymmetric codes. Its Triton GEMV kernels are a torch custom op, which the compiled loop calls as it is
    (per layer on an H100, ``bench/layer_ceiling.py``: int8 1.74x BF16 against 1.68-1.72x for torchao's compiled
    int8; int4 1.94x against tinygemm's 1.95x)."""
    from gemlite.helper import A16W8_FP8, A16W8_INT8, A16Wn

    device = str(next(model.parameters()).device)
    names = _linear_names(model, skip)
    if fmt == "int4gl":
        processor = A16Wn(device=device, dtype=torch.bfloat16)
        for name in names:
            linear = model.get_submodule(name)
            codes, scales, zeros = int4_groups(linear.weight.detach(), INT4_GROUP_SIZE)
            model.set_submodule(name, processor.from_weights(codes, scales, zeros, W_nbits=4,
                                                             group_size=INT4_GROUP_SIZE, bias=linear.bias))
        return
    processor = (A16W8_INT8 if fmt == "int8gl" else A16W8_FP8)(device=device)
    for name in names:
        model.set_submodule(name, processor.from_linear(model.get_submodule(name)))


def int4_groups(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qlab's int4 round-to-nearest (groups of ``group`` inputs, asymmetric) as gemlite's A16W4 takes it: unsigned
    codes 0..15 (out, in) as uint8, and per group the scale and the zero-point in code units (out, in / group),
    so that ``(codes - zeros) * scales`` is the weight the sweep evaluates (gemlite then holds the scales and
    zero-points in bf16, its activations' dtype)."""
    from qlab.core.quant import quantize

    scheme = QuantScheme("int4", "group", group, symmetric=False)
    qtensor = quantize(weight, scheme)
    rows, width = weight.shape
    qmin = scheme.fmt.qmin
    codes = (qtensor.codes.to(torch.int16) - qmin).to(torch.uint8).reshape(rows, width)
    zeros = (qtensor.zero_point.to(torch.float32) - qmin).reshape(rows, width // group)
    return codes, qtensor.scale.to(torch.float32).reshape(rows, width // group), zeros


def _wait_turn(turn_dir: str, key: str, timeout_s: float = 900.0) -> float:
    """Say this step has compiled (``<key>.ready``), then wait for the orchestrator's ``<key>.go``; seconds
    waited. A missing orchestrator must not hang a step forever: after ``timeout_s`` it goes on."""
    folder = Path(turn_dir)
    (folder / f"{key}.ready").touch()
    started = time.monotonic()
    while not (folder / f"{key}.go").exists() and time.monotonic() - started < timeout_s:
        time.sleep(0.1)
    return round(time.monotonic() - started, 1)


# --- measurement ----------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _stats(values: list[float], name: str) -> dict:
    if not values:
        return {name: None}
    median = statistics.median(values)
    return {name: round(median, 4), f"{name}_min": round(min(values), 4), f"{name}_max": round(max(values), 4),
            f"{name}_spread_pct": round(100 * (max(values) - min(values)) / median, 2) if median else None}


def _inductor_settings(all_directions: bool = False) -> None:
    """torchao's benchmark settings (``recommended_inductor_config_setter``). Coordinate-descent tuning matters
    twice: it tunes the fused dequantize-matmul kernels, and it is what makes inductor rewrite a one-row matmul
    (batch-1 decode) as a multiply + reduction, into which the INT8->BF16 conversion and the scale fuse (the
    ``mm`` decomposition in torch/_inductor/decomposition.py). torchao also sets
    ``coordinate_descent_check_all_directions``; on the H100 with torch 2.11 that pushed an 8-layer BF16 compile
    past 200 s (32 layers without it: about 100 s), so it is opt-in here. Flag names move between torch
    releases and setting an unknown one raises, so each is set only where it exists."""
    import torch._inductor.config as inductor

    for owner, name, value in ((inductor, "coordinate_descent_tuning", True),
                               (inductor, "coordinate_descent_check_all_directions", all_directions),
                               (inductor.triton, "unique_kernel_names", True), (inductor, "fx_graph_cache", True),
                               (inductor, "force_fuse_int_mm_with_mul", True)):
        if hasattr(owner, name):
            setattr(owner, name, value)
    torch.set_float32_matmul_precision("high")


def _math_attention():
    """Math SDPA for decode steps, as torchao's generate.py: inductor then generates the attention itself."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:
        import contextlib

        return contextlib.nullcontext()


def copy_bandwidth_gbps(device: str, nbytes: int = 1 << 30) -> float | None:
    """Device-memory bandwidth by a large device-to-device copy (bytes read + written), the roofline's ceiling."""
    if device != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return round(2 * 10 * nbytes / (start.elapsed_time(end) / 1000) / 1e9, 1)


def _profile_decode(step, model: nn.Module, token: torch.Tensor, position: torch.Tensor, steps: int,
                    skip_guards: bool = False) -> dict:
    """torch.profiler over ``steps`` compiled decode steps: kernels per step, the top kernels by device time, and
    how the host launched them (CUDA graph replays vs single kernel launches)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    position = position.clone()
    with torch.no_grad(), _math_attention(), _guard_stance(skip_guards), \
            profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            token = step(model, token, position).clone()
            position += 1
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sorted((e for e in events if e.device_type == DeviceType.CUDA), key=lambda e: e.self_device_time_total,
                     reverse=True)
    launches = {e.key: e.count / steps for e in events
                if e.device_type == DeviceType.CPU and e.key in ("cudaGraphLaunch", "cudaLaunchKernel",
                                                                  "cuLaunchKernel", "cuLaunchKernelEx",
                                                                  "cudaLaunchKernelExC")}
    host = sorted((e for e in events if e.device_type == DeviceType.CPU), key=lambda e: e.self_cpu_time_total,
                  reverse=True)
    return {
        "steps": steps,
        "host_top_ops": [{"name": e.key[:120], "self_us_per_step": round(e.self_cpu_time_total / steps, 1),
                          "calls_per_step": round(e.count / steps, 2)} for e in host[:10]],
        "device_us_per_step": round(sum(e.self_device_time_total for e in kernels) / steps, 1),
        "kernels_per_step": round(sum(e.count for e in kernels) / steps, 1),
        "host_launches_per_step": launches,
        "top_kernels": [{"name": e.key[:160], "us_per_step": round(e.self_device_time_total / steps, 1),
                         "calls_per_step": round(e.count / steps, 2)} for e in kernels[:14]],
    }


def _guard_stance(skip: bool):
    """After the first (compiling) repetition, optionally skip dynamo's guard evaluation on each call
    (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``): with one compiled graph and fixed shapes no guard
    can fail, and the H100 profile showed 'TorchDynamo Cache Lookup' at about 2 ms of host time per decode step."""
    import contextlib

    if not skip:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


def _inductor_counters() -> dict:
    """Inductor's counters that say whether CUDA graphs were used and matmuls decomposed (a skip is the usual
    reason a compiled decode stays launch-bound)."""
    from torch._dynamo.utils import counters

    return {k: v for k, v in counters["inductor"].items() if any(w in k for w in ("cudagraph", "decompose", "mm"))}


def _loop_step(args: Args, fmt: str, compiled: bool, turn_key: str = "") -> dict:
    record: dict = {}
    started = time.perf_counter()
    model = build_compact(args)
    record["build_seconds"] = round(time.perf_counter() - started, 2)
    log.info("built %s in %.1f s", fmt, record["build_seconds"])
    started = time.perf_counter()
    quantize(model, fmt, skip=() if args.quantize_head else ("output",))
    _sync(args.device)
    record["quantize_seconds"] = round(time.perf_counter() - started, 2)
    record["head_quantized"] = args.quantize_head and fmt != "bf16"
    if compiled and args.unwrap_subclasses and FORMATS[fmt].library == "torchao":
        # Measured on the H100 (torch 2.11, torchao 0.18): with tensor-subclass weights each compiled decode step
        # spent about 7 ms on the host for 3.4-5.2 ms of GPU work (CUDA graphs on), so INT4/INT8 decode was
        # host-bound. torchao's parametrization rebuilds the subclass inside the traced graph from plain tensors,
        # so the compiled step's inputs are plain parameters.
        from torchao.utils import unwrap_tensor_subclass

        unwrap_tensor_subclass(model)
        record["subclasses_unwrapped"] = True
    total = args.prompt_tokens + args.new_tokens
    model.setup_caches(1, 8 * math.ceil(total / 8), args.dtype, args.device)

    def decode_one(m: nn.Module, token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return m(token, positions)[:, -1].argmax(dim=-1, keepdim=True)

    step = decode_one
    if compiled:
        _inductor_settings(args.all_directions)
        record["inductor_all_directions"] = args.all_directions
        step = torch.compile(decode_one, mode=args.compile_mode, fullgraph=True)
    generator = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(0, args.config["vocab_size"], (1, args.prompt_tokens), generator=generator).to(args.device)
    prefill_ms, rates = [], []
    # no_grad, not inference_mode: as torchao's generate.py, whose tensor subclasses it was tested with.
    with torch.no_grad():
        for rep in range(args.repetitions + 1):  # the first is warm-up (and compile)
            _sync(args.device)
            t0 = time.perf_counter()
            positions = torch.arange(args.prompt_tokens, device=args.device)
            token = model(prompt, positions)[:, -1].argmax(dim=-1, keepdim=True)
            _sync(args.device)
            t1 = time.perf_counter()
            position = torch.tensor([args.prompt_tokens], device=args.device)
            with _math_attention(), _guard_stance(compiled and args.skip_guards and rep > 0):
                for _ in range(args.new_tokens):
                    token = step(model, token, position).clone()
                    position += 1
            _sync(args.device)
            t2 = time.perf_counter()
            log.info("repetition %d: %d decode steps in %.1f s", rep, args.new_tokens, t2 - t1)
            if rep == 0:
                record["compile_seconds" if compiled else "warmup_seconds"] = round(t2 - t1, 2)
                if args.turn_dir:
                    record["waited_for_turn_seconds"] = _wait_turn(args.turn_dir, turn_key)
                continue
            prefill_ms.append(1000 * (t1 - t0))
            rates.append(args.new_tokens / (t2 - t1))
    record.update(_stats(prefill_ms, "prefill_ms"))
    record.update(_stats(rates, "decode_tokens_per_s"))
    record.update(bytes_per_token(model))
    if rates:
        record["achieved_weight_gbps"] = round(record["weight_bytes_per_token"] * statistics.median(rates) / 1e9, 1)
    record["hbm_copy_gbps"] = copy_bandwidth_gbps(args.device)
    if rates and record["hbm_copy_gbps"]:
        # The bandwidth roofline: every weight byte and the whole KV cache read once per token at copy speed.
        bound = record["hbm_copy_gbps"] * 1e9 / (record["weight_bytes_per_token"] + record["kv_cache_bytes"])
        record["roofline_decode_tokens_per_s"] = round(bound, 1)
        record["roofline_fraction"] = round(statistics.median(rates) / bound, 4)
    if compiled and args.device == "cuda":
        record["inductor_counters"] = _inductor_counters()
        log.info("counters %s; profiling", record["inductor_counters"])
        if args.profile_steps:
            try:  # a profiler failure must not lose the timing above
                # From the prompt's end again: the cache holds prompt + new tokens, and an index past it trips
                # the compiled index_put's device-side bounds assert.
                start = torch.tensor([args.prompt_tokens], device=args.device)
                record["profile"] = _profile_decode(step, model, token, start,
                                                    min(args.profile_steps, args.new_tokens), args.skip_guards)
            except Exception as error:
                record["profile_error"] = f"{type(error).__name__}: {str(error)[:300]}"
    return record


def _hf_step(args: Args, fmt: str) -> dict:
    record: dict = {}
    started = time.perf_counter()
    model = build_hf(args)
    record["build_seconds"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    quantize(model, fmt, skip=() if args.quantize_head else ("lm_head",))
    _sync(args.device)
    record["head_quantized"] = args.quantize_head and fmt != "bf16"
    record["quantize_seconds"] = round(time.perf_counter() - started, 2)
    generator = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(0, args.config["vocab_size"], (1, args.prompt_tokens), generator=generator).to(args.device)
    mask = torch.ones_like(prompt)
    new = args.hf_new_tokens
    prefill_ms, rates = [], []
    with torch.no_grad():
        for rep in range(args.repetitions + 1):
            _sync(args.device)
            t0 = time.perf_counter()
            model(prompt, attention_mask=mask, logits_to_keep=1)
            _sync(args.device)
            t1 = time.perf_counter()
            model.generate(prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0)
            _sync(args.device)
            t2 = time.perf_counter()
            if rep == 0:
                record["warmup_seconds"] = round(t2 - t0, 2)
                continue
            prefill_ms.append(1000 * (t1 - t0))
            # generate() prefills too: take one prefill off its time to leave the decode steps.
            rates.append(new / max(1e-9, (t2 - t1) - (t1 - t0)))
    record.update(_stats(prefill_ms, "prefill_ms"))
    record.update(_stats(rates, "decode_tokens_per_s"))
    return record


def run_step(args: Args, fmt: str, path: str) -> dict:
    """One (format, path) measurement in this process; the row, with ``error`` set if it failed."""
    turn_key = f"{fmt}.{path}"  # the orchestrator's name for this step, as it asked for it
    if path.endswith(FUSED):  # one step of a run can ask for the fused layout, so both sit side by side
        args, path = replace(args, fuse_projections=True), path.removesuffix(FUSED)
    row = base_row(args, fmt, path)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        if path == "hf-generate":
            row.update(_hf_step(args, fmt))
        else:
            row.update(_loop_step(args, fmt, compiled=path == "compiled-loop", turn_key=turn_key))
    except Exception as error:  # the row records the failure; the orchestrator goes on with the next step
        row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:400] if str(error).strip() else ''}"
    if args.device == "cuda":
        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    return row


def base_row(args: Args, fmt: str, path: str) -> dict:
    gpu = torch.cuda.get_device_name() if args.device == "cuda" and torch.cuda.is_available() else None
    return {
        "model": args.config_name, "backend": FORMATS[fmt].backend, "format": FORMATS[fmt].scheme.format, "format_slug": fmt,
        # A compile mode other than the default names its own path, so both can sit in one results file.
        "path": _path_name(args, fmt, path), "device": args.device, "gpu": gpu, "batch": 1,
        "kernel": FORMATS[fmt].kernel if path == "compiled-loop" else None,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.hf_new_tokens if path == "hf-generate" else args.new_tokens,
        "repetitions": args.repetitions, "threads": torch.get_num_threads(),
        "compile_mode": args.compile_mode if path == "compiled-loop" else None,
        "prefill_ms": None, "decode_tokens_per_s": None, "peak_memory_bytes": None, "error": None,
        "torch": torch.__version__, "torchao": _version("torchao"), "bitsandbytes": _version("bitsandbytes"),
        "gemlite": _version("gemlite") if FORMATS[fmt].library == "gemlite" else None,
        "transformers": _version("transformers"), "measured": True,
    }


def _path_name(args: Args, fmt: str, path: str) -> str:
    """Every recipe switch that changes a compiled-loop measurement names its own path, so ``merge`` (keyed on
    format and path) never lets a variant overwrite the default recipe's row."""
    if path != "compiled-loop":
        return path + FUSED if args.fuse_projections and path == "eager-loop" else path
    if args.compile_mode != "reduce-overhead":
        path += f":{args.compile_mode}"
    if not args.unwrap_subclasses and FORMATS[fmt].library == "torchao":
        path += KEPT_WEIGHTS
    if not args.quantize_head and fmt != "bf16":
        path += ":head-bf16"
    if args.fuse_projections:
        path += FUSED
    return path + ":skip-guards" if args.skip_guards else path


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None
