"""The fields of a Hugging Face ``config.json`` that qlab reads, as a pydantic schema with their bounds.

An uploaded config is data from outside: every field the architecture code uses is typed (strictly: no ``true``
for a count, no ``"4096"`` for a width), bounded (no zero heads, no 10**12 layers) and cross-checked (experts per
token within the experts, key/value heads dividing the query heads). ``validate`` turns the first violation
into one ``QlabError`` line that names the field.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qlab.core.errors import QlabError

# Bounds are guards against typos and hostile files, an order of magnitude beyond every published model.
MAX_WIDTH = 2**20  # hidden, head and MLP widths (the largest public hidden size is 25,600)
MAX_LAYERS = 4096
MAX_HEADS = 2**14
MAX_VOCAB = 2**24
MAX_POSITIONS = 2**30
MAX_EXPERTS = 2**14
MAX_CONFIG_BYTES = 16 * 2**20  # a config.json is a few kB; a multimodal one with its processor a few hundred

Count = Annotated[int, Field(ge=1)]
Width = Annotated[int, Field(ge=1, le=MAX_WIDTH)]
Heads = Annotated[int, Field(ge=1, le=MAX_HEADS)]
Layers = Annotated[int, Field(ge=0, le=MAX_LAYERS)]
Experts = Annotated[int, Field(ge=0, le=MAX_EXPERTS)]
Positions = Annotated[int, Field(ge=0, le=MAX_POSITIONS)]


class _Strict(BaseModel):
    # Unknown keys (rope scaling, token ids, qlab's own ``_qlab`` block) pass through unchecked: qlab never reads them.
    model_config = ConfigDict(strict=True, extra="allow")


class TextConfig(_Strict):
    """A decoder (or BERT encoder) config: the keys qlab's architecture code reads."""

    model_type: Annotated[str, Field(min_length=1, max_length=64)]
    architectures: Annotated[list[Annotated[str, Field(max_length=128)]], Field(min_length=1)] | None = None
    hidden_size: Width
    num_hidden_layers: Annotated[int, Field(ge=1, le=MAX_LAYERS)]
    num_attention_heads: Heads
    num_key_value_heads: Heads | None = None
    head_dim: Width | None = None
    intermediate_size: Width
    intermediate_size_mlp: Width | None = None
    vocab_size: Annotated[int, Field(ge=1, le=MAX_VOCAB)]
    max_position_embeddings: Positions | None = None
    type_vocab_size: Annotated[int, Field(ge=1, le=MAX_VOCAB)] | None = None
    tie_word_embeddings: bool | None = None
    attention_bias: bool | None = None
    mlp_bias: bool | None = None
    sliding_window: Annotated[int, Field(ge=1, le=MAX_POSITIONS)] | None = None
    sliding_window_pattern: Annotated[int, Field(ge=1, le=MAX_LAYERS)] | None = None
    attention_chunk_size: Annotated[int, Field(ge=1, le=MAX_POSITIONS)] | None = None
    no_rope_layers: list[Annotated[int, Field(ge=0, le=1)]] | None = None
    layer_types: list[Annotated[str, Field(max_length=64)]] | None = None
    use_sliding_window: bool | None = None
    max_window_layers: Layers | None = None
    num_local_experts: Experts | None = None
    num_experts: Experts | None = None
    n_routed_experts: Experts | None = None
    num_experts_per_tok: Annotated[int, Field(ge=0, le=MAX_EXPERTS)] | None = None
    moe_intermediate_size: Width | None = None
    n_shared_experts: Experts | None = None
    first_k_dense_replace: Layers | None = None
    moe_layer_freq: Annotated[int, Field(ge=1, le=MAX_LAYERS)] | None = None
    decoder_sparse_step: Annotated[int, Field(ge=1, le=MAX_LAYERS)] | None = None
    mlp_only_layers: list[Annotated[int, Field(ge=0, lt=MAX_LAYERS)]] | None = None
    moe_layers: list[Annotated[int, Field(ge=0, lt=MAX_LAYERS)]] | None = None
    interleave_moe_layer_step: Annotated[int, Field(ge=1, le=MAX_LAYERS)] | None = None
    kv_lora_rank: Width | None = None
    q_lora_rank: Width | None = None
    qk_nope_head_dim: Width | None = None
    qk_rope_head_dim: Width | None = None
    v_head_dim: Width | None = None
    num_nextn_predict_layers: Layers | None = None
    torch_dtype: str | None = None
    dtype: str | None = None

    @property
    def routed_experts(self) -> int:
        return self.num_local_experts or self.num_experts or self.n_routed_experts or 0

    @model_validator(mode="after")
    def _consistent(self) -> TextConfig:
        heads, layers = self.num_attention_heads, self.num_hidden_layers
        kv_heads = self.num_key_value_heads or heads
        if kv_heads > heads or heads % kv_heads:
            raise ValueError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
        mla = self.kv_lora_rank is not None
        if mla and None in (self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim):
            raise ValueError("kv_lora_rank (MLA) needs qk_nope_head_dim, qk_rope_head_dim and v_head_dim")
        if not mla and self.head_dim is None and self.hidden_size % heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) does not split into num_attention_heads ({heads}) "
                             "and no head_dim is given")
        experts, per_token = self.routed_experts, self.num_experts_per_tok
        if experts and not per_token:
            raise ValueError(f"a model of {experts} experts per layer needs num_experts_per_tok >= 1")
        if experts and per_token > experts:
            raise ValueError(f"num_experts_per_tok ({per_token}) exceeds the {experts} experts of a layer")
        if self.layer_types is not None and len(self.layer_types) != layers:
            raise ValueError(f"layer_types lists {len(self.layer_types)} layers, num_hidden_layers says {layers}")
        if self.no_rope_layers and len(self.no_rope_layers) != layers:
            raise ValueError(f"no_rope_layers lists {len(self.no_rope_layers)} layers, num_hidden_layers says {layers}")
        for name in ("mlp_only_layers", "moe_layers"):
            listed = getattr(self, name) or []
            if any(i >= layers for i in listed):
                raise ValueError(f"{name} names a layer beyond the {layers} of num_hidden_layers")
        return self


