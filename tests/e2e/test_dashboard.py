"""The dashboard in a real browser: open it, run a sweep on the bundled LLM, see the chart, no exceptions."""

import time
from pathlib import Path

import pytest

from tests.e2e.conftest import assert_no_exception, run_server, wait_for_app_idle

pytestmark = pytest.mark.e2e
SCREENSHOT = Path(__file__).resolve().parents[2] / "assets" / "screenshot.png"


def main_heading(page, title: str):
    return page.locator('[data-testid="stMain"] h1', has_text=title)


def open_page(page, base_url: str, title: str) -> None:
    page.get_by_role("link", name=title).click()
    wait_for_app_idle(page, timeout_ms=180_000)
    main_heading(page, title).wait_for(timeout=60_000)
    assert_no_exception(page)


def test_sweep_in_the_browser_then_every_page(streamlit_server, browser_page):
    page = browser_page
    started = time.monotonic()
    page.goto(f"{streamlit_server}/model")
    # The first load of the bundled SmolLM2 converts its GGUF once (~20 s on 2 cores).
    wait_for_app_idle(page, timeout_ms=240_000)
    main_heading(page, "Model").wait_for()
    print(f"first render of the Model page: {time.monotonic() - started:.1f} s")
    assert_no_exception(page)
    assert page.get_by_text("Q4_1", exact=False).first.is_visible()

    open_page(page, streamlit_server, "Quantize")
    page.get_by_role("button", name="Run sweep").click()
    chart = page.locator('[data-testid="stPlotlyChart"]').first
    chart.wait_for(timeout=300_000)
    wait_for_app_idle(page, timeout_ms=300_000)
    assert_no_exception(page)
    assert page.locator('[data-testid="stDataFrame"]').count() >= 1
    assert page.get_by_role("button", name="Download CSV").is_visible()
    page.set_viewport_size({"width": 1400, "height": 1500})  # tall enough for the chart in the README shot
    wait_for_app_idle(page)
    page.screenshot(path=str(SCREENSHOT), full_page=False)

    switched = time.monotonic()
    open_page(page, streamlit_server, "Weights")
    page.locator('[data-testid="stPlotlyChart"]').first.wait_for(timeout=120_000)
    assert_no_exception(page)

    open_page(page, streamlit_server, "Quantize")
    page.locator('[data-testid="stPlotlyChart"]').first.wait_for(timeout=10_000)
    assert_no_exception(page)
    print(f"switching pages with cached results: {time.monotonic() - switched:.1f} s for two switches")
    assert page.get_by_text("Press Run sweep", exact=False).count() == 0  # the finished sweep survived


def test_memory_page_plans_a_catalog_model(streamlit_server, browser_page):
    page = browser_page
    page.goto(f"{streamlit_server}/model")
    wait_for_app_idle(page, timeout_ms=240_000)
    open_page(page, streamlit_server, "Memory")
    page.locator('[data-testid="stPlotlyChart"]').first.wait_for(timeout=60_000)
    assert_no_exception(page)
    assert page.locator('[data-testid="stAlert"]', has_text="Traceback").count() == 0


def test_a_shared_link_as_the_first_request_goes_through_the_navigation(browser_page):
    """A fresh server's first request used to run the page alone in Streamlit's pages/-directory mode."""
    page = browser_page
    with run_server("streamlit-deeplink.log") as base_url:
        page.goto(f"{base_url}/memory?formats=int8,int4&gran=channel")
        wait_for_app_idle(page, timeout_ms=120_000)
        main_heading(page, "Memory").wait_for(timeout=60_000)
        navigation = page.locator('[data-testid="stSidebarNav"]').inner_text()
        assert "Quantize" in navigation and "common" not in navigation, navigation
        assert_no_exception(page)
        assert "gran=channel" in page.url and "int4" in page.url
