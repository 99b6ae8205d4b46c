"""The layer-streamed sweep: block by block over cached hidden states, the same metrics as the shadow copy."""

import pytest
import torch

from qlab.analyses import streamed
from qlab.analyses.streamed import evaluate_streamed, streamable_stack
from qlab.analyses.sweep import run_sweep
from qlab.core import cpu_kernels, quant
from qlab.core.errors import Cancelled, QlabError
from qlab.core.plan import quantizable_linears, quantized_copy
from qlab.core.quant import QuantScheme, quantize
from qlab.models import evaluate as evaluation
from qlab.models.evaluate import EvalSpec, compute_baseline, evaluate
from qlab.models.loading import load, weights_digest
from tests.tiny_models import tiny_bert, tiny_llama

SCHEMES = [QuantScheme("fp32"), QuantScheme("fp16"), QuantScheme("bf16"), QuantScheme("int8"),
           QuantScheme("int4", "group", 32), QuantScheme("nf4", "group", 32, symmetric=True),
           QuantScheme("fp8_e4m3", "channel")]


def assert_same_metrics(loaded, baseline, plan) -> None:
    shadow = evaluate(quantized_copy(loaded.model, plan), baseline)
    layered = evaluate_streamed(loaded, plan, baseline)
    assert layered.keys() == shadow.keys()
    for key, value in shadow.items():
        assert layered[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, plan)


@pytest.mark.parametrize("build", [tiny_llama, tiny_bert])
def test_equals_the_shadow_copy_and_leaves_the_base_alone(build):
    loaded = build()
    before = weights_digest(loaded.model)
    baseline = compute_baseline(loaded, EvalSpec(tokens=128))
    for scheme in SCHEMES:
        assert_same_metrics(loaded, baseline, scheme)
    names = [name for name, _ in quantizable_linears(loaded.model)]
    assert_same_metrics(loaded, baseline, {names[0]: QuantScheme("int4", "group", 32), names[-1]: QuantScheme("int8")})
    assert weights_digest(loaded.model) == before


def test_a_blocks_shell_is_a_new_tree_of_modules_that_shares_the_rest():
    loaded = tiny_llama()
    base = loaded.model.model.layers[0]
    shell, _ = streamed._shell(base, ["self_attn.q_proj"], streamed.get_format("fp32"), torch.float32)
    pairs = list(zip(base.modules(), shell.runnable.modules(), strict=True))
    assert all(copy is not module for module, copy in pairs)  # every module its own, so it can be replaced
    assert shell.runnable.self_attn.config is base.self_attn.config  # attributes shared, not copied
    assert shell.runnable.input_layernorm.weight is base.input_layernorm.weight
    shell.lend([torch.zeros_like(base.self_attn.q_proj.weight)])
    assert base.self_attn.q_proj.weight.abs().sum() > 0  # the base's linear never got the lent weight
    seen = []  # a hook another session puts on the base later is not the shell's
    handle = base.mlp.register_forward_pre_hook(lambda module, args: seen.append(module))
    shell.runnable.mlp(torch.zeros(1, 2, base.mlp.down_proj.out_features))
    handle.remove()
    assert not seen


def test_blocks_with_accelerates_hooks_are_deep_copied_and_still_take_the_plans_weights():
    from accelerate.hooks import ModelHook, add_hook_to_module

    loaded = tiny_llama()
    baseline = compute_baseline(loaded, EvalSpec(tokens=128))
    for module in loaded.model.model.layers.modules():  # as device_map="auto" does: forward bound to the module
        add_hook_to_module(module, ModelHook())
    # a shell sharing the hooked forward would run the base's weights: the int4 metrics would be the base's own
    assert_same_metrics(loaded, baseline, QuantScheme("int4", "group", 32))
    assert evaluate_streamed(loaded, QuantScheme("int4", "group", 32), baseline)["kld_mean"] > 0


def test_rows_rounded_in_chunks_equal_the_whole_weight(monkeypatch):
    loaded = tiny_llama()
    baseline = compute_baseline(loaded, EvalSpec(tokens=128))
    monkeypatch.setitem(quant.FAKE_QUANTIZE_CHUNK_ELEMENTS, "cpu", 64 * 3)  # three rows of 64 inputs: 43 chunks a layer
    for scheme in (QuantScheme("int4", "group", 32, symmetric=False), QuantScheme("nf4", "channel"),
                   QuantScheme("fp8_e4m3", "tensor"), QuantScheme("fp16")):
        assert_same_metrics(loaded, baseline, scheme)


