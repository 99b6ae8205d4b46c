"""The VRAM planner: KV cache and weights from first principles, exact bytes for loaded models, fit verdicts."""

from __future__ import annotations

import json
import math

import pytest

from qlab.analyses import memory
from qlab.cli import memory as cli_memory
from qlab.cli.common import Parser
from qlab.core.errors import QlabError
from qlab.core.formats import FORMATS, get_format
from qlab.core.quant import QuantScheme, quantize
from qlab.models import architectures

INT4_G128 = QuantScheme("int4", "group", 128)
FP16 = QuantScheme("fp16")


# --- KV cache, by hand ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("context", "batch"), [(1, 1), (8192, 1), (4096, 3), (131072, 2)])
def test_kv_cache_of_a_gqa_model(context, batch):
    # Llama-3.1-8B: 32 layers, 8 KV heads of 128 (32 query heads share them), fp16 = 2 bytes.
    expected = 2 * 32 * 8 * 128 * context * batch * 2
    plan = memory.plan("llama-3.1-8b", INT4_G128, context, batch, "fp16")
    assert plan.kv_cache_bytes == expected
    assert plan.kv.bits_per_value == 16


@pytest.mark.parametrize(("context", "batch"), [(2048, 1), (4096, 2), (8192, 1), (8192, 4)])
def test_kv_cache_of_a_sliding_window_model(context, batch):
    # Gemma-2-9B: 42 layers alternate local (window 4096) and global; 8 KV heads of 256. transformers' prefill
    # leaves every layer holding the whole prompt; the first decode step trims the local ones to the window.
    per_token_layer = 2 * 8 * 256 * 2
    plan = memory.plan("gemma-2-9b", INT4_G128, context, batch)
    assert plan.kv_cache_bytes == per_token_layer * batch * 42 * context
    assert plan.steady.kv_bytes == per_token_layer * batch * (21 * context + 21 * min(context, 4096))
    static = memory.plan("gemma-2-9b", INT4_G128, context, batch,
                         assumptions=memory.Assumptions(runtime="transformers-static"))
    assert static.kv_cache_bytes == static.steady.kv_bytes == plan.steady.kv_bytes


def test_the_fit_uses_the_prefill_peak_not_the_steady_state():
    # Mistral-7B at 32k: the prompt in all 32 sliding layers is 4.3 GB; the window alone 0.5 GB.
    plan = memory.plan("mistral-7b", FP16, 32768, 1, "bf16", "h200-sxm-141gb")
    assert plan.peak.kv_bytes == 8 * plan.steady.kv_bytes
    assert plan.primary.total_bytes == plan.peak.device_bytes > plan.primary.steady_bytes == plan.steady.device_bytes
    assert any("prefill peak, not the steady state" in note for note in plan.notes)


@pytest.mark.parametrize(("context", "batch"), [(16, 1), (8192, 1), (163840, 2)])
def test_kv_cache_of_an_mla_model(context, batch):
    # DeepSeek-V3 in vLLM: one latent of kv_lora_rank 512 + rope key 64 per token per layer, 61 layers, bf16,
    # in pages of 16 tokens (MLAAttentionSpec.page_size_bytes).
    vllm = memory.Assumptions(runtime="vllm")
    expected = (512 + 64) * 61 * 2 * math.ceil(context / 16) * 16 * batch
    plan = memory.plan("deepseek-v3", INT4_G128, context, batch, "bf16", "h200-sxm-141gb", vllm)
    assert plan.kv_cache_bytes == expected
    assert plan.kv.per_gpu_bytes(8) == plan.kv.total_bytes  # the latent is replicated, not split, across TP ranks
    # transformers 5.x caches the same latent (kv_lora_rank as keys, the rotated 64 as values), unpaged, and
    # decompresses one layer's latents into 128 heads of keys (192) and values (128) only while it attends.
    eager = memory.plan("deepseek-v3", INT4_G128, context, batch, "bf16")
    assert eager.kv_cache_bytes == eager.steady.kv_bytes == (512 + 64) * 61 * 2 * context * batch
    assert eager.steady.bytes_of("decode step") == max(2 * batch * context * 128 * (128 + 128 + 128 + 64),
                                                       2 * batch * (context + 1) * 512)


