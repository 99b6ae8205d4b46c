import copy

import pytest
import torch

from qlab.analyses.sensitivity import (
    analyze,
    block_stack,
    calibrate,
    check_calibration,
    error_of,
    layer_type,
    weight_stats,
)
from qlab.core.algorithms import quantize_weight
from qlab.core.errors import QlabError
from qlab.core.quant import QuantScheme, fake_quantize, quantize
from qlab.models.evaluate import EvalSpec, compute_baseline, default_text, evaluate
from qlab.models.loading import quantizable_linears, weights_digest
from tests.tiny_models import tiny_bert, tiny_llama

LADDER = ("fp32", "int8", "int4", "int3", "int2")
TEXT = default_text()[:20_000]  # the tiny models' byte tokenizer is pure Python: keep the text short


@pytest.fixture(scope="module")
def llama():
    loaded = tiny_llama()
    return loaded, compute_baseline(loaded, EvalSpec(tokens=128, text=TEXT))


@pytest.fixture(scope="module")
def bert():
    loaded = tiny_bert()
    return loaded, compute_baseline(loaded, EvalSpec(tokens=256, text=TEXT))


def _reference_error(loaded, baseline, quantized: dict[str, QuantScheme], metric: str) -> float:
    """Independent path: a deep copy of the whole model with some weights fake-quantized, evaluated in full."""
    model = copy.deepcopy(loaded.model)
    for name, scheme in quantized.items():
        module = model.get_submodule(name)
        module.weight.data = fake_quantize(module.weight.data, scheme)
    return error_of(metric, evaluate(model, baseline)[metric])


def test_layer_types_cover_llama_and_bert_names():
    assert [layer_type(n) for n in ("model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.o_proj",
                                    "model.layers.3.mlp.gate_proj", "model.layers.3.mlp.down_proj")] == \
        ["q", "o", "gate", "down"]
    assert [layer_type(n) for n in ("encoder.layer.0.attention.self.key", "encoder.layer.0.attention.output.dense",
                                    "encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense",
                                    "pooler.dense", "something.else")] == ["k", "o", "up", "down", "other", "other"]


def test_weight_stats_against_numpy_style_formulas():
    torch.manual_seed(0)
    weight = torch.randn(64, 256)
    weight[5, 7] = 40.0
    stats = weight_stats(weight)
    std = weight.std()
    assert stats["weight_absmax_over_std"] == pytest.approx(40.0 / std.item(), rel=1e-5)
    z = (weight - weight.mean()) / std
    assert stats["weight_kurtosis"] == pytest.approx(((z**4).mean() - 3).item(), rel=1e-4)
    assert stats["weight_outlier_rows"] == 1


def test_block_stack_finds_the_blocks(llama, bert):
    stack = block_stack(llama[0].model)
    assert stack.path == "model.layers" and len(stack.linears) == 3 and stack.outside == ()
    assert all(len(names) == 7 for names in stack.linears)
    stack = block_stack(bert[0].model)
    assert stack.path == "encoder.layer" and stack.outside == ("pooler.dense",)
    assert stack.block_of("encoder.layer.2.output.dense") == 2 and stack.block_of("pooler.dense") is None


def test_per_linear_error_is_zero_for_fp32_and_grows_as_bits_fall(llama):
    loaded, baseline = llama
    report = analyze(loaded, [QuantScheme(f, "channel") for f in LADDER], baseline, blocks=False)
    by_layer: dict[str, list[float]] = {}
    for row in report.linears:
        by_layer.setdefault(row["layer"], []).append(row["relative_mse"])
    assert len(by_layer) == len(quantizable_linears(loaded.model))
    for layer, errors in by_layer.items():
        assert errors[0] == 0.0, layer
        assert all(a < b for a, b in zip(errors, errors[1:])), (layer, errors)
    fp32 = [r for r in report.linears if r["format"] == "fp32"]
    assert all(r["sqnr_db"] is None and r["weight_relative_mse"] == 0 and r["predicted_delta"] == 0 for r in fp32)
    int8 = next(r for r in report.linears if r["format"] == "int8")
    assert int8["sqnr_db"] == pytest.approx(-10 * torch.log10(torch.tensor(int8["relative_mse"])).item())


