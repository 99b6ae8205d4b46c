"""Pages that run something show their last stored result again in a fresh session (a browser reload) without
recomputing it, and say before any press what would go wrong: a text shorter than the budget, a group size that
does not divide the model's layers. Cancel says what it kept."""

import pytest
from streamlit.testing.v1 import AppTest

pytestmark = pytest.mark.slow


def page(name: str, **state) -> AppTest:
    at = AppTest.from_file(f"../pages/{name}.py", default_timeout=600)
    at.session_state["model_choice"] = "minilm-l6"
    at.session_state["tokens"] = 64
    for key, value in state.items():
        at.session_state[key] = value
    return at


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def refuse(*_args, **_kwargs):
    raise AssertionError("recomputed instead of read back from the run history")


@pytest.fixture(autouse=True)
def private_db(tmp_path, monkeypatch):
    monkeypatch.setenv("QLAB_DB", str(tmp_path / "runs.sqlite"))


def test_sensitivity_analysis_and_mixes_come_back_after_a_reload(minilm, monkeypatch):
    from qlab.analyses import mixed, sensitivity

    state = {"formats": ["int8", "int4"], "sensitivity_unit": "none"}
    at = page("sensitivity", **state)
    at.run()
    at.button(key="run_sensitivity").click().run()
    no_errors(at)
    table = at.dataframe[0].value
    at.button(key="run_mix").click().run()
    no_errors(at)
    mixes = at.dataframe[-1].value

    monkeypatch.setattr(sensitivity, "analyze", refuse)
    monkeypatch.setattr(mixed, "compare", refuse)
    monkeypatch.setattr(mixed, "evaluate", refuse)
    monkeypatch.setattr(mixed, "evaluate_streamed", refuse)
    again = page("sensitivity", **state)
    again.run()
    no_errors(again)
    assert again.dataframe[0].value.equals(table)
    assert any("Shown from the analysis stored" in c.value for c in again.caption)
    assert list(again.dataframe[-1].value["label"]) == list(mixes["label"])
    assert any(" bits/weight, " in m.value and "layers int" in m.value for m in again.markdown)  # the recommendation
    # Other settings are another analysis: nothing to show, nothing computed.
    other = page("sensitivity", **state | {"sensitivity_view": "reverse"})
    other.run()
    no_errors(other)
    assert not other.dataframe and any("Press **Analyse**" in i.value for i in other.info)


def test_speed_measurement_comes_back_after_a_reload(minilm, monkeypatch):
    from qlab.backends import speed

    state = {"speed_backends": ["fp32"], "speed_reps": 1}
    at = page("speed", **state)
    at.run()
    at.button(key="run_speed").click().run()
    no_errors(at)
    measured = next(df.value for df in at.dataframe if "sentences_per_s" in df.value.columns)

    monkeypatch.setattr(speed, "run_bench", refuse)
    again = page("speed", **state)
    again.run()
    no_errors(again)
    shown = next(df.value for df in again.dataframe if "sentences_per_s" in df.value.columns)
    assert list(shown["backend"]) == ["fp32"]
    assert shown["sentences_per_s"].iloc[0] == measured["sentences_per_s"].iloc[0]
    again.button(key="run_speed").click().run()  # everything chosen is measured already: nothing runs
    no_errors(again)
    assert any("already measured" in i.value for i in again.info)


def test_formats_accuracy_sweep_comes_back_after_a_reload(minilm, monkeypatch):
    from qlab.analyses import sweep

    state = {"formats_section": "Claims"}
    at = page("formats", **state)
    at.run()
    at.button(key="fx_run_accuracy").click().run()
    no_errors(at)
    measured = list(at.dataframe[0].value["measured_loss"])
    assert all("nearest neighbours" in text for text in measured)

    monkeypatch.setattr(sweep, "run_sweep", refuse)
    again = page("formats", **state)
    again.run()
    no_errors(again)
    assert list(again.dataframe[0].value["measured_loss"]) == measured


def whole_model_table(at):
    """The whole-model sweep's table: the section also shows the measured table of every rounding method."""
    return next(frame.value for frame in at.dataframe if "label" in frame.value)


def test_concepts_whole_model_gptq_comes_back_after_a_reload(minilm, monkeypatch):
    from qlab.analyses import sweep

    state = {"concepts_section": "GPTQ vs RTN"}
    at = page("concepts", **state)
    at.run()
    at.button(key="cx_run_gptq_model").click().run()
    no_errors(at)
    rows = whole_model_table(at)
    assert list(rows["label"]) == ["int4 g64", "int4 g64 gptq", "int3 g64", "int3 g64 gptq"]

    monkeypatch.setattr(sweep, "run_sweep", refuse)
    again = page("concepts", **state)
    again.run()
    no_errors(again)
    assert whole_model_table(again).equals(rows)
    assert again.get("plotly_chart")[-1].proto.spec == at.get("plotly_chart")[-1].proto.spec


def test_cancel_says_which_schemes_it_kept(minilm, monkeypatch):
    import streamlit as st

    from qlab.analyses import sweep

    real_sweep = sweep.run_sweep

    def one_then_stop(*args, **kwargs):
        for index, row in enumerate(real_sweep(*args, **kwargs)):
            if index == 1:  # the user presses Cancel while the second scheme runs: the script run stops like this
                st.stop()
            yield row

    monkeypatch.setattr(sweep, "run_sweep", one_then_stop)
    at = page("quantize", formats=["fp32", "int8", "int4"])
    at.run()
    at.button(key="run_sweep").click().run()
    no_errors(at)
    at.button(key="cancel_sweep").click().run()  # the rerun the Cancel press causes
    no_errors(at)
    assert any(i.value.startswith("Cancelled. Kept 1 finished scheme (fp32)") for i in at.info), \
        [i.value for i in at.info]
    assert list(at.dataframe[0].value["label"]) == ["fp32"]


def test_progress_names_the_step_that_runs():
    from pages.common import step_names

    shown = []
    named = step_names(lambda fraction, message: shown.append(message), ["fp32", "int8 g64", "int4 g64"])
    named(0.2, "fp32: window 1/2")
    named(1 / 3, "fp32: done")  # the sweep's own word once fp32 is done: int8 is what runs now
    named(0.5, "int8 g64: window 1/2")
    named(1.0, "int4 g64: done")
    assert shown == ["1 of 3: fp32: window 1/2", "2 of 3: int8 g64", "2 of 3: int8 g64: window 1/2",
                     "3 of 3: int4 g64"]


def test_a_short_text_and_a_group_size_that_does_not_fit_are_said_before_the_button():
    at = page("quantize", formats=["int4"], granularity="group", group_size=256, tokens=512)
    at.run()
    no_errors(at)
    # MiniLM's layers are 384 and 1536 wide: 256 is not offered, 128 is used instead, and the sidebar says so.
    slider = at.select_slider(key="group_size")
    assert list(map(int, slider.options)) == [32, 64, 128] and at.session_state["group_size"] == 128
    assert any("Group size 256 does not divide" in c.value for c in at.sidebar.caption)
    at.radio(key="text_source").set_value("Paste text").run()
    at.text_area(key="pasted_text").input("\n\n".join(f"Paragraph {i} says something short but real enough."
                                                      for i in range(12))).run()
    no_errors(at)
    assert any("fewer than the budget of 512" in w.value for w in at.warning), [w.value for w in at.warning]
