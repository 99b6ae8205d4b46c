"""Model architectures from Hugging Face ``config.json``: shapes, exact parameter counts, weight matrices.

Counts are computed from the config alone (no weights, no transformers import), so the memory planner can
size models that would never fit on this machine. Each family's layout follows its transformers modeling
file; tests check every catalog model against a meta-device build and against the published count.

Over 500 lines on purpose: one counting function per model family, all checked against the same meta-device
build and published counts; the config schema lives in config_schema.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

from qlab.core.errors import QlabError
from qlab.models.config_schema import (
    MAX_CONFIG_BYTES,
    TextConfig,
    VisionConfig,
    validate_multimodal,
    validate_text,
)

CATALOG_DIR = Path(__file__).resolve().parents[2] / "assets" / "model_configs"

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class _Family:
    """How one transformers model family lays out its weights beyond what config.json states."""

    bias: str = "none"  # "none", "qkv" (Qwen2 hard-codes q/k/v biases), or "config" (reads attention_bias)
    mlp_bias: bool = False  # only Llama reads config.mlp_bias
    fused: bool = False  # Phi-3 checkpoints store qkv_proj and gate_up_proj
    qk_norm: bool = False  # Qwen3 and Gemma-3 RMS-normalise q and k per head
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    tie_default: bool = False  # what the family's config class assumes when the key is absent
    # "none", "all" (window on every layer), "alternate" (Gemma-2, gpt-oss), "qwen2", "pattern" (Gemma-3: every
    # sliding_window_pattern-th layer global), "chunked" (Llama-4: RoPE layers attend within attention_chunk_size)
    sliding: str = "none"
    mlp_name: str = "mlp"
    moe_prefix: str = "mlp"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    fused_experts: bool = False  # gpt-oss and Llama-4 store one gate_up_proj per expert
    expert_bias: bool = False  # gpt-oss: biases on every expert projection
    router: str = "gate"
    router_bias: str = ""  # DeepSeek-V3 stores ".e_score_correction_bias" (noaux_tc routing), gpt-oss ".bias"
    fp32_routing_weights: bool = False  # DeepSeek-V3's router scores (and so its expert weights) stay float32
    shared_expert: str = "shared_experts"
    shared_experts: int = 0  # shared experts when the config has no n_shared_experts (Llama-4: one)
    sinks: bool = False  # gpt-oss: one learned attention-sink logit per head
    encoder: bool = False  # BERT: learned positions, LayerNorm with bias, biases on every linear


_GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")
_FAMILIES: dict[str, _Family] = {
    "llama": _Family(bias="config", mlp_bias=True),
    "mistral": _Family(sliding="all"),
    "mixtral": _Family(sliding="all", moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2")),
    "qwen2": _Family(bias="qkv", sliding="qwen2"),
    "qwen3": _Family(bias="config", qk_norm=True, sliding="qwen2"),
    "qwen3_moe": _Family(bias="config", qk_norm=True, sliding="qwen2"),
    "gemma2": _Family(bias="config", layer_norms=_GEMMA_NORMS, tie_default=True, sliding="alternate"),
    "gemma3_text": _Family(bias="config", qk_norm=True, layer_norms=_GEMMA_NORMS, tie_default=True,
                           sliding="pattern"),
    "llama4_text": _Family(bias="config", sliding="chunked", mlp_name="feed_forward", moe_prefix="feed_forward",
                           fused_experts=True, router="router", shared_expert="shared_expert", shared_experts=1),
    "gpt_oss": _Family(bias="config", sliding="alternate", fused_experts=True, expert_bias=True, router="router",
                       router_bias=".bias", sinks=True),
    "phi3": _Family(fused=True, sliding="all"),
    "deepseek_v3": _Family(bias="config", router_bias=".e_score_correction_bias", fp32_routing_weights=True),
    "bert": _Family(encoder=True),
}
# Configs that nest their language model in text_config, beside a vision tower whose weights stay resident.
_MULTIMODAL: dict[str, str] = {"llama4": "llama4_text"}


@dataclass(frozen=True)
class Architecture:
    """A model's shape as its config.json states it, normalised across families."""

    slug: str
    hf_id: str | None
    model_type: str
    architecture: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int  # query/key width per head; MLA: qk_nope_head_dim + qk_rope_head_dim
    vocab_size: int
    intermediate_size: int  # width of the dense MLP
    tie_word_embeddings: bool
    max_context_tokens: int
    sliding_window_tokens: int | None
    layer_types: tuple[str, ...]  # SLIDING or FULL per layer
    attention_bias: bool  # biases on q, k, v and o
    qkv_bias: bool  # biases on q, k and v only
    mlp_bias: bool
    num_experts: int  # routed experts per MoE layer; 0 for dense models
    experts_per_token: int
    num_shared_experts: int
    moe_intermediate_size: int  # width of one expert; 0 for dense models
    num_dense_layers: int  # layers with a dense MLP (DeepSeek's first_k_dense_replace); the rest are MoE
    kv_lora_rank: int | None
    q_lora_rank: int | None
    qk_nope_head_dim: int | None
    qk_rope_head_dim: int | None
    v_head_dim: int | None
    num_mtp_layers: int  # multi-token-prediction layers shipped in the checkpoint, not run by transformers
    checkpoint_fp8_block: tuple[int, int] | None  # (rows, cols) per float32 scale in an FP8 checkpoint
    type_vocab_size: int  # BERT's token-type embedding rows; 0 elsewhere
    torch_dtype: str | None
    official_params: int | None
    official_params_source: str | None
    notes: str
    config: dict[str, Any] = field(repr=False, compare=False, hash=False)
    vision: VisionConfig | None = field(default=None, repr=False, compare=False, hash=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def uses_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    @property
    def num_sliding_layers(self) -> int:
        return self.layer_types.count(SLIDING)

    @property
    def num_global_layers(self) -> int:
        return self.layer_types.count(FULL)


@dataclass(frozen=True)
class ParamCounts:
    """Exact parameter counts; ``total`` is the model transformers builds, tied weights counted once."""

    total: int
    embedding: int
    lm_head: int  # 0 when tied to the embedding
    attention_per_layer: int
    dense_mlp_per_layer: int  # 0 when every layer is MoE
    moe_mlp_per_layer: int  # all routed + shared experts + router; 0 for dense models
    norms_per_layer: int
    routed_experts_total: int
    routed_experts_active: int  # the experts_per_token share that one token runs through
    active_per_token: int
    quantizable: int  # the block matrices listed by linear_shapes(arch)
    mtp: int  # multi-token-prediction module as stored in the checkpoint, including its embedding copies
    fp8_scales: int  # float32 block scales stored beside FP8 weights
    checkpoint_total: int  # every tensor in the published checkpoint: total + mtp + fp8_scales
    breakdown: dict[str, int] = field(hash=False)  # part name -> count, summing to checkpoint_total


class LinearShape(NamedTuple):
    """One kind of weight matrix: a glob over module names, its (out, in) shape and how many exist."""

    name_pattern: str
    out_features: int
    in_features: int
    count: int

    @property
    def params(self) -> int:
        return self.out_features * self.in_features * self.count


class _Tensor(NamedTuple):
    name: str
    shape: tuple[int, ...]
    count: int
    part: str
    matrix: bool = False  # a block weight matrix that weight quantizers convert (routers are left alone)

    @property
    def numel(self) -> int:
        return math.prod(self.shape) * self.count


_EXTRA_PARTS = ("mtp", "fp8_scales")
_LOCAL_TYPES = (SLIDING, "chunked_attention")  # a chunked layer attends within its chunk: a window, for memory


def _layer_types(cfg: TextConfig, family: _Family) -> tuple[tuple[str, ...], int | None]:
    num_layers = cfg.num_hidden_layers
    window = cfg.attention_chunk_size if family.sliding == "chunked" else cfg.sliding_window
    if cfg.layer_types is not None:
        types = tuple(SLIDING if t in _LOCAL_TYPES else FULL for t in cfg.layer_types)
    elif window is None or family.sliding == "none":
        types = (FULL,) * num_layers
    elif family.sliding == "alternate":
        # transformers' Gemma2Config and GptOssConfig: even layers (0, 2, ...) are local, odd ones global.
        types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(num_layers))
    elif family.sliding == "pattern":
        # Gemma3TextConfig: layer i is global when (i + 1) is a multiple of sliding_window_pattern (default 6).
        period = cfg.sliding_window_pattern or 6
        types = tuple(SLIDING if (i + 1) % period else FULL for i in range(num_layers))
    elif family.sliding == "chunked":
        # Llama4TextConfig: RoPE layers (no_rope_layers[i] == 1) attend within a chunk; every 4th is global NoPE.
        rope = cfg.no_rope_layers or [int((i + 1) % 4 != 0) for i in range(num_layers)]
        types = tuple(SLIDING if r else FULL for r in rope)
    elif family.sliding == "qwen2":
        # Qwen2 ships sliding_window=131072 but use_sliding_window=false; when on, it applies from
        # max_window_layers upwards.
        start = num_layers if cfg.max_window_layers is None else cfg.max_window_layers
        types = tuple(SLIDING if cfg.use_sliding_window and i >= start else FULL for i in range(num_layers))
    else:
        types = (SLIDING,) * num_layers
    return types, (window if SLIDING in types else None)


