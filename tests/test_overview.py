"""The Overview's pieces on tiny models: each computes, is saved per scheme, comes back from the store, is
estimated beforehand and can be cancelled; the panels and the HTML export are built from them."""

import json
import types
from pathlib import Path

import pytest
import torch

from qlab.analyses import overview, sensitivity
from qlab.analyses.overview import OverviewRequest, Pieces
from qlab.analyses.sensitivity import calibrate
from qlab.backends import format_speed, speed
from qlab.core.algorithms.gptq import gptq_quantize
from qlab.core.errors import Cancelled, QlabError
from qlab.core.quant import QuantScheme, grid_values, quantize
from qlab.models.evaluate import EvalSpec, compute_baseline, default_text
from qlab.store import Store
from qlab.store import overview as recorded
from tests.tiny_models import tiny_bert, tiny_llama

SCHEMES = (QuantScheme("fp16"), QuantScheme("int8", "group", 32), QuantScheme("int4", "group", 32))
SPEC = EvalSpec(64)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "runs.sqlite")


def request(hardware: str = "h100-sxm-80gb", schemes=SCHEMES) -> OverviewRequest:
    return OverviewRequest(schemes, hardware, SPEC)


def test_a_request_needs_distinct_formats_and_caps_the_context_at_the_model():
    with pytest.raises(QlabError, match="at least one format"):
        OverviewRequest((), "h100-sxm-80gb")
    with pytest.raises(QlabError, match="listed twice"):
        OverviewRequest((QuantScheme("fp16"), QuantScheme("fp16")), "h100-sxm-80gb")
    assert request().context_for(tiny_llama(layers=1)) == 512  # the model's maximum, under the default 4096


def test_memory_and_predicted_pieces_follow_the_bytes(llama):
    plans = overview.memory_piece(llama, request(), SCHEMES)
    assert [plans[s.label]["weights_bytes"] for s in SCHEMES] == sorted(
        (plans[s.label]["weights_bytes"] for s in SCHEMES), reverse=True)
    assert all(plans[s.label]["fits"] for s in SCHEMES) and plans["int4 g32"]["scales_bytes"] > 0
    fast = overview.predicted_piece(llama, request(), [*SCHEMES, overview.REFERENCE])
    assert fast["int4 g32"]["speed"] > fast["int8 g32"]["speed"] > fast["fp16"]["speed"]
    assert fast["fp16"]["speed"] == pytest.approx(fast["bf16"]["speed"])
    # An AVX2 CPU has int4 kernels but no int8 ones: int8 is smaller there, not faster.
    cpu = overview.predicted_piece(llama, request("cpu-x86-avx2"), SCHEMES)
    assert cpu["int8 g32"]["native"] is False and cpu["int8 g32"]["verdict"] == "smaller, not faster"
    assert cpu["int4 g32"]["native"] is True


def test_embedding_throughput_is_bounded_by_bandwidth_or_compute():
    bert = tiny_bert()
    bert.model.config.architectures = ["BertModel"]  # as a saved BERT's config.json names it
    fast = overview.predicted_piece(bert, request(), SCHEMES)
    assert all(r["speed_unit"] == "sentences/s" and r["speed"] > 0 for r in fast.values())
    with pytest.raises(QlabError, match="no known memory bandwidth"):
        overview.predicted_piece(bert, request("this-machine"), SCHEMES)


def test_steps_come_cheapest_first_with_estimates_that_grow_with_the_work(llama):
    pieces = Pieces()
    found = recorded.steps(llama, request(), pieces, measure_here=True)
    assert [s.piece for s in found] == [p for p in ("sweep", "sensitivity", "measured") if p not in pieces.skipped]
    assert all(s.seconds > 0 for s in found)
    one = overview.estimate_seconds("sweep", llama, request(), SCHEMES[:1])
    three = overview.estimate_seconds("sweep", llama, request(), SCHEMES)
    assert three > one > 0
    assert overview.estimate_seconds("sweep", llama, request(), SCHEMES, baseline_ready=True) < three
    assert format_speed.estimate_seconds(llama, SCHEMES) > 0
    assert "measured" not in [s.piece for s in recorded.steps(llama, request(), pieces, measure_here=False)]


