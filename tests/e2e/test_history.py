"""The History page in a real browser: a shared link opens two stored runs side by side."""

import os
from pathlib import Path

import pytest

from qlab.analyses.sweep import ResultRow
from qlab.core.plan import SizeReport
from qlab.core.quant import QuantScheme
from qlab.store import RunMeta, Store
from tests.e2e.conftest import REPO_ROOT, assert_no_exception, wait_for_app_idle

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif("pages/history.py" not in (REPO_ROOT / "app.py").read_text(),
                       reason="the History page is not in app.py's navigation yet"),
]


def stored_run(db: Store, klds: dict[str, float]) -> str:
    run_id = db.start_run(RunMeta("sweep", "smollm2-135m", {}, tokens=512, environment={"qlab": "e2e"}))
    for index, (fmt, kld) in enumerate(klds.items()):
        db.add_result(run_id, ResultRow("smollm2-135m", QuantScheme(fmt, "group", 64),
                                        SizeReport(800, 600 - 100 * index, 40, 100, 200),
                                        {"kld_mean": kld, "top1_agreement": 1 - kld}, 0.1, 0.2, 512))
    db.finish_run(run_id)
    return run_id


def test_a_shared_link_opens_a_comparison(streamlit_server, browser_page):
    # The server was started with the same QLAB_DB (tests/conftest.py), so it reads what we store here.
    db = Store(Path(os.environ["QLAB_DB"]))
    first, second = stored_run(db, {"int8": 2e-3, "int4": 0.06}), stored_run(db, {"int8": 1e-3, "int4": 0.05})
    page = browser_page
    page.goto(f"{streamlit_server}/history?runs={first},{second}")
    wait_for_app_idle(page, timeout_ms=120_000)
    assert_no_exception(page)
    page.get_by_text("2 runs side by side").wait_for(timeout=30_000)
    page.locator('[data-testid="stPlotlyChart"]').first.wait_for(timeout=30_000)
    # The report's button comes after the charts (the report is built first): waited for, not checked at once,
    # which raced on a fresh clone.
    page.get_by_role("button", name="HTML report").wait_for(state="visible", timeout=30_000)
    assert f"runs={first}%2C{second}" in page.url or f"runs={first},{second}" in page.url