def _moe_layers(cfg: TextConfig) -> int:
    """How many layers carry experts (the rest run a dense MLP), in each family's own terms."""
    layers = cfg.num_hidden_layers
    if cfg.moe_layers is not None:
        return len(set(cfg.moe_layers))
    if cfg.interleave_moe_layer_step is not None:  # Llama-4: layers step-1, 2*step-1, ...
        return len(range(cfg.interleave_moe_layer_step - 1, layers, cfg.interleave_moe_layer_step))
    if cfg.first_k_dense_replace is not None or cfg.moe_layer_freq is not None:  # DeepSeek
        if (cfg.moe_layer_freq or 1) != 1:
            raise QlabError("Configs with moe_layer_freq other than 1 are not supported; use a standard layout.")
        return layers - min(cfg.first_k_dense_replace or 0, layers)
    # Qwen-MoE: a layer is sparse unless listed in mlp_only_layers or off the decoder_sparse_step grid.
    dense = set(cfg.mlp_only_layers or [])
    step = cfg.decoder_sparse_step or 1
    return sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0)


def _fp8_block(config: dict[str, Any]) -> tuple[int, int] | None:
    quant = config.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "fp8":
        return None
    block = quant.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        return None
    return (block[0], block[1])


def _slug_for(config: dict[str, Any], hf_id: str | None) -> str:
    name = hf_id or config.get("_name_or_path") or config["model_type"]
    return str(name).rstrip("/").split("/")[-1].lower()


