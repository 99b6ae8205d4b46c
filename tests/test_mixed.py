import itertools
import json

import numpy as np
import pytest

from qlab.analyses import mixed
from qlab.analyses.mixed import (
    Budget,
    Choices,
    choices_from,
    compare,
    recommend,
    solve,
)
from qlab.analyses.sensitivity import analyze
from qlab.core.errors import QlabError
from qlab.core.plan import plan_record, quantized_copy, read_plan, size_report
from qlab.core.quant import QuantScheme
from qlab.models.evaluate import EvalSpec, compute_baseline, default_text, evaluate
from qlab.models.loading import quantizable_linears, weights_digest
from tests.tiny_models import tiny_llama

INT8, INT4, INT2 = (QuantScheme(f, "group", 32) for f in ("int8", "int4", "int2"))


def synthetic(n_layers: int = 12, seed: int = 0) -> Choices:
    """Layers of mixed shapes at int8/int4/int2 g32 with exact storage bytes and random convex errors."""
    rng = np.random.default_rng(seed)
    shapes = [(int(rng.choice([64, 128, 192])), int(rng.choice([64, 128]))) for _ in range(n_layers)]
    schemes = (INT8, INT4, INT2)
    size = np.array([[sum(s.storage_bytes(shape).values()) for s in schemes] for shape in shapes])
    base = rng.lognormal(0, 1.5, n_layers)[:, None]
    error = base * np.array([1.0, 16.0, 300.0])[None, :] * rng.uniform(0.5, 2.0, (n_layers, 3))
    params = np.array([a * b for a, b in shapes])
    names = tuple(f"layer{i}" for i in range(n_layers))
    return Choices(names, schemes, params, size, error, 0, "synthetic")


def brute_force(choices: Choices, budget: int) -> float:
    best = np.inf
    for combo in itertools.product(range(len(choices.schemes)), repeat=len(choices.layers)):
        pick = np.array(combo)
        if choices.bytes_of(pick) <= budget:
            best = min(best, choices.predicted(pick))
    return best


def test_solver_is_optimal_against_brute_force_and_never_exceeds_the_budget():
    choices = synthetic(n_layers=7)
    low, high = choices.size_bytes.min(axis=1).sum(), choices.size_bytes.max(axis=1).sum()
    for budget in np.linspace(low, high, 9).astype(int):
        pick = solve(choices, int(budget))
        assert choices.bytes_of(pick) <= budget
        assert choices.predicted(pick) == pytest.approx(brute_force(choices, int(budget)), rel=1e-12)


def test_solver_beats_random_assignments_of_the_same_size():
    choices = synthetic(n_layers=40, seed=3)
    rng = np.random.default_rng(1)
    for _ in range(50):
        random_pick = rng.integers(0, len(choices.schemes), len(choices.layers))
        size = choices.bytes_of(random_pick)
        pick = solve(choices, size)
        assert choices.bytes_of(pick) <= size
        assert choices.predicted(pick) <= choices.predicted(random_pick)
    # And strictly better than random in aggregate (a random pick is almost never optimal).
    assert choices.predicted(solve(choices, size)) < choices.predicted(random_pick)


def test_rounded_byte_grid_still_respects_the_budget(monkeypatch):
    monkeypatch.setattr(mixed, "MAX_STATES", 97)  # force costs onto a coarse grid, rounded up
    choices = synthetic(n_layers=20, seed=5)
    low, high = choices.size_bytes.min(axis=1).sum(), choices.size_bytes.max(axis=1).sum()
    for budget in np.linspace(low + 1, high, 7).astype(int):
        assert choices.bytes_of(solve(choices, int(budget))) <= budget


def test_budget_range_spans_the_all_smallest_and_all_largest_plans_and_steps_stay_inside():
    choices = synthetic(n_layers=5, seed=2)
    low, high = mixed.budget_range(choices)
    weights = int(choices.params.sum())
    # int2 g32 and int8 g32 with an fp16 scale per 32 weights: 2.5 and 8.5 bits per weight, exactly.
    assert (low, high) == (2.5, 8.5)
    assert low == choices.bytes_of(np.full(5, 2)) * 8 / weights
    # Every step is a budget the knapsack can meet: the all-smallest plan fits even after rounding.
    steps = mixed.budget_steps(low, high, 4.5)
    assert steps == [3.7, 4.5, 4.9, 6.1, 7.3]
    assert all(choices.budget_bytes(Budget(b)) >= choices.size_bytes.min(axis=1).sum() for b in steps)
    assert mixed.budget_steps(2.33333, 3.0, 2.33333, points=1) == [2.3334, 2.6667]  # never rounded below low


