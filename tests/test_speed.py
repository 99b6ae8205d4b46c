"""qlab.backends.speed: timing loops, memory and bandwidth probes, verdicts; the bench JSON fields. No timing asserts."""

import itertools
import json
import os
import time

import pytest
import torch

from qlab.backends import speed
from qlab.core.errors import Cancelled, QlabError
from tests.test_peak_rss import transient_allocation


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def test_spec_rejects_nonsense():
    with pytest.raises(QlabError, match="new_tokens"):
        speed.SpeedSpec(new_tokens=0)
    with pytest.raises(QlabError, match="batch"):
        speed.SpeedSpec(batch=True)


def test_timing_median_and_spread():
    t = speed.Timing.of([10.0, 30.0, 20.0])
    assert (t.median, t.low, t.high) == (20.0, 10.0, 30.0)
    assert t.spread_pct == pytest.approx(100.0)


def test_measure_lm_decodes_the_asked_tokens_for_each_sequence():
    model = tiny_llama()
    calls = []
    original = model.forward

    def counting(*args, **kwargs):
        calls.append(kwargs.get("past_key_values") is None)
        return original(*args, **kwargs)

    model.forward = counting
    spec = speed.SpeedSpec(prompt_tokens=8, new_tokens=5, batch=3, repetitions=2, warmup=1)
    result = speed.measure_lm(model, torch.randint(0, 64, (3, 8)), spec)
    # (warm-up + 2 repetitions) x (1 prefill + 5 decode steps), each prefill starting without a cache.
    assert len(calls) == 3 * 6 and calls.count(True) == 3
    record = result.to_record()
    assert record["batch"] == 3 and record["new_tokens"] == 5 and record["repetitions"] == 2
    assert record["decode_tokens_per_s_min"] <= record["decode_tokens_per_s"] <= record["decode_tokens_per_s_max"]
    assert record["prefill_ms"] > 0 and record["threads"] == torch.get_num_threads()
    assert record["sentences_per_s"] is None


def test_measure_lm_stops_when_cancelled():
    seen = []

    def cancel() -> bool:
        seen.append(1)
        return len(seen) > 3

    with pytest.raises(Cancelled):
        speed.measure_lm(tiny_llama(), torch.randint(0, 64, (1, 4)), speed.SpeedSpec(new_tokens=8), cancel=cancel)


