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
SLOW_META = {"deepseek-v3", "llama-4-scout"}

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
    "qwen3-moe-sparse-step": {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 24,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 100,
        "num_experts": 6,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [3],
        "tie_word_embeddings": False,
    },
    "gemma3-pattern": {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 7,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "vocab_size": 100,
        "sliding_window": 8,
        "sliding_window_pattern": 3,
    },
    "gpt-oss": {
        "model_type": "gpt_oss",
        "architectures": ["GptOssForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 100,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": 8,
        "attention_bias": True,
        "tie_word_embeddings": False,
    },
    "llama4-vision": {
        "model_type": "llama4",
        "architectures": ["Llama4ForConditionalGeneration"],
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "llama4_text",
            "hidden_size": 64,
            "intermediate_size": 32,
            "intermediate_size_mlp": 96,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": 100,
            "num_local_experts": 4,
            "num_experts_per_tok": 1,
            "interleave_moe_layer_step": 2,
            "attention_chunk_size": 8,
        },
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
            "vision_output_dim": 48,
            "projector_input_dim": 48,
            "projector_output_dim": 48,
        },
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
        "qwen3-8b",
        "qwen3-30b-a3b",
        "gemma-3-1b",
        "llama-4-scout",
        "gpt-oss-20b",
        "mistral-small-24b",
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
    # transformers fuses experts into 3-D tensors (gpt-oss's expert biases into 2-D ones), so compare the block
    # matrices by size; routers, biases and a vision tower (which quantizers leave alone) are not block matrices.
    block_matrices = sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.dim() >= 2 and (".layers." in name or "encoder.layer." in name)
        and not any(skip in name for skip in (".mlp.gate.", ".router.", "vision", "_bias"))
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


@pytest.mark.parametrize(("slug", "total", "active"), [
    ("qwen3-30b-a3b", 30_532_122_624, 3_353_032_704),  # Qwen's "30B-A3B"
    ("gpt-oss-20b", 20_914_757_184, 4_187_440_704),  # OpenAI's 3.61B active leaves the 579M embedding out
    ("llama-4-scout", 108_641_793_536, 17_172_894_720),  # Meta's "17B active": no vision tower, 1 of 16 experts
])
def test_newer_moe_totals_and_active_params(slug, total, active):
    arch = CATALOG[slug]
    counts = A.count_params(arch)
    assert (counts.total, counts.active_per_token) == (total, active)
    assert counts.active_per_token < counts.total
    if slug == "gpt-oss-20b":
        assert counts.active_per_token - counts.embedding == 3_608_307_264
    if slug == "llama-4-scout":
        assert counts.breakdown["vision"] == 871_932_416  # encoder, adapter and projector: resident, not active
        assert "vision" not in {s.name_pattern.split(".")[0] for s in A.linear_shapes(arch)}


def test_local_attention_layouts_of_newer_families():
    gemma3, gpt_oss, scout = CATALOG["gemma-3-1b"], CATALOG["gpt-oss-20b"], CATALOG["llama-4-scout"]
    assert [i for i, t in enumerate(gemma3.layer_types) if t == A.FULL] == [5, 11, 17, 23]
    assert gemma3.sliding_window_tokens == 512
    assert gpt_oss.layer_types[:2] == (A.SLIDING, A.FULL) and gpt_oss.num_sliding_layers == 12
    # Llama-4's chunked attention holds at most one chunk of keys: a window, as far as memory goes.
    assert (scout.num_sliding_layers, scout.num_global_layers, scout.sliding_window_tokens) == (36, 12, 8192)
    assert CATALOG["qwen3-30b-a3b"].num_moe_layers == 48 and CATALOG["mistral-small-24b"].num_sliding_layers == 0


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


GOOD = TINY["mixtral"]


@pytest.mark.parametrize(("change", "words"), [
    ({"num_attention_heads": 0}, "num_attention_heads is 0: input should be greater than or equal to 1"),
    ({"num_experts_per_tok": 50}, "num_experts_per_tok (50) exceeds the 4 experts"),
    ({"num_key_value_heads": 3}, "num_attention_heads (4) is not a multiple of num_key_value_heads (3)"),
    ({"hidden_size": 66}, "hidden_size (66) does not split into num_attention_heads (4)"),
    ({"hidden_size": 10**400}, "hidden_size is 100000000000000000000000... (401 characters): input should be less than or equal"),
    ({"num_hidden_layers": 10**12}, "num_hidden_layers is 1000000000000: input should be less than or equal to 4096"),
    ({"architectures": 5}, "architectures is 5: input should be a valid list"),
    ({"model_type": ["mixtral"]}, "model_type is ['mixtral']: input should be a valid string"),
    ({"num_hidden_layers": True}, "num_hidden_layers is True: input should be a valid integer"),
    ({"vocab_size": 100.0}, "vocab_size is 100.0: input should be a valid integer"),
    ({"layer_types": ["full_attention"]}, "layer_types lists 1 layers, num_hidden_layers says 2"),
    ({"hidden_size": None}, "hidden_size is None: input should be a valid integer"),
])
def test_impossible_configs_are_one_line_naming_the_field(change, words):
    with pytest.raises(QlabError) as caught:
        A.from_config({**GOOD, **change})
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_a_missing_field_and_a_nested_bad_field_are_named():
    config = {k: v for k, v in GOOD.items() if k != "vocab_size"}
    with pytest.raises(QlabError, match="The config has no 'vocab_size'"):
        A.from_config(config)
    scout = json.loads(json.dumps(CATALOG["llama-4-scout"].config))
    scout["text_config"]["num_experts_per_tok"] = 20
    with pytest.raises(QlabError, match=r"text_config is inconsistent: num_experts_per_tok \(20\) exceeds the 16"):
        A.from_config(scout)
    scout["vision_config"]["patch_size"] = -1
    with pytest.raises(QlabError, match="vision_config.patch_size is -1"):
        A.from_config(scout)


@pytest.mark.parametrize(("text", "words"), [
    ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
    ('{"hidden_size": 1' + "0" * 5000 + "}", "not valid JSON"),
    (" " * (17 * 2**20), "far beyond any config.json"),
])
def test_hostile_config_text_is_one_line(text, words):
    with pytest.raises(QlabError, match=words):
        A.from_config_json(text)


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