def _family(model_type: str) -> _Family:
    family = _FAMILIES.get(model_type)
    if family is None:
        supported = sorted({*_FAMILIES, *_MULTIMODAL} - set(_MULTIMODAL.values()))
        raise QlabError(f"Model type '{model_type}' is not supported; use one of: {', '.join(supported)}.")
    return family


def from_config(config: dict[str, Any], slug: str | None = None) -> Architecture:
    """Normalise a config.json dict (optionally carrying a ``_qlab`` block) into an Architecture.

    The keys read are validated first (``qlab.models.config_schema``): a bad value is one QlabError naming it.
    """
    if not isinstance(config, dict):
        raise QlabError("The model config is not a JSON object; upload the model's config.json.")
    model_type = config.get("model_type")
    vision = None
    text = config
    if isinstance(model_type, str) and model_type in _MULTIMODAL:
        outer = validate_multimodal(config)
        vision = outer.vision_config
        text = {"architectures": outer.architectures, **outer.text_config,
                "tie_word_embeddings": outer.tie_word_embeddings}
        where = " text_config"
    else:
        where = ""
    cfg = validate_text(text, where)
    family = _family(cfg.model_type)
    if vision is not None and cfg.model_type != _MULTIMODAL[model_type]:
        raise QlabError(f"The config's text_config has model_type '{cfg.model_type}', not "
                        f"'{_MULTIMODAL[model_type]}'; fix config.json.")
    meta = config.get("_qlab") or {}
    architecture = (config.get("architectures") or [cfg.model_type])[0]
    if family.encoder and architecture != "BertModel":
        raise QlabError(f"'{architecture}' is not supported for BERT; only BertModel configs can be counted.")

    heads = cfg.num_attention_heads
    mla = cfg.kv_lora_rank is not None
    if mla:
        head_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    else:
        head_dim = cfg.head_dim or cfg.hidden_size // heads
    num_experts = cfg.routed_experts
    moe_layers = _moe_layers(cfg) if num_experts else 0
    layer_types, window = _layer_types(cfg, family)
    hf_id = meta.get("hf_id")
    tie = family.tie_default if cfg.tie_word_embeddings is None else cfg.tie_word_embeddings
    return Architecture(
        slug=slug or _slug_for(config, hf_id),
        hf_id=hf_id,
        model_type=cfg.model_type,
        architecture=str(architecture),
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        num_attention_heads=heads,
        num_kv_heads=cfg.num_key_value_heads or heads,
        head_dim=head_dim,
        vocab_size=cfg.vocab_size,
        intermediate_size=cfg.intermediate_size_mlp or cfg.intermediate_size,
        tie_word_embeddings=tie,
        max_context_tokens=cfg.max_position_embeddings or 0,
        sliding_window_tokens=window,
        layer_types=layer_types,
        attention_bias=family.bias == "config" and bool(cfg.attention_bias),
        qkv_bias=family.bias == "qkv",
        mlp_bias=family.mlp_bias and bool(cfg.mlp_bias),
        num_experts=num_experts,
        experts_per_token=cfg.num_experts_per_tok if num_experts else 0,
        num_shared_experts=(family.shared_experts if cfg.n_shared_experts is None else cfg.n_shared_experts)
        if num_experts else 0,
        # Mixtral and Llama-4 size experts with intermediate_size; Llama-4's dense MLP is intermediate_size_mlp.
        moe_intermediate_size=(cfg.moe_intermediate_size or cfg.intermediate_size) if num_experts else 0,
        num_dense_layers=cfg.num_hidden_layers - moe_layers,
        kv_lora_rank=cfg.kv_lora_rank,
        q_lora_rank=cfg.q_lora_rank if mla else None,
        qk_nope_head_dim=cfg.qk_nope_head_dim if mla else None,
        qk_rope_head_dim=cfg.qk_rope_head_dim if mla else None,
        v_head_dim=cfg.v_head_dim if mla else None,
        num_mtp_layers=cfg.num_nextn_predict_layers or 0,
        checkpoint_fp8_block=_fp8_block(config),
        type_vocab_size=(cfg.type_vocab_size or 2) if family.encoder else 0,
        torch_dtype=cfg.torch_dtype or cfg.dtype,
        official_params=meta.get("official_params"),
        official_params_source=meta.get("official_params_source"),
        notes=meta.get("notes", ""),
        config={k: v for k, v in config.items() if k != "_qlab"},
        vision=vision,
    )


