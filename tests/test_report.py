"""HTML report and comparison tables, built from stored runs (no model is loaded)."""

import base64
import html
import json
import re

import numpy as np
import pandas as pd
import pytest

from qlab.analyses import memory
from qlab.analyses.sweep import ResultRow
from qlab.core.plan import SizeReport
from qlab.core.quant import QuantScheme
from qlab.store import RunMeta, Store, report

ENV = {"qlab": "0.1.0", "torch": "2.13.0", "transformers": "5.23.0", "python": "3.11.9"}


def lm_row(fmt: str, kld: float, size_bytes: int) -> ResultRow:
    scheme = QuantScheme(fmt, "group", 64) if fmt not in ("fp32", "fp16") else QuantScheme(fmt)
    return ResultRow("smollm2-135m", scheme, SizeReport(800, size_bytes - 200, 50, 100, 200),
                     {"ppl": 12 + kld, "kld_mean": kld, "kld_p99": 10 * kld, "top1_agreement": 1 - kld},
                     0.5, 1.5, 512)


def sweep_run(db: Store, klds: dict[str, float], model: str = "smollm2-135m", created: str | None = None) -> str:
    sizes = {"fp16": 270_000_000, "int8": 150_000_000, "int4": 90_000_000, "nf4": 90_000_000}
    rows = [lm_row(fmt, kld, sizes[fmt]) for fmt, kld in klds.items()]
    run_id = db.start_run(RunMeta("sweep", model, {"schemes": [r.scheme.to_dict() for r in rows]},
                                  model_sha256="5a" * 32, hardware="l4", text_sha256="7e" * 32,
                                  text_name="pydoc", tokens=512, seed=1234, environment=ENV))
    for row in rows:
        db.add_result(run_id, row)
    db.finish_run(run_id)
    return run_id


@pytest.fixture
def db(tmp_path) -> Store:
    return Store(tmp_path / "runs.sqlite")


def charts_in(page: str) -> int:
    return page.count("Plotly.newPlot(")


def test_single_run_report_is_self_contained_with_every_chart_and_setting(db):
    run = db.get(sweep_run(db, {"fp16": 1e-7, "int8": 1e-3, "int4": 0.05}))
    page = report.render_html([run])
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert charts_in(page) == 3  # KLD, top-1 agreement, perplexity
    assert len(re.findall(r"\* plotly\.js v\d", page)) == 1  # the library inline, once
    assert not re.search(r"<script[^>]+src=", page)  # nothing fetched when opened offline
    for expected in (run.id, "5a" * 32, "7e" * 32, "transformers", "5.23.0", "1234", "int4 g64", "l4"):
        assert expected in page
    # Each chart carries its points: the KLD chart's y values are the stored ones (fp16's on the log floor).
    first_plot = page[page.index("Plotly.newPlot("):]
    data = json.loads(first_plot[first_plot.index("["):first_plot.index("}],") + 2])
    assert sorted(y for trace in data for y in values(trace["y"])) == [1e-6, 1e-3, 0.05]


def values(array) -> list[float]:
    """A plotly trace array: a list, or plotly 6+'s base64-encoded typed array."""
    if isinstance(array, dict):
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return list(array)


def test_user_text_is_escaped(db):
    run = db.get(sweep_run(db, {"int8": 1e-3}, model="<script>alert('x')</script>"))
    page = report.render_html([run], title="<b>mine</b>")
    assert "<script>alert" not in page and "&lt;script&gt;alert" in page and "&lt;b&gt;mine" in page


def test_comparison_lines_up_schemes_and_computes_deltas(db):
    before = db.get(sweep_run(db, {"fp16": 1e-7, "int8": 2e-3, "int4": 0.06}))
    after = db.get(sweep_run(db, {"int8": 1e-3, "int4": 0.05, "nf4": 0.04}))
    table = report.comparison_table([before, after]).set_index("label")
    a, b = report.run_name(before), report.run_name(after)
    assert list(table.index) == ["fp16", "int8 g64", "int4 g64", "nf4 g64"]
    assert table.loc["int4 g64", f"Δ kld_mean [{b}]"] == pytest.approx(0.05 - 0.06)
    assert table.loc["int8 g64", f"Δ top1_agreement [{b}]"] == pytest.approx((1 - 1e-3) - (1 - 2e-3))
    assert pd.isna(table.loc["fp16", f"kld_mean [{b}]"]) and pd.isna(table.loc["nf4 g64", f"kld_mean [{a}]"])
    assert report.comparison_caveats([before, after]) == []  # same model, weights, text, budget, versions
    page = report.render_html([before, after])
    assert "Comparison" in page and f"Δ kld_mean [{b}]" in page and "The runs differ" not in page
    assert charts_in(page) == 3 + 3 + 3  # overlaid metrics, then each run's own charts
    assert len(re.findall(r"\* plotly\.js v\d", page)) == 1