def test_the_full_analysis_estimate_prices_each_replay_by_the_blocks_it_runs(llama):
    scaled = SCHEMES[1:]
    shares = {unit: sensitivity.replayed_shares(llama.model, unit) for unit in ("block", "linear")}
    blocks = len(sensitivity.block_stack(llama.model).linears)
    # Block k's replay runs the blocks from k on: (blocks - k) / blocks of the stack, every block alike here.
    assert shares["block"] == pytest.approx([(blocks - k) / blocks for k in range(blocks)])
    assert len(shares["linear"]) > blocks and max(shares["linear"]) == 1.0
    per_block = overview.analysis_seconds(llama, scaled, SPEC)
    per_linear = overview.analysis_seconds(llama, scaled, SPEC, unit="linear")
    no_replays = overview.analysis_seconds(llama, scaled, SPEC, blocks=False)
    evaluation = overview.evaluation_seconds(llama, SPEC.tokens)
    stack = sum(m.weight.numel() for _, m in overview.quantizable_linears(llama.model)) / overview.matmul_params(llama)

    def replays(unit: str) -> float:  # each costs the head's share of an evaluation and its share of the stack's
        return len(scaled) * evaluation * sum(1 - stack + stack * share for share in shares[unit])

    # Between the two units only the replays differ.
    assert per_linear - per_block == pytest.approx(replays("linear") - replays("block"))
    assert per_linear > per_block > no_replays + replays("block") > no_replays > 0
    assert overview.analysis_seconds(llama, scaled, SPEC, view="reverse") > per_block
    assert overview.analysis_seconds(llama, scaled, SPEC, blocks=False, predict=False) < no_replays


def test_a_job_saves_every_piece_and_a_new_session_restores_them(llama, store):
    pieces = Pieces()
    recorded.fill_arithmetic(llama, request(), pieces)
    todo = recorded.steps(llama, request(), pieces, measure_here=False)
    job = recorded.OverviewJob(llama, request(), pieces, todo, store)
    job.run()
    assert set(job.state.values()) == {"done"}, job.notes
    assert set(pieces.sweep) == {s.label for s in SCHEMES} and set(pieces.predicted) >= {"bf16", "int4 g32"}
    again = recorded.restore(store, llama, request())
    assert again.sweep == pieces.sweep
    assert again.memory == {} and {r.kind for r in store.runs()} <= {"sweep", "sensitivity_quick"}  # not stored
    recorded.fill_arithmetic(llama, request(), again)
    assert again.memory == pieces.memory and again.predicted == pieces.predicted
    if overview.sensitivity_available():
        assert set(again.sensitivity) == {s.label for s in SCHEMES}
    assert recorded.steps(llama, request(), again, measure_here=False) == []
    # Another target reuses the accuracy: it does not depend on the target.
    elsewhere = recorded.restore(store, llama, request("l4"))
    assert elsewhere.sweep == pieces.sweep
    # A fourth format computes only itself.
    more = request(schemes=(*SCHEMES, QuantScheme("nf4", "group", 32)))
    partial = recorded.restore(store, llama, more)
    assert [s.label for s in partial.missing("sweep", more)] == ["nf4 g32"]