def test_each_block_reuses_the_previous_blocks_tensors_and_unchanged_weights_are_lent_as_themselves(
        bf16_llama_dir, monkeypatch, cpu_bf16_math):
    loaded = load(str(bf16_llama_dir))
    baseline = compute_baseline(loaded, EvalSpec(tokens=128))
    allocated, lent = [], []
    take = streamed.ReusedBuffers.take
    monkeypatch.setattr(streamed.ReusedBuffers, "take",
                        lambda self, *args: allocated.append(not self._free[(tuple(args[0]), *args[1:])])
                        or take(self, *args))
    unchecked = streamed.dequantized_weights_unchecked

    def recording(layers, dtype, buffers):
        values, suspect = unchecked(layers, dtype, buffers)
        lent.extend(value.data_ptr() == weight.data_ptr() for (weight, _, _), value in zip(layers, values))
        return values, suspect

    monkeypatch.setattr(streamed, "dequantized_weights_unchecked", recording)
    stack = streamable_stack(loaded.model)
    per_block = len(stack.linears[0])
    evaluate_streamed(loaded, QuantScheme("int4", "group", 32), baseline)
    # New tensors for the first block (and a head outside the blocks) only
    assert sum(allocated) <= per_block + len(stack.outside) < len(allocated) and not any(lent)
    allocated.clear()
    lent.clear()
    evaluate_streamed(loaded, QuantScheme("bf16"), baseline)
    if baseline.compute_dtype == torch.bfloat16:
        assert not allocated and all(lent)  # a bf16 model's own values: nothing copied
    else:  # widened to fp32 once per block, into the same tensors for every block
        assert sum(allocated) <= per_block + len(stack.outside) < len(allocated) and not any(lent)


def test_the_compiled_cpu_kernels_stream_like_the_shadow_copy(bf16_llama_dir, monkeypatch):
    pytest.importorskip("numba")
    monkeypatch.setattr(cpu_kernels, "MIN_VALUES", 1)
    loaded = load(str(bf16_llama_dir))
    before = weights_digest(loaded.model)
    baseline = compute_baseline(loaded, EvalSpec(tokens=128))
    for scheme in (QuantScheme("int4", "group", 32, symmetric=False), QuantScheme("nf4", "group", 32),
                   QuantScheme("int8", "channel")):
        assert_same_metrics(loaded, baseline, scheme)
    assert weights_digest(loaded.model) == before


def test_an_untied_head_is_quantized_like_the_shadow_copy_does():
    loaded = tiny_llama()
    from transformers import LlamaForCausalLM

    config = loaded.model.config
    config.tie_word_embeddings = False
    torch.manual_seed(1)
    untied = type(loaded)(loaded.source, LlamaForCausalLM(config).eval().requires_grad_(False), loaded.tokenizer)
    assert "lm_head" in streamable_stack(untied.model).outside
    baseline = compute_baseline(untied, EvalSpec(tokens=128))
    assert_same_metrics(untied, baseline, QuantScheme("int4", "group", 32))


def test_block_inputs_are_captured_once_per_model_and_text():
    loaded = tiny_llama()
    baseline = compute_baseline(loaded, EvalSpec(tokens=128))
    evaluate_streamed(loaded, QuantScheme("fp32"), baseline)  # leaves the embedding as it is: its capture is kept
    [(key, capture)] = [(key, value) for key, value in baseline.cache.items() if key[0] == "streamed block inputs"]
    evaluate_streamed(loaded, QuantScheme("int8"), baseline)  # fp16 rounds the embedding: a capture of its own
    assert baseline.cache[key] is capture and len(capture.hidden) == 1


def test_large_tensors_outside_the_plan_are_rounded_once_per_baseline_until_they_change(monkeypatch):
    monkeypatch.setattr(streamed, "COPIED_UNCHECKED_VALUES", 1)
    loaded = tiny_llama()  # fp32: every scheme below stores the embedding in fp16
    embedding = loaded.model.get_input_embeddings().weight
    baseline = compute_baseline(loaded, EvalSpec(tokens=128))
    rounded = []
    real = streamed.fake_quantize_unchecked
    monkeypatch.setattr(streamed, "fake_quantize_unchecked",
                        lambda x, scheme: rounded.append(x.data_ptr() == embedding.data_ptr()) or real(x, scheme))
    assert_same_metrics(loaded, baseline, QuantScheme("int8"))
    assert_same_metrics(loaded, baseline, QuantScheme("int4", "group", 32))
    assert rounded.count(True) == 1
    with torch.no_grad():
        embedding[0, 0] += 1.0
    assert_same_metrics(loaded, baseline, QuantScheme("int8"))
    assert rounded.count(True) == 2


