"""History page in Streamlit's AppTest: list, open, compare, share by URL, re-run, delete."""

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from qlab.analyses.sweep import ResultRow
from qlab.core.plan import SizeReport
from qlab.core.quant import QuantScheme
from qlab.store import RunMeta, Store

REPO = Path(__file__).resolve().parents[1]
ENV = {"qlab": "0.1.0", "torch": "2.13.0", "transformers": "5.23.0"}


@pytest.fixture
def db(tmp_path, monkeypatch) -> Store:
    monkeypatch.setenv("QLAB_DB", str(tmp_path / "runs.sqlite"))
    return Store()


def sweep(db: Store, model: str, klds: dict[str, float], granularity: str = "group", tokens: int = 128) -> str:
    schemes = {fmt: QuantScheme(fmt, granularity, 32) for fmt in klds}
    run_id = db.start_run(RunMeta("sweep", model, {"schemes": [s.to_dict() for s in schemes.values()]},
                                  hardware="l4", tokens=tokens, text_name="pydoc_data.topics (Python's built-in "
                                  "help text)", environment=ENV))
    for index, (fmt, kld) in enumerate(klds.items()):
        db.add_result(run_id, ResultRow(model, schemes[fmt], SizeReport(800, 600 - 100 * index, 40, 100, 200),
                                        {"kld_mean": kld, "top1_agreement": 1 - kld}, 0.1, 0.2, tokens))
    db.finish_run(run_id)
    return run_id


def page() -> AppTest:
    return AppTest.from_file("../pages/history.py", default_timeout=120)