def test_cancel_keeps_the_finished_schemes_and_the_other_pieces_go_on(llama, store):
    pieces = Pieces()
    todo = [s for s in recorded.steps(llama, request(), pieces, measure_here=False) if s.piece == "sweep"]
    job = recorded.OverviewJob(llama, request(), pieces, todo, store)
    original = job._changed

    def cancel_after_the_first_scheme():
        original()
        if pieces.sweep:
            job.cancel("sweep")

    job._changed = cancel_after_the_first_scheme
    job.run()
    assert job.state == {"sweep": "cancelled"}
    assert list(pieces.sweep) == ["fp16"] and "kept fp16 (1 of 3)" in job.notes["sweep"]
    assert job.cancelled_by_user == {"sweep"}
    run = next(r for r in store.runs() if r.kind == "sweep")
    assert run.status == "cancelled" and [r["label"] for r in run.records("sweep")] == ["fp16"]
    # Cancelled before it starts: nothing runs, nothing is stored for it.
    waiting = recorded.OverviewJob(llama, request(), Pieces(), todo, store)
    waiting.cancel("sweep")
    waiting.run()
    assert waiting.state["sweep"] == "cancelled" and "before it started" in waiting.notes["sweep"]


def test_a_job_on_a_thread_and_a_failing_piece(llama, store, monkeypatch):
    def broken(*args, **kwargs):
        raise QlabError("the sweep cannot run this")

    monkeypatch.setattr(overview, "sweep_piece", broken)
    pieces = Pieces()
    todo = recorded.steps(llama, request(), pieces, measure_here=False)
    job = recorded.OverviewJob(llama, request(), pieces, todo, store).start()
    job.wait(120)
    assert not job.alive and job.state["sweep"] == "failed" and job.notes["sweep"] == "the sweep cannot run this"
    assert all(state == "done" for piece, state in job.state.items() if piece != "sweep")
    assert job.version >= 2 * len(todo)


def test_arithmetic_that_cannot_be_done_for_a_target_is_said_not_raised(llama, monkeypatch):
    def broken(*args, **kwargs):
        raise QlabError("the planner has no such target")

    monkeypatch.setattr(overview, "memory_piece", broken)
    pieces = Pieces()
    recorded.fill_arithmetic(llama, request(), pieces)
    assert pieces.skipped == {"memory": "the planner has no such target"} and pieces.predicted
    assert pieces.missing("memory", request()) == []


def test_the_verdict_panels_and_html_from_the_pieces(llama, store):
    pieces = Pieces()
    recorded.fill_arithmetic(llama, request(), pieces)
    recorded.OverviewJob(llama, request(), pieces, recorded.steps(llama, request(), pieces, measure_here=False),
                         store).run()
    answer = overview.decide(pieces, request(), llama.kind, bound=10.0)  # random weights: every loss is large
    assert answer.recommended is not None and answer.baseline_predicted == pieces.predicted["bf16"]["speed"]
    front = recorded.accuracy_frame(pieces, request())
    assert list(front["label"]) == [s.label for s in SCHEMES] and front["pareto"].any()
    grids = None
    if overview.sensitivity_available():
        layer = overview.most_sensitive_layer(pieces, request())
        grids = overview.layer_grids(llama, layer, SCHEMES)
        assert set(grids.grids) == {"int8 g32", "int4 g32"} and grids.values.numel() == 32
        assert grids.grids["int4 g32"].numel() == 16
    figures = recorded.panel_figures(pieces, request(), answer, grids)
    assert all(figures[k] is not None for k in ("accuracy", "memory", "speed"))
    for figure in (f for f in figures.values() if f is not None):
        assert figure.layout.title.text  # every chart titled
    page = recorded.overview_html("tiny-llama", request(), answer, figures, ["a note"])
    assert page.startswith("<!DOCTYPE html>") and answer.headline.split(":")[0] in page
    assert page.count("plotly.js") >= 1 and "a note" in page


