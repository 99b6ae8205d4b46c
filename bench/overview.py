"""Overview benchmark: time to the full answer in a real browser, from a cold server and on a warm reopen.

    python bench/overview.py [--models minilm-l6,smollm2-135m] [--hardware h100-sxm-80gb] [--json OUT]

Per model, with an empty run database and a freshly started ``streamlit run app.py`` (Chromium, headless):
- ``cold_s``: from opening the Overview's shared link (model, target, formats fp16/int8/int4/nf4, 512 tokens) to
  the full answer: a verdict, no piece still being computed, and every panel drawn (four panels and the weight
  histogram). The model load, the baseline, the sweep, the quick sensitivity and the short speed measurement
  are all inside it.
- ``warm_reopen_s``: the same link opened again in a new tab of the same browser (a new Streamlit session of the
  same server; the results are stored, the model is loaded, the browser has the app's scripts cached as a user's
  browser does); ``warm_reopen_new_browser_s``: the same from a browser that never opened the app (it downloads
  and compiles the app's scripts and plotly first).
- ``restart_reopen_s``: the same link in a new tab after the server is restarted on the same database (results
  stored, the model loaded again).
The issue's goals: SmolLM2 <= 60 s and MiniLM <= 20 s cold, a warm reopen <= 3 s. CPU load is recorded beside
the times, because the machine is shared and wall time stretches with it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qlab.cli.common import emit  # noqa: E402
from tests.e2e.conftest import CHROMIUM, CHROMIUM_ARGS, VIEWPORT, run_server  # noqa: E402

FORMATS = "fp16,int8,int4,nf4"
TOKENS = 512
GOALS_S = {"minilm-l6": 20.0, "smollm2-135m": 60.0, "warm_reopen": 3.0}
CHARTS = 5  # four panels and the histogram of the most sensitive layer
TIMEOUT_S = 900.0

_STATE_JS = """() => {
  const main = document.querySelector('[data-testid="stMain"]');
  const text = main ? main.innerText : '';
  return {
    verdict: [...document.querySelectorAll('[data-testid="stMain"] h3')].some(
      h => h.innerText.startsWith('Ship ') || h.innerText.startsWith('No ')),
    measured: !text.includes('No accuracy measured yet'),
    computing: text.includes('Computing what is not stored yet'),
    charts: document.querySelectorAll('[data-testid="stPlotlyChart"]').length,
    exception: document.querySelectorAll('[data-testid="stException"]').length,
  };
}"""


def full_answer_s(context, url: str) -> tuple[float, dict]:
    """Seconds from opening ``url`` in a new tab of the browser ``context`` (a new Streamlit session) until the
    Overview shows its full answer."""
    page = context.new_page()
    started = time.perf_counter()
    page.goto(url)
    deadline = started + TIMEOUT_S
    state: dict = {}
    try:
        while time.perf_counter() < deadline:
            state = page.evaluate(_STATE_JS)
            if state["exception"]:
                raise RuntimeError(f"the Overview shows an exception: {page.inner_text('[data-testid=stException]')}")
            if state["verdict"] and state["measured"] and not state["computing"] and state["charts"] >= CHARTS:
                return time.perf_counter() - started, state
            page.wait_for_timeout(100)
        raise TimeoutError(f"no full answer within {TIMEOUT_S:.0f} s at {url} (last state: {state})")
    finally:
        page.close()


def bench_model(browser, model: str, hardware: str) -> dict:
    link = "/?" + urlencode({"model": model, "hw": hardware, "formats": FORMATS, "tokens": TOKENS}, safe=",")
    with tempfile.TemporaryDirectory(prefix="qlab-bench-overview-") as folder:
        env = {"QLAB_DB": str(Path(folder) / "runs.sqlite")}
        load_before = os.getloadavg()[0]
        user = browser.new_context(viewport=VIEWPORT)  # one user's browser: its cache survives a reopen
        with run_server(f"bench-overview-{model}.log", env) as base:
            cold_s, state = full_answer_s(user, base + link)
            warm_s, _ = full_answer_s(user, base + link)
            stranger = browser.new_context(viewport=VIEWPORT)
            fresh_browser_s, _ = full_answer_s(stranger, base + link)
            stranger.close()
        with run_server(f"bench-overview-{model}-restart.log", env) as base:
            restart_s, _ = full_answer_s(user, base + link)
        user.close()
        load_after = os.getloadavg()[0]
    goal = GOALS_S.get(model)
    return {"model": model, "hardware": hardware, "formats": FORMATS.split(","), "tokens": TOKENS,
            "cold_s": round(cold_s, 2), "warm_reopen_s": round(warm_s, 2),
            "warm_reopen_new_browser_s": round(fresh_browser_s, 2), "restart_reopen_s": round(restart_s, 2),
            "charts": state["charts"], "cold_goal_s": goal, "cold_goal_met": goal is None or cold_s <= goal,
            "warm_goal_met": warm_s <= GOALS_S["warm_reopen"],
            "load_average_before": round(load_before, 2), "load_average_after": round(load_after, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm-l6,smollm2-135m")
    parser.add_argument("--hardware", default="h100-sxm-80gb", help="target of the Overview (a catalog id)")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "overview_cpu.json"),
                        help="where to write the result ('-': stdout)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            rows = [bench_model(browser, model.strip(), args.hardware) for model in args.models.split(",")]
        finally:
            browser.close()
    emit({"benchmark": "overview", "machine": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "date": time.strftime("%Y-%m-%d"), "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