def test_relative_output_error_matches_a_direct_computation(llama):
    """The hook's error equals X (W_q - W)^T computed from inputs captured independently."""
    loaded, baseline = llama
    name = "model.layers.1.mlp.down_proj"
    scheme = QuantScheme("int4", "group", 32)
    captured = []
    module = loaded.model.get_submodule(name)
    handle = module.register_forward_hook(lambda m, args, out: captured.append((args[0].detach(), out.detach())))
    evaluate(loaded.model, baseline)
    handle.remove()
    x = torch.cat([a.reshape(-1, module.in_features) for a, _ in captured])
    y = torch.cat([o.reshape(-1, module.out_features) for _, o in captured])
    expected = ((x @ (fake_quantize(module.weight, scheme) - module.weight).T) ** 2).sum() / (y**2).sum()
    report = analyze(loaded, [scheme], baseline, blocks=False, predict=False)
    row = next(r for r in report.linears if r["layer"] == name)
    assert row["relative_mse"] == pytest.approx(expected.item(), rel=1e-4)
    assert row["tokens"] == baseline.tokens


@pytest.mark.parametrize("scheme", [QuantScheme("int4", "group", 64), QuantScheme("nf4", "group", 64),
                                    QuantScheme("fp8_e4m3", "channel")], ids=lambda s: s.label)
def test_a_large_weight_s_error_is_rounded_to_the_bits_quantize_gives(scheme):
    """A weight as large as a real model's (over the compiled kernels' minimum on a CPU) is rounded to nearest by
    ``fake_quantize``'s route; its error must be the one ``quantize`` then ``dequantize`` gives, bit for bit."""
    from qlab.analyses.sensitivity import _LinearProbe, _Rounder
    from qlab.core import cpu_kernels

    torch.manual_seed(0)
    weight = (torch.randn(1024, 1536) * 0.02).to(torch.bfloat16)
    assert weight.numel() >= cpu_kernels.MIN_VALUES
    probe = _LinearProbe("big", weight, [scheme], [None], _Rounder(None))
    expected = quantize(weight, scheme).dequantize(torch.bfloat16).float() - weight.float()
    assert torch.equal(probe._delta(scheme), expected)


def test_an_artificial_outlier_makes_its_layer_the_most_sensitive():
    loaded = tiny_llama(seed=1)
    target = "model.layers.1.self_attn.v_proj"
    weight = loaded.model.get_submodule(target).weight
    weight.data[3, 5] = 20 * weight.abs().max()  # a per-tensor scale now rounds every other weight to zero
    baseline = compute_baseline(loaded, EvalSpec(tokens=128, text=TEXT))
    report = analyze(loaded, [QuantScheme("int4", "tensor")], baseline)
    rows = sorted(report.rows(), key=lambda r: r["relative_mse"], reverse=True)
    assert rows[0]["layer"] == target
    assert max(report.linears, key=lambda r: r["predicted_delta"])["layer"] == target
    assert max(report.linears, key=lambda r: r["weight_absmax_over_std"])["layer"] == target
    assert max(report.blocks, key=lambda r: r["delta"])["block"] == 1


@pytest.mark.parametrize("fixture", ["llama", "bert"])
def test_block_replay_equals_quantizing_the_whole_model_with_only_that_block(request, fixture):
    loaded, baseline = request.getfixturevalue(fixture)
    before = weights_digest(loaded.model)
    scheme = QuantScheme("int3", "channel")
    report = analyze(loaded, [scheme], baseline, predict=False)
    stack = block_stack(loaded.model)
    blocks = [r for r in report.blocks if r["unit"] == "block"]
    assert [r["block"] for r in blocks] == list(range(len(stack.linears)))
    for row in blocks:
        reference = _reference_error(loaded, baseline, dict.fromkeys(row["layers"], scheme), report.metric)
        assert reference > 1e-5  # int3 visibly moves the output: the comparison is not 0 == 0
        assert row["delta"] == pytest.approx(reference, rel=1e-4, abs=1e-7), row["name"]
    assert weights_digest(loaded.model) == before


