"""``python -m qlab runs ...`` and ``python -m qlab report``, driven through qlab.cli.main."""

import argparse
import json
import statistics
import time

import pytest

from qlab import cli
from qlab.analyses.sweep import ResultRow
from qlab.core.plan import SizeReport
from qlab.core.quant import QuantScheme
from qlab.store import RunMeta, Store


@pytest.fixture
def db(tmp_path, monkeypatch) -> Store:
    path = tmp_path / "runs.sqlite"
    monkeypatch.setenv("QLAB_DB", str(path))
    store = Store(path)
    for model, klds in (("smollm2-135m", (1e-3, 0.05)), ("minilm-l6", (2e-3, 0.07))):
        run_id = store.start_run(RunMeta("sweep", model, {"schemes": []}, environment={"qlab": "0.1.0"}))
        for fmt, kld in zip(("int8", "int4"), klds):
            store.add_result(run_id, ResultRow(model, QuantScheme(fmt, "group", 64), SizeReport(8, 6, 1, 1, 2),
                                               {"kld_mean": kld}, 0.1, 0.2, 64))
        store.finish_run(run_id)
    return store


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_show_and_json(db, capsys):
    code, out, _ = run(capsys, "runs", "list")
    assert code == 0 and out.count("finished") == 2 and "int8 g64, int4 g64" in out
    code, out, _ = run(capsys, "runs", "list", "--model", "smol", "--json")
    [listed] = json.loads(out)
    assert listed["model"] == "smollm2-135m" and listed["results"] == 2
    code, out, _ = run(capsys, "runs", "show", listed["id"][:6])
    assert code == 0 and "smollm2-135m" in out and "int4 g64" in out and "0.05" in out
    code, out, _ = run(capsys, "runs", "show", listed["id"], "--json")
    assert json.loads(out) == db.get(listed["id"]).to_dict()


def test_export_then_import_into_another_database(db, tmp_path, capsys):
    exported = tmp_path / "export.json"
    assert run(capsys, "runs", "export", "--json", str(exported))[0] == 0
    other = tmp_path / "other.sqlite"
    code, out, _ = run(capsys, "runs", "import", str(exported), "--db", str(other))
    assert code == 0 and "2 run(s)" in out
    assert Store(other).export()["runs"] == db.export()["runs"]
    code, out, _ = run(capsys, "runs", "import", str(db.path), "--db", str(tmp_path / "third.sqlite"), "--json")
    assert len(json.loads(out)["imported"][str(db.path)]) == 2


def test_export_csv_has_one_row_per_result(db, tmp_path, capsys):
    import pandas as pd

    path = tmp_path / "results.csv"
    assert run(capsys, "runs", "export", "--csv", str(path))[0] == 0
    frame = pd.read_csv(path)
    assert len(frame) == 4 and set(frame["run_model"]) == {"smollm2-135m", "minilm-l6"}
    assert sorted(frame["kld_mean"]) == [1e-3, 2e-3, 0.05, 0.07]


def test_report_writes_html(db, tmp_path, capsys):
    ids = [r["id"] for r in db.list_runs()]
    out_file = tmp_path / "report.html"
    code, out, _ = run(capsys, "report", "--run", ids[0][:5], "--run", ids[1], "--out", str(out_file))
    assert code == 0 and "2 run(s)" in out
    page = out_file.read_text()
    assert "Comparison" in page and page.count("Plotly.newPlot(") == 1 + 2  # overlaid KLD, each run's KLD


def test_delete(db, capsys):
    victim = db.list_runs()[0]["id"]
    code, out, _ = run(capsys, "runs", "delete", victim, "--json")
    assert code == 0 and json.loads(out) == {"deleted": [victim], "count": 1}
    assert [r["id"] for r in db.list_runs()] != [victim] and len(db.list_runs()) == 1


