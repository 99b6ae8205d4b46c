"""The HTML report opened from disk in a real browser, offline: every chart draws, no script error."""

import pytest

from qlab.analyses.sweep import ResultRow
from qlab.core.plan import SizeReport
from qlab.core.quant import QuantScheme
from qlab.store import RunMeta, Store, report

pytestmark = pytest.mark.e2e


def stored_run(db: Store, klds: dict[str, float]) -> str:
    run_id = db.start_run(RunMeta("sweep", "smollm2-135m", {}, environment={"qlab": "test"}))
    for index, (fmt, kld) in enumerate(klds.items()):
        scheme = QuantScheme(fmt, "group", 64)
        db.add_result(run_id, ResultRow("smollm2-135m", scheme, SizeReport(800, 600 - 100 * index, 40, 100, 200),
                                        {"kld_mean": kld, "top1_agreement": 1 - kld, "ppl": 12 + kld}, 0.1, 0.2, 512))
    return run_id


def test_report_draws_every_chart_offline(tmp_path, browser_page):
    db = Store(tmp_path / "runs.sqlite")
    runs = [db.get(stored_run(db, {"int8": 1e-3, "int4": 0.05})), db.get(stored_run(db, {"int8": 2e-3, "nf4": 0.04}))]
    path = tmp_path / "report.html"
    path.write_text(report.render_html(runs))
    expected = path.read_text().count("Plotly.newPlot(")
    assert expected == 9
    page = browser_page
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(path.as_uri())
    page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {expected}",
                           timeout=30_000)
    plots = page.locator(".js-plotly-plot")
    assert plots.count() == expected
    assert not errors
    assert all(url.startswith("file:") for url in requests), requests  # self-contained: nothing fetched
    # The scheme labels are drawn as point text on the first (comparison) chart.
    text = plots.first.locator("g.textpoint text").all_text_contents()
    assert {"int8 g64", "int4 g64", "nf4 g64"} <= set(text)
    assert page.locator("h2", has_text="Comparison").is_visible()