def test_budgets_below_the_smallest_format_or_malformed_are_refused():
    choices = synthetic()
    with pytest.raises(QlabError, match="smallest formats need"):
        solve(choices, int(choices.size_bytes.min(axis=1).sum()) - 1)
    with pytest.raises(QlabError, match="exactly one budget"):
        Budget()
    with pytest.raises(QlabError, match="exactly one budget"):
        Budget(4.5, 10**9)
    with pytest.raises(QlabError, match="out of range"):
        Budget(-1.0)


@pytest.fixture(scope="module")
def analysed():
    loaded = tiny_llama(seed=2)
    baseline = compute_baseline(loaded, EvalSpec(tokens=128, text=default_text()[:20_000]))
    report = analyze(loaded, [INT8, INT4], baseline)
    return loaded, baseline, report


def test_predicted_errors_add_up_to_each_measured_block(analysed):
    loaded, _, report = analysed
    choices = choices_from(loaded, report)
    rows = {name: i for i, name in enumerate(choices.layers)}
    for block in report.blocks:
        j = [s.label for s in choices.schemes].index(block["label"])
        total = choices.error[[rows[n] for n in block["layers"]], j].sum()
        assert total == pytest.approx(max(0.0, block["delta"]), rel=1e-9)
    assert (choices.error[:, 0] <= choices.error[:, 1]).mean() > 0.9  # int8 predicted below int4 nearly always


def test_recommended_plan_has_the_size_it_reports_and_fits(analysed):
    loaded, _, report = analysed
    choices = choices_from(loaded, report)
    mix = recommend(loaded, choices, Budget(bits_per_weight=5.0))
    size = size_report(loaded.model, mix.assignment)
    assert mix.bits_per_weight == size.bits_per_weight <= 5.0
    assert {s.format for s in mix.assignment.values()} == {"int8", "int4"}
    by_gb = recommend(loaded, choices, Budget(size_bytes=mix.size_bytes))
    assert by_gb.size_bytes <= mix.size_bytes
    assert by_gb.predicted_error == pytest.approx(mix.predicted_error)


def test_export_maps_onto_torchao_and_quanto_and_reads_back(analysed):
    loaded, baseline, report = analysed
    names = [n for n, _ in quantizable_linears(loaded.model)]
    plan = {**dict.fromkeys(names, INT4), names[0]: INT8, names[1]: QuantScheme("nf4", "group", 32),
            names[2]: QuantScheme("int4", "channel", symmetric=False)}
    record = json.loads(json.dumps(plan_record(loaded.model, plan, loaded.name)))
    torchao = record["torchao"]["FqnToConfig"]
    assert torchao[names[3]] == {"config": "IntxWeightOnlyConfig", "weight_dtype": "torch.int4",
                                 "granularity": "PerGroup(32)", "mapping_type": "SYMMETRIC",
                                 "scale_dtype": "torch.float16"}
    assert torchao[names[2]]["granularity"] == "PerAxis(0)" and torchao[names[2]]["mapping_type"] == "ASYMMETRIC"
    assert torchao[names[1]] is None and any("nf4" in note for note in record["notes"])
    assert record["optimum_quanto"][names[0]] == {"weights": "qint8", "activations": "none"}
    assert record["optimum_quanto"][names[1]]["weights"] == "none"
    restored = read_plan(record)
    assert restored == plan
    assert evaluate(quantized_copy(loaded.model, restored), baseline)["kld_mean"] > 0
    with pytest.raises(QlabError, match="not a qlab plan file"):
        read_plan({"modules": {}})


def test_compare_measures_mixes_next_to_uniform_formats(analysed):
    loaded, baseline, report = analysed
    before = weights_digest(loaded.model)
    choices = choices_from(loaded, report)
    mixes, rows = compare(loaded, choices, [Budget(4.5), Budget(6.0)], baseline)
    labels = [row["label"] for row in rows]
    assert labels == ["int8 g32", "int4 g32", "mix @ 4.5 bits/weight", "mix @ 6 bits/weight"]
    by_label = {row["label"]: row for row in rows}
    assert by_label["mix @ 6 bits/weight"]["error"] < by_label["int4 g32"]["error"]
    assert by_label["int8 g32"]["error"] < by_label["mix @ 6 bits/weight"]["error"]
    assert all(row["bits_per_weight"] <= 4.5 for row in rows if row["label"] == "mix @ 4.5 bits/weight")
    assert weights_digest(loaded.model) == before


@pytest.mark.slow
def test_measured_mix_at_4_5_bits_beats_uniform_int4_on_minilm(minilm):
    scheme = {f: QuantScheme(f, "group", 64) for f in ("int8", "int4")}
    baseline = compute_baseline(minilm, EvalSpec(tokens=256))
    report = analyze(minilm, list(scheme.values()), baseline)
    choices = choices_from(minilm, report)
    (mix,), rows = compare(minilm, choices, [Budget(4.5)], baseline)
    by_label = {row["label"]: row for row in rows}
    assert mix.bits_per_weight <= 4.5
    assert by_label[mix.label]["cosine_mean"] > by_label["int4 g64"]["cosine_mean"]


