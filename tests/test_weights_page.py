"""The Weights page in Streamlit's AppTest with a rounding algorithm that needs calibration (standalone: it calls
common.page_setup() itself)."""

import pytest
from streamlit.testing.v1 import AppTest

from qlab.analyses.sensitivity import calibrate
from qlab.core.algorithms.gptq import gptq_quantize
from qlab.core.quant import QuantScheme, error_stats, quantize
from qlab.models.evaluate import EvalSpec

pytestmark = pytest.mark.slow


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_weights_page_shows_gptq_rounding_after_calibrating_the_layer(minilm):
    at = AppTest.from_file("../pages/weights.py", default_timeout=600)
    at.session_state["model_choice"] = "minilm-l6"
    at.session_state["formats"] = ["int8", "int4"]
    at.session_state["algorithm"] = "gptq"
    at.session_state["tokens"] = 128
    at.run()
    no_errors(at)
    assert not at.dataframe and any("gptq rounds a layer" in i.value for i in at.info)  # nothing before the click
    at.button(key="weights_calibrate").click().run()
    no_errors(at)
    table = at.dataframe[0].value.set_index("scheme")
    assert list(table.index) == ["int8 g64 gptq", "int4 g64 gptq"]
    assert any("rounded by the sidebar's algorithm, gptq" in c.value for c in at.caption)
    # The same numbers from the whole model's calibration, as the sweep collects it, and GPTQ on that layer.
    layer = at.session_state["layer"]
    scheme = QuantScheme("int4", "group", 64, algorithm="gptq")
    stats, _ = calibrate(minilm, [scheme], EvalSpec(128))
    weight = minilm.model.get_submodule(layer).weight.detach()
    expected = error_stats(weight, gptq_quantize(weight, stats[layer].hessian, scheme))
    assert table.loc["int4 g64 gptq", "relative_mse"] == pytest.approx(expected["relative_mse"], rel=1e-6)
    rtn = error_stats(weight, quantize(weight, QuantScheme("int4", "group", 64)))
    assert table.loc["int4 g64 gptq", "relative_mse"] != pytest.approx(rtn["relative_mse"], rel=1e-3)
    # Another row of the same layer needs no second click.
    at.number_input(key="weight_row").set_value(5).run()
    no_errors(at)
    assert list(at.dataframe[0].value["scheme"]) == ["int8 g64 gptq", "int4 g64 gptq"]