def table_with(at: AppTest, column: str):
    """The first dataframe on the page that has this column (dataframes are not addressable by key)."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_empty_history_says_how_to_fill_it(db):
    at = page().run()
    no_errors(at)
    assert any("No stored runs yet" in i.value for i in at.info)


def test_open_one_run_then_compare_two(db):
    first = sweep(db, "smollm2-135m", {"int8": 1e-3, "int4": 0.05})
    second = sweep(db, "smollm2-135m", {"int8": 2e-3, "int4": 0.04})
    at = page().run()
    no_errors(at)
    assert set(at.dataframe[0].value["id"]) == {first, second}
    at.multiselect(key="history_selected").select(first).run()
    no_errors(at)
    settings = table_with(at, "setting")
    assert dict(zip(settings["setting"], settings["value"]))["token budget"] == "128"
    assert list(table_with(at, "bits_per_weight")["label"]) == ["int8 g32", "int4 g32"]
    assert len(at.get("plotly_chart")) == 2  # KLD and top-1, read back, not recomputed
    assert at.query_params["runs"] == first
    at.multiselect(key="history_selected").select(second).run()
    no_errors(at)
    delta = next(c for d in at.dataframe for c in d.value.columns if c.startswith("Δ kld_mean"))
    table = table_with(at, delta).set_index("label")
    assert table.loc["int4 g32", delta] == pytest.approx(0.04 - 0.05)
    assert at.query_params["runs"] == f"{first},{second}"


def test_a_shared_link_restores_the_selection(db):
    first = sweep(db, "smollm2-135m", {"int8": 1e-3})
    second = sweep(db, "minilm-l6", {"int8": 1e-3})
    at = page()
    at.query_params["runs"] = f"{second},{first},notanid,ffffffffffff"
    at.run()
    no_errors(at)
    assert at.multiselect(key="history_selected").value == [second, first]
    assert any(c.startswith("Δ kld_mean") for d in at.dataframe for c in d.value.columns)


def test_filters_narrow_the_list(db):
    sweep(db, "smollm2-135m", {"int8": 1e-3})
    keep = sweep(db, "minilm-l6", {"nf4": 1e-3})
    at = page().run()
    at.multiselect(key="history_models").select("minilm-l6").run()
    assert list(at.dataframe[0].value["id"]) == [keep]
    at.multiselect(key="history_models").unselect("minilm-l6").run()
    at.text_input(key="history_search").input("nf4").run()
    assert list(at.dataframe[0].value["id"]) == [keep]


def test_delete_needs_confirmation(db):
    victim = sweep(db, "smollm2-135m", {"int8": 1e-3})
    survivor = sweep(db, "smollm2-135m", {"int4": 1e-2})
    at = page().run()
    at.multiselect(key="history_selected").select(victim).run()
    assert at.button(key="history_delete").disabled
    at.checkbox(key="history_confirm_delete").check().run()
    at.button(key="history_delete").click().run()
    no_errors(at)
    assert [r["id"] for r in db.list_runs()] == [survivor]
    assert at.multiselect(key="history_selected").value == []
    assert any("Deleted 1 run" in s.value for s in at.success)


@pytest.mark.slow
def test_rerun_puts_the_settings_in_the_sidebar_and_opens_quantize(db, minilm):
    if "pages/history.py" not in (REPO / "app.py").read_text():
        pytest.skip("the History page is not in app.py's navigation yet (switch_page needs it)")
    run_id = sweep(db, "minilm-l6", {"fp16": 0.0, "int8": 1e-3, "int4": 0.05}, granularity="group", tokens=96)
    at = AppTest.from_file("../app.py", default_timeout=120)
    at.session_state["model_choice"] = "minilm-l6"
    at.run()
    at.switch_page("pages/history.py").run()
    at.multiselect(key="history_selected").select(run_id).run()
    at.button(key="history_rerun").click().run()
    no_errors(at)
    state = at.session_state
    assert state["model_choice"] == "minilm-l6" and state["formats"] == ["fp16", "int8", "int4"]
    assert (state["granularity"], state["group_size"], state["tokens"], state["hardware"]) == ("group", 32, 96, "l4")
    assert at.title[0].value == "Quantize"


def stored_sensitivity_run(db: Store, monkeypatch, tmp_path) -> str:
    """A real sensitivity analysis of a tiny Llama, stored by the CLI's --db (milliseconds, no bundled model)."""
    from qlab import cli
    from qlab.models import loading as models
    from qlab.models.evaluate import default_text
    from tests.tiny_models import tiny_llama

    loaded = tiny_llama(seed=4)
    monkeypatch.setattr(models, "load", lambda name: loaded)
    text = tmp_path / "text.txt"
    text.write_text(default_text()[:20_000])
    assert cli.main(["sensitivity", "--model", "tiny", "--tokens", "128", "--text-file", str(text), "--quiet",
                     "--group-size", "32", "--formats", "int8,int4", "--db", str(db.path), "--json",
                     str(tmp_path / "rows.json")]) == 0
    return db.list_runs()[0]["id"]


def stored_bench_run(db: Store, faster: float = 1.0) -> str:
    rows = [{"model": "smollm2-135m", "kind": "causal-lm", "backend": backend, "library": library, "format": fmt,
             "available": True, "error": None, "reason": None, "decode_tokens_per_s": tok_s * faster,
             "prefill_ms": 90.0 / faster,
             "kld_mean": kld, "twin_kld_mean": kld, "agrees_with_twin": True, "size_bytes": size}
            for backend, library, fmt, tok_s, kld, size in (
                ("fp32", "torch", "fp32", 25.0, 0.0, 540_000_000),
                ("torch-dynamic-int8", "torch", "int8", 80.0, 0.9, 160_000_000),
                ("quanto-int4", "optimum-quanto", "int4", 20.0, 0.006, 90_000_000))]
    rows.append({"model": "smollm2-135m", "kind": "causal-lm", "backend": "bnb-nf4", "library": "bitsandbytes",
                 "available": False, "error": None, "reason": "bitsandbytes needs CUDA here"})
    run_id = db.start_run(RunMeta("bench", "smollm2-135m", {"backends": [r["backend"] for r in rows],
                                                            "prompt_tokens": 128}, environment=ENV))
    for row in rows:
        db.add_result(run_id, row, "bench")
    db.finish_run(run_id)
    return run_id


