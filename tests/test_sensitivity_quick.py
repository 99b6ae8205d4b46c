import contextlib
import dataclasses
import json
import math

import pytest
import torch

from qlab.analyses.overview import OverviewRequest, Pieces
from qlab.analyses.sensitivity import _batches, analyze, calibrate
from qlab.analyses.sensitivity_quick import (
    QuickSensitivity,
    agreement,
    evaluations_per_format,
    quick_sensitivity,
    spearman,
)
from qlab.cli.common import Parser
from qlab.cli.sensitivity import add_parser
from qlab.core.errors import Cancelled, QlabError
from qlab.core.quant import QuantScheme
from qlab.models import loading as models
from qlab.models.evaluate import EvalSpec, compute_baseline, default_text
from qlab.models.loading import quantizable_linears, weights_digest
from qlab.store import Store
from qlab.store import overview as recorded
from tests.tiny_models import tiny_bert, tiny_llama

TEXT = default_text()[:20_000]  # the tiny models' byte tokenizer is pure Python: keep the text short
LLAMA_SPEC = EvalSpec(tokens=128, text=TEXT)
BERT_SPEC = EvalSpec(tokens=256, text=TEXT)


@pytest.fixture(scope="module")
def llama():
    loaded = tiny_llama(layers=4)
    return loaded, compute_baseline(loaded, LLAMA_SPEC)


@pytest.fixture(scope="module")
def bert():
    loaded = tiny_bert()
    return loaded, compute_baseline(loaded, BERT_SPEC)


def test_one_record_per_linear_and_scheme_made_of_its_parts(llama):
    loaded, baseline = llama
    schemes = [QuantScheme("fp32"), QuantScheme("int8"), QuantScheme("int3", "channel")]
    quick = quick_sensitivity(loaded, schemes, LLAMA_SPEC, baseline)
    names = [name for name, _ in quantizable_linears(loaded.model)]
    assert [(r["layer"], r["scheme"]) for r in quick.records] == [(n, s.label) for n in names for s in schemes]
    for record in quick.records:
        if record["scheme"] == "fp32":  # the cast of an FP32 weight to FP32 changes nothing
            assert record["score"] == 0.0 and record["output_error"] == 0.0
            continue
        assert record["score"] > 0
        assert record["score"] == pytest.approx(record["output_error"] * record["error_cost"], rel=1e-9)
    int8, int3 = (sum(r["score"] for r in quick.records if r["scheme"] == s.label) for s in schemes[1:])
    assert int3 > 100 * int8
    assert quick.metric == "kld_mean" and quick.tokens == baseline.tokens


def test_scores_predict_each_linears_measured_delta(llama):
    """Second order, token-coupled: the score ranks linears like quantizing each alone does, at the right scale."""
    loaded, baseline = llama
    scheme = QuantScheme("int4", "channel")
    quick = quick_sensitivity(loaded, [scheme], LLAMA_SPEC, baseline)
    measured = {r["name"]: r["delta"] for r in analyze(loaded, [scheme], baseline, unit="linear",
                                                        predict=False).blocks}
    scores = [r["score"] for r in quick.records]
    deltas = [measured[r["layer"]] for r in quick.records]
    assert spearman(scores, deltas) > 0.8
    assert 0.5 < sum(scores) / sum(deltas) < 2


def test_embedding_scores_follow_measured_block_deltas(bert):
    loaded, baseline = bert
    scheme = QuantScheme("int3", "channel")
    quick = quick_sensitivity(loaded, [scheme], BERT_SPEC, baseline)
    report = analyze(loaded, [scheme], baseline, predict=False)
    measured = {r["block"]: r["delta"] for r in report.blocks if r["block"] is not None}
    estimated = quick.block_scores(scheme)
    assert list(estimated) == sorted(measured)
    assert 0.5 < sum(estimated.values()) / sum(measured.values()) < 2
    pooler = [r for r in quick.records if r["layer"] == "pooler.dense"]
    assert pooler and pooler[0]["score"] == 0.0  # mean pooling never reads the pooler: no cost there


def test_an_artificial_outlier_tops_the_ranking():
    loaded = tiny_llama(seed=1)
    target = "model.layers.1.self_attn.v_proj"
    weight = loaded.model.get_submodule(target).weight
    weight.data[3, 5] = 20 * weight.abs().max()  # a per-tensor scale now rounds every other weight to zero
    scheme = QuantScheme("int4", "tensor")
    quick = quick_sensitivity(loaded, [scheme], LLAMA_SPEC)
    assert quick.top(1, scheme)[0]["layer"] == target
    assert max(quick.block_scores(scheme).items(), key=lambda item: item[1])[0] == 1


