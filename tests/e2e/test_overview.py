"""The Overview in a real browser: a cold server's default URL lands on it, and for MiniLM the verdict and the
four panels appear without an exception box. The screenshot is the README's first picture."""

import pytest

from tests.e2e.conftest import ARTIFACTS, REPO_ROOT, assert_no_exception, wait_for_app_idle

pytestmark = pytest.mark.e2e
# Three formats at 128 tokens keep the cold answer (load, sweep, sensitivity, speed here) within a few minutes
# even when the 2-core machine is shared; the benchmark times the full four-format answer.
LINK = "/?model=minilm-l6&hw=h100-sxm-80gb&formats=fp16,int8,int4&tokens=128"
MAIN = '[data-testid="stMain"]'
CHART = '[data-testid="stPlotlyChart"]'
SCREENSHOT = REPO_ROOT / "assets" / "overview.png"


@pytest.mark.timeout(2400)
def test_default_url_lands_on_the_overview_and_minilm_gets_its_answer(streamlit_server, browser_page):
    page = browser_page
    # The server's root path (a shared link's view of MiniLM on an H100): the landing page is the Overview.
    page.goto(streamlit_server + LINK)
    page.locator(f"{MAIN} h1", has_text="Overview").wait_for(timeout=240_000)
    assert "which precision should you ship this model in" in page.locator(MAIN).inner_text()
    assert_no_exception(page)
    page.locator(f"{MAIN} h3", has_text="Ship ").wait_for(timeout=900_000)
    page.get_by_text("Computing what is not stored yet").wait_for(state="detached", timeout=1_200_000)
    wait_for_app_idle(page, timeout_ms=120_000)
    assert page.locator(CHART).count() == 5  # four panels and the most sensitive layer's histogram
    for title in ("Accuracy against size", "Memory per format on NVIDIA H100 SXM", "Speed per format",
                  "Most sensitive layers"):
        assert page.locator(CHART, has_text=title).count() == 1, title
    for link in ("Quantize page", "Memory page", "Speed page", "Sensitivity page"):
        assert page.get_by_role("link", name=link).count() >= 1, link
    assert_no_exception(page)
    # The page scrolls inside Streamlit's main block, so a tall window shows the verdict and all four panels.
    page.set_viewport_size({"width": 1280, "height": 2000})
    page.wait_for_timeout(1500)  # plotly redraws at the new width
    assert_no_exception(page)
    page.screenshot(path=str(SCREENSHOT))
    page.set_viewport_size({"width": 1280, "height": 720})
    page.locator(CHART).first.scroll_into_view_if_needed()
    page.wait_for_timeout(1500)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "overview-1280x720.png"))  # the panels at 1280x720, to check by eye