def test_without_replays_the_recommender_uses_the_second_order_predictions(analysed):
    loaded, baseline, _ = analysed
    report = analyze(loaded, [INT8, INT4], baseline, blocks=False)
    choices = choices_from(loaded, report)
    assert "second-order" in choices.predictor
    predicted = {(r["layer"], r["label"]): r["predicted_delta"] for r in report.linears}
    labels = [s.label for s in choices.schemes]
    for i, layer in enumerate(choices.layers):
        for j, label in enumerate(labels):
            assert choices.error[i, j] == predicted[(layer, label)]
    mix = recommend(loaded, choices, Budget(5.0))
    assert mix.bits_per_weight <= 5.0
    no_estimate = analyze(loaded, [INT4], baseline, blocks=False, predict=False)
    with pytest.raises(QlabError, match="neither end-to-end measurements nor predictions"):
        choices_from(loaded, no_estimate)


def test_exported_plan_applies_with_torchao_and_optimum_quanto(analysed):
    """The export is not just names: torchao's FqnToConfig and quanto's quantize accept it as written."""
    import copy
    import re

    import torch
    from optimum.quanto import freeze, qtypes
    from optimum.quanto import quantize as quanto_quantize
    from torchao.quantization import FqnToConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup
    from torchao.quantization.quant_primitives import MappingType

    loaded, baseline, _ = analysed
    names = [n for n, _ in quantizable_linears(loaded.model)]
    plan = {**dict.fromkeys(names, INT4), names[0]: INT8, names[5]: QuantScheme("int8", "channel")}
    record = json.loads(json.dumps(plan_record(loaded.model, plan, loaded.name)))

    def torchao_config(entry: dict) -> IntxWeightOnlyConfig:
        assert entry["config"] == "IntxWeightOnlyConfig"
        group = re.fullmatch(r"PerGroup\((\d+)\)", entry["granularity"])
        return IntxWeightOnlyConfig(weight_dtype=getattr(torch, entry["weight_dtype"].removeprefix("torch.")),
                                    granularity=PerGroup(int(group[1])) if group else PerAxis(0),
                                    mapping_type=MappingType[entry["mapping_type"]],
                                    scale_dtype=getattr(torch, entry["scale_dtype"].removeprefix("torch.")))

    ids = baseline.inputs["windows"][:, :64]
    with torch.no_grad():
        reference = loaded.model(ids).logits
        ours = quantized_copy(loaded.model, read_plan(record))(ids).logits
        torchao_model = copy.deepcopy(loaded.model)
        configs = {name: torchao_config(entry) for name, entry in record["torchao"]["FqnToConfig"].items()}
        quantize_(torchao_model, FqnToConfig(configs), filter_fn=None)
        theirs = torchao_model(ids).logits
        quanto_model = copy.deepcopy(loaded.model)
        for qtype in {entry["weights"] for entry in record["optimum_quanto"].values()}:
            include = [n for n, entry in record["optimum_quanto"].items() if entry["weights"] == qtype]
            quanto_quantize(quanto_model, weights=qtypes[qtype], include=include)
        freeze(quanto_model)
        quanto_out = quanto_model(ids).logits
    assert type(torchao_model.get_submodule(names[1]).weight).__name__ != "Parameter"
    assert type(quanto_model.get_submodule(names[1])).__name__ == "QLinear"
    ours_error = (ours - reference).norm()
    # Same formats and groups, slightly different rounding conventions: errors of the same size, not identical.
    for other in (theirs, quanto_out):
        assert 0 < (other - reference).norm() < 3 * ours_error


def test_measured_mixes_stream_block_by_block_with_the_shadow_copys_metrics(monkeypatch):
    loaded = tiny_llama()
    baseline = compute_baseline(loaded, EvalSpec(tokens=128))
    names = [name for name, _ in quantizable_linears(loaded.model)]
    plan = {name: INT4 if index % 2 else INT8 for index, name in enumerate(names)}
    expected = evaluate(quantized_copy(loaded.model, plan), baseline)

    def no_copy(*args, **kwargs):
        raise AssertionError("a model the streamed sweep knows was copied whole")

    monkeypatch.setattr(mixed, "quantized_copy", no_copy)
    (row,) = mixed.measure(loaded, {"mix": plan}, baseline)
    assert row["kld_mean"] == pytest.approx(expected["kld_mean"], rel=1e-6)
    assert row["ppl"] == pytest.approx(expected["ppl"], rel=1e-6)