def test_memory_plans_and_verdicts_are_reported(db):
    targets = ["rtx-4060-8gb", "h100-sxm-80gb"]
    plans = [memory.plan("llama-3.1-8b", QuantScheme(fmt, "group", 128), 8192, hardware_ids=targets)
             for fmt in ("int4", "int8")]
    plans.append(memory.plan("llama-3.1-8b", QuantScheme("fp16"), 8192, hardware_ids=targets))
    run_id = db.start_run(RunMeta("memory", "llama-3.1-8b", {}, hardware=targets[0], environment=ENV))
    for plan in plans:
        db.add_result(run_id, plan)
    run = db.get(run_id)
    verdicts = report.verdict_table(run)
    assert len(verdicts) == 6
    assert list(verdicts["fits"]) == [t.fits for plan in plans for t in plan.targets]
    fp16_small = verdicts[(verdicts["scheme"] == "fp16") & (verdicts["target"] == "rtx-4060-8gb")].iloc[0]
    assert not fp16_small["fits"]  # 16 GB of fp16 weights on an 8 GB card
    assert fp16_small["total_GB"] == pytest.approx(plans[2].targets[0].total_bytes / 1e9)
    assert verdicts[verdicts["target"] == "h100-sxm-80gb"]["fits"].all()
    page = report.render_html([run])
    assert "Memory plan" in page and "Verdicts" in page and charts_in(page) == 1


def test_other_result_kinds_are_tabulated(db):
    run_id = db.start_run(RunMeta("sensitivity", "smollm2-135m", {}, environment=ENV))
    db.add_result(run_id, {"label": "model.layers.0.mlp.down_proj", "kld_mean": 0.125, "formats": ["int4"]},
                  kind="sensitivity")
    page = report.render_html([db.get(run_id)])
    assert "sensitivity results" in page and "model.layers.0.mlp.down_proj" in page and "0.125" in page
    assert charts_in(page) == 0


def test_embedding_runs_chart_their_own_metrics(db):
    run_id = db.start_run(RunMeta("sweep", "minilm-l6", {}, environment=ENV))
    for fmt, cosine in (("int8", 0.999), ("int4", 0.95)):
        db.add_result(run_id, {"label": fmt, "format": fmt, "size_bytes": 1000 if fmt == "int8" else 600,
                               "bits_per_weight": 8.0, "cosine_mean": cosine, "retrieval_agreement": cosine},
                      kind="sweep")
    run = db.get(run_id)
    assert [m for m, _ in report.chart_metrics(pd.DataFrame(run.records()))] == ["cosine_mean",
                                                                                 "retrieval_agreement"]
    assert charts_in(report.render_html([run])) == 2


def test_comparing_unlike_runs_says_what_differs(db):
    ours = db.get(sweep_run(db, {"int8": 1e-3}))
    other_id = db.start_run(RunMeta("sweep", "minilm-l6", {}, tokens=256, environment={**ENV, "qlab": "0.2.0"}))
    caveats = report.comparison_caveats([ours, db.get(other_id)])
    assert [c.split(":")[0] for c in caveats] == [
        "The runs differ in model", "The runs differ in model weights (SHA-256)",
        "The runs differ in evaluation text (SHA-256)", "The runs differ in token budget",
        "The runs differ in qlab version"]
    assert "0.1.0, 0.2.0" in caveats[-1]