def test_panels_are_rebuilt_only_when_what_they_draw_changes(llama, monkeypatch):
    from qlab import charts

    pieces = Pieces()
    recorded.fill_arithmetic(llama, request(), pieces)
    sweep = list(overview.sweep_piece(llama, request(), SCHEMES))
    pieces.sweep[sweep[0]["label"]] = sweep[0]
    built = []
    for name in ("accuracy_size_front", "memory_on_target", "speed_predicted_and_measured"):
        monkeypatch.setattr(charts, name, lambda *args, name=name, real=getattr(charts, name): built.append(name)
                            or real(*args))
    cache: dict = {}

    def figures(bound: float = 10.0) -> dict:
        return recorded.panel_figures(pieces, request(), overview.decide(pieces, request(), llama.kind, bound),
                                      cache=cache)

    first = figures()
    assert sorted(built) == ["accuracy_size_front", "memory_on_target", "speed_predicted_and_measured"]
    assert figures() == first and len(built) == 3  # a rerun with nothing new builds nothing
    for record in sweep[1:]:
        pieces.sweep[record["label"]] = record
    assert figures()["accuracy"] is not first["accuracy"] and built[3:] == ["accuracy_size_front"]
    figures(bound=0.5)
    assert built[4:] == ["accuracy_size_front"]  # the bound is drawn on the accuracy panel only
    assert recorded.panel_figures(pieces, request(), overview.decide(pieces, request(), llama.kind, 0.5))[
        "accuracy"] is not None and len(built) == 8  # no cache: every figure is built


def test_layer_grids_without_a_scaled_format_and_for_an_unknown_layer(llama):
    assert overview.layer_grids(llama, "model.layers.0.mlp.down_proj", [QuantScheme("fp16")]) is None
    with pytest.raises(QlabError, match="no linear layer"):
        overview.layer_grids(llama, "no.such.layer", SCHEMES)


def test_pareto_front():
    assert overview.pareto_front([(1, 3), (2, 2), (3, 3), (2, 1)]) == [True, False, False, True]


def test_format_speed_picks_a_backend_per_format_and_says_when_none_runs():
    assert format_speed.backend_for("fp32", "causal-lm").slug == "fp32"
    assert format_speed.backend_for("nf4", "causal-lm") is None  # bitsandbytes needs CUDA
    records = list(format_speed.measure(tiny_llama(layers=1), [QuantScheme("nf4", "group", 32)]))
    assert records == [{"label": "nf4 g32", "format": "nf4", "backend": None, "available": False, "speed": None,
                        "reason": "no nf4 backend for a causal-lm model runs on this machine's CPU"}]


def test_measured_speed_of_a_tiny_model(store):
    tiny = tiny_llama(layers=1)
    records = list(format_speed.measure(tiny, [QuantScheme("fp32")]))
    assert records[0]["backend"] == "fp32" and records[0]["speed"] > 0 and records[0]["speed_unit"] == \
        "decode tokens/s"
    assert isinstance(records[0]["noisy"], bool)
    with pytest.raises(Cancelled):
        list(format_speed.measure(tiny, [QuantScheme("fp32")], cancel=lambda: True))


