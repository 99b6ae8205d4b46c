"""The Memory page runs headless (Streamlit AppTest) for a catalog model, an MLA/MoE model and a bad choice."""

from __future__ import annotations

from pathlib import Path

import pytest

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "memory.py")


@pytest.fixture()
def page():
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(PAGE, default_timeout=60)
    app.session_state["hardware"] = "h100-sxm-80gb"
    app.session_state["formats"] = ["fp16", "int8", "int4"]
    app.session_state["group_size"] = 128
    app.session_state["memory_source"] = "Catalog architecture"
    app.session_state["memory_arch"] = "llama-3.1-8b"
    return app


def _frame(page, column: str):
    """The first table on the page that has this column."""
    return next(d.value for d in page.dataframe if column in d.value.columns)


def test_default_plan_draws_every_section(page):
    page.run()
    assert not page.exception and not page.error
    assert page.subheader[0].value == "llama-3.1-8b on NVIDIA H100 SXM 80GB"
    components = _frame(page, "scheme")
    assert list(components["scheme"]) == ["fp16", "int8 g128", "int4 g128"]
    assert components["fits"].all()
    assert (components["prefill peak (GB)"] >= components["steady decode (GB)"]).all()
    assert len(_frame(page, "target")) >= 27  # every catalog target
    assert len(_frame(page, "claim")) == 4  # the quoted figures
    peak, steady = [d.value for d in page.dataframe if "formula" in d.value.columns]
    assert "KV cache" in set(peak["component"]) and peak["formula"].str.len().min() > 0
    assert peak["GB"].sum() == pytest.approx(components["prefill peak (GB)"].iloc[0])
    assert steady["GB"].sum() == pytest.approx(components["steady decode (GB)"].iloc[0])


def test_a_sliding_window_model_peaks_at_prefill_and_says_so(page):
    page.run()
    page.selectbox(key="memory_arch").set_value("mistral-7b").run()
    page.number_input(key="memory_context").set_value(32768).run()
    assert not page.exception and not page.error
    assert any("prefill peak, not the steady state" in info.value for info in page.info)
    table = _frame(page, "scheme")
    assert (table["prefill peak (GB)"] > table["steady decode (GB)"] + 3).all()  # 4.3 GB of cache vs 0.5


def test_runtimes_change_the_controls_and_the_plan(page):
    page.run()
    page.selectbox(key="memory_runtime").set_value("vllm").run()
    assert not page.exception and not page.error
    assert "fp8" in page.selectbox(key="memory_kv_dtype").options
    assert any("has not measured" in info.value for info in page.info)
    page.selectbox(key="memory_runtime").set_value("llama.cpp").run()
    assert not page.exception and not page.error
    assert page.selectbox(key="memory_kv_dtype").value == "fp16"  # a format llama.cpp stores
    assert list(_frame(page, "scheme")["scheme"]) == ["GGUF Q4_K_M", "GGUF Q8_0"]
    page.multiselect(key="memory_gguf").set_value([]).run()
    assert "ick at least one GGUF file type" in page.error[0].value


def test_deepseek_needs_several_gpus_and_says_why(page):
    page.run()
    page.selectbox(key="memory_arch").set_value("deepseek-v3").run()
    assert not page.exception and not page.error
    assert (_frame(page, "scheme")["GPUs needed"] >= 8).all()
    assert any("MLA" in info.value for info in page.info)


def test_a_group_size_that_does_not_divide_is_one_red_line(page):
    page.run()
    page.selectbox(key="memory_arch").set_value("smollm2-135m").run()
    assert not page.exception
    assert "does not divide input width(s) [576]" in page.error[0].value


@pytest.mark.slow
def test_the_page_starts_from_the_sidebars_model_and_says_so():
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(PAGE, default_timeout=120)
    app.session_state["model_choice"] = "minilm-l6"
    app.session_state["formats"] = ["fp16", "int8"]
    app.run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert app.subheader[0].value.startswith("minilm-l6 on ")
    assert any("Showing **minilm-l6**: the sidebar's model" in c.value for c in app.caption)
    # The catalog list then starts at the sidebar's model (the catalog has MiniLM's architecture too).
    app.radio(key="memory_source").set_value("Catalog architecture").run()
    assert not app.exception and not app.error
    assert app.selectbox(key="memory_arch").value == "minilm-l6"
    assert any("a catalog architecture, planned from its config alone" in c.value for c in app.caption)