def test_top_ranks_layers_per_scheme_and_overall(llama):
    loaded, baseline = llama
    int8, int3 = QuantScheme("int8"), QuantScheme("int3", "channel")
    quick = quick_sensitivity(loaded, [int8, int3], LLAMA_SPEC, baseline)
    top = quick.top(5, int8)
    assert len(top) == 5 and {r["scheme"] for r in top} == {int8.label}
    assert [r["score"] for r in top] == sorted((r["score"] for r in quick.records if r["scheme"] == int8.label),
                                               reverse=True)[:5]
    assert quick.top(3, int3.label) == quick.top(3, int3)
    overall = quick.top(100)
    assert len({r["layer"] for r in overall}) == len(overall) == len(quantizable_linears(loaded.model))
    assert overall[0]["scheme"] == int3.label  # the coarser format is every layer's worst
    with pytest.raises(QlabError, match="no quick sensitivity for 'nf4"):
        quick.top(3, QuantScheme("nf4"))


CALIBRATED = [QuantScheme("int4", "group", 32, algorithm=a) for a in ("gptq", "gptq-act-order", "awq")]


def test_each_algorithm_is_scored_on_its_own_rounding(llama):
    """GPTQ, act-order and AWQ (with the calibration the full analysis and the sweep use) and HQQ: every linear's
    output error on the pass's tokens is the one the full analysis measures for that rounding."""
    loaded, baseline = llama
    rtn = QuantScheme("int4", "group", 32)
    schemes = [rtn, *CALIBRATED, dataclasses.replace(rtn, algorithm="hqq")]
    seen = []
    quick = quick_sensitivity(loaded, schemes, LLAMA_SPEC, baseline, progress=lambda f, m: seen.append((f, m)))
    stats, record = calibrate(loaded, schemes, LLAMA_SPEC)
    assert quick.calibration["calibration_tokens"] == record["calibration_tokens"] > 128
    full = analyze(loaded, schemes, baseline, blocks=False, predict=False, calibration=stats)
    measured = {(r["layer"], r["label"]): r["relative_mse"] for r in full.linears}
    assert {r["scheme"] for r in quick.records} == {s.label for s in schemes}
    for r in quick.records:
        assert r["output_error"] == pytest.approx(measured[r["layer"], r["scheme"]], rel=1e-4), r
    errors = {s.label: [r["output_error"] for r in quick.records if r["scheme"] == s.label] for s in schemes}
    assert all(errors[s.label] != errors[rtn.label] for s in schemes[1:])
    assert sum(errors["int4 g32 gptq"]) < sum(errors[rtn.label])  # GPTQ's point: less output error
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(m.startswith("calibration batch") for _, m in seen) and any("rounding" in m for _, m in seen)
    with pytest.raises(Cancelled):
        quick_sensitivity(loaded, CALIBRATED[:1], LLAMA_SPEC, baseline, cancel=lambda: True)


def test_records_survive_json_and_rebuild_the_result(llama):
    loaded, baseline = llama
    quick = quick_sensitivity(loaded, [QuantScheme("int8"), QuantScheme("nf4", "group", 32)], LLAMA_SPEC,
                              baseline)
    stored = json.loads(json.dumps(quick.to_records()))
    assert {r["scheme"] for r in stored} == {s.label for s in quick.schemes}
    rebuilt = QuickSensitivity.from_records(stored)
    assert rebuilt == quick
    assert rebuilt.top(4) == quick.top(4)
    with pytest.raises(QlabError, match="no quick sensitivity records"):
        QuickSensitivity.from_records([])


def test_a_stored_calibrated_ranking_says_which_tokens_it_was_calibrated_on(llama, tmp_path):
    """Issue 19: a GPTQ ranking the Overview stores carries its calibration record on its scheme's records, as the
    sweep's rows do; a round-to-nearest scheme of the same pass carries none."""
    loaded, baseline = llama
    rtn = QuantScheme("int4", "group", 32)
    gptq = dataclasses.replace(rtn, algorithm="gptq")
    wanted = OverviewRequest((rtn, gptq), "h100-sxm-80gb", LLAMA_SPEC)
    store = Store(tmp_path / "runs.sqlite")
    recorded.run_step(recorded.Step("sensitivity", (rtn, gptq), 0.0), loaded, wanted, Pieces(), store,
                      lambda: baseline)
    (summary,) = store.list_runs(kind="sensitivity_quick")
    records = store.get(summary["id"]).records("sensitivity_quick")
    expected = calibrate(loaded, [gptq], LLAMA_SPEC)[1]
    calibrated = [r for r in records if r["scheme"] == gptq.label]
    assert calibrated and len(calibrated) == len(records) / 2
    for r in calibrated:
        assert r["calibration_tokens"] == expected["calibration_tokens"] > LLAMA_SPEC.tokens
        assert r["calibration_overlaps_eval"] == expected["calibration_overlaps_eval"]
        assert r["calibration_seconds"] > 0
    assert not any(k.startswith("calibration") for r in records if r["scheme"] == rtn.label for k in r)
    rebuilt = QuickSensitivity.from_records(records)
    assert rebuilt.calibration == {k: v for k, v in calibrated[0].items() if k.startswith("calibration")}
    assert not any(k.startswith("calibration") for r in rebuilt.records for k in r)
    restored = recorded.restore(store, loaded, wanted).sensitivity[gptq.label]
    assert {r["calibration_tokens"] for r in restored} == {expected["calibration_tokens"]}


