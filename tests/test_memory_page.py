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


def test_default_plan_draws_every_section(page):
    page.run()
    assert not page.exception and not page.error
    assert page.subheader[0].value == "llama-3.1-8b on NVIDIA H100 SXM 80GB"
    components = page.dataframe[0].value
    assert list(components["scheme"]) == ["fp16", "int8 g128", "int4 g128"]
    assert components["fits"].all()
    assert len(page.dataframe[1].value) >= 27  # every catalog target
    assert len(page.dataframe[2].value) == 4  # the seed facts


def test_deepseek_needs_several_gpus_and_says_why(page):
    page.run()
    page.selectbox(key="memory_arch").set_value("deepseek-v3").run()
    assert not page.exception and not page.error
    assert (page.dataframe[0].value["GPUs needed"] >= 8).all()
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