def test_stored_sensitivity_and_bench_runs_reopen_without_recomputing(db, monkeypatch, tmp_path):
    from qlab.analyses import sensitivity
    from qlab.backends import speed

    sensitivity_id = stored_sensitivity_run(db, monkeypatch, tmp_path)
    bench_id = stored_bench_run(db)

    def no_recompute(*args, **kwargs):
        raise AssertionError("the History page recomputed a stored run")

    monkeypatch.setattr(sensitivity, "analyze", no_recompute)
    monkeypatch.setattr(speed, "run_bench", no_recompute)
    at = page().run()
    no_errors(at)
    listed = at.dataframe[0].value
    assert set(listed["kind"]) == {"sensitivity analysis", "speed measurement"}  # in words, not stored names
    assert not listed["created_at"].str.contains("T|\\+").any()  # "2026-12-07 20:45", not ISO with an offset
    at.multiselect(key="history_kinds").select("sensitivity").run()
    assert list(at.dataframe[0].value["id"]) == [sensitivity_id]
    assert at.dataframe[0].value["labels"].iloc[0] == "int8 g32, int4 g32"
    at.multiselect(key="history_selected").select(sensitivity_id).run()
    no_errors(at)
    ranked = table_with(at, "estimated_delta")
    assert len(ranked) == 2 * 21 and ranked["estimated_delta"].is_monotonic_decreasing
    assert len(at.get("plotly_chart")) == 3  # heatmap, by layer type, end-to-end units
    at.multiselect(key="history_kinds").unselect("sensitivity").select("bench").run()
    at.multiselect(key="history_selected").unselect(sensitivity_id).select(bench_id).run()
    no_errors(at)
    table = table_with(at, "decode_tokens_per_s")
    assert list(table["backend"]) == ["fp32", "torch-dynamic-int8", "quanto-int4", "bnb-nf4"]
    assert len(at.get("plotly_chart")) == 1  # accuracy vs speed vs size, measured points only
    assert any("bitsandbytes needs CUDA" in c.value for c in at.caption)


def test_a_read_only_database_is_browsed_and_left_untouched(db, monkeypatch):
    import hashlib
    import os

    first = sweep(db, "smollm2-135m", {"int8": 1e-3, "int4": 0.05})
    second = sweep(db, "smollm2-135m", {"int8": 2e-3, "int4": 0.04})
    before = hashlib.sha256(db.path.read_bytes()).hexdigest(), db.path.stat().st_mtime_ns
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if mode & os.W_OK and str(p).startswith(
        str(db.path.parent)) else real(p, mode, *a, **k))  # tests run as root: say no as a read-only mount would
    at = page().run()
    no_errors(at)
    assert any("is read-only" in i.value for i in at.info)
    at.multiselect(key="history_selected").select(first).select(second).run()
    no_errors(at)
    assert any(c.startswith("Δ kld_mean") for d in at.dataframe for c in d.value.columns)
    assert at.button(key="history_import").disabled and at.button(key="history_delete").disabled
    assert (hashlib.sha256(db.path.read_bytes()).hexdigest(), db.path.stat().st_mtime_ns) == before
    assert sorted(p.name for p in db.path.parent.iterdir()) == ["runs.sqlite"]


def test_a_shared_link_to_runs_this_database_lacks_says_so_once(db):
    present = sweep(db, "smollm2-135m", {"int8": 1e-3})
    at = page()
    at.query_params["runs"] = f"{present},0123456789ab"
    at.run()
    no_errors(at)
    assert [w.value for w in at.warning] == [
        f"Run 0123456789ab is not in `{db.path}`; import it first (History → Import)."]
    assert at.multiselect(key="history_selected").value == [present]
    at.run()  # the warning belongs to opening the link, not to every rerun
    assert not at.warning and at.query_params["runs"] == present


def test_a_shared_link_into_an_empty_database_says_so(db):
    at = page()
    at.query_params["runs"] = "0123456789ab,ba9876543210"
    at.run()
    no_errors(at)
    assert len(at.warning) == 1 and "Runs 0123456789ab, ba9876543210 are not in" in at.warning[0].value
    assert any("No stored runs yet" in i.value for i in at.info)


