"""Every page in the navigation, in a real browser: open it, do its main action on the small bundled model,
wait for its result, and check that no exception box or error shows. Screenshots land in artifacts/."""

import time

import pytest

from tests.e2e.conftest import ARTIFACTS, assert_no_exception, wait_for_app_idle, wait_for_element

pytestmark = pytest.mark.e2e
SMALL = "?model=minilm-l6&formats=fp32,int8,int4&tokens=128&gran=group&group=64"
CHART = '[data-testid="stPlotlyChart"]'
TABLE = '[data-testid="stDataFrame"]'


def heading(title: str) -> str:
    return f'[data-testid="stMain"] h1:has-text("{title}")'


def visit(page, title: str) -> float:
    started = time.monotonic()
    page.get_by_role("link", name=title, exact=True).click()
    wait_for_element(page, heading(title), timeout_ms=120_000)
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
    page.goto(streamlit_server + "/model" + SMALL)  # (the Overview, the landing page, has its own test)
    wait_for_element(page, heading("Model"), timeout_ms=240_000)
    # The model's table, not idleness: the page can be idle for a moment before the model has loaded.
    wait_for_element(page, TABLE, timeout_ms=240_000)
    wait_for_app_idle(page, timeout_ms=240_000)
    print(f"first rendered page: {time.monotonic() - started:.1f} s")
    no_errors(page, "model")

    visit(page, "Quantize")
    click_and_wait(page, "Run sweep")
    wait_for_element(page, CHART, timeout_ms=60_000)
    no_errors(page, "quantize")

    visit(page, "Weights")
    wait_for_element(page, CHART, timeout_ms=60_000)
    no_errors(page, "weights")

    visit(page, "Sensitivity")
    click_and_wait(page, "Analyse")
    wait_for_element(page, CHART, timeout_ms=60_000)
    no_errors(page, "sensitivity")

    visit(page, "Memory")
    wait_for_element(page, CHART, timeout_ms=60_000)
    no_errors(page, "memory")

    visit(page, "Speed")
    click_and_wait(page, "Measure")
    wait_for_element(page, CHART, timeout_ms=60_000)
    no_errors(page, "speed")

    visit(page, "History")
    # the sweep above was stored (its row may sit in the table's hidden accessible copy: attached, not visible)
    page.get_by_text("minilm-l6").first.wait_for(state="attached", timeout=60_000)
    no_errors(page, "history")

    visit(page, "Formats")
    wait_for_element(page, CHART, timeout_ms=60_000)
    no_errors(page, "formats")

    visit(page, "Concepts")
    wait_for_element(page, CHART, timeout_ms=60_000)
    no_errors(page, "concepts")

    switches = [visit(page, title) for title in ("Quantize", "Memory", "Weights")]
    print("page switches on cached results: " + ", ".join(f"{s:.2f} s" for s in switches))


def test_charts_fit_a_laptop_window(streamlit_server, browser_page):
    page = browser_page
    page.set_viewport_size({"width": 1280, "height": 720})
    page.goto(streamlit_server + "/model" + SMALL)
    wait_for_element(page, heading("Model"), timeout_ms=240_000)
    wait_for_app_idle(page, timeout_ms=240_000)
    visit(page, "Memory")
    chart = page.locator(CHART).first
    chart.wait_for(timeout=60_000)
    chart.scroll_into_view_if_needed()
    box = chart.bounding_box()
    assert box is not None and box["width"] > 300 and box["x"] >= 0 and box["x"] + box["width"] <= 1280
    assert chart.is_visible()
    no_errors(page, "laptop-memory")
