"""The Speed page runs headless (Streamlit AppTest): backends listed with reasons, measured rows drawn with
roofline predictions, verdicts, common claims. Rows are injected, so no benchmark runs here."""

import json

import pandas as pd
import pytest

from qlab.backends import gpu_recipe, speed

PAGE = "../pages/speed.py"


def lm_row(backend: str, fmt: str, tok_s: float, kld: float, size: int) -> dict:
    return {"model": "smollm2-135m", "kind": "causal-lm", "backend": backend, "library": "torch", "format": fmt,
            "available": True, "error": None, "reason": None, "decode_tokens_per_s": tok_s, "prefill_ms": 100.0,
            "kld_mean": kld, "twin_kld_mean": kld, "agrees_with_twin": True, "size_bytes": size,
            "threads": 2, "twin": fmt}


@pytest.mark.slow
def test_speed_page_draws_measured_and_predicted_points_and_verdicts():
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(PAGE, default_timeout=120)
    spec = speed.SpeedSpec()
    rows = {"fp32": lm_row("fp32", "fp32", 25.0, 0.0, 540_000_000),
            "torch-dynamic-int8": lm_row("torch-dynamic-int8", "int8", 80.0, 0.95, 160_000_000),
            # quanto-int4 rather than llama.cpp: the page offers only installed backends, and `make run` has no llama.cpp.
            "quanto-int4": {**lm_row("quanto-int4", "int4", 95.0, 0.0055, 90_000_000),
                            "library": "optimum-quanto"},
            "bnb-nf4": {**lm_row("bnb-nf4", "nf4", 0, 0, 0), "available": False, "reason": "needs CUDA"}}
    app.session_state["speed_rows"] = {("smollm2-135m", spec, 512): rows}
    app.session_state["speed_backends"] = ["fp32", "torch-dynamic-int8", "quanto-int4"]
    app.session_state["hardware"] = "h100-sxm-80gb"
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    subheaders = [s.value for s in app.subheader]
    assert "Verdicts" in subheaders and "Common claims, next to measured ratios" in subheaders
    verdicts = next(df.value for df in app.dataframe if "question" in df.value.columns)
    answers = dict(zip(verdicts["question"], verdicts["backend"]))
    # Dynamic INT8 is fast but far outside a 0.01-nat bound; the int4 row is the fastest inside it.
    assert answers["fastest within the accuracy bound"] == "quanto-int4"
    claims = next(df.value for df in app.dataframe if "claim" in df.value.columns)
    assert list(claims["best measured here (vs FP32)"]) == [3.2, 3.8]
    roofline_table = next(df.value for df in app.dataframe if "verdict" in df.value.columns)
    assert set(roofline_table["hardware_id"]) == {"h100-sxm-80gb"}


@pytest.mark.slow
def test_speed_page_lists_unavailable_backends_for_an_embedding_model():
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(PAGE, default_timeout=120)
    app.session_state["model_choice"] = "minilm-l6"
    app.run()
    assert not app.exception, [e.value for e in app.exception]
    listing = app.dataframe[0].value
    assert "onnxruntime-int8" in set(listing["backend"])
    bnb = listing[listing["backend"] == "bnb-nf4"].iloc[0]
    assert not bnb["available here"] and "CUDA" in bnb["why not"]
    assert "llamacpp-q4_0" not in set(listing["backend"])  # a causal-LM-only backend


@pytest.mark.slow
def test_speed_page_stores_what_it_measures_and_saves_a_quantized_model(tmp_path, monkeypatch, minilm):
    from streamlit.testing.v1 import AppTest

    from qlab.backends import export
    from qlab.store import Store

    monkeypatch.setenv("QLAB_DB", str(tmp_path / "runs.sqlite"))
    app = AppTest.from_file(PAGE, default_timeout=300)
    app.session_state["model_choice"] = "minilm-l6"
    app.session_state["tokens"] = 64
    app.session_state["speed_backends"] = ["fp32"]
    app.session_state["speed_reps"] = 1
    app.run()
    app.button(key="run_speed").click().run()
    assert not app.exception, [e.value for e in app.exception]
    [run] = Store().runs()
    assert (run.kind, run.status, run.meta.tokens) == ("bench", "finished", 64)
    assert [r["backend"] for r in run.records("bench")] == ["fp32"] and run.records("bench")[0]["sentences_per_s"] > 0
    app.selectbox(key="export_backend").select("quanto-int8").run()
    app.text_input(key="export_dir").input("../outside").run()
    app.button(key="export_model").click().run()
    assert [e.value for e in app.error] and "not a folder name" in app.error[0].value  # no path from the browser
    app.text_input(key="export_dir").input("saved").run()
    app.button(key="export_model").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert any("model.safetensors" in s.value for s in app.success)
    assert export.read_scheme(tmp_path / "exports" / "saved")["backend"] == "quanto-int8"


