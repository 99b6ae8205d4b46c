"""Every page rendered by Streamlit's AppTest, driven the way a user would drive it."""

import pytest
from streamlit.testing.v1 import AppTest

pytestmark = pytest.mark.slow


def app(model: str = "minilm-l6") -> AppTest:
    at = AppTest.from_file("../app.py", default_timeout=300)
    at.session_state["model_choice"] = model
    at.switch_page("pages/model.py")  # the Overview is the landing page; these tests start from the Model page
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_model_page_shows_counts_and_layers(minilm):
    at = app()
    no_errors(at)
    values = {m.label: m.value for m in at.metric}
    assert values["Parameters"] == "22.71 M"
    table = at.dataframe[0].value
    assert list(table["name"]) == [name for name, _ in minilm.model.named_parameters()]


def test_smollm_caveat_is_shown():
    at = app("smollm2-135m")
    assert any("Q4_1" in i.value for i in at.info)


def test_quantize_page_runs_a_sweep_and_keeps_it_across_reruns():
    at = app()
    at.session_state["formats"] = ["fp32", "int8", "int4"]
    at.session_state["tokens"] = 128
    at.switch_page("pages/quantize.py").run()
    no_errors(at)
    at.button(key="run_sweep").click().run()
    no_errors(at)
    table = at.dataframe[0].value
    assert list(table["label"]) == ["fp32", "int8 g64", "int4 g64"]
    assert table["cosine_mean"].iloc[0] == pytest.approx(1.0, abs=1e-6)
    assert table["cosine_mean"].iloc[2] < table["cosine_mean"].iloc[1]
    # A rerun (any widget change) redraws the finished sweep without recomputing it.
    at.selectbox(key="sweep_metric").select("retrieval_agreement").run()
    no_errors(at)
    assert list(at.dataframe[0].value["label"]) == ["fp32", "int8 g64", "int4 g64"]


def test_quantize_page_reports_bad_choices_in_one_line():
    at = app()
    at.session_state["formats"] = []
    at.switch_page("pages/quantize.py").run()
    assert not at.exception
    assert any("at least one format" in e.value for e in at.error)


def test_bad_model_name_is_an_error_not_a_traceback():
    at = AppTest.from_file("../app.py", default_timeout=60)
    at.session_state["model_choice"] = "Other: Hugging Face id or local directory"
    at.session_state["custom_model"] = "/no/such/model"
    at.run()
    assert not at.exception
    assert any("not a directory" in e.value for e in at.error)


def test_weights_page_draws_grid_and_error_table():
    at = app()
    at.session_state["formats"] = ["int8", "int4", "nf4", "fp16"]
    at.switch_page("pages/weights.py").run()
    no_errors(at)
    stats = at.dataframe[0].value
    assert list(stats["scheme"]) == ["int8 g64", "int4 g64", "nf4 g64"]
    assert stats["sqnr_db"].iloc[0] > stats["sqnr_db"].iloc[1]
    at.number_input(key="weight_row").set_value(5).run()
    no_errors(at)