def test_reverse_view_and_linear_unit_match_full_model_references(llama):
    loaded, baseline = llama
    scheme = QuantScheme("int3", "channel")
    names = [n for n, _ in quantizable_linears(loaded.model)]
    reverse = analyze(loaded, [scheme], baseline, view="reverse", predict=False)
    everything = _reference_error(loaded, baseline, dict.fromkeys(names, scheme), reverse.metric)
    for row in reverse.blocks:
        kept = set(row["layers"])
        rest = _reference_error(loaded, baseline, {n: scheme for n in names if n not in kept}, reverse.metric)
        assert row["delta"] == pytest.approx(everything - rest, rel=1e-3, abs=1e-7)
    single = analyze(loaded, [scheme], baseline, unit="linear", predict=False)
    assert len(single.blocks) == len(names)
    for row in single.blocks[:7:3]:
        reference = _reference_error(loaded, baseline, {row["name"]: scheme}, single.metric)
        assert row["delta"] == pytest.approx(reference, rel=1e-4, abs=1e-7)
    assert {r["linear_delta"] is not None for r in single.rows()} == {True}


def test_predicted_delta_tracks_measured_per_linear_delta(llama):
    """The curvature-weighted estimate ranks layers like their measured end-to-end deltas do."""
    loaded, baseline = llama
    report = analyze(loaded, [QuantScheme("int3", "channel")], baseline, unit="linear")
    rows = report.rows()
    predicted = torch.tensor([r["predicted_delta"] for r in rows])
    measured = torch.tensor([r["linear_delta"] for r in rows])
    rank = lambda v: v.argsort().argsort().float()  # noqa: E731
    correlation = torch.corrcoef(torch.stack([rank(predicted), rank(measured)]))[0, 1]
    assert correlation > 0.6, correlation
    # Second order is an estimate, not a fit: within an order of magnitude of the measurement in total.
    assert 0.1 < predicted.sum() / measured.sum() < 10


def test_bad_requests_fail_in_one_line(llama):
    loaded, baseline = llama
    with pytest.raises(QlabError, match="unit"):
        analyze(loaded, [QuantScheme("int4")], baseline, unit="head")
    with pytest.raises(QlabError, match="group size 48"):
        analyze(loaded, [QuantScheme("int4", "group", 48)], baseline)
    with pytest.raises(QlabError, match="at least one"):
        analyze(loaded, [], baseline)
    with pytest.raises(QlabError, match="calibration statistics"):
        analyze(loaded, [QuantScheme("int4", "group", 32, algorithm="gptq")], baseline)


def test_gptq_and_awq_blocks_equal_the_whole_model_with_that_block_rounded_by_them(llama):
    """Each layer is rounded by its scheme's algorithm with the sweep's calibration statistics: a replayed block
    equals quantized_copy (the sweep's shadow) with that block alone, and differs from rounding to nearest."""
    from qlab.core.plan import quantized_copy

    loaded, baseline = llama
    schemes = [QuantScheme("int3", "group", 32, algorithm="gptq"), QuantScheme("int3", "group", 32, algorithm="awq")]
    stats, record = calibrate(loaded, schemes, EvalSpec(tokens=128, text=TEXT))
    assert record["calibration_tokens"] == 4096
    report = analyze(loaded, schemes, baseline, predict=False, calibration=stats, calibration_record=record)
    rtn = analyze(loaded, [QuantScheme("int3", "group", 32)], baseline, predict=False)
    assert report.calibration == record
    for scheme in schemes:
        blocks = [r for r in report.blocks if r["label"] == scheme.label]
        assert len(blocks) == 3
        for row, plain in zip(blocks, rtn.blocks, strict=True):
            shadow = quantized_copy(loaded.model, dict.fromkeys(row["layers"], scheme), stats)
            reference = error_of(report.metric, evaluate(shadow, baseline)[report.metric])
            # quantized_copy also rounds the tensors outside the plan to fp16: hence the tolerance.
            assert row["delta"] == pytest.approx(reference, rel=0.02), row["name"]
            assert row["delta"] != pytest.approx(plain["delta"], rel=1e-3)