@pytest.mark.slow
def test_speed_page_shows_each_stored_gpu_run_with_its_own_ratios():
    from streamlit.testing.v1 import AppTest

    runs, unreadable = speed.gpu_speed_runs()
    fused_run = next(run for run in runs if any(":fused-projections" in r["path"] for r in run["rows"]))
    rate = {(r["format_slug"], r["path"]): r["decode_tokens_per_s"] for r in fused_run["rows"]}
    app = AppTest.from_file(PAGE, default_timeout=120)
    app.session_state["model_choice"] = "minilm-l6"
    app.run()
    assert not app.exception and not unreadable
    assert app.selectbox(key="gpu_run").options == [run["label"] for run in runs]
    app.selectbox(key="gpu_run").select(fused_run["label"]).run()
    assert not app.exception, [e.value for e in app.exception]
    table = next(df.value for df in app.dataframe if "vs bf16 same path" in df.value.columns)
    assert len(table) == len(fused_run["rows"])
    path = "compiled-loop:fused-projections"
    fused_int4 = table[(table["format"] == gpu_recipe.FORMATS["int4wo"].label)
                       & (table["code path"] == gpu_recipe.PATH_LABEL[path])]
    assert fused_int4["vs bf16 same path"].item() == pytest.approx(rate["int4wo", path] / rate["bf16", path])
    caption = " ".join(c.value for c in app.caption)
    assert "four weight matmuls a block instead of seven" in caption and "weight objects kept" not in caption
    assert not set(table["format"]) & set(gpu_recipe.FORMATS)  # words, not the command line's names


def test_speed_page_sets_each_kernel_s_ceiling_beside_the_runs_of_its_gpu():
    from streamlit.testing.v1 import AppTest

    runs, _ = speed.gpu_speed_runs()
    ceilings, unreadable = speed.layer_ceilings()
    assert ceilings and not unreadable
    app = AppTest.from_file(PAGE, default_timeout=120)
    app.session_state["model_choice"] = "minilm-l6"
    app.run()
    beside = aligned_gaps = 0
    for run in runs:  # the user's own model (outside the catalog) and every stored run draw without an error
        app.selectbox(key="gpu_run").select(run["label"]).run()
        assert not app.exception, (run["label"], [e.value for e in app.exception])
        frames = [df for df in app.dataframe if "rest_ms" in df.value.columns]
        tables = [df.value for df in frames]
        for frame in frames:  # a number column with a gap ("–") becomes text, and still lines up on the right
            columns = json.loads(frame.proto.columns)
            gapped = [name for name in ("step_ms", "rest_ms") if frame.value[name].eq("–").any()]
            aligned_gaps += len(gapped)
            assert all(columns[name].get("alignment") == "right" for name in gapped)
        measured = [r for r in run["rows"] if r.get("decode_tokens_per_s")]
        layouts = {"fused" if r["path"].endswith(":fused-projections") else "separate"
                   for r in measured if r["path"].startswith("compiled-loop")}
        stored = speed.ceilings_of(ceilings, run["gpu"], measured[0]["model"])
        assert len(tables) == len(layouts & set(stored)), run["label"]  # one per layout both measured
        for table in tables:
            numbers = table[["step_ms", "matmul_ms", "rest_ms"]].apply(pd.to_numeric, errors="coerce")  # "–" empty
            measured = numbers.dropna()
            beside += len(measured)
            assert measured["rest_ms"].to_numpy() == pytest.approx(
                (measured["step_ms"] - measured["matmul_ms"]).to_numpy(), abs=0.011)  # shown to 0.01 ms
    assert beside >= 4  # the stored H100 runs measured bf16 and int4 (at least) in the ceiling's layout
    assert aligned_gaps  # gemlite's ceilings were measured without an end-to-end run beside them


