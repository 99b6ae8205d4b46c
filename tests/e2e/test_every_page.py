"""Every page in the navigation, in a real browser: open it, do its main action on the small bundled model,
wait for its result, and check that no exception box or error shows. Screenshots land in artifacts/."""

import time

import pytest

from tests.e2e.conftest import ARTIFACTS, assert_no_exception, wait_for_app_idle

pytestmark = pytest.mark.e2e
SMALL = "?model=minilm-l6&formats=fp32,int8,int4&tokens=128&gran=group&group=64"
CHART = '[data-testid="stPlotlyChart"]'


def heading(page, title: str):
    return page.locator('[data-testid="stMain"] h1', has_text=title)


def visit(page, title: str) -> float:
    started = time.monotonic()
    page.get_by_role("link", name=title, exact=True).click()
    heading(page, title).wait_for(timeout=120_000)
    wait_for_app_idle(page, timeout_ms=300_000)
    return time.monotonic() - started


def click_and_wait(page, label: str, timeout_ms: int = 600_000) -> None:
    page.get_by_role("button", name=label, exact=True).first.click()
    wait_for_app_idle(page, timeout_ms=timeout_ms)


def no_errors(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"page-{name}.png"), full_page=True)
    assert_no_exception(page)
    errors = page.locator('[data-testid="stAlertContentError"]')
    assert errors.count() == 0, [errors.nth(i).inner_text() for i in range(errors.count())]


def test_every_page_does_its_main_action(streamlit_server, browser_page):
    page = browser_page
    started = time.monotonic()
    page.goto(streamlit_server + SMALL)
    heading(page, "Model").wait_for(timeout=240_000)
    wait_for_app_idle(page, timeout_ms=240_000)
    print(f"first rendered page: {time.monotonic() - started:.1f} s")
    assert page.locator('[data-testid="stDataFrame"]').count() >= 1
    no_errors(page, "model")

    visit(page, "Quantize")
    click_and_wait(page, "Run sweep")
    page.locator(CHART).first.wait_for(timeout=60_000)
    no_errors(page, "quantize")

    visit(page, "Weights")
    page.locator(CHART).first.wait_for(timeout=60_000)
    no_errors(page, "weights")

    visit(page, "Sensitivity")
    click_and_wait(page, "Analyse")
    page.locator(CHART).first.wait_for(timeout=60_000)
    no_errors(page, "sensitivity")

    visit(page, "Memory")
    page.locator(CHART).first.wait_for(timeout=60_000)
    no_errors(page, "memory")

    visit(page, "Speed")
    click_and_wait(page, "Measure")
    page.locator(CHART).first.wait_for(timeout=60_000)
    no_errors(page, "speed")

    visit(page, "History")
    assert page.get_by_text("minilm-l6").count() >= 1  # the sweep above was stored
    no_errors(page, "history")

    visit(page, "Formats")
    page.locator(CHART).first.wait_for(timeout=60_000)
    no_errors(page, "formats")

    visit(page, "Concepts")
    page.locator(CHART).first.wait_for(timeout=60_000)
    no_errors(page, "concepts")

    switches = [visit(page, title) for title in ("Quantize", "Memory", "Weights")]
    print("page switches on cached results: " + ", ".join(f"{s:.2f} s" for s in switches))


def test_charts_fit_a_laptop_window(streamlit_server, browser_page):
    page = browser_page
    page.set_viewport_size({"width": 1280, "height": 720})
    page.goto(streamlit_server + SMALL)
    heading(page, "Model").wait_for(timeout=240_000)
    wait_for_app_idle(page, timeout_ms=240_000)
    visit(page, "Memory")
    chart = page.locator(CHART).first
    chart.wait_for(timeout=60_000)
    chart.scroll_into_view_if_needed()
    box = chart.bounding_box()
    assert box is not None and box["width"] > 300 and box["x"] >= 0 and box["x"] + box["width"] <= 1280
    assert chart.is_visible()
    no_errors(page, "laptop-memory")