def test_baseline_is_shared_by_the_evaluating_pieces(llama, store, monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return compute_baseline(*args, **kwargs)

    monkeypatch.setattr(recorded, "compute_baseline", counted)
    pieces = Pieces()
    todo = [s for s in recorded.steps(llama, request(), pieces, measure_here=False) if s.piece in ("sweep",
                                                                                                 "sensitivity")]
    recorded.OverviewJob(llama, request(), pieces, todo, store).run()
    assert len(calls) == 1


def test_cli_overview_stores_then_reuses_and_refuses_a_bad_target(tmp_path, monkeypatch, capsys):
    from qlab.cli import main
    from qlab.models import loading

    monkeypatch.setattr(loading, "load", lambda name, device_map=None: tiny_llama())
    argv = ["overview", "--model", "tiny", "--hardware", "h100-sxm-80gb", "--formats", "fp16,int8",
            "--group-size", "32", "--tokens", "64", "--no-measure", "--quiet", "--db", str(tmp_path / "runs.sqlite"),
            "--bound", "10", "--json", str(tmp_path / "first.json"), "--html", str(tmp_path / "overview.html")]
    assert main(argv) == 0
    first = json.loads((tmp_path / "first.json").read_text())
    assert first["verdict"]["recommended"]["label"] in ("fp16", "int8 g32")
    assert [s["state"] for s in first["steps"]] == ["done"] * len(first["steps"])
    assert [r["label"] for r in first["sweep"]] == ["fp16", "int8 g32"] and first["predicted"][-1]["label"] == "bf16"
    assert (tmp_path / "overview.html").read_text().startswith("<!DOCTYPE html>")
    argv[argv.index(str(tmp_path / "first.json"))] = str(tmp_path / "second.json")
    assert main(argv) == 0
    second = json.loads((tmp_path / "second.json").read_text())
    assert second["steps"] == [] and second["sweep"] == first["sweep"]  # everything came from the store
    assert main(["overview", "--hardware", "no-such-gpu", "--json"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_overview_loads_as_sweep_does_and_refuses_a_bad_bound_or_cap(tmp_path, monkeypatch, capsys):
    from qlab.cli import main
    from qlab.models import loading

    asked = []
    monkeypatch.setattr(loading, "load", lambda name, **options: asked.append(options) or tiny_llama(layers=1))
    argv = ["overview", "--model", "tiny", "--formats", "fp16", "--tokens", "64", "--no-measure", "--quiet",
            "--no-store", "--device", "cpu", "--dtype", "fp32", "--speed-cap", "5", "--json"]
    assert main(argv) == 0
    assert asked == [{"device": "cpu", "dtype": "fp32"}]
    assert json.loads(capsys.readouterr().out)["formats"] == ["fp16"]
    for bad in (["--bound", "nan"], ["--bound", "-1"], ["--speed-cap", "0"], ["--speed-cap", "inf"]):
        assert main(["overview", "--no-store", *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("--bound" in err or "time cap" in err), err
    assert len(asked) == 1  # each was refused before the model loaded


def test_a_gptq_sidebar_scheme_gets_a_gptq_quick_ranking_kept_apart_from_round_to_nearest(llama, store):
    spec = EvalSpec(64, default_text()[:20_000])  # the tiny models' byte tokenizer is pure Python: a short text
    rtn = (QuantScheme("int4", "group", 32),)
    gptq = (QuantScheme("int4", "group", 32, algorithm="gptq"),)
    asked = {scheme: OverviewRequest(scheme, "h100-sxm-80gb", spec) for scheme in (rtn, gptq)}
    assert (overview.estimate_seconds("sensitivity", llama, asked[gptq], gptq)
            > overview.estimate_seconds("sensitivity", llama, asked[rtn], rtn))  # the calibration pass counts
    found = {}
    for schemes, wanted in asked.items():
        step = recorded.Step("sensitivity", schemes, 0.0)
        recorded.run_step(step, llama, wanted, Pieces(), store, lambda: compute_baseline(llama, spec))
        if schemes == rtn:  # only the round-to-nearest run is stored so far: GPTQ does not take its records
            assert recorded.restore(store, llama, asked[gptq]).sensitivity == {}
        found[schemes] = recorded.restore(store, llama, wanted).sensitivity
    assert set(found[rtn]) == {"int4 g32"} and set(found[gptq]) == {"int4 g32 gptq"}
    assert all(r["scheme_settings"]["algorithm"] == "gptq" for r in found[gptq]["int4 g32 gptq"])
    scores = {s: {r["layer"]: r["score"] for r in found[s][s[0].label]} for s in asked}
    assert scores[gptq].keys() == scores[rtn].keys() and scores[gptq] != scores[rtn]
    # The histogram of the most sensitive layer draws GPTQ's grid: its widest block, from that layer's GPTQ scales
    # (GPTQ computed here from the whole model's calibration, as the sweep collects it).
    layer = overview.most_sensitive_layer(Pieces(sensitivity=found[gptq]), asked[gptq])
    grids = overview.layer_grids(llama, layer, gptq, spec)
    weight = llama.model.get_submodule(layer).weight.detach()
    rounded = gptq_quantize(weight, calibrate(llama, gptq, spec)[0][layer].hessian, gptq[0])
    assert not torch.equal(rounded.scale, quantize(weight, rtn[0]).scale)
    widest = int(rounded.scale.float().argmax())
    assert torch.equal(grids.grids["int4 g32 gptq"], grid_values(rounded, widest))
    row, group = divmod(widest, weight.shape[1] // 32)
    assert torch.equal(grids.values, weight[row, 32 * group: 32 * group + 32])
    with pytest.raises(QlabError, match="give the text to calibrate on"):
        overview.layer_grids(llama, layer, gptq)


def test_cli_overview_refuses_a_text_too_short_to_calibrate_on_before_any_work(tmp_path, monkeypatch, capsys):
    from qlab.cli import main
    from qlab.models import loading

    monkeypatch.setattr(loading, "load", lambda name, **options: tiny_llama())
    monkeypatch.setattr(recorded, "compute_baseline", lambda *a, **k: pytest.fail("work started"))
    short = tmp_path / "short.txt"
    short.write_text("A few words of text, far fewer tokens than a layer has inputs.")
    db = tmp_path / "runs.sqlite"
    code = main(["overview", "--model", "tiny", "--formats", "fp16,int4", "--group-size", "32", "--algorithm",
                 "gptq", "--tokens", "16", "--text-file", str(short), "--no-measure", "--quiet", "--db", str(db)])
    assert code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "inputs" in line and "rtn or hqq" in line
    assert not db.exists() or Store(db).list_runs() == []


ROOT = Path(__file__).resolve().parent.parent


def meta_model(config: str) -> torch.nn.Module:
    """A catalog model's shapes on the meta device (no weights): what the estimates read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = json.loads((ROOT / "assets" / "model_configs" / f"{config}.json").read_text())
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields))


def test_cpu_estimates_come_near_the_times_measured_on_a_quiet_cpu(monkeypatch):
    """The constants were fitted to ``bench/estimates.py``'s run; with the probe rates and read bandwidth of that
    run, the estimates of the random 1B Llama (its shapes on the meta device, bf16 as it was measured) land near
    what each step took."""
    stored = json.loads((ROOT / "bench" / "results" / "estimates_cpu.json").read_text())
    rates = stored["probe_flops_per_s"]
    monkeypatch.setattr(overview, "matmul_flops_per_s",
                        lambda device="cpu", dtype=torch.float32: rates[str(dtype).removeprefix("torch.")])
    [run] = [m for m in stored["models"] if m["model"] == "qlab-llama-3.2-1b-random"]
    assert run["compute_dtype"] == "bfloat16"
    loaded = types.SimpleNamespace(model=meta_model("llama-3.2-1b").to(torch.bfloat16), device="cpu",
                                   kind="causal-lm")
    spec = EvalSpec(run["tokens"])
    sweep = (QuantScheme("fp16"), QuantScheme("int8", "group", 64), QuantScheme("int4", "group", 64),
             QuantScheme("nf4", "group", 64))
    timed_there = {s.format for s in sweep if run["speed_backends"][s.label]}  # the formats a backend ran
    monkeypatch.setattr(format_speed, "backend_for", lambda fmt, kind, device="cpu": fmt in timed_there or None)
    monkeypatch.setattr(speed, "this_machine_bandwidth", lambda: stored["bandwidth_bytes_per_s"])
    estimates = {
        "evaluation": overview.evaluation_seconds(loaded, spec.tokens),
        "baseline": overview.sweep_seconds(loaded, [], spec),
        "sweep": overview.sweep_seconds(loaded, sweep, spec, baseline_ready=True),
        "quick_sensitivity": overview.estimate_seconds("sensitivity", loaded, OverviewRequest(sweep, "this-machine", spec),
                                                       sweep),
        "full_analysis": overview.analysis_seconds(loaded, sweep[1:3], spec),
        "measured_speed": format_speed.estimate_seconds(loaded, sweep),
    }
    assert set(estimates) == set(run["steps"])
    for step, estimate in estimates.items():
        assert estimate == pytest.approx(run["steps"][step]["estimated_s"], rel=0.02), step  # the same arithmetic
        assert 0.5 < estimate / run["steps"][step]["measured_s"] < 2.0, step


@pytest.mark.parametrize("config, device, results, probe", [
    ("llama-3.2-1b", "cpu", "rounding_methods_1b_cpu.json", 268e9),  # the CPU's probe when they were timed
    ("llama-3.1-8b", "cuda:0", "rounding_methods_8b_gpu.json", 700e12),  # a bf16 rate, which they do not use
])
def test_rounding_estimates_reproduce_the_times_measured_for_every_algorithm(monkeypatch, config, device, results,
                                                                             probe):
    model = meta_model(config)
    loaded = types.SimpleNamespace(model=model, device=device)
    monkeypatch.setattr(overview, "matmul_flops_per_s", lambda device="cpu", dtype=None: probe)
    measured = {row["label"]: row["rounding_seconds"] for row in json.loads(
        (ROOT / "bench" / "results" / results).read_text())["models"][0]["rows"]}
    for algorithm in ("gptq", "gptq-act-order", "awq", "hqq"):
        scheme = QuantScheme("int4", "group", 128, symmetric=False, algorithm=algorithm)
        estimate = overview.rounding_seconds(loaded, scheme)
        assert 0.75 < estimate / measured[scheme.label] < 1.35, (scheme.label, estimate, measured[scheme.label])
    assert overview.rounding_seconds(loaded, QuantScheme("int4", "group", 128)) < 30  # round to nearest: seconds


def test_gptq_on_a_gpu_is_not_estimated_by_its_arithmetic(monkeypatch):
    """On the H100 GPTQ took minutes for a solve that the GPU's matmul rate would finish in about a second (a dozen
    small kernels per input column), so a GPU estimate counts columns, not FLOPs."""
    model = meta_model("llama-3.1-8b")
    monkeypatch.setattr(overview, "matmul_flops_per_s", lambda device="cpu", dtype=None: 700e12)
    measured = {row["label"]: row["rounding_seconds"] for row in json.loads(
        (ROOT / "bench" / "results" / "rounding_methods_8b_gpu.json").read_text())["models"][0]["rows"]}
    solve_flops = sum(2.0 * m.out_features * m.in_features**2 for _, m in overview.quantizable_linears(model))
    assert overview.GPTQ_RATE * 700e12 * measured["int4 g128 asym gptq"] > 100 * solve_flops


def test_a_model_on_a_gpu_is_estimated_at_the_gpu_rates_measured_on_the_h200(monkeypatch):
    model = meta_model("llama-3.1-8b")
    probed = []
    monkeypatch.setattr(overview, "matmul_flops_per_s", lambda device="cpu", dtype=None: probed.append(device) or 268e9)
    on_gpu = types.SimpleNamespace(model=model, device="cuda:0", kind="causal-lm")
    on_cpu = types.SimpleNamespace(model=model, device="cpu", kind="causal-lm")
    sweep = json.loads((ROOT / "bench" / "results" / "real_model_gpu.json").read_text())["models"]["llama-3.1-8b"]
    measured = [row["quantize_seconds"] for row in sweep["steps"]["sweep"]["rows"] if row["label"] != "bf16"]
    estimate = overview.rounding_seconds(on_gpu, QuantScheme("int4", "group", 64))
    assert 0.75 < estimate / max(measured) and estimate / min(measured) < 1.25, (estimate, measured)
    assert overview.rounding_seconds(on_cpu, QuantScheme("int4", "group", 64)) > 100 * estimate
    overview.evaluation_seconds(on_gpu, 512)
    assert probed == ["cuda:0"]  # the rate of the device the model is on, not this CPU's