def test_without_a_baseline_it_runs_nothing_more_and_scores_the_same(llama):
    loaded, baseline = llama
    schemes = [QuantScheme("int4", "channel")]
    given = quick_sensitivity(loaded, schemes, LLAMA_SPEC, baseline)
    with _counted(loaded.model) as passes:
        computed = quick_sensitivity(loaded, schemes, LLAMA_SPEC)
    assert passes == {"forward_tokens": baseline.tokens, "backward": baseline.inputs["windows"].shape[0]}
    assert computed.tokens == given.tokens
    assert [r["score"] for r in computed.records] == pytest.approx([r["score"] for r in given.records], rel=1e-5)


@contextlib.contextmanager
def _counted(model):
    """Count the tokens of every forward pass through ``model`` (and through the structural copies an analysis
    makes of it, which keep its hooks) and every backward pass."""
    passes = {"forward_tokens": 0, "backward": 0}

    def forward(module, args, kwargs):
        passes["forward_tokens"] += (args[0] if args else kwargs["input_ids"]).numel()

    backward = torch.Tensor.backward

    def counted_backward(tensor, *args, **kwargs):
        passes["backward"] += 1
        return backward(tensor, *args, **kwargs)

    handle = model.get_input_embeddings().register_forward_pre_hook(forward, with_kwargs=True)
    torch.Tensor.backward = counted_backward
    try:
        yield passes
    finally:
        torch.Tensor.backward = backward
        handle.remove()


@pytest.mark.parametrize("formats", [["int8"], ["fp16", "int8", "int4", "nf4"]])
def test_cost_is_one_forward_one_backward_and_a_product_per_format(llama, bert, formats):
    for (loaded, baseline), spec in ((llama, LLAMA_SPEC), (bert, BERT_SPEC)):
        schemes = [QuantScheme(f, "group", 32) for f in formats]
        with _counted(loaded.model) as passes:
            quick_sensitivity(loaded, schemes, spec)
        rows = baseline.inputs["windows" if loaded.kind == "causal-lm" else "input_ids"]
        assert passes == {"forward_tokens": rows.numel(), "backward": len(list(_batches(baseline, 1)))}
        assert evaluations_per_format(loaded, schemes, spec, baseline) <= 3