def test_kv_dtypes_store_their_scales():
    values = 2 * 32 * 8 * 128 * 8192  # Llama-3.1-8B, 8192 tokens
    layer_tensors = 2 * 32  # K and V per layer
    groups = values // 32

    def kv(dtype: str, runtime: str = "transformers") -> memory.KVCache:
        weights = memory.weight_spec("Q4_K_M") if runtime == "llama.cpp" else INT4_G128
        return memory.plan("llama-3.1-8b", weights, 8192, 1, dtype,
                           assumptions=memory.Assumptions(runtime=runtime)).kv

    assert kv("bf16").total_bytes == values * 2
    # fp8 (vLLM): one byte a value plus one fp32 per-tensor scale for each layer's K and V.
    assert kv("fp8", "vllm").total_bytes == values + layer_tensors * 4
    assert kv("int8_per_token_head", "vllm").total_bytes == values + values // 128 * 4  # fp32 per token and head
    # int8/int4 (transformers' quantized cache): an fp16 scale and a zero-point at the cache's bits per 32 values.
    assert kv("int8").total_bytes == values + groups * 2 + groups
    assert kv("int4").total_bytes == values // 2 + groups * 2 + groups // 2
    assert kv("int4").bits_per_value == pytest.approx(4 + 16 / 32 + 4 / 32)
    assert kv("int4").scales_bytes == groups * 2 + groups // 2
    # llama.cpp q8_0 / q4_0 rows: 34 and 18 bytes per block of 32 (ggml type_traits), n_ctx padded to 256.
    assert kv("q8_0", "llama.cpp").total_bytes == values // 32 * 34
    assert kv("q4_0", "llama.cpp").total_bytes == values // 32 * 18


def test_each_runtime_refuses_kv_formats_it_does_not_store():
    with pytest.raises(QlabError, match="transformers does not store a 'q8_0' KV cache; pick one of"):
        memory.plan("llama-3.1-8b", INT4_G128, 8192, 1, "q8_0")
    with pytest.raises(QlabError, match="llama.cpp does not store a 'fp8' KV cache"):
        memory.plan("llama-3.1-8b", memory.weight_spec("Q4_K_M"), 8192, 1, "fp8",
                    assumptions=memory.Assumptions(runtime="llama.cpp"))
    with pytest.raises(QlabError, match="llama.cpp loads GGUF files"):
        memory.plan("llama-3.1-8b", INT4_G128, 8192, assumptions=memory.Assumptions(runtime="llama.cpp"))


def test_an_encoder_has_no_kv_cache():
    assert memory.plan("minilm-l6", INT4_G128, 512).kv_cache_bytes == 0


# --- weights ----------------------------------------------------------------------------------------------


def test_group_128_int4_overhead_is_visible():
    plan = memory.plan("llama-3.1-8b", INT4_G128, 8192)
    counts = architectures.count_params(architectures.get("llama-3.1-8b"))
    assert plan.weights.bits_per_weight == 4.125
    assert plan.scales_bytes == counts.quantizable // 128 * 2
    # Embedding and the untied lm_head stay at fp16, and the plan says so.
    assert plan.unquantized_format == "fp16"
    assert plan.weights_bytes == counts.quantizable * 4125 // 8000 + (counts.total - counts.quantizable) * 2
    assert plan.params == 8_030_261_248


def test_plain_casts_cast_everything():
    plan = memory.plan("llama-3.1-8b", QuantScheme("fp32"), 1)
    assert plan.weights_bytes == 4 * 8_030_261_248 and plan.scales_bytes == 0
    assert plan.inputs.act_bytes == 4


def test_lm_head_choice_is_an_assumption():
    kept = memory.plan("llama-3.1-8b", INT4_G128, 1)
    quantized = memory.plan("llama-3.1-8b", INT4_G128, 1,
                            assumptions=memory.Assumptions(quantize_lm_head=True))
    head = 128256 * 4096
    assert kept.weights_bytes - quantized.weights_bytes == head * 2 - head * 4125 // 8000


def test_moe_keeps_every_expert_resident_and_reports_active_params():
    plan = memory.plan("mixtral-8x7b", INT4_G128, 4096)
    counts = architectures.count_params(architectures.get("mixtral-8x7b"))
    assert plan.weights.quantized_params == counts.quantizable  # all 8 experts of every layer
    assert plan.active_params == counts.active_per_token < plan.params
    assert any("MoE" in note for note in plan.notes)


