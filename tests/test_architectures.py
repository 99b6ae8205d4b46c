"""Architectures: catalog counts against published figures and against transformers' meta-device builds."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from qlab.core.errors import QlabError
from qlab.models import architectures as A

CATALOG = A.load_catalog()
# Building these on the meta device takes over 2 s (DeepSeek-V3: 61 layers x 256 experts of modules).
SLOW_META = {"deepseek-v3"}

# Small configs, one per supported family, exercising the flags the catalog leaves at their defaults.
TINY = {
    "llama-biases": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": 100,
        "attention_bias": True,
        "mlp_bias": True,
        "tie_word_embeddings": False,
    },
    "qwen2-sliding": {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "use_sliding_window": True,
        "sliding_window": 16,
        "max_window_layers": 1,
        "tie_word_embeddings": True,
    },
    "qwen3": {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": 100,
        "tie_word_embeddings": True,
    },
    "gemma2": {
        "model_type": "gemma2",
        "architectures": ["Gemma2ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 5,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "vocab_size": 100,
        "sliding_window": 16,
    },
    "phi3-gqa": {
        "model_type": "phi3",
        "architectures": ["Phi3ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "sliding_window": 31,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
    },
    "mixtral": {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "tie_word_embeddings": False,
    },
    "deepseek-no-q-lora": {
        "model_type": "deepseek_v3",
        "architectures": ["DeepseekV3ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 24,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 100,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 2,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
        "kv_lora_rank": 16,
        "q_lora_rank": None,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 4,
        "v_head_dim": 8,
        "num_nextn_predict_layers": 0,
        "attention_bias": True,
        "tie_word_embeddings": False,
    },
    "bert": {
        "model_type": "bert",
        "architectures": ["BertModel"],
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 100,
        "max_position_embeddings": 32,
        "type_vocab_size": 3,
    },
}


def _build_meta(config: dict):
    """The model transformers builds from this config, on the meta device (shapes only, no memory)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    # The FP8 block scales are counted analytically; transformers' own model is the unquantized main model.
    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "auto_map")}
    model_config = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        return getattr(transformers, cfg["architectures"][0])(model_config), model_config


def _stored_numel(model) -> int:
    """Parameters (tied ones once) plus persistent buffers such as DeepSeek's e_score_correction_bias."""
    persistent = model.state_dict().keys()
    buffers = sum(b.numel() for name, b in model.named_buffers() if name in persistent)
    return sum(p.numel() for p in model.parameters()) + buffers


def _meta_params(slugs: list[str]) -> list:
    return [pytest.param(s, marks=pytest.mark.slow) if s in SLOW_META else s for s in slugs]


def test_catalog_has_the_models_the_planner_offers():
    expected = {
        "llama-3.1-8b",
        "llama-3.1-70b",
        "llama-3.2-1b",
        "llama-3.2-3b",
        "mistral-7b",
        "mixtral-8x7b",
        "qwen2.5-7b",
        "qwen2.5-72b",
        "gemma-2-9b",
        "gemma-2-27b",
        "phi-3-mini",
        "deepseek-v3",
        "smollm2-135m",
        "minilm-l6",
    }
    assert expected <= set(CATALOG)
    for arch in CATALOG.values():
        assert arch.official_params and arch.official_params_source and arch.hf_id


@pytest.mark.parametrize("slug", sorted(CATALOG))
def test_analytic_count_matches_official_count(slug):
    arch = CATALOG[slug]
    counts = A.count_params(arch)
    assert counts.checkpoint_total == arch.official_params
    assert sum(counts.breakdown.values()) == counts.checkpoint_total


@pytest.mark.parametrize("slug", _meta_params(sorted(CATALOG)))
def test_analytic_count_matches_meta_device_build(slug):
    arch = CATALOG[slug]
    model, _ = _build_meta(arch.config)
    assert A.count_params(arch).total == _stored_numel(model)


@pytest.mark.parametrize("name", sorted(TINY))
def test_each_family_matches_meta_device_build(name):
    arch = A.from_config(TINY[name], slug=name)
    model, model_config = _build_meta(TINY[name])
    assert A.count_params(arch).total == _stored_numel(model)
    expected_types = getattr(model_config, "layer_types", None)
    if expected_types is not None:
        assert list(arch.layer_types) == list(expected_types)
    # transformers fuses experts into 3-D tensors, so compare the block matrices by size, routers excluded.
    block_matrices = sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.dim() >= 2 and (".layers." in name or "encoder.layer." in name) and ".mlp.gate." not in name
    )
    assert sum(s.params for s in A.linear_shapes(arch)) == block_matrices


