"""A dashboard run stores where its model ran, as a CLI run does, so History can re-run it on that device."""

import pytest
from streamlit.testing.v1 import AppTest

from qlab.core.quant import QuantScheme
from qlab.models.evaluate import EvalSpec, compute_baseline
from qlab.store import Store, bench_meta, run_meta, sensitivity_meta, sweep_meta

pytestmark = pytest.mark.slow


def test_quantize_page_sweep_stores_the_device_and_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv("QLAB_DB", str(tmp_path / "runs.sqlite"))
    at = AppTest.from_file("../app.py", default_timeout=300)
    at.session_state["model_choice"] = "minilm-l6"
    at.session_state["device"] = "cpu"
    at.session_state["formats"] = ["int8"]
    at.session_state["tokens"] = 64
    at.switch_page("pages/quantize.py").run()
    at.button(key="run_sweep").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    (run,) = Store().runs()
    assert run.kind == "sweep" and [r["label"] for r in run.records()] == ["int8 g64"]
    settings = run.meta.settings
    assert (settings["device"], settings["device_map"], settings["dtype"]) == ("cpu", None, "float32")


def test_every_run_meta_carries_the_model_placement(minilm):
    spec = EvalSpec(16)
    schemes = [QuantScheme("int8")]
    placement = {"device": minilm.device, "device_map": None, "dtype": "float32"}
    baseline = compute_baseline(minilm, spec)
    for meta in (run_meta("memory", minilm), sweep_meta(minilm, schemes, spec),
                 sensitivity_meta("sensitivity", minilm, schemes, spec, baseline, unit="block")):
        assert {k: meta.settings[k] for k in placement} == placement
    # A caller's own value wins: a speed run records the device it timed on, whatever the model's.
    assert sweep_meta(minilm, schemes, spec, device="cuda:1").settings["device"] == "cuda:1"
    from qlab.backends.speed import SpeedSpec

    assert bench_meta(minilm, SpeedSpec(), ["fp32"], None, "cpu").settings["dtype"] == "float32"