def test_two_speed_runs_and_two_sensitivity_runs_compare_side_by_side(db):
    from tests.test_report import sensitivity_run

    slow, fast = stored_bench_run(db), stored_bench_run(db, faster=2.0)
    before = sensitivity_run(db, {"q_proj": 1e-3, "down_proj": 2e-2})
    after = sensitivity_run(db, {"q_proj": 3e-3, "down_proj": 1e-2})
    at = page().run()
    at.multiselect(key="history_selected").select(slow).select(fast).run()
    no_errors(at)
    fast_name = report_name(db, fast)
    table = table_with(at, f"Δ decode_tokens_per_s [{fast_name}]").set_index("backend")
    # A column with gaps (a backend one run lacks) is shown as text, a dash in each gap: read numbers back.
    assert float(table.loc["torch-dynamic-int8", f"Δ decode_tokens_per_s [{fast_name}]"]) == pytest.approx(80.0)
    assert float(table.loc["fp32", f"Δ prefill_ms [{fast_name}]"]) == pytest.approx(45.0 - 90.0)
    assert f"Δ kld_mean [{fast_name}]" in table
    # Overlaid decode, prefill and KLD bars, then each run's own accuracy-vs-speed chart.
    assert len(at.get("plotly_chart")) == 3 + 2
    assert not any("no results of one kind" in i.value for i in at.info)

    at.multiselect(key="history_selected").unselect(slow).unselect(fast).select(before).select(after).run()
    no_errors(at)
    after_name = report_name(db, after)
    table = table_with(at, f"Δ estimated_delta [{after_name}]").set_index(["layer", "label"])
    assert float(table.loc[("down_proj", "int4 g64"), f"Δ estimated_delta [{after_name}]"]) == pytest.approx(-1e-2)
    assert len(table) == 4
    overlaid = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    assert len(overlaid) == 4  # one line per run and scheme, on one chart
    assert {t["legendgroup"].split(",")[0] for t in overlaid} == {report_name(db, before), after_name}
    at.multiselect(key="history_selected").select(slow).run()  # a speed run beside two sensitivity runs
    no_errors(at)
    assert table_with(at, f"Δ estimated_delta [{after_name}]") is not None


def report_name(db: Store, run_id: str) -> str:
    from qlab.store.report import run_name

    return run_name(db.get(run_id))


def test_a_stored_bench_sweep_offers_its_schemes_for_re_run_and_export(db):
    """`bench sweep --db` stores its rows with their schemes, so History can re-run or export them."""
    from qlab.cli.bench import store_bench_sweep

    rows = [ResultRow("minilm-l6", QuantScheme(fmt, "group", 32), SizeReport(800, 600, 40, 100, 200),
                      {"cosine_mean": 0.99}, 0.1, 0.2, 64).to_record() for fmt in ("int8", "int4")]
    run_id = store_bench_sweep(type("Args", (), {"db": str(db.path)})(), {
        "benchmark": "sweep", "model": "minilm-l6", "formats": ["int8 g32", "int4 g32"], "tokens": 64,
        "one_fp32_eval_s": 0.5, "sweep_s": 2.0, "sweep_over_eval": 4.0, "rows": rows})
    at = page().run()
    at.multiselect(key="history_selected").select(run_id).run()
    no_errors(at)
    assert at.selectbox(key="history_scheme_label").options == ["int8 g32", "int4 g32"]
    assert at.button(key="history_rerun")


def recommend_run(db: Store) -> str:
    """A stored recommendation (as the Sensitivity page or `recommend --db` saves it), without its analysis."""
    run_id = db.start_run(RunMeta("recommend", "smollm2-135m", {"budget_bits": 4.5}, environment=ENV))
    db.add_result(run_id, {"label": "mix @ 4.5 bits", "bits_per_weight": 4.52, "size_bytes": 98_760_000,
                           "assignment": {"l0.q": "int8 g64", "l0.k": "int4 g64", "l1.q": "int4 g64",
                                          "l1.k": "int4 g64"}}, "recommendation")
    db.finish_run(run_id)
    return run_id