class VisionConfig(_Strict):
    """A Llama-4 vision tower: the keys its parameter count reads."""

    hidden_size: Width
    intermediate_size: Width
    num_hidden_layers: Annotated[int, Field(ge=1, le=MAX_LAYERS)]
    num_attention_heads: Heads
    image_size: Width
    patch_size: Width
    num_channels: Annotated[int, Field(ge=1, le=64)] = 3
    vision_output_dim: Width
    projector_input_dim: Width
    projector_output_dim: Width
    multi_modal_projector_bias: bool = False


class MultimodalConfig(_Strict):
    """A config that nests its language model in ``text_config`` (Llama-4)."""

    model_type: Annotated[str, Field(min_length=1, max_length=64)]
    architectures: Annotated[list[Annotated[str, Field(max_length=128)]], Field(min_length=1)] | None = None
    text_config: dict[str, Any]
    vision_config: VisionConfig
    tie_word_embeddings: bool | None = None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:24]}... ({len(text):,} characters)"


def _one_line(error: ValidationError, where: str) -> QlabError:
    first = error.errors(include_url=False)[0]
    field = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        return QlabError(f"The config{where} has no '{field}'; upload the model's complete config.json.")
    if not field:
        return QlabError(f"The config{where} is inconsistent: {message}; fix config.json.")
    return QlabError(f"The config{where}'s {field} is {_short(first.get('input'))}: {message[:1].lower()}"
                     f"{message[1:]}; fix that field of config.json.")


def validate_text(config: dict[str, Any], where: str = "") -> TextConfig:
    """The decoder keys of ``config`` checked against ``TextConfig``, or one QlabError naming the field."""
    try:
        return TextConfig.model_validate(config)
    except ValidationError as exc:
        raise _one_line(exc, where) from None


def validate_multimodal(config: dict[str, Any]) -> MultimodalConfig:
    """A nested (text + vision) config checked against ``MultimodalConfig``."""
    try:
        return MultimodalConfig.model_validate(config)
    except ValidationError as exc:
        raise _one_line(exc, "") from None