def test_sensitivity_and_recommendation_runs_are_reported_with_their_charts(db, tmp_path, monkeypatch):
    """A tiny Llama's recommendation stored by the CLI: ranked linears, units, measured plans and three
    sensitivity charts plus the mix Pareto chart, all from the store."""
    from qlab import cli
    from qlab.models import loading as models
    from qlab.models.evaluate import default_text
    from tests.tiny_models import tiny_llama

    loaded = tiny_llama(seed=8)
    monkeypatch.setattr(models, "load", lambda name: loaded)
    text = tmp_path / "text.txt"
    text.write_text(default_text()[:20_000])
    assert cli.main(["recommend", "--model", "tiny", "--tokens", "128", "--text-file", str(text), "--quiet",
                     "--group-size", "32", "--budget-bits", "6", "--db", str(db.path), "--json",
                     str(tmp_path / "mix.json")]) == 0
    run = db.get(db.list_runs()[0]["id"])
    frame, blocks, measure = report.sensitivity_frame(run)
    assert measure == "estimated_delta" and len(frame) == 2 * 21 and len(blocks) == 2 * 3
    ranked = report.sensitivity_table(frame, measure, top=5)
    assert len(ranked) == 5 and ranked[measure].is_monotonic_decreasing
    page = report.render_html([run])
    assert "Most sensitive linears" in page and "Measured plans" in page and "Recommendation: mix @ 6 bits" in page
    assert charts_in(page) == 4
    [(title, text)] = report.recommendation_summary(run)  # what History shows, the same words
    record = run.records("recommendation")[0]
    assert title == f"Recommendation: {record['label']}" and record["label"].startswith("mix @ 6 bits")
    assert f"<h3>{html.escape(title)}</h3><p>{html.escape(text)}</p>" in page
    assert text.startswith(f"{record['bits_per_weight']:.3f} bits/weight, {record['size_bytes'] / 1e6:.2f} MB; ")
    assert sum(int(part.split()[0]) for part in text.split("; ")[1].split(", ")) == len(record["assignment"])
    assert "summary results" not in page  # the closing record is not tabulated as a result kind


def bench_run(db: Store, speeds: dict[str, tuple[float, float, float]], model: str = "smollm2-135m") -> str:
    """A speed run: backend -> (decode tokens/s, prefill ms, KLD); plus a backend unavailable here."""
    run_id = db.start_run(RunMeta("bench", model, {"backends": list(speeds)}, environment=ENV))
    for backend, (tok_s, prefill_ms, kld) in speeds.items():
        db.add_result(run_id, {"backend": backend, "library": "torch", "kind": "causal-lm", "available": True,
                               "error": None, "decode_tokens_per_s": tok_s, "prefill_ms": prefill_ms,
                               "kld_mean": kld, "size_bytes": 100_000_000}, "bench")
    db.add_result(run_id, {"backend": "bnb-nf4", "available": False, "reason": "needs CUDA"}, "bench")
    db.finish_run(run_id)
    return run_id


def sensitivity_run(db: Store, deltas: dict[str, float]) -> str:
    """A sensitivity run without end-to-end units: linear -> predicted delta at int4 (int8 a hundredth of it)."""
    schemes = [QuantScheme("int8", "group", 64), QuantScheme("int4", "group", 64)]
    run_id = db.start_run(RunMeta("sensitivity", "smollm2-135m", {
        "schemes": [s.to_dict() for s in schemes], "model_kind": "causal-lm", "metric": "kld_mean",
        "eval_tokens": 128, "unit": "block", "view": "forward"}, tokens=128, environment=ENV))
    db.add_results(run_id, [{"layer": layer, "layer_type": layer.rsplit(".", 1)[-1][0], "block": 0,
                             "label": scheme.label, "bits_per_weight": 8.5 if scheme.format == "int8" else 4.5,
                             "predicted_delta": delta / (100 if scheme.format == "int8" else 1),
                             "relative_mse": delta, "params": 1000, "weight_relative_mse": delta}
                            for scheme in schemes for layer, delta in deltas.items()], "sensitivity_linear")
    db.finish_run(run_id)
    return run_id


def test_speed_runs_compare_side_by_side_by_backend(db):
    before = db.get(bench_run(db, {"fp32": (25.0, 90.0, 0.0), "quanto-int4": (20.0, 120.0, 0.006)}))
    after = db.get(bench_run(db, {"fp32": (30.0, 80.0, 0.0), "torchao-int8wo": (60.0, 70.0, 0.001)}))
    comparison = report.bench_comparison([before, after])
    a, b = report.run_name(before), report.run_name(after)
    table = comparison.table.set_index("backend")
    assert list(table.index) == ["fp32", "quanto-int4", "bnb-nf4", "torchao-int8wo"]
    assert table.loc["fp32", f"Δ decode_tokens_per_s [{b}]"] == pytest.approx(5.0)
    assert table.loc["fp32", f"Δ prefill_ms [{b}]"] == pytest.approx(-10.0)
    assert table.loc["fp32", f"kld_mean [{a}]"] == 0.0
    assert pd.isna(table.loc["quanto-int4", f"Δ decode_tokens_per_s [{b}]"])  # not measured in the second run
    assert table.loc["bnb-nf4"].isna().all()  # listed, unavailable in both
    assert [t for t, _ in comparison.figures] == ["Decode (tokens/s)", "Prefill (ms)",
                                                  "KL divergence to the base model (nats/token)"]
    bars = comparison.figures[0][1]
    assert {trace.name for trace in bars.data} == {a, b}  # one bar colour per run, overlaid by backend
    assert report.bench_comparison([before]) is None
    page = report.render_html([before, after])
    assert "Speed runs side by side" in page and f"Δ prefill_ms [{b}]" in page
    assert charts_in(page) == 3 + 2  # three overlaid, then each run's own accuracy-vs-speed chart