def test_a_stored_recommendation_is_shown(db):
    run_id = recommend_run(db)
    at = page().run()
    at.multiselect(key="history_selected").select(run_id).run()
    no_errors(at)
    shown = [m.value for m in at.markdown if "Recommendation" in m.value]
    assert shown == ["**Recommendation: mix @ 4.5 bits**: 4.520 bits/weight, 98.76 MB; 3 layers int4 g64, "
                     "1 layers int8 g64"]


def test_a_rerun_reads_each_run_once_and_draws_one_sweep_comparison_chart(db, monkeypatch):
    """Each page run builds every selected run's frames once, and the sweep comparison chart once (the metric
    picker's), not one hidden chart per metric as well."""
    from qlab import charts
    from qlab.store import report

    ids = [sweep(db, "smollm2-135m", {"int8": kld, "int4": 0.05}) for kld in (1e-3, 2e-3)]
    ids.append(stored_bench_run(db))
    calls = {"stored_sensitivity": 0, "compare_runs": 0}
    real_stored, real_compare = report.stored_sensitivity, charts.compare_runs
    monkeypatch.setattr(report, "stored_sensitivity", lambda run: calls.__setitem__(
        "stored_sensitivity", calls["stored_sensitivity"] + 1) or real_stored(run))
    monkeypatch.setattr(charts, "compare_runs", lambda *a, **k: calls.__setitem__(
        "compare_runs", calls["compare_runs"] + 1) or real_compare(*a, **k))
    at = page().run()
    at.multiselect(key="history_selected").select(ids[0]).select(ids[1]).select(ids[2]).run()
    no_errors(at)
    calls.update(dict.fromkeys(calls, 0))
    at.run()
    no_errors(at)
    assert calls == {"stored_sensitivity": 3, "compare_runs": 1}


def test_a_recommendation_shows_the_analysis_run_it_names(db, monkeypatch, tmp_path):
    """A dashboard recommendation stores no copy of its analysis, only the analysis run's id: History draws the
    ranked linears and the sensitivity charts from that run, and the HTML report does too."""
    from qlab.store import report

    analysis_id = stored_sensitivity_run(db, monkeypatch, tmp_path)
    run_id = db.start_run(RunMeta("recommend", "tiny", {"analysis_run": analysis_id}, environment=ENV))
    db.add_result(run_id, {"label": "mix @ 6 bits/weight", "bits_per_weight": 6.0, "size_bytes": 1000,
                           "assignment": {"a": "int8 g32"}}, "recommendation")
    db.finish_run(run_id)
    at = page().run()
    at.multiselect(key="history_selected").select(run_id).run()
    no_errors(at)
    ranked = table_with(at, "estimated_delta")
    assert len(ranked) == 2 * 21  # the analysis run's linears, read through the link
    assert len(at.get("plotly_chart")) == 3  # heatmap, by layer type, end-to-end units
    assert any("Recommendation: mix @ 6 bits/weight" in m.value for m in at.markdown)
    assert any(analysis_id in str(v) for v in table_with(at, "setting")["value"])
    assert "Most sensitive linears" in report.render_html([db.get(run_id)])


def test_the_picker_names_each_runs_kind_and_a_mixed_selection_says_which_kinds_it_compares(db):
    bench = stored_bench_run(db)
    first, second = sweep(db, "smollm2-135m", {"int8": 1e-3}), sweep(db, "smollm2-135m", {"int4": 2e-2})
    at = page().run()
    no_errors(at)
    picker = at.multiselect(key="history_selected")
    kinds = {option.split(" · ")[0]: option.split(" · ")[1] for option in picker.options}
    assert kinds == {bench[:6]: "speed measurement", first[:6]: "sweep", second[:6]: "sweep"}
    picker.select(first).select(second).run()
    no_errors(at)
    assert not any("different kinds" in c.value for c in at.caption)
    at.multiselect(key="history_selected").select(bench).run()
    no_errors(at)
    assert any("compares runs of different kinds: sweep (2), speed measurement (1)" in c.value for c in at.caption), \
        [c.value for c in at.caption]