def test_progress_names_the_running_step_and_cancel_stops_it(bert):
    loaded, baseline = bert
    before = weights_digest(loaded.model)
    seen = []
    quick_sensitivity(loaded, [QuantScheme("int8")], BERT_SPEC, progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    during = {f for f, m in seen if m == "quick sensitivity: batch of texts 1/1"}
    assert len(during) > 10  # the backward pass reports as it scores each linear, not only per batch
    with pytest.raises(Cancelled):
        quick_sensitivity(loaded, [QuantScheme("int8")], BERT_SPEC, baseline, cancel=lambda: True)
    assert weights_digest(loaded.model) == before


def test_bad_requests_fail_in_one_line(llama, bert):
    loaded, baseline = llama
    with pytest.raises(QlabError, match="group size 48"):
        quick_sensitivity(loaded, [QuantScheme("int4", "group", 48)], LLAMA_SPEC, baseline)
    with pytest.raises(QlabError, match="gives 100 tokens, fewer than the 128 inputs"):
        quick_sensitivity(loaded, [QuantScheme("int4", algorithm="gptq")], EvalSpec(16, TEXT[:100]))
    with pytest.raises(QlabError, match="no schemes"):
        quick_sensitivity(loaded, [], LLAMA_SPEC, baseline)
    with pytest.raises(QlabError, match="baseline is for a causal-lm"):
        quick_sensitivity(bert[0], [QuantScheme("int8")], BERT_SPEC, baseline)


def test_spearman_and_agreement(bert):
    assert spearman([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(0.8)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    loaded, baseline = bert
    scheme = QuantScheme("int3", "channel")
    quick = quick_sensitivity(loaded, [scheme], BERT_SPEC, baseline)
    with pytest.raises(QlabError, match="unit block and the forward view"):
        agreement(quick, analyze(loaded, [scheme], baseline, predict=False, view="reverse"))


def _cli(argv: list[str]) -> None:
    parser = Parser(prog="qlab")
    add_parser(parser.add_subparsers(dest="command", required=True, parser_class=Parser))
    args = parser.parse_args(argv)
    args.func(args)


def test_cli_quick_writes_and_stores_the_records(monkeypatch, tmp_path, capsys):
    loaded = tiny_llama(seed=3)
    monkeypatch.setattr(models, "load", lambda name, **options: loaded)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    common = ["sensitivity", "--quick", "--model", "tiny", "--tokens", "128", "--text-file", str(text), "--quiet",
              "--group-size", "32", "--formats", "int8,int4"]
    out, db = tmp_path / "quick.json", tmp_path / "runs.sqlite"
    _cli([*common, "--json", str(out), "--db", str(db)])
    records = json.loads(out.read_text())
    assert len(records) == 2 * len(quantizable_linears(loaded.model))
    assert {r["scheme"] for r in records} == {"int8 g32", "int4 g32"}
    assert QuickSensitivity.from_records(records).top(1)[0]["score"] == max(r["score"] for r in records)
    (run,) = [Store(db).get(r["id"]) for r in Store(db).list_runs(kind="sensitivity_quick")]
    assert run.meta.settings["method"] == "quick" and len(run.records("sensitivity_quick")) == len(records)
    _cli(common)
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["layer", "scheme", "score", "output_error", "error_cost", "sqnr_db"]
    with pytest.raises(QlabError, match="--reverse and --unit do not apply"):
        _cli([*common, "--reverse"])


# Bundled models against the full analysis's measured block deltas: the goal is a Spearman rank
# correlation of at least 0.85 for every format, at a cost of at most 3 FP32 evaluations per format, one format
# alone included (bench/sensitivity_quick.py records both). Both at 512 tokens: at 128, SmolLM2's 8-bit block
# deltas, within a factor of two of each other, rank at 0.6-0.75 whatever the probe.
GOAL = 0.85
BUNDLED_SCHEMES = [QuantScheme("int8", "group", 64), QuantScheme("int4", "group", 64)]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["minilm", "smollm"])
def test_bundled_quick_ranking_follows_measured_block_deltas_within_the_cost(request, model):
    loaded = request.getfixturevalue(model)
    spec = EvalSpec(tokens=512)
    baseline = compute_baseline(loaded, spec)
    quick = quick_sensitivity(loaded, BUNDLED_SCHEMES, spec, baseline)
    rho = agreement(quick, analyze(loaded, BUNDLED_SCHEMES, baseline, predict=False))
    assert set(rho) == {s.label for s in BUNDLED_SCHEMES} and min(rho.values()) >= GOAL, rho
    for schemes in (BUNDLED_SCHEMES[:1], BUNDLED_SCHEMES):
        assert evaluations_per_format(loaded, schemes, spec, baseline) <= 3


def test_a_16_bit_model_computes_in_what_its_evaluations_do(bf16_llama_dir, cpu_bf16_math, probe_dtypes):
    from qlab.analyses import sensitivity_quick

    computes_in = cpu_bf16_math
    loaded = models.load(str(bf16_llama_dir))
    before = weights_digest(loaded.model)
    seen = probe_dtypes(sensitivity_quick._Probe)
    result = quick_sensitivity(loaded, [QuantScheme("int8")], EvalSpec(tokens=128))
    assert seen == {(computes_in, computes_in, torch.bfloat16)}  # the weights stay 16-bit
    assert result.records and all(math.isfinite(r["score"]) for r in result.records)
    assert weights_digest(loaded.model) == before


@pytest.mark.parametrize("cpu_bf16_math", [({"avx512_bf16"}, "bfloat16")], indirect=True, ids=["bf16"])
def test_a_bf16_models_error_product_in_bf16_scores_as_the_fp32_product_does(bf16_llama_dir, cpu_bf16_math,
                                                                            monkeypatch):
    from qlab.analyses import sensitivity_quick

    loaded = models.load(str(bf16_llama_dir))
    schemes = [QuantScheme("int8", "group", 32), QuantScheme("int4", "group", 32)]
    native = quick_sensitivity(loaded, schemes, LLAMA_SPEC)
    monkeypatch.setattr(sensitivity_quick, "_product_in_bf16", lambda x, weight: False)
    in_fp32 = quick_sensitivity(loaded, schemes, LLAMA_SPEC)
    assert [(r["layer"], r["scheme"]) for r in native.records] == [(r["layer"], r["scheme"]) for r in in_fp32.records]
    for fast, reference in zip(native.records, in_fp32.records, strict=True):
        assert fast["output_error"] == pytest.approx(reference["output_error"], rel=0.01), fast["layer"]
        assert fast["score"] == pytest.approx(reference["score"], rel=0.01), fast["layer"]