def test_sensitivity_runs_compare_per_linear(db):
    before = db.get(sensitivity_run(db, {"q_proj": 1e-3, "k_proj": 5e-4, "down_proj": 2e-2}))
    after = db.get(sensitivity_run(db, {"q_proj": 2e-3, "k_proj": 5e-4, "down_proj": 1e-2}))
    sweep = db.get(sweep_run(db, {"int8": 1e-3}))
    comparison = report.sensitivity_comparison([before, sweep, after])
    b = report.run_name(after)
    table = comparison.table.set_index(["layer", "label"])
    assert len(table) == 6 and list(table.index[:3]) == [("q_proj", "int8 g64"), ("k_proj", "int8 g64"),
                                                          ("down_proj", "int8 g64")]
    assert table.loc[("down_proj", "int4 g64"), f"Δ estimated_delta [{b}]"] == pytest.approx(1e-2 - 2e-2)
    assert table.loc[("q_proj", "int8 g64"), f"Δ estimated_delta [{b}]"] == pytest.approx(1e-5)
    assert table.loc[("k_proj", "int4 g64"), f"Δ estimated_delta [{b}]"] == 0.0
    [(title, figure)] = comparison.figures
    assert len(figure.data) == 4  # two runs x two schemes, overlaid
    assert [c.kind for c in report.comparisons([before, sweep, after])] == ["sensitivity"]  # one sweep: nothing
    page = report.render_html([before, after])
    assert "Sensitivity runs side by side: estimated_delta" in page and f"Δ estimated_delta [{b}]" in page


def test_each_run_is_read_into_frames_once_and_sweep_comparison_charts_only_where_drawn(db, monkeypatch):
    """A report (or a History rerun) builds each run's frames once; the sweep comparison's charts are drawn
    from its rows by the HTML report, never built for a page that draws its own."""
    sweeps = [db.get(sweep_run(db, {"int8": kld, "int4": 10 * kld})) for kld in (1e-3, 2e-3)]
    sensitive = [db.get(sensitivity_run(db, {"q_proj": d, "down_proj": 2 * d})) for d in (1e-3, 3e-3)]
    speed = [db.get(bench_run(db, {"fp32": (25.0, 90.0, 0.0)})) for _ in range(2)]
    runs = sweeps + sensitive + speed
    calls = {"stored_sensitivity": 0, "bench_frame": 0, "results_frame": 0}
    for name in calls:
        real = getattr(report, name)
        monkeypatch.setattr(report, name, lambda *a, _real=real, _name=name, **k: calls.__setitem__(
            _name, calls[_name] + 1) or _real(*a, **k))
    overlaid = []
    real_compare = report.charts.compare_runs
    monkeypatch.setattr(report.charts, "compare_runs", lambda *a, **k: overlaid.append(a[1]) or real_compare(*a, **k))

    found = report.comparisons(runs)
    assert [c.kind for c in found] == ["sweep", "bench", "sensitivity"]
    assert overlaid == [] and found[0].figures == () and set(found[0].rows["run_id"]) == {r.id for r in sweeps}
    assert calls == {"stored_sensitivity": len(runs), "bench_frame": len(runs), "results_frame": 1}

    calls.update(dict.fromkeys(calls, 0))
    page = report.render_html(runs)
    assert calls == {"stored_sensitivity": len(runs), "bench_frame": len(runs), "results_frame": 1}
    metrics = [m for m, _ in report.chart_metrics(found[0].rows)]
    assert overlaid == metrics and "kld_mean" in metrics  # the report draws the sweep comparison itself
    per_sweep = len(report.chart_metrics(pd.DataFrame(sweeps[0].records())))
    assert "Sweeps side by side" in page and charts_in(page) == (
        len(metrics) + len(found[1].figures) + len(found[2].figures)  # the three comparisons
        + 2 * per_sweep + 2 * 2 + 2 * 1)  # per sensitivity run: heatmap, by layer type; per bench run: speed