def from_config_json(text: str | bytes, slug: str | None = None) -> Architecture:
    """Parse config.json text (e.g. a browser upload) into an Architecture."""
    if len(text) > MAX_CONFIG_BYTES:
        raise QlabError(f"The model config is {len(text):,} bytes, far beyond any config.json "
                        f"({MAX_CONFIG_BYTES:,} at most); upload the model's config.json.")
    try:
        config = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, and integers past Python's digit limit
        raise QlabError(f"The model config is not valid JSON ({str(exc)[:120]}); upload the model's "
                        "config.json.") from None
    except RecursionError:
        raise QlabError("The model config nests too deeply to be a config.json; upload the model's "
                        "config.json.") from None
    return from_config(config, slug=slug)


def from_config_file(path: str | Path) -> Architecture:
    """Read a config.json from disk into an Architecture named after the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise QlabError(f"Cannot read the model config {path} ({exc}); check the path.") from exc
    return from_config_json(text, slug=path.stem if path.stem != "config" else None)


@cache
def _catalog() -> tuple[Architecture, ...]:
    return tuple(from_config_file(p) for p in sorted(CATALOG_DIR.glob("*.json")))


def load_catalog() -> dict[str, Architecture]:
    """Every model config shipped in assets/model_configs, by slug."""
    return {arch.slug: arch for arch in _catalog()}


def get(name: str) -> Architecture:
    """A catalog model by slug or Hugging Face id, case-insensitively."""
    wanted = name.strip().lower()
    for arch in _catalog():
        if wanted in (arch.slug.lower(), (arch.hf_id or "").lower()):
            return arch
    options = ", ".join(arch.slug for arch in _catalog())
    raise QlabError(f"Unknown model '{name}'; choose one of {options}, or their Hugging Face ids.")


# --- weight layout -----------------------------------------------------------------------------------------


def _linear(name: str, out: int, inp: int, count: int, part: str, bias: bool = False) -> list[_Tensor]:
    weight = _Tensor(name, (out, inp), count, part, matrix=True)
    return [weight, _Tensor(f"{name}.bias", (out,), count, part)] if bias else [weight]


def _attention(a: Architecture, layer: str, n: int) -> list[_Tensor]:
    h, heads, part = a.hidden_size, a.num_attention_heads, "attention"
    attn = f"{layer}.self_attn"
    if a.uses_mla:
        rope, nope, v_dim = a.qk_rope_head_dim or 0, a.qk_nope_head_dim or 0, a.v_head_dim or 0
        bias = a.attention_bias
        if a.q_lora_rank:
            tensors = [
                *_linear(f"{attn}.q_a_proj", a.q_lora_rank, h, n, part, bias),
                _Tensor(f"{attn}.q_a_layernorm", (a.q_lora_rank,), n, part),
                *_linear(f"{attn}.q_b_proj", heads * a.head_dim, a.q_lora_rank, n, part),
            ]
        else:
            tensors = _linear(f"{attn}.q_proj", heads * a.head_dim, h, n, part)
        rank = a.kv_lora_rank or 0
        return [
            *tensors,
            *_linear(f"{attn}.kv_a_proj_with_mqa", rank + rope, h, n, part, bias),
            _Tensor(f"{attn}.kv_a_layernorm", (rank,), n, part),
            *_linear(f"{attn}.kv_b_proj", heads * (nope + v_dim), rank, n, part),
            *_linear(f"{attn}.o_proj", h, heads * v_dim, n, part, bias),
        ]
    q_out, kv_out = heads * a.head_dim, a.num_kv_heads * a.head_dim
    family = _FAMILIES[a.model_type]
    if family.encoder:
        attn = f"{layer}.attention"
        return [
            *_linear(f"{attn}.self.query", q_out, h, n, part, bias=True),
            *_linear(f"{attn}.self.key", kv_out, h, n, part, bias=True),
            *_linear(f"{attn}.self.value", kv_out, h, n, part, bias=True),
            *_linear(f"{attn}.output.dense", h, q_out, n, part, bias=True),
        ]
    qkv_bias = a.attention_bias or a.qkv_bias
    if family.fused:
        tensors = _linear(f"{attn}.qkv_proj", q_out + 2 * kv_out, h, n, part, qkv_bias)
    else:
        tensors = [
            *_linear(f"{attn}.q_proj", q_out, h, n, part, qkv_bias),
            *_linear(f"{attn}.k_proj", kv_out, h, n, part, qkv_bias),
            *_linear(f"{attn}.v_proj", kv_out, h, n, part, qkv_bias),
        ]
    tensors += _linear(f"{attn}.o_proj", h, q_out, n, part, a.attention_bias)
    if family.qk_norm:
        tensors += [
            _Tensor(f"{attn}.q_norm", (a.head_dim,), n, part),
            _Tensor(f"{attn}.k_norm", (a.head_dim,), n, part),
        ]
    if family.sinks:
        tensors.append(_Tensor(f"{attn}.sinks", (heads,), n, part))
    return tensors


def _gated_mlp(
    prefix: str,
    names: tuple[str, str, str],
    h: int,
    width: int,
    n: int,
    part: str,
    bias: bool,
    fused: bool = False,
) -> list[_Tensor]:
    gate, up, down = names
    if fused:
        return [
            *_linear(f"{prefix}.gate_up_proj", 2 * width, h, n, part, bias),
            *_linear(f"{prefix}.{down}", h, width, n, part, bias),
        ]
    return [
        *_linear(f"{prefix}.{gate}", width, h, n, part, bias),
        *_linear(f"{prefix}.{up}", width, h, n, part, bias),
        *_linear(f"{prefix}.{down}", h, width, n, part, bias),
    ]


def _mlp(a: Architecture, layer: str, n: int, moe: bool) -> list[_Tensor]:
    h, family = a.hidden_size, _FAMILIES[a.model_type]
    if family.encoder:
        return [
            *_linear(f"{layer}.intermediate.dense", a.intermediate_size, h, n, "mlp", bias=True),
            *_linear(f"{layer}.output.dense", h, a.intermediate_size, n, "mlp", bias=True),
        ]
    if not moe:
        names = ("gate_proj", "up_proj", "down_proj")
        return _gated_mlp(f"{layer}.{family.mlp_name}", names, h, a.intermediate_size, n, "mlp", a.mlp_bias,
                          family.fused)
    moe_prefix = f"{layer}.{family.moe_prefix}"
    router = f"{moe_prefix}.{family.router}"
    # Routers stay a plain (non-quantized) tensor: quantizers and DeepSeek's FP8 checkpoint keep them in BF16.
    tensors = [_Tensor(router, (a.num_experts, h), n, "router")]
    if family.router_bias:
        tensors.append(_Tensor(f"{router}{family.router_bias}", (a.num_experts,), n, "router"))
    experts = f"{moe_prefix}.experts.*"
    tensors += _gated_mlp(experts, family.expert_names, h, a.moe_intermediate_size, n * a.num_experts,
                          "experts.routed", family.expert_bias, family.fused_experts)
    if a.num_shared_experts:
        # DeepSeek runs its shared experts as one MLP of n_shared_experts x moe_intermediate_size.
        width = a.moe_intermediate_size * a.num_shared_experts
        tensors += _gated_mlp(
            f"{moe_prefix}.{family.shared_expert}", family.expert_names, h, width, n, "experts.shared", False
        )
    return tensors


def _norm(name: str, a: Architecture, n: int, part: str) -> list[_Tensor]:
    if _FAMILIES[a.model_type].encoder:
        return [_Tensor(name, (a.hidden_size,), n, part), _Tensor(f"{name}.bias", (a.hidden_size,), n, part)]
    return [_Tensor(name, (a.hidden_size,), n, part)]


def _layers(a: Architecture, layer: str, n: int, moe: bool) -> list[_Tensor]:
    family = _FAMILIES[a.model_type]
    if family.encoder:
        norms = [
            *_norm(f"{layer}.attention.output.LayerNorm", a, n, "norms"),
            *_norm(f"{layer}.output.LayerNorm", a, n, "norms"),
        ]
    else:
        norms = [t for name in family.layer_norms for t in _norm(f"{layer}.{name}", a, n, "norms")]
    return [*_attention(a, layer, n), *_mlp(a, layer, n, moe), *norms]


def _main_tensors(a: Architecture) -> list[_Tensor]:
    h, v = a.hidden_size, a.vocab_size
    if _FAMILIES[a.model_type].encoder:
        return [
            _Tensor("embeddings.word_embeddings", (v, h), 1, "embedding"),
            _Tensor("embeddings.position_embeddings", (a.max_context_tokens, h), 1, "position_embedding"),
            _Tensor(
                "embeddings.token_type_embeddings",
                (a.type_vocab_size, h),
                1,
                "token_type_embedding",
            ),
            *_norm("embeddings.LayerNorm", a, 1, "embedding_norm"),
            *_layers(a, "encoder.layer.*", a.num_layers, moe=False),
            *_linear("pooler.dense", h, h, 1, "pooler", bias=True),
        ]
    tensors = [_Tensor("model.embed_tokens", (v, h), 1, "embedding")]
    tensors += _layers(a, "model.layers.*", a.num_dense_layers, moe=False)
    tensors += _layers(a, "model.layers.*", a.num_moe_layers, moe=True)
    tensors.append(_Tensor("model.norm", (h,), 1, "final_norm"))
    if not a.tie_word_embeddings:
        tensors.append(_Tensor("lm_head", (v, h), 1, "lm_head"))
    if a.vision is not None:
        tensors += _llama4_vision(a.vision, h)
    return [t for t in tensors if t.count]


def _llama4_vision(v: VisionConfig, text_hidden: int) -> list[_Tensor]:
    """Llama-4's vision encoder, pixel-shuffle adapter and projector (transformers' Llama4VisionModel)."""
    h, part, vm = v.hidden_size, "vision", "vision_model"
    patches = (v.image_size // v.patch_size) ** 2 + 1  # one class token besides the patch grid

    def layer_norm(name: str, n: int = 1) -> list[_Tensor]:
        return [_Tensor(name, (h,), n, part), _Tensor(f"{name}.bias", (h,), n, part)]

    layers, n = f"{vm}.model.layers.*", v.num_hidden_layers
    shuffled = v.intermediate_size  # the adapter's input: hidden x 4 after a 0.5 pixel shuffle (config's choice)
    return [
        _Tensor(f"{vm}.class_embedding", (h,), 1, part),
        _Tensor(f"{vm}.positional_embedding_vlm", (patches, h), 1, part),
        _Tensor(f"{vm}.patch_embedding.linear", (h, v.num_channels * v.patch_size**2), 1, part),
        *layer_norm(f"{vm}.layernorm_pre"),
        *layer_norm(f"{vm}.layernorm_post"),
        *[t for proj in ("q_proj", "k_proj", "v_proj", "o_proj")
          for t in _linear(f"{layers}.self_attn.{proj}", h, h, n, part, bias=True)],
        *_linear(f"{layers}.mlp.fc1", v.intermediate_size, h, n, part, bias=True),
        *_linear(f"{layers}.mlp.fc2", h, v.intermediate_size, n, part, bias=True),
        *layer_norm(f"{layers}.input_layernorm", n),
        *layer_norm(f"{layers}.post_attention_layernorm", n),
        _Tensor(f"{vm}.vision_adapter.mlp.fc1", (v.projector_input_dim, shuffled), 1, part),
        _Tensor(f"{vm}.vision_adapter.mlp.fc2", (v.projector_output_dim, v.projector_output_dim), 1, part),
        *_linear("multi_modal_projector.linear_1", text_hidden, v.vision_output_dim, 1, part,
                 v.multi_modal_projector_bias),
    ]


def _mtp_tensors(a: Architecture) -> list[_Tensor]:
    """DeepSeek-V3's checkpoint layout for its MTP layers (model.layers.61 onwards)."""
    h, v, tensors = a.hidden_size, a.vocab_size, []
    for i in range(a.num_layers, a.num_layers + a.num_mtp_layers):
        layer = f"model.layers.{i}"
        # The checkpoint stores its own copies of the embedding and output head, though the paper shares them.
        tensors += [
            _Tensor(f"{layer}.embed_tokens", (v, h), 1, "mtp"),
            _Tensor(f"{layer}.enorm", (h,), 1, "mtp"),
            _Tensor(f"{layer}.hnorm", (h,), 1, "mtp"),
            _Tensor(f"{layer}.eh_proj", (h, 2 * h), 1, "mtp"),
            *[t._replace(part="mtp") for t in _layers(a, layer, 1, moe=a.is_moe and i >= a.num_dense_layers)],
            _Tensor(f"{layer}.shared_head.norm", (h,), 1, "mtp"),
            _Tensor(f"{layer}.shared_head.head", (v, h), 1, "mtp"),
        ]
    return tensors