def test_a_mix_assigns_schemes_by_glob():
    int8 = QuantScheme("int8", "channel")
    plan = memory.plan("llama-3.1-8b", {"*.down_proj": int8, "*": INT4_G128}, 1)
    arch = architectures.get("llama-3.1-8b")
    expected = 0
    for shape in architectures.linear_shapes(arch):
        scheme = int8 if shape.name_pattern.endswith("down_proj") else INT4_G128
        expected += sum(scheme.storage_bytes((shape.out_features, shape.in_features)).values()) * shape.count
    assert plan.weights.quantized_bytes == expected
    assert plan.scheme_label.startswith("mixed")


def test_seed_facts_show_the_scales_they_leave_out():
    rows = {(r["params"], r["scheme"]): r for r in memory.seed_facts(group_size=128)}
    assert rows[(70 * 10**9, "fp16")]["total_bytes"] == 140 * 10**9
    int4_70b = rows[(70 * 10**9, "int4 g128")]
    assert int4_70b["codes_bytes"] == 35 * 10**9
    assert int4_70b["scales_bytes"] == 70 * 10**9 // 128 * 2
    assert int4_70b["bits_per_weight"] == 4.125
    assert int4_70b["real_model_bytes"] > int4_70b["total_bytes"]  # embeddings and head stay at fp16
    assert rows[(30 * 10**9, "fp32")]["total_bytes"] == 120 * 10**9
    assert rows[(30 * 10**9, "int4 g128")]["codes_bytes"] == 15 * 10**9


# --- loaded models: the estimate is the real storage ------------------------------------------------------


@pytest.fixture(scope="module", params=["minilm-l6", "smollm2-135m"])
def loaded(request):
    from qlab.models import loading as models

    return models.load(request.param)


def _schemes() -> list[QuantScheme]:
    # Group 64 divides every layer of both bundled models (SmolLM2's 576 rules out 128).
    schemes = [QuantScheme(f, "group", 64) if FORMATS[f].scaled else QuantScheme(f) for f in FORMATS]
    return [*schemes, QuantScheme("int4", "group", 64, symmetric=False), QuantScheme("int8", "channel"),
            QuantScheme("nf4", "tensor")]


