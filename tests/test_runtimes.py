"""Runtimes: each one's KV formats against its own size formula, and the states the planner builds from them.

The transformers numbers are checked against the GPU measurements committed in bench/results/memory_gpu.json
(measured by bench/memory_gpu.py on an H200); vLLM's and llama.cpp's are their documented formulas.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qlab.analyses import memory, runtimes
from qlab.core.errors import QlabError
from qlab.core.kv_formats import get_kv_format, kv_format_names
from qlab.core.quant import QuantScheme

BF16 = QuantScheme("bf16")
RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "memory_gpu.json"


@pytest.mark.parametrize(("name", "expected"), [
    ("fp16", 256), ("bf16", 256), ("fp8", 128),
    ("fp8_per_token_head", 128 + 4), ("int8_per_token_head", 128 + 4),  # vLLM: an fp32 scale per token and head
    ("nvfp4", 64 + 8),  # vLLM nvfp4_kv_cache_full_dim: head_size // 2 + head_size // 16
    ("int8", 128 + 4 * 2 + 4), ("int4", 64 + 4 * 2 + 2),  # KIVI groups of 32: fp16 scale, zero at the bits
])
def test_kv_vectors_of_128_values(name, expected):
    assert get_kv_format(name).bytes_per_vector(128, 32) == expected


@pytest.mark.parametrize("name", ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"])
def test_llama_cpp_kv_rows_are_ggml_row_sizes(name):
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    # llama_kv_cache: one row of n_embd_k_gqa values per cell; 8 KV heads of 128 in one row.
    row = quant_shape_to_byte_shape((1, 1024), GGMLQuantizationType[name.upper()])[1]
    assert 8 * get_kv_format(name).bytes_per_vector(128) == row


def test_each_runtime_offers_its_own_kv_formats():
    assert set(kv_format_names("llama.cpp")) >= {"fp16", "bf16", "q8_0", "q4_0"}
    assert "fp8" in kv_format_names("vllm") and "fp8" not in kv_format_names("transformers")
    assert "int4" in kv_format_names("transformers") and "q8_0" not in kv_format_names("vllm")


def test_vllm_pages_and_its_reservation():
    # Llama-3.1-8B, fp8 KV, 4 sequences of 10,000 tokens, block 16: FullAttentionSpec.page_size_bytes =
    # 2 x 16 x 8 heads x 128 x 1 byte per layer; cdiv(10000, 16) = 625 blocks a sequence.
    a = memory.Assumptions(runtime="vllm")
    plan = memory.plan("llama-3.1-8b", memory.weight_spec("awq-int4-g128"), 10_000, 4, "fp8", "h100-sxm-80gb", a)
    assert plan.kv_cache_bytes == 4 * 625 * (2 * 16 * 8 * 128) * 32
    reserved = int(0.9 * plan.primary.memory_bytes)
    assert plan.peak.device_bytes == reserved == plan.primary.budget_bytes  # whatever the load
    assert plan.primary.total_bytes == reserved - plan.peak.kind_bytes("reserve") and plan.fits
    assert any("has not measured" in n for n in plan.notes) and any("max_model_len" in n for n in plan.notes)


def test_vllm_sliding_layers_hold_the_window_and_one_chunk():
    # Gemma-2-9B: SlidingWindowSpec: cdiv(min(context, 4096 - 1 + 8192), 16) + 1 blocks per sliding layer.
    plan = memory.plan("gemma-2-9b", BF16, 32768, 1, "bf16", "h200-sxm-141gb", memory.Assumptions(runtime="vllm"))
    page = 2 * 16 * 8 * 256 * 2
    assert plan.kv_cache_bytes == page * (21 * 2048 + 21 * (math.ceil(12287 / 16) + 1))


def test_vllm_refuses_a_budget_its_weights_overflow():
    plan = memory.plan("llama-3.1-70b", BF16, 8192, 1, "bf16", "h100-sxm-80gb", memory.Assumptions(runtime="vllm"))
    assert not plan.fits and plan.peak.kind_bytes("reserve") == 0


def test_llama_cpp_pads_its_context_and_sizes_the_swa_cache():
    a = memory.Assumptions(runtime="llama.cpp")
    plan = memory.plan("llama-3.1-8b", memory.weight_spec("Q4_K_M"), 8000, 1, "q8_0", "rtx-4090", a)
    assert plan.kv_cache_bytes == 8192 * 32 * 2 * 1024 // 32 * 34  # n_ctx 8000 -> 8192 cells, q8_0 rows
    assert plan.peak.components == plan.steady.components  # everything is allocated at start-up
    gemma = memory.plan("gemma-3-1b", memory.weight_spec("Q8_0"), 32768, 1, "f16", "rtx-4090", a)
    # 4 global layers x 32768 cells, 22 SWA layers x GGML_PAD(512 + 512, 256) cells; 1 KV head of 256, f16.
    assert gemma.kv_cache_bytes == (4 * 32768 + 22 * 1024) * 2 * 256 * 2
    no_fa = memory.plan("llama-3.1-8b", memory.weight_spec("Q4_K_M"), 8000, 1, "q8_0", "rtx-4090",
                        memory.Assumptions(runtime="llama.cpp", llamacpp_flash_attention=False))
    assert no_fa.activations_bytes - plan.activations_bytes == 4 * 512 * 32 * 8192  # the f32 KQ matrix


def test_transformers_offloaded_keeps_the_cache_in_host_memory():
    a = memory.Assumptions(runtime="transformers-offloaded")
    plan = memory.plan("llama-3.1-8b", BF16, 32768, 1, "bf16", "h200-sxm-141gb", a)
    layer = 2 * 8 * 128 * 32768 * 2
    assert plan.peak.host_bytes == 32 * layer and plan.steady.kv_bytes == layer
    assert any("CPU memory" in n for n in plan.notes)


def test_every_component_states_its_formula():
    for runtime in runtimes.runtime_names():
        weights = memory.weight_spec("Q4_K_M") if runtime == "llama.cpp" else BF16
        plan = memory.plan("mistral-7b", weights, 16384, 2, "fp16", "h200-sxm-141gb",
                           memory.Assumptions(runtime=runtime))
        for state in (plan.peak, plan.steady):
            assert all(c.formula and c.bytes >= 0 for c in state.components)
        assert plan.total_bytes == plan.peak.device_bytes - plan.peak.kind_bytes("reserve")


def test_bad_runtime_options_are_one_line():
    with pytest.raises(QlabError, match="unknown runtime 'tgi'"):
        memory.Assumptions(runtime="tgi")
    with pytest.raises(QlabError, match="gpu_memory_utilization must be in"):
        memory.Assumptions(gpu_memory_utilization=1.5)


def _measured_rows() -> list[dict]:
    rows = json.loads(RESULTS.read_text())["rows"]
    return [r for r in rows if r.get("measured_peak_allocated_bytes")]


def test_committed_gpu_measurements_meet_the_goals():
    rows = _measured_rows()
    assert len(rows) >= 60 and {r["format"] for r in rows} == {"bf16", "int8", "int4", "fp8"}
    assert {r["runtime"] for r in rows} == {"transformers", "transformers-static", "transformers-offloaded"}
    assert max(abs(r["weights_error"]) for r in rows) <= 0.01
    assert max(abs(r["peak_error"]) for r in rows) <= 0.03


def test_held_out_gpu_measurements_meet_the_goals():
    # Measured after the planner was fitted, on models and formats not used to shape it (Gemma-3-1B int8/fp8
    # among them, whose codes inherit the rounding of the bf16 blocks they replace).
    rows = [r for r in json.loads(RESULTS.with_name("memory_gpu_heldout.json").read_text())["rows"]
            if r.get("measured_peak_allocated_bytes")]
    assert {("gemma-3-1b", "int8"), ("gemma-3-1b", "fp8")} <= {(r["model"], r["format"]) for r in rows}
    assert max(abs(r["weights_error"]) for r in rows) <= 0.01
    assert max(abs(r["peak_error"]) for r in rows) <= 0.03


def test_torchao_codes_inherit_the_rounding_of_the_bf16_blocks_they_reuse():
    # Gemma-3-1B's 78 MLP matrices of 6912 x 1152: a bf16 block of 16 MiB, int8 codes of 7,962,624 B; two codes
    # per freed block, the second keeping the 851,968 B rest (<= 1 MiB, not split off).
    mlp = (2 * 6912 * 1152, 6912 * 1152, 78)
    assert runtimes.requantized_rounding((mlp,)) == 39 * (16 * 2**20 - 2 * 6912 * 1152)
    # Llama's 14336 x 4096 bf16 blocks are whole MiBs: the codes fill them exactly.
    assert runtimes.requantized_rounding(((2 * 14336 * 4096, 14336 * 4096, 96),)) == 0
    # Qwen2.5's 3584 x 3584: a 24.5 MiB bf16 block in a 26 MiB segment splits, so nothing to inherit.
    assert runtimes.requantized_rounding(((2 * 3584 * 3584, 3584 * 3584, 56),)) == 0
    plan = memory.plan("gemma-3-1b", memory.weight_spec("torchao-int8-weight-only"), 2048, 1, "bf16",
                       "h200-sxm-141gb")
    assert plan.peak.bytes_of("allocator block rounding") >= 39 * 851_968
    int4_plan = memory.plan("gemma-3-1b", memory.weight_spec("torchao-int4-tile-packed"), 2048, 1, "bf16",
                            "h200-sxm-141gb")
    assert int4_plan.peak.bytes_of("allocator block rounding") < 2**20


@pytest.mark.parametrize("row", _measured_rows()[:: 9], ids=lambda r: f"{r['model']}-{r['format']}-"
                         f"{r['context_tokens']}-{r['runtime']}")
def test_the_current_planner_reproduces_the_committed_estimates(row):
    import sys

    sys.path.insert(0, str(RESULTS.parent.parent))
    from memory_gpu import estimate

    workspace = row["base_holds_cublas_workspace"]
    fresh = estimate(row["model"], row["format"], row["context_tokens"], row["batch"], "h200-sxm-141gb",
                     row["runtime"], row["attention"] == "eager", workspace)
    assert fresh["estimated_peak_allocated_bytes"] == row["estimated_peak_allocated_bytes"]


def test_reduced_depth_deepseek_rows_are_estimated_on_the_reduced_config():
    import sys

    sys.path.insert(0, str(RESULTS.parent.parent))
    from memory_gpu import estimate, parse_overrides

    overrides = parse_overrides("num_hidden_layers=4,first_k_dense_replace=3")
    assert overrides == {"num_hidden_layers": 4, "first_k_dense_replace": 3}
    row = estimate("deepseek-v3", "bf16", 2048, 1, "h200-sxm-141gb", overrides=overrides)
    # Four MLA layers cache one latent of 512 + 64 bf16 values per token, as transformers stores it.
    assert row["estimated_kv_peak_bytes"] == 4 * 2048 * (512 + 64) * 2
    full = estimate("deepseek-v3", "bf16", 2048, 1, "h200-sxm-141gb")
    assert 25e9 < row["estimated_weights_bytes"] < 35e9 < full["estimated_weights_bytes"]
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides("num_hidden_layers")


def test_reduced_depth_deepseek_measured_on_the_gpu_meets_the_goals_as_planned_now():
    import sys

    sys.path.insert(0, str(RESULTS.parent.parent))
    from memory_gpu import estimate

    rows = json.loads(RESULTS.with_name("memory_gpu_deepseek.json").read_text())["rows"]
    assert {r["context_tokens"] for r in rows} == {2048, 8192}
    for row in rows:
        fresh = estimate("deepseek-v3", "bf16", row["context_tokens"], 1, "h200-sxm-141gb",
                         overrides=row["config_overrides"])
        measured = row["measured_peak_allocated_bytes"]
        assert abs(fresh["estimated_peak_allocated_bytes"] / measured - 1) <= 0.03, row["context_tokens"]
        assert abs(fresh["estimated_weights_bytes"] / row["measured_stored_weights_bytes"] - 1) <= 0.01