def test_rounding_by_an_algorithm_shows_progress_per_layer_and_can_be_cancelled(llama):
    from qlab.core.errors import Cancelled

    loaded, baseline = llama
    hqq = QuantScheme("int4", "group", 32, algorithm="hqq")
    messages = []
    analyze(loaded, [hqq], baseline, blocks=False, predict=False, progress=lambda f, m: messages.append((f, m)))
    rounding = [m for _, m in messages if ": rounding " in m]
    assert len(rounding) == 21 and rounding[0] == "int4 g32 asym hqq: rounding model.layers.0.self_attn.q_proj"
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    asked = []
    with pytest.raises(Cancelled):
        analyze(loaded, [hqq], baseline, cancel=lambda: len(asked.append(1) or asked) > 3)
    assert len(asked) == 4  # stopped while rounding, before the first pass over the text


def test_too_little_calibration_text_is_refused_before_any_work(llama):
    loaded, _ = llama
    gptq = QuantScheme("int4", "group", 32, algorithm="gptq")
    # 100 byte tokens: fewer than the 128 inputs of the tiny Llama's down projections.
    with pytest.raises(QlabError, match="100 tokens, fewer than the 128 inputs"):
        check_calibration(loaded, [gptq], EvalSpec(tokens=64, text=TEXT[:100]))
    with pytest.raises(QlabError, match="fewer than the 128 inputs"):
        calibrate(loaded, [gptq], EvalSpec(tokens=64, text=TEXT[:100]))
    check_calibration(loaded, [QuantScheme("int4", "group", 32)], EvalSpec(tokens=64, text=TEXT[:100]))


@pytest.mark.slow
def test_minilm_block_replay_matches_the_sweep_path_and_leaves_weights_alone(minilm):
    """On a bundled model: the replayed delta of a block equals quantized_copy with only that block quantized
    (which also rounds the other tensors to fp16, hence the looser tolerance)."""
    from qlab.core.plan import quantized_copy

    before = weights_digest(minilm.model)
    baseline = compute_baseline(minilm, EvalSpec(tokens=128))
    scheme = QuantScheme("int4", "group", 64)
    report = analyze(minilm, [scheme], baseline, predict=False)
    row = report.blocks[2]
    shadow = quantized_copy(minilm.model, dict.fromkeys(row["layers"], scheme))
    reference = error_of("cosine_mean", evaluate(shadow, baseline)["cosine_mean"])
    assert row["delta"] == pytest.approx(reference, rel=0.02)
    assert weights_digest(minilm.model) == before


@pytest.mark.slow
def test_minilm_gptq_int3_blocks_lose_less_than_round_to_nearest(minilm):
    """GPTQ int3 measured per block on MiniLM: not RTN's numbers, and less damage per block on average."""
    spec = EvalSpec(tokens=256)
    baseline = compute_baseline(minilm, spec)
    rtn = QuantScheme("int3", "group", 64)
    gptq = QuantScheme("int3", "group", 64, algorithm="gptq")
    stats, record = calibrate(minilm, [gptq], spec)
    report = analyze(minilm, [rtn, gptq], baseline, predict=False, calibration=stats, calibration_record=record)
    deltas = {s.label: [r["delta"] for r in report.blocks if r["label"] == s.label] for s in (rtn, gptq)}
    assert len(deltas[gptq.label]) == len(deltas[rtn.label]) == 7  # six blocks and the pooler
    assert deltas[gptq.label] != pytest.approx(deltas[rtn.label], rel=0.01)
    assert sum(deltas[gptq.label]) < sum(deltas[rtn.label])
    linears = {s.label: sum(r["relative_mse"] for r in report.linears if r["label"] == s.label) for s in (rtn, gptq)}
    assert linears[gptq.label] < linears[rtn.label]


def test_a_block_cache_larger_than_free_memory_is_refused_up_front(llama, monkeypatch):
    import psutil

    loaded, baseline = llama

    class Tight:
        available = 1000  # bytes: far less than 3 blocks x 128 tokens x 64 x 4 bytes

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tight())
    with pytest.raises(QlabError, match="lower the token budget"):
        analyze(loaded, [QuantScheme("int4")], baseline)


