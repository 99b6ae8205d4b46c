"""The Sensitivity page in Streamlit's AppTest, standalone (it calls common.page_setup() itself)."""

import pytest
from streamlit.testing.v1 import AppTest

pytestmark = pytest.mark.slow


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_sensitivity_page_analyses_picks_a_layer_and_recommends_a_mix(minilm, tmp_path, monkeypatch):
    from qlab.store import Store, stored_sensitivity

    monkeypatch.setenv("QLAB_DB", str(tmp_path / "runs.sqlite"))
    at = AppTest.from_file("../pages/sensitivity.py", default_timeout=600)
    at.session_state["model_choice"] = "minilm-l6"
    at.session_state["formats"] = ["fp16", "int8", "int4"]
    at.session_state["tokens"] = 128
    at.run()
    no_errors(at)
    assert at.multiselect(key="sensitivity_schemes").value == ["int8 g64", "int4 g64"]
    # Before it runs, the page says what the analysis will do here and about how long it takes.
    [before] = [i.value for i in at.info if "Analyse" in i.value]
    assert "2 formats on 128 tokens, 7 replays end to end per format (one per block): about" in before and "SmolLM2" not in before
    assert "rest FP32" in at.radio(key="sensitivity_view").options[0]  # MiniLM is loaded in FP32
    at.button(key="run_sensitivity").click().run()
    no_errors(at)
    # Dataframes in page order: ranked table, layer types, blocks (and the mix table last, once measured).
    table = at.dataframe[0].value
    assert len(table) == 2 * 37 and set(table["label"]) == {"int8 g64", "int4 g64"}
    assert table["estimated_delta"].is_monotonic_decreasing  # ranked by the default measure
    assert table["block_delta"].notna().all()
    # The analysis was stored as it ran, and reads back as the same table.
    [stored] = Store().runs()
    assert (stored.kind, stored.status) == ("sensitivity", "finished")
    assert len(stored_sensitivity(stored).rows()) == len(table)
    # Picking a layer hands it to the Weights page.
    layer = "encoder.layer.3.attention.self.value"
    at.selectbox(key="sensitivity_layer").select(layer).run()
    no_errors(at)
    assert at.session_state["layer"] == layer
    at.selectbox(key="sensitivity_measure").select("sqnr_db").run()
    no_errors(at)
    assert at.dataframe[0].value["sqnr_db"].is_monotonic_increasing
    at.button(key="run_mix").click().run()
    no_errors(at)
    mixes = at.dataframe[-1].value
    assert {"int8 g64", "int4 g64", "mix @ 4.5 bits/weight"} <= set(mixes["label"])
    by_label = mixes.set_index("label")
    assert by_label.loc["mix @ 4.5 bits/weight", "error"] < by_label.loc["int4 g64", "error"]
    recommend = Store().runs()[-1]
    assert recommend.kind == "recommend" and len(recommend.records("mix")) == len(mixes)
    assert recommend.records("recommendation")[0]["label"] == "mix @ 4.5 bits/weight"
    # It names the analysis run it was built on instead of storing every per-linear record again.
    assert recommend.meta.settings["analysis_run"] == stored.id and not recommend.records("sensitivity_linear")
    assert recommend.analysis.id == stored.id
    assert stored_sensitivity(recommend).rows() == stored_sensitivity(stored).rows()
    assert sum(len(run.records("sensitivity_linear")) for run in Store().runs()) == len(table)
    # A rerun redraws from session state without recomputing.
    at.slider(key="mix_budget_bits").set_value(4.5).run()
    no_errors(at)
    assert len(at.dataframe[-1].value) == len(mixes)


