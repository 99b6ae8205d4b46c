"""The Quantize page refuses, in one line before Run, a text too short to calibrate the chosen algorithm on."""

import pytest
from streamlit.testing.v1 import AppTest

from qlab.store import Store

pytestmark = pytest.mark.slow


def test_a_text_too_short_to_calibrate_on_is_one_error_and_no_run():
    stored = len(Store().list_runs())
    at = AppTest.from_file("../app.py", default_timeout=300)
    at.session_state["model_choice"] = "minilm-l6"
    at.switch_page("pages/model.py").run()
    at.session_state["formats"] = ["int4"]
    at.session_state["algorithm"] = "gptq"
    at.session_state["text_source"] = "Paste text"
    at.session_state["pasted_text"] = "A paragraph of a few words, far fewer tokens than MiniLM's widest layer has inputs."
    at.switch_page("pages/quantize.py").run()
    assert not at.exception, [e.value for e in at.exception]
    [error] = at.error
    assert "fewer than the 1536 inputs" in error.value and "rtn or hqq" in error.value
    assert "run_sweep" not in [button.key for button in at.button]
    at.session_state["algorithm"] = "hqq"  # an algorithm without calibration runs on the same text
    at.run()
    assert not at.error and "run_sweep" in [button.key for button in at.button]
    assert len(Store().list_runs()) == stored


def test_a_long_sweep_is_announced_with_its_estimate_before_run(monkeypatch):
    from qlab.analyses import overview

    monkeypatch.setattr(overview, "matmul_flops_per_s", lambda device="cpu", dtype=None: 268e9)  # a fixed machine: the estimate is stable
    at = AppTest.from_file("../app.py", default_timeout=300)
    at.session_state["model_choice"] = "smollm2-135m"
    at.switch_page("pages/model.py").run()
    at.session_state["formats"] = ["int4"]
    at.session_state["algorithm"] = "hqq"  # about 0.7 us a weight: over a minute for SmolLM2's 106 M
    at.switch_page("pages/quantize.py").run()
    assert not at.exception, [e.value for e in at.exception]
    [announced] = [c.value for c in at.caption if "takes about" in c.value]
    assert announced.startswith("Measuring 1 scheme takes about") and " s here" in announced
    seconds = int(announced.split("takes about ")[1].split(" s")[0])
    assert 60 < seconds < 120
    at.session_state["algorithm"] = "rtn"
    at.session_state["model_choice"] = "minilm-l6"
    at.switch_page("pages/model.py").run()
    at.switch_page("pages/quantize.py").run()
    assert not [c.value for c in at.caption if "takes about" in c.value]  # a few seconds: nothing to announce
