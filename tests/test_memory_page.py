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