def test_cancel_of_recommend_and_measure_keeps_the_plans_already_measured(minilm, tmp_path, monkeypatch):
    import streamlit as st

    from qlab.analyses import mixed
    from qlab.store import Store

    monkeypatch.setenv("QLAB_DB", str(tmp_path / "runs.sqlite"))
    at = AppTest.from_file("../pages/sensitivity.py", default_timeout=600)
    at.session_state["model_choice"] = "minilm-l6"
    at.session_state["formats"] = ["int8", "int4"]
    at.session_state["tokens"] = 64
    at.session_state["sensitivity_unit"] = "none"  # predict only: the fastest analysis
    at.run()
    at.button(key="run_sensitivity").click().run()
    no_errors(at)
    calls = []
    real_evaluations = {name: getattr(mixed, name) for name in ("evaluate", "evaluate_streamed")}

    def then_stop(real):  # a plan is measured streamed (a known block list) or on a shadow copy
        def evaluate_then_stop(*args, **kwargs):
            if len(calls) == 2:  # the third plan: the user presses Cancel, which stops the script run like this
                st.stop()
            calls.append(args)
            return real(*args, **kwargs)
        return evaluate_then_stop

    for name, real in real_evaluations.items():
        monkeypatch.setattr(mixed, name, then_stop(real))
    at.button(key="run_mix").click().run()
    no_errors(at)
    at.button(key="cancel_mix").click().run()  # the rerun the Cancel press causes
    no_errors(at)
    assert any("Stopped after 2 evaluation(s)" in i.value for i in at.info)
    kept = at.dataframe[-1].value
    assert list(kept["label"]) == ["int8 g64", "int4 g64"] and kept["error"].notna().all()
    assert len(at.get("plotly_chart")) >= 1 and not any("layers int" in m.value for m in at.markdown)
    recommend = Store().runs()[-1]
    assert (recommend.kind, recommend.status) == ("recommend", "stopped")
    assert [r["label"] for r in recommend.records("mix")] == ["int8 g64", "int4 g64"]
    for name, real in real_evaluations.items():
        monkeypatch.setattr(mixed, name, real)
    at.button(key="run_mix").click().run()  # pressed again, every plan is measured and recommended
    no_errors(at)
    assert not any("Stopped after" in i.value for i in at.info) and len(at.dataframe[-1].value) > 2


def test_the_sidebar_algorithm_rounds_every_layer_and_the_mixes(minilm, tmp_path, monkeypatch):
    """GPTQ chosen in the sidebar (as on the Quantize page): the analysis and the mixes round with it, and the
    calibration tokens are stored with the run."""
    from qlab.store import Store

    monkeypatch.setenv("QLAB_DB", str(tmp_path / "runs.sqlite"))
    at = AppTest.from_file("../pages/sensitivity.py", default_timeout=600)
    at.session_state["model_choice"] = "minilm-l6"
    at.session_state["formats"] = ["int8", "int4"]
    at.session_state["algorithm"] = "gptq"
    at.session_state["tokens"] = 64
    at.session_state["sensitivity_unit"] = "none"  # predict only: the fastest analysis
    at.run()
    no_errors(at)
    assert at.multiselect(key="sensitivity_schemes").value == ["int8 g64 gptq", "int4 g64 gptq"]
    at.button(key="run_sensitivity").click().run()
    no_errors(at)
    assert set(at.dataframe[0].value["label"]) == {"int8 g64 gptq", "int4 g64 gptq"}
    [stored] = Store().runs()
    assert stored.meta.settings["calibration"]["calibration_tokens"] > 1536  # more than the widest layer's inputs
    at.button(key="run_mix").click().run()
    no_errors(at)
    recommend = Store().runs()[-1]
    plan = recommend.records("recommendation")[0]["plan"]
    assert {scheme["algorithm"] for scheme in plan["layers"].values()} == {"gptq"}


def test_a_pruned_cast_is_offered_for_analysis(minilm, tmp_path, monkeypatch):
    """fp16 rounds next to nothing, but fp16 with 2:4 pruning is worth a per-layer look: the page offers it."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("QLAB_DB", str(tmp_path / "runs.sqlite"))
    at = AppTest.from_file("../pages/sensitivity.py", default_timeout=300)
    at.session_state["model_choice"], at.session_state["formats"] = "minilm-l6", ["fp16"]
    at.run()
    assert not at.exception and any("Pick at least one scaled format" in i.value for i in at.info)
    at.session_state["sparsity"] = "2:4"
    at.run()
    assert not at.exception and not any("Pick at least one scaled format" in i.value for i in at.info)
    assert at.multiselect(key="sensitivity_schemes").value == ["fp16 2:4"]