class FakeClock:
    """A clock that only the fake model below moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class SlowEncoder(torch.nn.Module):
    """An encoder whose every call takes the next of ``latencies`` seconds on ``clock``."""

    def __init__(self, clock: FakeClock, latencies) -> None:
        super().__init__()
        self.clock, self.latencies, self.calls, self.last = clock, iter(latencies), 0, 0.0

    def forward(self, input_ids, attention_mask=None):
        self.last = next(self.latencies)
        self.clock.now += self.last
        self.calls += 1
        return input_ids


BATCH = {"input_ids": torch.ones(4, 8, dtype=torch.long)}


def test_a_capped_loop_stops_as_soon_as_its_fastest_runs_agree():
    clock = FakeClock()
    # One warm-up, then timed runs a busy neighbour slows now and then: the third 0.1 s run makes three that
    # agree, whatever ran between them.
    model = SlowEncoder(clock, [1.0, 0.5, 0.2, 0.1, 0.3, 0.1, 0.1, 0.1, 0.1])
    result = speed.measure_embedding(model, BATCH, speed.SpeedSpec(repetitions=3, warmup=1),
                                     until=speed.Until(deadline=100.0, spread_pct=10.0, clock=clock))
    assert model.calls == 7 and result.agreed is True and result.repetitions == 3
    assert result.sentences_per_s.median == pytest.approx(40.0)
    assert result.sentences_per_s.spread_pct == pytest.approx(0.0, abs=1e-9)
    assert result.to_record()["agreed"] is True
    fixed = speed.measure_embedding(SlowEncoder(clock, [1.0, 0.5, 0.2, 0.1]), BATCH, speed.SpeedSpec(repetitions=3))
    assert fixed.agreed is None and fixed.repetitions == 3 and "agreed" not in fixed.to_record()


def test_a_capped_loop_whose_runs_never_agree_stops_at_its_deadline_with_every_run():
    clock = FakeClock()
    model = SlowEncoder(clock, (0.05 * 1.08**k for k in itertools.count()))  # ever slower: no three agree
    result = speed.measure_embedding(model, BATCH, speed.SpeedSpec(repetitions=3, warmup=1),
                                     until=speed.Until(deadline=5.0, spread_pct=10.0, clock=clock))
    assert clock.now - model.last < 5.0 <= clock.now  # no run starts after the deadline
    assert result.agreed is False and result.repetitions == model.calls - 1  # every timed run counts
    assert result.sentences_per_s.spread_pct > 10.0


def test_a_loop_past_its_deadline_still_makes_its_repetitions():
    clock = FakeClock()
    clock.now = 10.0
    model = SlowEncoder(clock, itertools.cycle([0.1, 0.2]))
    result = speed.measure_embedding(model, BATCH, speed.SpeedSpec(repetitions=3, warmup=1),
                                     until=speed.Until(deadline=5.0, spread_pct=10.0, clock=clock))
    assert model.calls == 4 and result.repetitions == 3 and result.agreed is False


def test_a_time_cap_gives_each_loop_an_equal_share_of_what_is_left():
    clock = FakeClock()
    cap = speed.TimeCap(12.0, clock=clock)
    assert cap.share(3).deadline == pytest.approx(4.0)
    clock.now = 1.0  # the first loop agreed early: the other two share the rest
    assert cap.share(2).deadline == pytest.approx(1.0 + 11.0 / 2)
    clock.now = 20.0
    assert cap.share(1).deadline == 20.0  # past the cap: no time beyond the repetitions
    for bad in (0, -1.0, float("nan"), float("inf"), True, "30"):
        with pytest.raises(QlabError, match="time cap"):
            speed.TimeCap(bad)


def test_peak_memory_sees_a_transient_allocation():
    with speed.PeakMemory() as memory:
        transient_allocation()  # 256 MB, touched
    assert memory.peak_bytes > 150 * 2**20


def test_bandwidth_probe_reports_a_positive_rate():
    result = speed.measure_bandwidth(test_bytes=16 * 2**20, repetitions=3)
    record = result.to_record()
    assert record["bandwidth_test_bytes"] == 16 * 2**20
    assert 1e8 < record["bandwidth_bytes_per_s"] <= record["bandwidth_bytes_per_s_max"]


ROWS = [
    {"backend": "fp32", "format": "fp32", "decode_tokens_per_s": 20.0, "kld_mean": 0.0, "size_bytes": 500},
    {"backend": "a", "format": "int8", "decode_tokens_per_s": 60.0, "kld_mean": 0.9, "size_bytes": 150},
    {"backend": "b", "format": "int8", "decode_tokens_per_s": 10.0, "kld_mean": 0.003, "size_bytes": 150},
    {"backend": "c", "format": "int4", "decode_tokens_per_s": 90.0, "kld_mean": 0.008, "size_bytes": 100},
    {"backend": "d", "format": "int4", "decode_tokens_per_s": 80.0, "kld_mean": 0.05, "size_bytes": 100},
]


def test_pareto_front_drops_dominated_points():
    # d is beaten by c on every axis; a only by c (c is faster, more accurate and smaller); b is more accurate
    # than c, fp32 the most accurate.
    assert speed.pareto_front(ROWS) == [True, False, True, True, False]


def test_verdicts_pick_by_their_rules():
    answers = {v["question"]: v for v in speed.verdicts(ROWS, max_error=0.01, latency_budget_ms=20.0,
                                                         memory_bytes=120)}
    assert answers["fastest within the accuracy bound"]["backend"] == "c"
    assert answers["smallest that fits"]["backend"] == "c"
    # <= 20 ms/token means >= 50 tok/s: a, c, d; the most accurate of them is c.
    assert answers["best under the latency budget"]["backend"] == "c"
    strict = {v["question"]: v for v in speed.verdicts(ROWS, max_error=0.001)}
    assert strict["fastest within the accuracy bound"]["backend"] == "fp32"
    none = speed.verdicts(ROWS, max_error=-1.0)[0]
    assert none["backend"] is None and "no measured backend" in none["rule"]


def test_ratios_are_relative_to_the_fp32_row():
    rows = speed.add_ratios([{**r, "kind": "causal-lm", "available": True} for r in ROWS])
    assert [r["speedup_vs_fp32"] for r in rows] == [1.0, 3.0, 0.5, 4.5, 4.0]


@pytest.mark.slow
def test_bench_cli_writes_the_documented_fields(tmp_path):
    from qlab.cli import bench as cli_bench

    out = tmp_path / "bench.json"
    assert cli_bench.main(["--model", "minilm-l6", "--backends", "fp32,torch-dynamic-int8,bnb-nf4", "--json",
                           str(out), "--repetitions", "1", "--sentences", "4", "--accuracy-tokens", "64",
                           "--quiet"]) == 0
    rows = json.loads(out.read_text())
    assert [r["backend"] for r in rows] == ["fp32", "torch-dynamic-int8", "bnb-nf4"]
    for row in rows:
        assert set(speed.BENCH_FIELDS) <= set(row)
        assert row["bandwidth_bytes_per_s"] > 0 and row["cpu_flags"] is not None
    ran, skipped = rows[:2], rows[2]
    for row in ran:
        assert row["error"] is None and row["available"]
        assert row["sentences_per_s"] > 0 and row["prefill_ms"] > 0
        assert row["agrees_with_twin"] is True
    assert skipped["available"] is False and "CUDA" in skipped["reason"]
    assert ran[0]["speedup_vs_fp32"] == 1.0


def test_gpu_bench_without_a_gpu_is_one_line_error(capsys):
    from qlab.cli import bench as cli_bench

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert cli_bench.main(["--device", "cuda"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_keeps_its_sweep_subcommand_once_wired():
    from qlab.cli import build_parser

    parser = build_parser()
    try:
        speed_args = parser.parse_args(["bench", "--model", "minilm-l6", "--backends", "fp32"])
    except Exception:
        pytest.skip("qlab.cli does not wire qlab.cli.bench yet (see qlab/cli_bench.py's docstring)")
    assert speed_args.func.__name__ == "cmd_bench" and speed_args.backends == "fp32"
    sweep_args = parser.parse_args(["bench", "sweep", "--formats", "int8"])
    assert sweep_args.func.__name__ == "cmd_bench_sweep" and sweep_args.formats == "int8"


def test_roofline_predictions_follow_each_backend_twin_and_the_measured_bandwidth():
    from qlab.analyses import roofline
    from qlab.backends import get_backend
    from qlab.models import architectures, hardware
    from tests.tiny_models import tiny_llama as tiny_loaded

    loaded = tiny_loaded()
    spec = speed.SpeedSpec(prompt_tokens=16, new_tokens=8)
    target = hardware.get("cpu-x86-avx512-vnni")
    fp32, int8 = speed.roofline_predictions(loaded, [{"backend": "fp32"}, {"backend": "torch-dynamic-int8"}],
                                            target, spec, bandwidth_bytes_per_s=1e10)
    assert (fp32.weight_format, fp32.compute_dtype, int8.weight_format, int8.compute_dtype) == (
        "fp32", "fp32", "int8", "int8")
    for p in (fp32, int8):  # the measured bandwidth replaces the catalog's, at the spec's context
        assert p.bandwidth_bytes_per_s == 1e10 and p.context_tokens == 24 and p.prompt_tokens == 16
        assert p.decode_bound_tokens_per_s == pytest.approx(1e10 / (p.weight_bytes_read + p.kv_bytes_read))
    assert int8.weight_bytes_read < fp32.weight_bytes_read
    arch = architectures.from_config(loaded.model.config.to_dict(), slug=loaded.name)
    assert int8 == roofline.predict(arch, get_backend("torch-dynamic-int8").twin(loaded.model), target,
                                    compute_dtype="int8", context_tokens=24, prompt_tokens=16,
                                    bandwidth_bytes_per_s=1e10)


def test_gpu_roofline_bounds_each_measured_weight_only_format_on_the_gpu_it_ran_on():
    from qlab.models import hardware

    cpu = hardware.get("cpu-x86-avx2")
    assert speed.gpu_target("NVIDIA H100 80GB HBM3", cpu).id == "h100-sxm-80gb"
    assert speed.gpu_target("NVIDIA H100 PCIe", cpu).id == "h100-pcie-80gb"
    assert speed.gpu_target("NVIDIA H200", cpu).id == "h200-sxm-141gb"
    assert speed.gpu_target("NVIDIA A100-SXM4-80GB", cpu) is cpu
    row = {"model": "llama-3.1-8b", "prompt_tokens": 128, "new_tokens": 200}
    rows = [{**row, "format_slug": "int8wo"}, {**row, "format_slug": "bf16"}, {**row, "format_slug": "int8dq"},
            {**row, "format_slug": "bf16", "new_tokens": 48}]
    bounds = speed.gpu_roofline(rows, hardware.get("h100-sxm-80gb"))
    # In the recipe's order; int8dq quantizes activations too, so bytes alone do not bound it.
    assert [b["format_slug"] for b in bounds] == ["bf16", "int8wo"]
    # BF16 Llama-3.1-8B reads 15,009,849,344 weight bytes a step (tests/test_roofline.py) and a KV cache of
    # 2 x 32 layers x 8 heads x 128 x (128 + 200) tokens x 2 bytes, at the H100 SXM's 3.35 TB/s.
    kv = 2 * 32 * 8 * 128 * 328 * 2
    assert bounds[0]["decode_tokens_per_s"] == pytest.approx(3.35e12 / (15_009_849_344 + kv))
    assert bounds[1]["decode_tokens_per_s"] > 1.8 * bounds[0]["decode_tokens_per_s"]
    assert speed.gpu_roofline(rows, cpu) == [] and speed.gpu_roofline([], hardware.get("h100-sxm-80gb")) == []
    # a stored row without the context it ran at (an edited results file) gets no bound rather than an error
    assert speed.gpu_roofline([{**rows[0], "prompt_tokens": None}], hardware.get("h100-sxm-80gb")) == []


def test_gpu_roofline_of_a_model_outside_the_catalog_uses_the_bytes_its_rows_read():
    from qlab.models import hardware

    # qlab bench --device cuda --model DIR names the rows after the user's folder, which no catalog entry matches
    row = {"model": "my-llama-1b", "prompt_tokens": 128, "new_tokens": 200, "kv_cache_bytes": 10_747_904}
    rows = [{**row, "format_slug": "int4wo", "weight_bytes_per_token": 700_000_000},
            {**row, "format_slug": "bf16", "weight_bytes_per_token": 2_471_628_800},
            {**row, "format_slug": "bf16", "path": "hf-generate"}]  # eager generate stores no bytes
    bounds = speed.gpu_roofline(rows, hardware.get("h100-sxm-80gb"))
    assert [b["format_slug"] for b in bounds] == ["bf16", "int4wo"]
    assert bounds[0]["decode_tokens_per_s"] == pytest.approx(3.35e12 / (2_471_628_800 + 10_747_904))
    assert bounds[1]["decode_tokens_per_s"] == pytest.approx(3.35e12 / (700_000_000 + 10_747_904))


def test_layer_ceilings_are_read_and_set_beside_the_run_of_the_same_model_and_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "RESULTS_DIR", tmp_path)
    assert speed.layer_ceilings() == ([], [])
    rows = [{"format_slug": "bf16", "kernel": "inductor", "layout": "fused", "step_matmul_ms": 5.0,
             "step_read_gbps": 3000.0, "step_matmul_speedup_over_bf16": 1.0},
            {"format_slug": "int4wo", "kernel": "tinygemm", "layout": "fused", "step_matmul_ms": 2.5,
             "step_read_gbps": 1600.0, "step_matmul_speedup_over_bf16": 2.0},
            {"format_slug": "int8gl", "layout": "fused", "error": "gemlite is not installed"}]
    (tmp_path / "layer_ceiling_h100.json").write_text(json.dumps(
        {"gpu": "NVIDIA H100 80GB HBM3", "model_config": "llama-3.1-8b", "date": "2026-12-07", "rows": rows}))
    (tmp_path / "layer_ceiling_broken.json").write_text(json.dumps({"rows": rows}))  # no GPU named
    [ceiling], unreadable = speed.layer_ceilings()
    assert unreadable == ["layer_ceiling_broken.json (not valid)"]
    assert (ceiling["gpu"], ceiling["model"], ceiling["layout"], ceiling["date"]) == (
        "NVIDIA H100 80GB HBM3", "llama-3.1-8b", "fused", "2026-12-07")
    run = [{"model": "llama-3.1-8b", "format_slug": "bf16", "path": "compiled-loop:fused-projections",
            "decode_tokens_per_s": 160.0},
           {"model": "llama-3.1-8b", "format_slug": "int4wo", "path": "compiled-loop:fused-projections",
            "decode_tokens_per_s": 320.0},
           # the separate layout and another model are not what the ceiling measured
           {"model": "llama-3.1-8b", "format_slug": "int4wo", "path": "compiled-loop", "decode_tokens_per_s": 1.0},
           {"model": "my-llama-1b", "format_slug": "bf16", "path": "compiled-loop:fused-projections",
            "decode_tokens_per_s": 700.0}]
    bf16, int4 = speed.ceiling_beside_run(ceiling, run)  # the failed format has no ceiling to show
    assert bf16["step_ms"] == pytest.approx(6.25) and bf16["rest_ms"] == pytest.approx(1.25)
    assert int4["step_ms"] == pytest.approx(3.125) and int4["rest_ms"] == pytest.approx(0.625)
    assert int4["step_speedup"] == pytest.approx(2.0) and int4["matmul_speedup"] == 2.0
    assert int4["read_tbps"] == pytest.approx(1.6) and int4["kernel"] == "tinygemm"
    alone = speed.ceiling_beside_run(ceiling, run[2:])
    assert [row["step_ms"] for row in alone] == [None, None] and alone[1]["matmul_ms"] == 2.5


def test_repeated_ceilings_are_kept_apart_by_gpu_model_and_layout_with_their_spread(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "RESULTS_DIR", tmp_path)

    def run(gpu, layout, int4_ms, model="llama-3.1-8b"):
        return {"gpu": gpu, "model_config": model, "rows": [
            {"format_slug": "bf16", "layout": layout, "step_matmul_ms": 5.0},
            {"format_slug": "int4wo", "layout": layout, "step_matmul_ms": int4_ms}]}

    (tmp_path / "layer_ceiling_h100.json").write_text(json.dumps({"runs": [
        {**run("H100", "fused", 2.5), "label": "first"}, {**run("H100", "fused", 2.6), "label": "second"},
        run("H100", "separate", 3.0), run("H100", "fused", 9.0, model="qwen2.5-7b")]}))
    (tmp_path / "layer_ceiling_h200.json").write_text(json.dumps(run("H200", "fused", 2.2)))  # as the program writes
    ceilings, unreadable = speed.layer_ceilings()
    assert not unreadable and len(ceilings) == 5
    h100 = speed.ceilings_of(ceilings, "H100", "llama-3.1-8b")
    assert sorted(h100) == ["fused", "separate"]
    assert [c["label"] for c in h100["fused"]] == ["first", "second"]
    assert speed.ceiling_spread_pct(h100["fused"]) == {"bf16": 0.0, "int4wo": pytest.approx(4.0)}
    assert speed.ceiling_spread_pct(h100["separate"]) == {}  # measured once: no spread to show
    later = {"gpu": "H100", "model": "llama-3.1-8b", "layout": "fused", "date": "2026-12-08", "label": "int4 only",
             "rows": [{"format_slug": "int4wo", "step_matmul_ms": 2.4}, {"format_slug": "int4gl", "step_matmul_ms": 2.7},
                      {"format_slug": "bf16", "error": "out of memory"}]}
    merged = speed.latest_ceiling([*h100["fused"], later])
    # each format's latest measurement; a later failure does not hide an earlier measurement
    assert [(r["format_slug"], r["step_matmul_ms"]) for r in merged["rows"]] == [
        ("bf16", 5.0), ("int4wo", 2.4), ("int4gl", 2.7)]
    assert merged["date"] == "2026-12-08"
    assert [c["rows"][1]["step_matmul_ms"] for c in speed.ceilings_of(ceilings, "H200", "llama-3.1-8b")["fused"]] \
        == [2.2]
    assert speed.ceilings_of(ceilings, "H200", "qwen2.5-7b") == {}


def test_bench_results_reads_row_lists_and_row_objects_from_the_repository(tmp_path, monkeypatch):
    from pathlib import Path

    assert speed.RESULTS_DIR == Path(__file__).resolve().parents[1] / "bench" / "results"
    measured = speed.bench_results("memory_gpu")  # an object holding its rows, as committed
    assert measured and all("measured_peak_allocated_bytes" in r for r in measured)
    monkeypatch.setattr(speed, "RESULTS_DIR", tmp_path)
    (tmp_path / "listed.json").write_text(json.dumps([{"backend": "fp32"}]))
    (tmp_path / "held.json").write_text(json.dumps({"benchmark": "x", "rows": [{"format": "int8"}]}))
    assert speed.bench_results("listed") == [{"backend": "fp32"}]
    assert speed.bench_results("held") == [{"format": "int8"}]
    assert speed.bench_results("missing") == []


def test_gpu_speed_runs_keep_each_gpu_and_date_of_every_result_file(tmp_path, monkeypatch):
    monkeypatch.setattr(speed, "RESULTS_DIR", tmp_path)
    assert speed.gpu_speed_runs() == ([], [])
    h200 = {"gpu": "NVIDIA H200", "format_slug": "bf16", "path": "compiled-loop", "decode_tokens_per_s": 208.0}
    h100 = {**h200, "gpu": "NVIDIA H100 80GB HBM3", "decode_tokens_per_s": 175.0}
    failed = {"format_slug": "nf4", "path": "eager-loop", "error": "out of memory"}  # failed before naming a GPU
    (tmp_path / "gpu_speed.json").write_text(json.dumps({"runs": [
        {"date": "2026-12-04", "rows": [h200]}, {"date": "2026-11-24", "rows": [h100, failed]}]}))
    (tmp_path / "gpu_speed_layouts.json").write_text(json.dumps({"date": "2026-12-06", "runs": [
        {"rows": [h100]}, {"rows": [{**h100, "path": "compiled-loop:fused-projections"}]}]}))
    (tmp_path / "gpu_speed_repeated.json").write_text(json.dumps({"date": "2026-12-06", "runs": [
        {"label": "first run", "rows": [h200]}, {"label": "second run", "rows": [h200]}]}))
    mine = tmp_path / "gpu_speed_mine.json"
    mine.write_text(json.dumps([h200]))  # a list of rows, as the benchmark writes it: dated by the file
    os.utime(mine, (time.mktime((2026, 12, 4, 12, 0, 0, 0, 0, -1)),) * 2)
    (tmp_path / "gpu_speed_cut.json").write_text('{"runs": [')
    (tmp_path / "gpu_speed_rowless.json").write_text(json.dumps([{"gpu": "NVIDIA H200"}]))  # no format, no path
    runs, unreadable = speed.gpu_speed_runs()
    assert [run["label"] for run in runs] == [
        "NVIDIA H200, 2026-12-04 (gpu_speed)", "NVIDIA H100 80GB HBM3, 2026-11-24", "NVIDIA H100 80GB HBM3, 2026-12-06",
        "NVIDIA H200, 2026-12-04 (gpu_speed_mine)", "NVIDIA H200, 2026-12-06, first run",
        "NVIDIA H200, 2026-12-06, second run"]
    assert runs[1]["rows"] == [{**h100, "model": None, "prompt_tokens": None, "new_tokens": None},
                               {**failed, **dict.fromkeys(("model", "gpu", "decode_tokens_per_s", "prompt_tokens",
                                                           "new_tokens"))}]
    assert [row["path"] for row in runs[2]["rows"]] == ["compiled-loop", "compiled-loop:fused-projections"]
    assert unreadable == ["gpu_speed_cut.json (not valid)", "gpu_speed_rowless.json (not valid)"]
