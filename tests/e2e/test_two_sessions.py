"""Two browser sessions sweep different formats on the one cached model at the same time (issue 9).

Each gets the numbers a sequential run of the CLI gets, and a third session's page still renders while both
sweeps run: long work in one session does not freeze the others.
"""

import json
import os
import subprocess
import sys

import pytest

from qlab.store import Store
from tests.e2e.conftest import REPO_ROOT, assert_no_exception, wait_for_app_idle

pytestmark = pytest.mark.e2e
VIEW = "/model?model=smollm2-135m&tokens=256&gran=group&group=64&formats="
FORMAT_SETS = ("fp32,int8,int4", "fp32,nf4,fp8_e4m3")
CHART = '[data-testid="stPlotlyChart"]'
METRICS = ("ppl", "kld_mean", "top1_agreement")


def heading(page, title: str):
    return page.locator('[data-testid="stMain"] h1', has_text=title)


def open_quantize(page, base_url: str, formats: str) -> None:
    page.goto(base_url + VIEW + formats)
    heading(page, "Model").wait_for(timeout=240_000)
    wait_for_app_idle(page, timeout_ms=240_000)
    page.get_by_role("link", name="Quantize", exact=True).click()
    heading(page, "Quantize").wait_for(timeout=120_000)
    wait_for_app_idle(page, timeout_ms=120_000)


RUNNING_JS = ("() => document.querySelector('[data-testid=\"stApp\"]')"
              ".getAttribute('data-test-script-state') === 'running'")


def running(page) -> bool:
    return page.evaluate(RUNNING_JS)


def sequential_rows(formats: str) -> dict[str, dict]:
    result = subprocess.run(
        [sys.executable, "-m", "qlab", "sweep", "--model", "smollm2-135m", "--formats", formats, "--tokens", "256",
         "--granularity", "group", "--group-size", "64", "--no-store", "--quiet", "--json"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return {row["format"]: row for row in json.loads(result.stdout)}


def test_two_sessions_sweep_at_once_and_a_third_stays_responsive(streamlit_server, browser_page, _chromium):
    sessions = [browser_page] + [_chromium.new_context(viewport={"width": 1400, "height": 1000}).new_page()
                                 for _ in range(2)]
    first, second, third = sessions
    try:
        for page, formats in zip((first, second), FORMAT_SETS, strict=True):
            open_quantize(page, streamlit_server, formats)
        third.goto(streamlit_server + VIEW + "fp32")
        heading(third, "Model").wait_for(timeout=240_000)
        wait_for_app_idle(third, timeout_ms=240_000)

        for page in (first, second):
            page.get_by_role("button", name="Run sweep", exact=True).click()
        for page in (first, second):
            page.wait_for_function(RUNNING_JS, timeout=30_000)
        third.get_by_role("link", name="Formats", exact=True).click()
        heading(third, "Formats").wait_for(timeout=60_000)
        third.locator(CHART).first.wait_for(timeout=60_000)
        assert running(first) or running(second), "both sweeps ended before the third page rendered"
        assert_no_exception(third)

        for page in (first, second):
            wait_for_app_idle(page, timeout_ms=600_000)
            page.locator(CHART).first.wait_for(timeout=60_000)
            assert_no_exception(page)
            assert page.locator('[data-testid="stAlertContentError"]').count() == 0
    finally:
        for page in sessions[1:]:
            page.context.close()

    store = Store(os.environ["QLAB_DB"])
    stored = [run for run in store.runs() if run.kind == "sweep" and run.model == "smollm2-135m"
              and run.meta.tokens == 256]
    by_formats = {",".join(record["format"] for record in run.records()): run for run in stored}
    for formats in FORMAT_SETS:
        assert formats in by_formats, f"no stored sweep of {formats}: {list(by_formats)}"
        alone = sequential_rows(formats)
        for record in by_formats[formats].records():
            expected = alone[record["format"]]
            for metric in METRICS:
                assert record[metric] == pytest.approx(expected[metric], rel=1e-5, abs=1e-7), \
                    (formats, record["format"], metric)