def test_run_sweep_streams_known_blocks_and_falls_back_to_the_shadow_copy(monkeypatch):
    loaded = tiny_llama()
    spec = EvalSpec(tokens=128)
    baseline = compute_baseline(loaded, spec)
    schemes = [QuantScheme("int8"), QuantScheme("int4", "group", 32)]
    layered = list(run_sweep(loaded, schemes, spec, baseline))
    monkeypatch.setattr(streamed, "STREAMED_STACKS", ())
    copied = list(run_sweep(loaded, schemes, spec, baseline))
    assert [r.extra["evaluation"] for r in layered + copied] == ["streamed"] * 2 + ["shadow copy"] * 2
    for a, b in zip(layered, copied, strict=True):
        assert a.metrics == pytest.approx(b.metrics, rel=1e-6)
        assert a.to_record()["reference_dtype"] == "float32"
        assert 0 < a.quantize_seconds <= a.seconds


def test_cancel_stops_between_blocks():
    loaded = tiny_llama()
    baseline = compute_baseline(loaded, EvalSpec(tokens=128))
    calls = {"n": 0}

    def cancel_after_two_checks() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(Cancelled):
        evaluate_streamed(loaded, QuantScheme("int4", "group", 32), baseline, cancel=cancel_after_two_checks)


def test_a_bf16_model_is_its_own_reference_and_streams_like_the_shadow_copy(bf16_llama_dir):
    loaded = load(str(bf16_llama_dir))
    before = weights_digest(loaded.model)
    baseline = compute_baseline(loaded, EvalSpec(tokens=128))
    assert baseline.dtype == torch.bfloat16
    for scheme in (QuantScheme("bf16"), QuantScheme("int8"), QuantScheme("nf4", "group", 32)):
        assert_same_metrics(loaded, baseline, scheme)
    assert evaluate_streamed(loaded, QuantScheme("bf16"), baseline)["top1_agreement"] == 1.0
    assert weights_digest(loaded.model) == before


def test_without_native_bf16_the_cpu_computes_in_fp32_on_bf16_weights(bf16_llama_dir, monkeypatch):
    monkeypatch.setattr(evaluation, "cpu_flags", lambda: frozenset({"avx2", "fma"}))  # no avx512_bf16, no amx
    loaded = load(str(bf16_llama_dir))
    baseline = compute_baseline(loaded, EvalSpec(tokens=128))
    assert baseline.reference_dtype == "bfloat16 (float32 compute)"
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}  # the weights stay 16-bit
    # Computing in fp32 on bf16 weights is exactly the model loaded in fp32 (bf16 -> fp32 is exact).
    wide = compute_baseline(load(str(bf16_llama_dir), dtype="fp32"), EvalSpec(tokens=128))
    assert torch.equal(baseline.reference, wide.reference)
    assert_same_metrics(loaded, baseline, QuantScheme("int4", "group", 32))
    monkeypatch.setattr(evaluation, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert evaluation.compute_dtype(loaded.model) == torch.bfloat16


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["minilm", "smollm"])
def test_equals_the_shadow_copy_on_both_bundled_models(request, fixture):
    loaded = request.getfixturevalue(fixture)
    before = weights_digest(loaded.model)
    baseline = compute_baseline(loaded, EvalSpec(tokens=128))
    for scheme in (QuantScheme("fp16"), QuantScheme("int4", "group", 64)):
        assert_same_metrics(loaded, baseline, scheme)
    assert weights_digest(loaded.model) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_streams_on_the_gpu_in_bf16(bf16_llama_dir):
    loaded = load(str(bf16_llama_dir), device="cuda")
    before = weights_digest(loaded.model)
    baseline = compute_baseline(loaded, EvalSpec(tokens=128))
    assert baseline.compute_dtype == torch.bfloat16
    for scheme in (QuantScheme("int8"), QuantScheme("int4", "group", 32)):
        assert_same_metrics(loaded, baseline, scheme)
    assert weights_digest(loaded.model) == before


def test_untrusted_weights_are_evaluated_again_checked(monkeypatch):
    loaded = tiny_llama()
    baseline = compute_baseline(loaded, EvalSpec(tokens=128))
    scheme = QuantScheme("int4", "group", 32)
    expected = evaluate(quantized_copy(loaded.model, scheme), baseline)
    unchecked = streamed.dequantized_weights_unchecked
    calls = []

    def every_block_untrusted(layers, dtype, buffers):
        calls.append(len(layers))
        values, _ = unchecked(layers, dtype, buffers)
        return [torch.full_like(v, float("nan")) for v in values], torch.tensor(True)

    monkeypatch.setattr(streamed, "dequantized_weights_unchecked", every_block_untrusted)
    timings = {}
    got = evaluate_streamed(loaded, scheme, baseline, timings=timings)
    assert calls and len(calls) == len(streamable_stack(loaded.model).linears)  # one unchecked pass, then checked
    assert got == pytest.approx(expected, rel=1e-6) and timings["quantize_s"] > 0


