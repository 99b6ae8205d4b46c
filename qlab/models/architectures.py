"""Model architectures from Hugging Face ``config.json``: shapes, exact parameter counts, weight matrices.

Counts are computed from the config alone (no weights, no transformers import), so the memory planner can
size models that would never fit on this machine. Each family's layout follows its transformers modeling
file; tests check every catalog model against a meta-device build and against the published count.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

from qlab.core.errors import QlabError

CATALOG_DIR = Path(__file__).resolve().parents[2] / "assets" / "model_configs"

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class _Family:
    """How one transformers model family lays out its weights beyond what config.json states."""

    bias: str = "none"  # "none", "qkv" (Qwen2 hard-codes q/k/v biases), or "config" (reads attention_bias)
    mlp_bias: bool = False  # only Llama reads config.mlp_bias
    fused: bool = False  # Phi-3 checkpoints store qkv_proj and gate_up_proj
    qk_norm: bool = False  # Qwen3 RMS-normalises q and k per head
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    tie_default: bool = False  # what the family's config class assumes when the key is absent
    sliding: str = "none"  # "none", "all" (window on every layer), "alternate" (Gemma-2), "qwen2"
    moe_prefix: str = "mlp"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    router_bias: bool = False  # DeepSeek-V3's noaux_tc routing stores e_score_correction_bias
    encoder: bool = False  # BERT: learned positions, LayerNorm with bias, biases on every linear


_FAMILIES: dict[str, _Family] = {
    "llama": _Family(bias="config", mlp_bias=True),
    "mistral": _Family(sliding="all"),
    "mixtral": _Family(sliding="all", moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2")),
    "qwen2": _Family(bias="qkv", sliding="qwen2"),
    "qwen3": _Family(bias="config", qk_norm=True, sliding="qwen2"),
    "gemma2": _Family(
        bias="config",
        layer_norms=(
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ),
        tie_default=True,
        sliding="alternate",
    ),
    "phi3": _Family(fused=True, sliding="all"),
    "deepseek_v3": _Family(bias="config", router_bias=True),
    "bert": _Family(encoder=True),
}


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
    torch_dtype: str | None
    official_params: int | None
    official_params_source: str | None
    notes: str
    config: dict[str, Any] = field(repr=False, compare=False, hash=False)

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


_REQUIRED = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_EXTRA_PARTS = ("mtp", "fp8_scales")


def _int(config: dict[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None:
        raise QlabError(f"The config has no '{key}'; upload the model's complete config.json.")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise QlabError(f"The config's '{key}' is {value!r}, not a whole number; fix it or re-download it.")
    return value


def _opt_int(config: dict[str, Any], key: str) -> int | None:
    return None if config.get(key) is None else _int(config, key)


def _layer_types(
    config: dict[str, Any], family: _Family, num_layers: int
) -> tuple[tuple[str, ...], int | None]:
    window = _opt_int(config, "sliding_window")
    explicit = config.get("layer_types")
    if isinstance(explicit, list) and len(explicit) == num_layers:
        types = tuple(SLIDING if t == SLIDING else FULL for t in explicit)
    elif window is None or family.sliding == "none":
        types = (FULL,) * num_layers
    elif family.sliding == "alternate":
        # transformers' Gemma2Config: even layers (0, 2, ...) are local, odd ones global.
        types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(num_layers))
    elif family.sliding == "qwen2":
        # Qwen2 ships sliding_window=131072 but use_sliding_window=false; when on, it applies from
        # max_window_layers upwards.
        start = _int(config, "max_window_layers", num_layers)
        on = bool(config.get("use_sliding_window", False))
        types = tuple(SLIDING if on and i >= start else FULL for i in range(num_layers))
    else:
        types = (SLIDING,) * num_layers
    return types, (window if SLIDING in types else None)


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


def from_config(config: dict[str, Any], slug: str | None = None) -> Architecture:
    """Normalise a config.json dict (optionally carrying a ``_qlab`` block) into an Architecture."""
    if not isinstance(config, dict):
        raise QlabError("The model config is not a JSON object; upload the model's config.json.")
    for key in _REQUIRED:
        if key not in config:
            raise QlabError(f"The config has no '{key}'; upload the model's complete config.json.")
    model_type = config["model_type"]
    family = _FAMILIES.get(model_type)
    if family is None:
        raise QlabError(
            f"Model type '{model_type}' is not supported; use one of: {', '.join(sorted(_FAMILIES))}."
        )
    meta = config.get("_qlab") or {}
    raw = {k: v for k, v in config.items() if k != "_qlab"}
    architectures = config.get("architectures") or [model_type]
    architecture = str(architectures[0])
    if family.encoder and architecture != "BertModel":
        raise QlabError(f"'{architecture}' is not supported for BERT; only BertModel configs can be counted.")

    hidden = _int(config, "hidden_size")
    num_layers = _int(config, "num_hidden_layers")
    heads = _int(config, "num_attention_heads")
    if hidden == 0 or num_layers == 0 or heads == 0:
        raise QlabError("The config has a zero hidden_size, layer or head count; check the file.")
    kv_heads = _int(config, "num_key_value_heads", heads)
    intermediate = _int(config, "intermediate_size")

    kv_lora_rank = _opt_int(config, "kv_lora_rank")
    qk_nope = qk_rope = v_head = None
    if kv_lora_rank is not None:
        qk_nope = _int(config, "qk_nope_head_dim")
        qk_rope = _int(config, "qk_rope_head_dim")
        v_head = _int(config, "v_head_dim")
        head_dim = qk_nope + qk_rope
    elif config.get("head_dim") is not None:
        head_dim = _int(config, "head_dim")
    elif hidden % heads:
        raise QlabError(
            f"hidden_size {hidden} does not split into {heads} heads and no head_dim is given; add head_dim."
        )
    else:
        head_dim = hidden // heads

    num_experts = _opt_int(config, "num_local_experts") or _opt_int(config, "n_routed_experts") or 0
    experts_per_token = _int(config, "num_experts_per_tok") if num_experts else 0
    if num_experts:
        moe_width = _opt_int(config, "moe_intermediate_size") or intermediate
        dense_layers = min(_int(config, "first_k_dense_replace", 0), num_layers)
        if _int(config, "moe_layer_freq", 1) != 1:
            raise QlabError(
                "Configs with moe_layer_freq other than 1 are not supported; use a standard layout."
            )
    else:
        moe_width, dense_layers = 0, num_layers

    layer_types, window = _layer_types(config, family, num_layers)
    attention_bias = family.bias == "config" and bool(config.get("attention_bias", False))
    hf_id = meta.get("hf_id")
    return Architecture(
        slug=slug or _slug_for(config, hf_id),
        hf_id=hf_id,
        model_type=model_type,
        architecture=architecture,
        hidden_size=hidden,
        num_layers=num_layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=_int(config, "vocab_size"),
        intermediate_size=intermediate,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", family.tie_default)),
        max_context_tokens=_int(config, "max_position_embeddings", 0),
        sliding_window_tokens=window,
        layer_types=layer_types,
        attention_bias=attention_bias,
        qkv_bias=family.bias == "qkv",
        mlp_bias=family.mlp_bias and bool(config.get("mlp_bias", False)),
        num_experts=num_experts,
        experts_per_token=experts_per_token,
        num_shared_experts=_int(config, "n_shared_experts", 0) if num_experts else 0,
        moe_intermediate_size=moe_width,
        num_dense_layers=dense_layers,
        kv_lora_rank=kv_lora_rank,
        q_lora_rank=_opt_int(config, "q_lora_rank") if kv_lora_rank is not None else None,
        qk_nope_head_dim=qk_nope,
        qk_rope_head_dim=qk_rope,
        v_head_dim=v_head,
        num_mtp_layers=_int(config, "num_nextn_predict_layers", 0),
        checkpoint_fp8_block=_fp8_block(config),
        torch_dtype=config.get("torch_dtype") or config.get("dtype"),
        official_params=meta.get("official_params"),
        official_params_source=meta.get("official_params_source"),
        notes=meta.get("notes", ""),
        config=raw,
    )


def from_config_json(text: str | bytes, slug: str | None = None) -> Architecture:
    """Parse config.json text (e.g. a browser upload) into an Architecture."""
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QlabError(
            f"The model config is not valid JSON ({exc}); upload the model's config.json."
        ) from exc
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
        return _gated_mlp(f"{layer}.mlp", names, h, a.intermediate_size, n, "mlp", a.mlp_bias, family.fused)
    moe_prefix = f"{layer}.{family.moe_prefix}"
    # Routers stay a plain (non-quantized) tensor: quantizers and DeepSeek's FP8 checkpoint keep them in BF16.
    tensors = [_Tensor(f"{moe_prefix}.gate", (a.num_experts, h), n, "router")]
    if family.router_bias:
        tensors.append(_Tensor(f"{moe_prefix}.gate.e_score_correction_bias", (a.num_experts,), n, "router"))
    experts = f"{moe_prefix}.experts.*"
    tensors += _gated_mlp(
        experts, family.expert_names, h, a.moe_intermediate_size, n * a.num_experts, "experts.routed", False
    )
    if a.num_shared_experts:
        # DeepSeek runs its shared experts as one MLP of n_shared_experts x moe_intermediate_size.
        width = a.moe_intermediate_size * a.num_shared_experts
        tensors += _gated_mlp(
            f"{moe_prefix}.shared_experts", family.expert_names, h, width, n, "experts.shared", False
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
        cfg = a.config
        return [
            _Tensor("embeddings.word_embeddings", (v, h), 1, "embedding"),
            _Tensor("embeddings.position_embeddings", (a.max_context_tokens, h), 1, "position_embedding"),
            _Tensor(
                "embeddings.token_type_embeddings",
                (_int(cfg, "type_vocab_size", 2), h),
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
    return [t for t in tensors if t.count]


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
        active_per_token=total - routed + routed_active,
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

    Routers, embeddings and the head are left out (see ``embedding_shapes``); include_mtp adds DeepSeek's MTP.
    """
    tensors = _main_tensors(arch) + (_mtp_tensors(arch) if include_mtp else [])
    return _shapes([t for t in tensors if t.matrix and t.part != "pooler"])


def embedding_shapes(arch: Architecture) -> list[LinearShape]:
    """Matrices outside the blocks: token/position embeddings, lm_head when untied, BERT's pooler."""
    parts = ("embedding", "position_embedding", "token_type_embedding", "lm_head", "pooler")
    return _shapes([t for t in _main_tensors(arch) if t.part in parts and len(t.shape) == 2])