def _stored_bytes(model, scheme: QuantScheme) -> int:
    """Real tensor bytes: packed codes, scales and zero-points of each quantized linear, plus the rest cast.

    ``nbytes`` and the packing depend on a tensor's shape alone, so one real weight per distinct shape is
    quantized and counted for every linear of that shape (all of SmolLM2 at nf4 takes 35 s otherwise).
    """
    from qlab.core.plan import unquantized_format
    from qlab.models.loading import quantizable_linears

    linears = quantizable_linears(model)
    per_shape = {}
    for _, module in linears:
        shape = tuple(module.weight.shape)
        if shape not in per_shape:
            qtensor = quantize(module.weight, scheme)
            packed = sum(t.numel() * t.element_size() for t in qtensor.packed().values())
            assert packed == qtensor.nbytes
            per_shape[shape] = qtensor.nbytes
    quantized_ids = {id(m.weight) for _, m in linears}
    others = sum(p.numel() for p in model.parameters() if id(p) not in quantized_ids)
    return (sum(per_shape[tuple(m.weight.shape)] for _, m in linears)
            + others * get_format(unquantized_format(scheme)).bits // 8)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", _schemes(), ids=lambda s: s.label.replace(" ", "-"))
def test_loaded_weights_equal_the_real_quantized_tensors(loaded, scheme):
    from qlab.core.plan import size_report

    plan = memory.plan_loaded(loaded, scheme, 128)
    assert plan.weights_bytes == size_report(loaded.model, scheme).size_bytes
    assert plan.weights_bytes == _stored_bytes(loaded.model, scheme)
    assert plan.params == loaded.num_params


@pytest.mark.slow
def test_loaded_mix_globs_match_module_names(loaded):
    from qlab.models.loading import quantizable_linears

    first = quantizable_linears(loaded.model)[0][0]
    int8 = QuantScheme("int8", "channel")
    plan = memory.plan_loaded(loaded, {first: int8, "*": QuantScheme("int4", "group", 64)}, 128)
    uniform = memory.plan_loaded(loaded, QuantScheme("int4", "group", 64), 128)
    assert plan.weights_bytes > uniform.weights_bytes


# --- verdicts ---------------------------------------------------------------------------------------------


def test_max_context_is_the_largest_that_fits():
    plan = memory.plan("llama-3.1-8b", FP16, 8192, 1, "fp16", "rtx-4090")
    fit = plan.primary
    assert 8192 < fit.max_context < 131072 and not fit.max_context_is_model_limit
    assert memory.plan("llama-3.1-8b", FP16, fit.max_context, 1, "fp16", "rtx-4090").fits
    assert not memory.plan("llama-3.1-8b", FP16, fit.max_context + 1, 1, "fp16", "rtx-4090").fits


def test_max_batch_is_the_largest_that_fits():
    fit = memory.plan("llama-3.1-8b", INT4_G128, 8192, 1, "fp16", "l4").primary
    assert fit.max_batch >= 1
    assert memory.plan("llama-3.1-8b", INT4_G128, 8192, fit.max_batch, "fp16", "l4").fits
    assert not memory.plan("llama-3.1-8b", INT4_G128, 8192, fit.max_batch + 1, "fp16", "l4").fits


def test_max_context_stops_at_the_model_limit():
    fit = memory.plan("llama-3.2-1b", INT4_G128, 1024, 1, "fp16", "h200-sxm-141gb").primary
    assert fit.max_context == 131072 and fit.max_context_is_model_limit


def test_a_70b_model_in_fp16_needs_two_80gb_gpus():
    plan = memory.plan("llama-3.1-70b", FP16, 8192, 1, "fp16", ["h100-sxm-80gb", "a100-sxm-80gb"])
    for fit in plan.targets:
        assert not fit.fits and fit.max_context == 0
        assert fit.gpus_needed is not None and fit.gpus_needed >= 2
        assert fit.per_gpu_bytes <= fit.memory_bytes
        expected = (math.ceil(plan.weights_bytes / fit.gpus_needed) + plan.kv_cache_bytes // fit.gpus_needed
                    + plan.activations_bytes + fit.overhead_bytes)
        assert fit.per_gpu_bytes == expected


def test_totals_add_up_with_the_stated_overhead():
    plan = memory.plan("llama-3.1-8b", INT4_G128, 8192, 1, "fp16", ["h100-sxm-80gb", "cpu-x86-avx2"])
    gpu, cpu = plan.targets
    assert gpu.overhead_bytes == 2**30 and cpu.overhead_bytes == 0
    assert gpu.total_bytes == plan.weights_bytes + plan.kv_cache_bytes + plan.activations_bytes + 2**30
    assert gpu.headroom_bytes == gpu.memory_bytes - gpu.total_bytes


def test_context_curve_grows_with_context():
    plan = memory.plan("llama-3.1-8b", INT4_G128, 8192)
    totals = [row["total_bytes"] for row in memory.context_curve(plan, [512, 2048, 8192, 32768])]
    assert totals == sorted(totals) and totals[2] == plan.primary.total_bytes


# --- bad inputs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("call", "words"), [
    (lambda: memory.plan("llama-9", INT4_G128, 8192), "Unknown model"),
    (lambda: memory.plan("llama-3.1-8b", INT4_G128, 0), "context"),
    (lambda: memory.plan("llama-3.1-8b", INT4_G128, -5), "context"),
    (lambda: memory.plan("llama-3.1-8b", INT4_G128, True), "context"),
    (lambda: memory.plan("llama-3.1-8b", INT4_G128, 8192, 0), "batch"),
    (lambda: memory.plan("smollm2-135m", INT4_G128, 8192), "group size 128 does not divide"),
    (lambda: memory.plan("llama-3.1-8b", INT4_G128, 8192, hardware_ids="h99"), "Unknown hardware"),
    (lambda: memory.plan("llama-3.1-8b", INT4_G128, 8192, hardware_ids=[]), "no target"),
    (lambda: memory.plan("llama-3.1-8b", INT4_G128, 8192, kv_dtype="fp7"), "KV-cache dtype"),
    (lambda: memory.plan("llama-3.1-8b", {"*.q_proj": INT4_G128}, 8192), "add a '*' entry"),
    (lambda: memory.plan("llama-3.1-8b", {"*.qproj": INT4_G128, "*": FP16}, 8192), "matches no matrix"),
    (lambda: memory.plan("phi-3-mini", INT4_G128, 8192, kv_dtype="int4",
                             assumptions=memory.Assumptions(kv_group_size=64)),
     "KV group size"),
    (lambda: memory.Assumptions(gpu_overhead_bytes=-1), "overhead"),
    (lambda: memory.plan({"model_type": "llama"}, INT4_G128, 8192), "config"),
    # Mixtral's config with 50 experts per token of 8 once reported 283B "active" of 46.7B.
    (lambda: memory.plan({**architectures.get("mixtral-8x7b").config, "num_experts_per_tok": 50}, INT4_G128, 8192),
     "num_experts_per_tok (50) exceeds the 8 experts"),
    (lambda: memory.plan("llama-3.1-8b", INT4_G128, 8192, assumptions=memory.Assumptions(runtime="sglang")),
     "unknown runtime"),
])
def test_bad_inputs_raise_one_line(call, words):
    with pytest.raises(QlabError) as caught:
        call()
    message = str(caught.value)
    assert words in message and "\n" not in message