def test_a_weight_quantize_refuses_is_refused_in_the_streamed_sweep_too():
    loaded = tiny_llama()
    baseline = compute_baseline(loaded, EvalSpec(tokens=128))
    weight = loaded.model.model.layers[1].mlp.down_proj.weight
    original = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] = float("inf")
    try:
        with pytest.raises(QlabError) as streamed_error:
            evaluate_streamed(loaded, QuantScheme("int8"), baseline)
        with pytest.raises(QlabError) as quantize_error:
            quantize(weight, QuantScheme("int8"))
        assert str(streamed_error.value) == str(quantize_error.value)
    finally:
        with torch.no_grad():
            weight.copy_(original)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_calibrated_algorithms_sweep_on_the_gpu(bf16_llama_dir):
    loaded = load(str(bf16_llama_dir), device="cuda")
    spec = EvalSpec(tokens=128)
    schemes = [QuantScheme("int4", "group", 32, algorithm=a) for a in ("gptq", "gptq-act-order", "awq", "hqq")]
    rows = list(run_sweep(loaded, schemes, spec, compute_baseline(loaded, spec)))
    assert [r.scheme.algorithm for r in rows] == ["gptq", "gptq-act-order", "awq", "hqq"]
    assert all(torch.isfinite(torch.tensor(r.metrics["kld_mean"])) for r in rows)


def test_the_model_outside_its_blocks_is_made_once_per_sweep_and_keeps_no_schemes_head(monkeypatch):
    loaded = tiny_llama(tied=False)
    baseline = compute_baseline(loaded, EvalSpec(tokens=128))
    made = []
    real_outer = streamed._outer
    monkeypatch.setattr(streamed, "_outer", lambda *args: made.append(args[3].name) or real_outer(*args))
    shells: dict = {}
    schemes = [QuantScheme("int8"), QuantScheme("int4", "group", 32), QuantScheme("fp32")]
    shared = [evaluate_streamed(loaded, scheme, baseline, shells=shells) for scheme in schemes]
    assert made == ["fp16", "fp32"]  # int8 and int4 share the fp16 rest
    for scheme, metrics in zip(schemes, shared, strict=True):
        assert metrics == evaluate_streamed(loaded, scheme, baseline), scheme.label
    [outer] = [shells[key] for key in shells if key[:2] == ("outside the blocks", "fp16")]
    # the quantized head is dropped after each pass
    assert [linear.weight for linear in outer.shell.linears] == [None]
    assert len(outer.shell.runnable.get_submodule("model.layers")) == 0  # and so are the blocks' outputs


def test_blocks_are_made_runnable_once_per_sweep_and_lent_without_keeping_weights(monkeypatch):
    loaded = tiny_llama()
    baseline = compute_baseline(loaded, EvalSpec(tokens=128))
    made = []
    real_shell = streamed._shell
    monkeypatch.setattr(streamed, "_shell", lambda *args: made.append(args[1]) or real_shell(*args))
    shells: dict = {}
    schemes = [QuantScheme("int8"), QuantScheme("int4", "group", 32), QuantScheme("nf4", "group", 32)]
    shared = [evaluate_streamed(loaded, scheme, baseline, shells=shells) for scheme in schemes]
    blocks = len(loaded.model.model.layers)
    # int8, int4 and nf4 share the fp16 rest: each block made once, and the model outside the blocks once
    assert len(made) == blocks and len(shells) == blocks + 1
    assert all(linear.weight is None for key, shell in shells.items() if key[0] != "outside the blocks"
               for linear in shell.linears)
    for scheme, metrics in zip(schemes, shared, strict=True):
        assert metrics == evaluate_streamed(loaded, scheme, baseline), scheme.label
    # A mixed plan leaving a large linear to the fp16 rest copies it: that block's shell is not kept.
    monkeypatch.setattr(streamed, "COPIED_UNCHECKED_VALUES", 1000)
    names = [name for name, _ in quantizable_linears(loaded.model)]
    shells.clear()
    evaluate_streamed(loaded, {name: QuantScheme("int8") for name in names[1:]}, baseline, shells=shells)
    assert sorted(key[0] for key in shells) == [f"model.layers.{index}" for index in range(1, blocks)] + [
        "outside the blocks"]