@pytest.mark.parametrize("argv, message", [
    (("runs", "show", "ffffff"), "no run 'ffffff'"),
    (("report", "--run", "nope1", "--out", "x.html"), "no run 'nope1'"),
    (("runs", "import", "/no/such/file.json"), "does not exist"),
    (("runs",), "required"),
])
def test_errors_are_one_line(db, capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and message in err and err.count("\n") == 1


@pytest.mark.slow
def test_export_scheme_loads_the_model_and_lists_every_linear(tmp_path, capsys, minilm, monkeypatch):
    from qlab.analyses.sweep import run_sweep
    from qlab.models.evaluate import EvalSpec
    from qlab.models.loading import quantizable_linears
    from qlab.store import store_rows, sweep_meta

    monkeypatch.setenv("QLAB_DB", str(tmp_path / "runs.sqlite"))
    schemes = [QuantScheme("int4", "group", 32)]
    list(store_rows(None, sweep_meta(minilm, schemes, EvalSpec(16)), run_sweep(minilm, schemes, EvalSpec(16))))
    [summary] = Store().list_runs()
    code, out, err = run(capsys, "runs", "export-scheme", summary["id"], "--label", "int4 g32")
    assert code == 0, err
    exported = json.loads(out)
    assert exported["model_sha256"] == Store().get(summary["id"]).meta.model_sha256
    assert list(exported["layers"]) == [name for name, _ in quantizable_linears(minilm.model)]
    assert all(QuantScheme.from_dict(s) == schemes[0] for s in exported["layers"].values())
    code, _, err = run(capsys, "runs", "export-scheme", summary["id"], "--label", "int3 g32")
    assert code == 2 and "'int4 g32'" in err


def test_memory_plans_are_stored_on_request_and_reported(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("QLAB_DB")
    argv = ["memory", "--model", "llama-3.1-8b", "--format", "int4", "--hardware", "rtx-4060-8gb,h100-sxm-80gb",
            "--json", str(tmp_path / "plan.json")]
    assert run(capsys, *argv)[0] == 0
    path = tmp_path / "runs.sqlite"
    assert not path.exists()  # neither --db nor QLAB_DB: nothing stored
    assert run(capsys, *argv, "--db", str(path))[0] == 0
    [summary] = Store(path).list_runs()
    stored = Store(path).get(summary["id"])
    assert (stored.kind, stored.model, stored.meta.hardware) == ("memory", "llama-3.1-8b", "rtx-4060-8gb")
    assert stored.meta.settings["context"] == 8192 and stored.meta.settings["format"] == "int4"
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert stored.records("memory")[0]["targets"] == plan["targets"]
    out_file = tmp_path / "report.html"
    assert run(capsys, "report", "--run", summary["id"], "--db", str(path), "--out", str(out_file))[0] == 0
    page = out_file.read_text()
    assert "Verdicts" in page and "rtx-4060-8gb" in page and page.count("Plotly.newPlot(") == 1


def test_bench_stores_each_backend_row_and_reports_it(tmp_path, capsys, monkeypatch):
    from qlab.models import loading as models
    from tests.tiny_models import tiny_llama

    loaded = tiny_llama(seed=2)
    monkeypatch.setattr(models, "load", lambda name: loaded)
    path = tmp_path / "bench.sqlite"
    code, out, err = run(capsys, "bench", "--model", "tiny", "--backends", "fp32,torch-dynamic-int8,bnb-nf4",
                         "--prompt-tokens", "16", "--new-tokens", "4", "--repetitions", "1",
                         "--accuracy-tokens", "64", "--no-bandwidth", "--quiet", "--db", str(path), "--json")
    assert code == 0, err
    printed = json.loads(out)
    store = Store(path)
    [summary] = store.list_runs()
    stored = store.get(summary["id"])
    assert stored.kind == "bench" and stored.status == "finished"
    assert summary["labels"] == "fp32, torch-dynamic-int8, bnb-nf4"
    # Each row was committed as it finished (before the next backend's ratios were known), so compare
    # the measured fields, not speedup_vs_fp32 of the first row.
    for kept, shown in zip(stored.records("bench"), printed, strict=True):
        assert kept["backend"] == shown["backend"] and kept.get("decode_tokens_per_s") == shown.get("decode_tokens_per_s")
    assert not stored.records("bench")[2]["available"]  # bnb needs CUDA: stored with its reason
    assert stored.meta.settings["backends"] == ["fp32", "torch-dynamic-int8", "bnb-nf4"]
    code, out, err = run(capsys, "report", "--run", summary["id"], "--db", str(path), "--out",
                         str(tmp_path / "bench.html"))
    assert code == 0, err
    page = (tmp_path / "bench.html").read_text()
    assert "Speed (measured)" in page and "torch-dynamic-int8" in page and page.count('class="plotly-graph-div"') == 1


def test_bench_sweep_result_is_stored_on_request_and_reported(tmp_path, monkeypatch):
    from qlab.cli.bench import store_bench_sweep

    monkeypatch.delenv("QLAB_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))

    row = ResultRow("minilm-l6", QuantScheme("int8", "group", 64), SizeReport(8, 6, 1, 1, 2),
                    {"cosine_mean": 0.999}, 0.1, 0.2, 64).to_record()
    result = {"benchmark": "sweep", "model": "minilm-l6", "formats": ["int8 g64"], "tokens": 64,
              "one_fp32_eval_s": 0.5, "sweep_s": 2.0, "sweep_over_eval": 4.0, "rows": [row]}
    result |= {"model_sha256": "ab" * 32, "text_name": "pydoc-topics", "text_sha256": "cd" * 32, "seed": 2**63 + 5,
               "qlab": "0.1.0", "torch": "2.13", "transformers": "4.99"}
    path = tmp_path / "sweep.sqlite"
    monkeypatch.setattr("qlab.models.loading.resolve", lambda *a, **k: pytest.fail("the model was resolved again"))
    store_bench_sweep(argparse.Namespace(db=None, model="minilm-l6", tokens=64), result)
    assert not (tmp_path / "data").exists()  # neither --db nor QLAB_DB: nothing stored
    run_id = store_bench_sweep(argparse.Namespace(db=str(path), model="minilm-l6", tokens=64), result)
    [stored] = Store(path).runs()
    assert stored.kind == "bench" and stored.records("sweep") == [row] and stored.meta.tokens == 64
    # The same run `runs import` of the JSON gives: nothing new on a second store or import of it.
    assert Store(path).import_payload(json.loads(json.dumps(result)), "bench.json") == [run_id] == [stored.id]
    assert len(Store(path).runs()) == 1
    # Provenance from the result itself, so comparisons and reuse see what was measured.
    assert (stored.meta.model_sha256, stored.meta.text_sha256, stored.meta.text_name, stored.meta.seed) == (
        "ab" * 32, "cd" * 32, "pydoc-topics", 2**63 + 5)
    assert stored.meta.environment == {"qlab": "0.1.0", "torch": "2.13", "transformers": "4.99"}
    scheme = QuantScheme("int8", "group", 64)
    assert [r.scheme for r in stored.results if r.kind == "sweep"] == [scheme.to_dict()]
    assert stored.schemes() == [scheme.to_dict()] and stored.meta.settings["benchmark"] == "sweep"
    assert Store(path).stored_schemes("minilm-l6", "ab" * 32, "cd" * 32, 64) == {scheme: row}
    from qlab.store import report

    summary = report.benchmark_summary(stored)
    assert summary["sweep_over_eval"].tolist() == [4.0] and "rows" not in summary
    assert "Sweep benchmark" in report.render_html([stored])


def test_bench_sweep_writes_its_result_even_when_the_database_then_fails(tmp_path, monkeypatch, capsys):
    """The benchmark's JSON comes out before it is stored: a corrupt --db costs the run record, not the result."""
    monkeypatch.delenv("QLAB_DB", raising=False)
    result = {"benchmark": "sweep", "model": "minilm-l6", "formats": ["int8 g64"], "tokens": 64,
              "one_fp32_eval_s": 0.5, "sweep_s": 2.0, "sweep_over_eval": 4.0, "rows": []}
    corrupt = tmp_path / "corrupt.sqlite"

    def benchmark(*args, **kwargs):  # the database is checked before the run; it breaks while the run goes on
        corrupt.write_bytes(b"this is not a database" * 100)
        return dict(result)

    monkeypatch.setattr("qlab.analyses.sweep_benchmark.bench_sweep", benchmark)
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "sweep", "--model", "minilm-l6", "--formats", "int8", "--tokens", "64",
                     "--db", str(corrupt), "--json", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "not a usable qlab run database" in err and err.count("\n") == 1
    assert json.loads(out.read_text()) == result
    corrupt.unlink()
    assert cli.main(["bench", "sweep", "--formats", "int8", "--db", str(corrupt)]) == 2  # stdout this time
    assert json.loads(capsys.readouterr().out) == result


@pytest.mark.slow
def test_bench_sweep_keeps_the_schemes_measured_before_one_fails(tmp_path, monkeypatch, minilm, capsys):
    """A scheme that fails late (out of memory, a kernel that breaks) costs that scheme, not the ones before it:
    the JSON holds them, marked incomplete, and imports as a stopped run."""
    from qlab.analyses import sweep_benchmark
    from qlab.core.errors import QlabError
    from qlab.store.transfer import runs_from_payload

    monkeypatch.delenv("QLAB_DB", raising=False)
    monkeypatch.setattr(sweep_benchmark, "load", lambda name: minilm)
    real_sweep = sweep_benchmark.run_sweep

    def breaks_at_the_second(*args, **kwargs):
        rows = real_sweep(*args, **kwargs)
        yield next(rows)
        raise QlabError("the GPU ran out of memory in the second scheme.")

    monkeypatch.setattr(sweep_benchmark, "run_sweep", breaks_at_the_second)
    warmed = []
    real_round = sweep_benchmark.dequantized_weights_unchecked
    monkeypatch.setattr(sweep_benchmark, "dequantized_weights_unchecked",
                        lambda layers, dtype: warmed.append(layers[0][1].label) or real_round(layers, dtype))
    out = tmp_path / "bench.json"
    code = cli.main(["bench", "sweep", "--model", "minilm-l6", "--formats", "int8,int4,nf4", "--granularity",
                     "group", "--tokens", "32", "--json", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "ran out of memory" in err and err.count("\n") == 1
    kept = json.loads(out.read_text())
    assert kept["complete"] is False and [r["label"] for r in kept["rows"]] == ["int8 g64"]
    assert kept["rows"][0]["cost_over_eval"] > 0
    # One evaluation is the median of the base model's evaluations, each kept; a scheme's cost is over it.
    assert len(kept["base_eval_s"]) == sweep_benchmark.BASE_EVALUATIONS
    assert kept["one_eval_s"] == sorted(kept["base_eval_s"])[len(kept["base_eval_s"]) // 2]
    row = kept["rows"][0]
    assert 0 < kept["copy_floor_s"] < row["seconds"]  # copying the weights is less than rounding and evaluating
    # Each scheme rounded a block's weights before the clock: the kernels' first call is the process's, not a
    # scheme's.
    # (a block's linears, then the pooler outside the blocks, which the sweep launches apart)
    assert warmed == [label for label in ("int8 g64", "int4 g64", "nf4 g64") for _ in range(2)]
    assert kept["kernel_warm_up_s"] >= 0
    assert row["cost_over_eval"] == pytest.approx(row["seconds"] / kept["one_eval_s"], rel=0.05, abs=0.01)
    [run] = runs_from_payload(kept, "bench.json")
    assert run["status"] == "stopped"
    assert [r["label"] for r in run["results"] if r["kind"] == "sweep"] == ["int8 g64"]


@pytest.mark.slow
def test_bench_sweep_repeats_put_each_scheme_between_two_base_evaluations(tmp_path, monkeypatch, minilm, capsys):
    """`--repeats N` measures each scheme N more times after the sweep, each time between two evaluations of the
    base model, and reports its cost over their mean per round, the median and the range; the run is stored."""
    from qlab.analyses import sweep_benchmark

    monkeypatch.delenv("QLAB_DB", raising=False)
    monkeypatch.setattr(sweep_benchmark, "load", lambda name: minilm)
    # The benchmark's clock advances only by what the work below says it took: base evaluations 1, 2, 3, ... s
    # (each its own, so that a ratio over the wrong neighbours shows), every scheme 10 s.
    clock, work = [0.0], []
    monkeypatch.setattr(sweep_benchmark, "time", type("Clock", (), {"perf_counter": lambda: clock[0]}))
    real_evaluate, real_measure = sweep_benchmark.evaluate, sweep_benchmark.measure_scheme

    def evaluate(*args, **kwargs):
        work.append("base")
        clock[0] += work.count("base")
        return real_evaluate(*args, **kwargs)

    def measure_scheme(loaded, scheme, *args, **kwargs):
        work.append(scheme.label)
        clock[0] += 10
        return real_measure(loaded, scheme, *args, **kwargs)

    monkeypatch.setattr(sweep_benchmark, "evaluate", evaluate)
    monkeypatch.setattr(sweep_benchmark, "measure_scheme", measure_scheme)
    out, db = tmp_path / "bench.json", tmp_path / "runs.db"
    assert cli.main(["bench", "sweep", "--model", "minilm-l6", "--formats", "int8,nf4", "--granularity", "group",
                     "--tokens", "32", "--repeats", "2", "--json", str(out), "--db", str(db)]) == 0
    result = json.loads(out.read_text())
    first = sweep_benchmark.BASE_EVALUATIONS
    assert work[first:] == ["base"] + ["int8 g64", "base", "nf4 g64", "base"] * 2
    assert result["complete"] and result["repeats"] == 2
    assert result["repeat_base_eval_s"] == [float(n) for n in range(first + 1, first + 6)]
    int8, nf4 = result["rows"]
    assert int8["repeated_s"] == nf4["repeated_s"] == [10.0, 10.0]
    # int8 sits between the 4th and 5th evaluations, then the 6th and 7th; nf4 between the 5th and 6th, ...
    assert int8["repeated_cost_over_eval"] == [round(20 / (4 + 5), 3), round(20 / (6 + 7), 3)]
    assert nf4["repeated_cost_over_eval"] == [round(20 / (5 + 6), 3), round(20 / (7 + 8), 3)]
    for row in (int8, nf4):
        ratios = row["repeated_cost_over_eval"]
        assert row["cost_over_eval_median"] == round(statistics.median(ratios), 3)
        assert row["cost_over_eval_range"] == [min(ratios), max(ratios)]
    assert result["max_scheme_cost_over_eval_median"] == int8["cost_over_eval_median"]
    [stored] = Store(db).runs()
    assert [r["label"] for r in stored.records("sweep")] == ["int8 g64", "nf4 g64"]
    assert stored.records("sweep")[0]["repeated_cost_over_eval"] == int8["repeated_cost_over_eval"]
    # Out of memory in a round: one line, and the file keeps the sweep and the rounds finished before it.
    calls = []

    def fails_in_the_second_round(loaded, scheme, *args, **kwargs):
        calls.append(scheme.label)
        if len(calls) > 2:  # the first round's two schemes (the sweep's own go through run_sweep)
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_measure(loaded, scheme, *args, **kwargs)

    monkeypatch.setattr(sweep_benchmark, "measure_scheme", fails_in_the_second_round)
    monkeypatch.setattr(sweep_benchmark, "evaluate", real_evaluate)
    monkeypatch.setattr(sweep_benchmark, "time", time)
    partial = tmp_path / "partial.json"
    assert cli.main(["bench", "sweep", "--model", "minilm-l6", "--formats", "int8,nf4", "--granularity", "group",
                     "--tokens", "32", "--repeats", "3", "--json", str(partial)]) == 2
    err = capsys.readouterr().err
    assert "ran out of memory measuring int8 g64 again in round 2 of 3" in err and err.count("\n") == 1
    kept = json.loads(partial.read_text())
    assert not kept["complete"] and [len(r["repeated_s"]) for r in kept["rows"]] == [1, 1]
    # Out of range: one line, before the model loads.
    monkeypatch.setattr(sweep_benchmark, "load", lambda name: pytest.fail("loaded before the refusal"))
    assert cli.main(["bench", "sweep", "--model", "minilm-l6", "--repeats", "51", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "repeats must be between 0 and 50" in err and err.count("\n") == 1
    assert json.loads(out.read_text()) == result  # the refused run wrote nothing over the last result


@pytest.mark.slow
def test_bench_sweep_run_carries_the_hashes_a_sweep_run_has(tmp_path, monkeypatch, minilm, capsys):
    """`bench sweep --db` stores the weights and text hashes of what it measured: its rows are reusable and a
    comparison with a plain sweep of the same model and text names no difference in text or weights."""
    from qlab.models.evaluate import EvalSpec
    from qlab.models.loading import model_sha256
    from qlab.store import report

    monkeypatch.delenv("QLAB_DB", raising=False)
    monkeypatch.setattr("qlab.analyses.sweep_benchmark.load", lambda name: minilm)
    path = tmp_path / "runs.sqlite"
    args = ["--model", "minilm-l6", "--formats", "int8", "--granularity", "group", "--tokens", "32", "--db", str(path)]
    assert cli.main(["bench", "sweep", *args, "--json", str(tmp_path / "bench.json")]) == 0
    assert cli.main(["sweep", *args, "--quiet", "--json", str(tmp_path / "sweep.json")]) == 0
    bench, sweep = sorted(Store(path).runs(), key=lambda r: r.kind)
    assert (bench.kind, sweep.kind) == ("bench", "sweep")
    assert bench.meta.text_sha256 == sweep.meta.text_sha256 == EvalSpec(tokens=32).text_sha256
    assert bench.meta.model_sha256 == sweep.meta.model_sha256 == model_sha256(minilm)
    assert not any("text" in c or "weights" in c for c in report.comparison_caveats([bench, sweep]))
    assert bench.schemes() == sweep.schemes()