# --- CLI --------------------------------------------------------------------------------------------------


def _run_cli(argv: list[str]) -> None:
    parser = Parser(prog="qlab")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    cli_memory.add_parser(sub)
    args = parser.parse_args(argv)
    args.func(args)


def test_cli_prints_the_plan_as_json(tmp_path):
    out = tmp_path / "plan.json"
    _run_cli(["memory", "--model", "meta-llama/Llama-3.1-8B", "--format", "int4", "--context", "8192",
              "--batch", "1", "--kv-dtype", "fp16", "--hardware", "h100-sxm-80gb", "--json", str(out)])
    payload = json.loads(out.read_text())
    for key in ("params", "weights_bytes", "kv_cache_bytes", "activations_bytes", "overhead_bytes",
                "total_bytes", "fits", "max_context", "gpus_needed", "scales_bytes", "formulas"):
        assert key in payload
    assert payload["model"] == "llama-3.1-8b" and payload["bits_per_weight"] == 4.125
    assert payload["kv_cache_bytes"] == 2 * 32 * 8 * 128 * 8192 * 2
    assert payload["total_bytes"] == sum(payload[k] for k in ("weights_bytes", "kv_cache_bytes",
                                                               "activations_bytes", "overhead_bytes"))


def test_cli_plans_an_uploaded_config(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text((architectures.CATALOG_DIR / "qwen2.5-7b.json").read_text())
    _run_cli(["memory", "--config-file", str(config), "--hardware", "l4,t4", "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert payload["params"] == architectures.count_params(architectures.get("qwen2.5-7b")).total
    assert [t["hardware_id"] for t in payload["targets"]] == ["l4", "t4"]


def test_cli_text_output(capsys):
    _run_cli(["memory", "--model", "mixtral-8x7b", "--hardware", "h100-sxm-80gb"])
    text = capsys.readouterr().out
    assert "KV cache" in text and "h100-sxm-80gb" in text and "MoE" in text


def test_what_awq_act_order_and_2_4_store_is_a_part_of_its_own_and_the_stack_still_adds_up():
    from dataclasses import replace

    import pandas as pd

    from qlab import charts

    rtn = memory.plan("llama-3.1-8b", INT4_G128, 8192)
    awq = memory.plan("llama-3.1-8b", replace(INT4_G128, algorithm="awq"), 8192).to_record()
    act_order = memory.plan("llama-3.1-8b", replace(INT4_G128, algorithm="gptq-act-order"), 8192).to_record()
    sparse = memory.plan("llama-3.1-8b", QuantScheme("int8", "channel", sparsity="2:4"), 8192).to_record()
    matrices = memory._catalog_matrices(architectures.get("llama-3.1-8b"), memory.Assumptions())
    inputs = sum(shape[-1] * count for _, shape, count in matrices)
    values = sum(math.prod(shape) * count for _, shape, count in matrices)
    assert awq["awq_scale_bytes"] == 2 * inputs and awq["index_bytes"] == awq["metadata_bytes"] == 0
    assert act_order["index_bytes"] == 4 * inputs and act_order["awq_scale_bytes"] == 0
    assert sparse["metadata_bytes"] == values // 2 * 2 // 8
    assert rtn.to_record()["metadata_bytes"] == rtn.to_record()["index_bytes"] == 0
    for record in (awq, act_order, sparse):
        parts = ["weights_before_scales_bytes", "scales_bytes", *charts.MEMORY_ALGORITHM_PARTS]
        assert sum(record[p] for p in parts) == record["weights_bytes"]
    # The extra parts add to the same weights as before: AWQ is RTN's size plus its input scales.
    assert awq["weights_bytes"] == rtn.weights_bytes + 2 * inputs
    figure = charts.memory_stack(pd.DataFrame([rtn.to_record(), awq]), 80 * 10**9, "H100")
    assert "AWQ input scales" in [trace.name for trace in figure.data]
    assert "2:4 positions" not in [trace.name for trace in figure.data]