def _scale_tensors(a: Architecture, tensors: list[_Tensor]) -> list[_Tensor]:
    if a.checkpoint_fp8_block is None:
        return []
    rows, cols = a.checkpoint_fp8_block
    return [
        _Tensor(
            f"{t.name}.weight_scale_inv",
            (-(-t.shape[0] // rows), -(-t.shape[1] // cols)),
            t.count,
            "fp8_scales",
        )
        for t in tensors
        if t.matrix
    ]


def _all_tensors(a: Architecture) -> list[_Tensor]:
    stored = _main_tensors(a) + _mtp_tensors(a)
    return stored + _scale_tensors(a, stored)


def stored_tensors(arch: Architecture) -> list[_Tensor]:
    """Every tensor of the published checkpoint as (name glob, shape, count, part, matrix), main model first."""
    return _all_tensors(arch)


def family(arch: Architecture) -> _Family:
    """How the architecture's transformers family lays out what its config does not state."""
    return _FAMILIES[arch.model_type]


def count_params(arch: Architecture) -> ParamCounts:
    """Exact parameter counts from the config, split by part, for the model and its published checkpoint."""
    tensors = _all_tensors(arch)
    breakdown: dict[str, int] = {}
    for t in tensors:
        breakdown[t.part] = breakdown.get(t.part, 0) + t.numel
    total = sum(n for part, n in breakdown.items() if part not in _EXTRA_PARTS)
    routed = breakdown.get("experts.routed", 0)
    routed_active = routed // arch.num_experts * arch.experts_per_token if arch.num_experts else 0
    moe = routed + breakdown.get("experts.shared", 0) + breakdown.get("router", 0)
    return ParamCounts(
        total=total,
        embedding=breakdown.get("embedding", 0),
        lm_head=breakdown.get("lm_head", 0),
        attention_per_layer=breakdown.get("attention", 0) // arch.num_layers,
        dense_mlp_per_layer=breakdown.get("mlp", 0) // arch.num_dense_layers if arch.num_dense_layers else 0,
        moe_mlp_per_layer=moe // arch.num_moe_layers if arch.num_moe_layers else 0,
        norms_per_layer=breakdown.get("norms", 0) // arch.num_layers,
        routed_experts_total=routed,
        routed_experts_active=routed_active,
        # A text token runs none of a vision tower, and only experts_per_token of the routed experts.
        active_per_token=total - routed + routed_active - breakdown.get("vision", 0),
        quantizable=sum(s.params for s in linear_shapes(arch)),
        mtp=breakdown.get("mtp", 0),
        fp8_scales=breakdown.get("fp8_scales", 0),
        checkpoint_total=sum(breakdown.values()),
        breakdown=breakdown,
    )


def _shapes(tensors: list[_Tensor]) -> list[LinearShape]:
    return [LinearShape(t.name, t.shape[0], t.shape[1], t.count) for t in tensors]


def linear_shapes(arch: Architecture, include_mtp: bool = False) -> list[LinearShape]:
    """Block weight matrices as (name glob, out, in, count), named as in the published checkpoint files.

    Routers, embeddings, the head and a vision tower (weight quantizers leave it at 16 bits) are left out (see
    ``embedding_shapes``); include_mtp adds DeepSeek's MTP.
    """
    tensors = _main_tensors(arch) + (_mtp_tensors(arch) if include_mtp else [])
    return _shapes([t for t in tensors if t.matrix and t.part not in ("pooler", "vision")])


def embedding_shapes(arch: Architecture) -> list[LinearShape]:
    """Matrices outside the blocks: token/position embeddings, lm_head when untied, BERT's pooler."""
    parts = ("embedding", "position_embedding", "token_type_embedding", "lm_head", "pooler")
    return _shapes([t for t in _main_tensors(arch) if t.part in parts and len(t.shape) == 2])