@pytest.mark.slow
def test_speed_page_measures_the_model_on_the_chosen_gpu_and_keeps_it_over_a_reload(
        bf16_llama_dir, tmp_path, monkeypatch):
    """With a GPU chosen in the sidebar the page runs the GPU benchmark on the model's shapes (faked here: the real
    program is tests/test_gpu_bench.py's), shows each row as it arrives, stores them, and a reload shows them
    again without measuring; a benchmark that fails is one red line."""
    import types

    import torch
    from streamlit.testing.v1 import AppTest

    from pages import common
    from qlab import models
    from qlab.backends import gpu_bench
    from qlab.core.errors import QlabError
    from qlab.models import loading
    from qlab.store import Store

    monkeypatch.setenv("QLAB_DB", str(tmp_path / "runs.sqlite"))
    monkeypatch.setattr(loading, "gpu_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80e9))
    on_cpu = models.load(str(bf16_llama_dir))  # the model the page works on; the benchmark builds its own
    monkeypatch.setattr(common, "load_model", lambda name: on_cpu)
    calls = []

    # rows the real program wrote for a user's 1B model on a lent H100 (committed results), renamed to this model
    measured_rows = {row["format_slug"]: {**row, "model": bf16_llama_dir.name}
                     for row in json.loads((speed.RESULTS_DIR / "gpu_speed_own_model_h100.json").read_text())
                     ["runs"][1]["rows"] if row["path"] == "compiled-loop:fused-projections"}

    def fake_run(model, placement, formats, scratch, *, fuse_projections, on_row, progress):
        calls.append((model, placement, formats, fuse_projections))
        for done, fmt in enumerate(formats):
            progress(done / len(formats), "timing")
            on_row(measured_rows[fmt])
        return []

    monkeypatch.setattr(gpu_bench, "run_compiled", fake_run)

    def page():
        app = AppTest.from_file(PAGE, default_timeout=120)
        app.session_state["model_choice"] = common.OTHER_MODEL
        app.session_state["custom_model"] = str(bf16_llama_dir)
        app.session_state["device"] = "cuda:0"
        app.session_state["gpu_formats"] = ["bf16", "int4wo"]
        return app.run()

    app = page()
    assert not app.exception, [e.value for e in app.exception]
    assert app.multiselect(key="gpu_formats").value == ["bf16", "int4wo"]
    # Words, not the command line's slugs: every format offered has its own label.
    offered = app.multiselect(key="gpu_formats").options
    assert "INT4 weights, torchao (tinygemm)" in offered and len(set(offered)) == len(gpu_recipe.FORMATS)
    app.button(key="run_gpu_speed").click().run()
    assert not app.exception and not app.error, ([e.value for e in app.exception], [e.value for e in app.error])
    assert calls == [(str(bf16_llama_dir), "cuda:0", ["bf16", "int4wo"], True)]
    measured = app.selectbox(key="gpu_run").options[0]
    assert measured == "your model on GPU 0: NVIDIA H100 80GB HBM3 (80 GB), measured here"
    assert app.selectbox(key="gpu_run").value == measured
    table = next(df.value for df in app.dataframe if "vs bf16 same path" in df.value.columns)
    assert list(table["format"]) == [gpu_recipe.FORMATS["bf16"].label, gpu_recipe.FORMATS["int4wo"].label]
    rate = measured_rows["int4wo"]["decode_tokens_per_s"] / measured_rows["bf16"]["decode_tokens_per_s"]
    assert table["vs bf16 same path"].iloc[1] == pytest.approx(rate)
    [stored] = Store().runs()
    assert stored.kind == "bench" and stored.meta.settings["gpu_benchmark"] == {
        "formats": ["bf16", "int4wo"], "fuse_projections": True, "device": "cuda:0"}
    assert stored.records("bench") == [measured_rows["bf16"], measured_rows["int4wo"]]

    monkeypatch.setattr(gpu_bench, "run_compiled", lambda *a, **k: pytest.fail("a reload must not measure again"))
    reloaded = page()
    assert not reloaded.exception
    assert reloaded.selectbox(key="gpu_run").options[0] == measured  # from the run database

    def fails(*args, **kwargs):
        raise QlabError("the GPU benchmark stopped with exit status 1 after 0 of 2 formats.")

    monkeypatch.setattr(gpu_bench, "run_compiled", fails)
    reloaded.button(key="run_gpu_speed").click().run()
    assert not reloaded.exception
    assert [e.value for e in reloaded.error] == ["The GPU benchmark stopped with exit status 1 after 0 of 2 formats."]