def test_pruning_a_plain_cast_is_measured_not_taken_for_the_identity(llama):
    """fp32 rounds nothing, but fp32 with 2:4 pruning drops half of every weight: its per-layer error and its
    blocks' deltas are measured, as the whole model with that block pruned gives them."""
    loaded, baseline = llama
    pruned = QuantScheme("fp32", sparsity="2:4")
    report = analyze(loaded, [pruned], baseline, blocks=True)
    assert all(row["relative_mse"] > 0.01 and row["weight_relative_mse"] > 0.01 for row in report.linears)
    first = next(r for r in report.blocks if r["unit"] == "block")
    model = copy.deepcopy(loaded.model)
    for name in first["layers"]:
        module = model.get_submodule(name)
        module.weight.data = quantize_weight(module.weight.data, pruned).dequantize()
    expected = error_of(report.metric, evaluate(model, baseline)[report.metric])
    assert expected > 1e-4 and first["delta"] == pytest.approx(expected, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("cpu_bf16_math", [({"avx512_bf16"}, "bfloat16")], indirect=True, ids=["bf16"])
def test_a_bf16_models_output_errors_in_bf16_match_the_fp32_product(cpu_bf16_math, monkeypatch):
    from qlab.analyses import sensitivity

    loaded = tiny_llama(seed=3)
    loaded.model.to(torch.bfloat16)
    baseline = compute_baseline(loaded, EvalSpec(tokens=128, text=TEXT))
    schemes = [QuantScheme("int8", "group", 32), QuantScheme("int4", "group", 32)]
    native = analyze(loaded, schemes, baseline, blocks=False).linears
    monkeypatch.setattr(sensitivity, "_product_in_bf16", lambda x, weight: False)
    in_fp32 = analyze(loaded, schemes, baseline, blocks=False).linears
    assert [(r["layer"], r["label"]) for r in native] == [(r["layer"], r["label"]) for r in in_fp32]
    for fast, reference in zip(native, in_fp32, strict=True):
        assert fast["output_mse"] > 0
        for key in ("output_mse", "predicted_delta", "input_absmax"):
            assert fast[key] == pytest.approx(reference[key], rel=0.01), (fast["layer"], key)


def test_a_16_bit_model_is_measured_in_what_its_evaluations_compute_in(cpu_bf16_math, probe_dtypes):
    """A bf16 model (with biases) on a CPU without native bf16 math: the capture, curvature and replay passes all
    compute in fp32, as the evaluations do, so a replayed block (forward view) and everything-but-a-block (reverse
    view) equal the whole model with those weights quantized. Before, a bf16 BERT failed in its block replays."""
    from qlab.analyses import sensitivity

    computes_in = cpu_bf16_math
    loaded = tiny_bert(seed=5)
    loaded.model.to(torch.bfloat16)
    baseline = compute_baseline(loaded, EvalSpec(tokens=256, text=TEXT))
    assert baseline.compute_dtype == computes_in
    before = weights_digest(loaded.model)
    seen = probe_dtypes(sensitivity._LinearProbe)
    scheme = QuantScheme("int3", "channel")
    names = [n for n, _ in quantizable_linears(loaded.model)]

    def reference(quantized: list[str]) -> float:
        model = copy.deepcopy(loaded.model)
        for name in quantized:
            module = model.get_submodule(name)
            module.weight = torch.nn.Parameter(quantize_weight(module.weight, scheme).dequantize(computes_in), False)
        return error_of("cosine_mean", evaluate(model, baseline)["cosine_mean"])

    forward = analyze(loaded, [scheme], baseline)
    assert seen == {(computes_in, computes_in, torch.bfloat16)}  # the weights stay 16-bit
    assert all(torch.isfinite(torch.tensor(r["predicted_delta"])) for r in forward.linears)
    first = forward.blocks[0]
    assert first["delta"] > 1e-5
    assert first["delta"] == pytest.approx(reference(first["layers"]), rel=1e-3, abs=1e-7)
    reverse = analyze(loaded, [scheme], baseline, view="reverse", predict=False)
    kept = set(reverse.blocks[1]["layers"])
    expected = reference(names) - reference([n for n in names if n not in kept])
    assert reverse.blocks[1]["delta"] == pytest.approx(expected, rel=1e-3, abs=1e-7)
    assert weights_digest(loaded.model) == before