@pytest.mark.parametrize("slug", [s for s in sorted(CATALOG) if not CATALOG[s].is_moe and s not in SLOW_META])
def test_linear_shapes_are_the_block_linears_transformers_builds(slug):
    torch = pytest.importorskip("torch")
    arch = CATALOG[slug]
    model, _ = _build_meta(arch.config)
    built = Counter(
        (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and (".layers." in name or "encoder.layer." in name)
    )
    listed = Counter()
    for shape in A.linear_shapes(arch):
        listed[(shape.out_features, shape.in_features)] += shape.count
    assert listed == built


def test_deepseek_v3_checkpoint_is_main_model_plus_mtp_plus_fp8_scales():
    counts = A.count_params(CATALOG["deepseek-v3"])
    # Main model: 61 layers, e_score_correction_bias (58 x 256) included, as DeepSeek's "671B".
    assert counts.total == 671_026_419_200
    assert counts.mtp == 13_463_426_304
    assert counts.fp8_scales == 41_540_496
    assert counts.active_per_token == 37_552_297_472  # DeepSeek's "37B activated"
    with_mtp = A.linear_shapes(CATALOG["deepseek-v3"], include_mtp=True)
    # One MoE decoder layer: MLA projections 187,105,280 + 256 routed and 1 shared expert of 44,040,192 each.
    assert sum(s.params for s in with_mtp) - counts.quantizable == 11_505_434_624


def test_moe_active_params_count_only_routed_experts_in_use():
    counts = A.count_params(CATALOG["mixtral-8x7b"])
    assert counts.routed_experts_active * 4 == counts.routed_experts_total
    assert counts.active_per_token == 12_879_925_248


def test_sliding_window_layers():
    assert (CATALOG["gemma-2-9b"].num_sliding_layers, CATALOG["gemma-2-9b"].num_global_layers) == (21, 21)
    assert (
        CATALOG["mistral-7b"].num_sliding_layers == 32 and CATALOG["mistral-7b"].sliding_window_tokens == 4096
    )
    assert CATALOG["qwen2.5-7b"].sliding_window_tokens is None  # use_sliding_window is false
    assert CATALOG["llama-3.1-8b"].num_sliding_layers == 0


def test_tied_embeddings_have_no_lm_head():
    assert A.count_params(CATALOG["llama-3.2-1b"]).lm_head == 0
    assert [s.name_pattern for s in A.embedding_shapes(CATALOG["llama-3.2-1b"])] == ["model.embed_tokens"]
    assert "lm_head" in [s.name_pattern for s in A.embedding_shapes(CATALOG["llama-3.1-8b"])]


def test_get_accepts_slug_and_hf_id_case_insensitively():
    assert A.get("meta-llama/llama-3.1-8b").slug == "llama-3.1-8b"
    assert A.get("Mixtral-8x7B").hf_id == "mistralai/Mixtral-8x7B-v0.1"
    assert A.get("  DEEPSEEK-AI/DeepSeek-V3 ").slug == "deepseek-v3"


def test_unknown_model_raises_with_options():
    with pytest.raises(QlabError, match="llama-3.1-8b"):
        A.get("gpt-5")


def test_bad_config_files_raise_qlab_error(tmp_path: Path):
    cases = {
        "garbage.json": "{not json",
        "list.json": "[1, 2]",
        "missing.json": json.dumps({"model_type": "llama", "hidden_size": 64}),
        "unknown.json": json.dumps({**TINY["llama-biases"], "model_type": "mamba"}),
        "negative.json": json.dumps({**TINY["llama-biases"], "num_hidden_layers": -2}),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(QlabError):
            A.from_config_file(tmp_path / name)
    with pytest.raises(QlabError):
        A.from_config_file(tmp_path / "absent.json")


def test_uploaded_config_file_round_trips(tmp_path: Path):
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps({**CATALOG["llama-3.1-8b"].config, "_name_or_path": "meta-llama/Llama-3.1-8B"})
    )
    arch = A.from_config_file(path)
    assert arch.slug == "llama-3.1-8b"
    assert A.count_params(arch).total == 8_030_261_248
