"""The Formats and Concepts pages rendered by Streamlit's AppTest, every section, driven as a user would."""

import pytest
from streamlit.testing.v1 import AppTest

pytestmark = pytest.mark.slow


def page(name: str, model: str = "minilm-l6") -> AppTest:
    at = AppTest.from_file(f"../pages/{name}.py", default_timeout=300)
    at.session_state["model_choice"] = model
    at.session_state["tokens"] = 128
    return at


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_bits_section_shows_the_seed_weight_and_flags_overflow():
    at = page("formats")
    at.run()
    no_errors(at)
    layouts = at.dataframe[0].value.set_index("format")
    assert layouts.loc["fp16", "stored"] == 0.87646484375
    assert layouts.loc["int8", "code"] == 111 and layouts.loc["int4", "code"] == 6
    seed = at.dataframe[1].value
    assert list(seed["format"]) == ["fp32", "fp16", "int8", "int4"]
    at.number_input(key="fx_value").set_value(70000.0).run()
    no_errors(at)
    flags = at.dataframe[0].value.set_index("format")["flags"]
    assert "overflow" in flags["fp16"] and "saturated" in flags["fp8_e4m3"] and flags["bf16"] == ""


def test_affine_presets_give_the_seed_numbers_and_explain_the_clamp():
    at = page("formats")
    at.session_state["formats_section"] = "Affine mapping"
    at.run()
    no_errors(at)
    rows = at.dataframe[0].value
    assert list(rows["code"]) == [-128, 69, 35, -47]
    assert any("-128.9" in w.value and "clamped to -128" in w.value for w in at.warning)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["FP32"] == "16 bytes" and metrics["Codes"] == "4 bytes" and metrics["Stored"] == "8 bytes"
    at.button(key="fx_preset_absmax").click().run()
    no_errors(at)
    assert list(at.dataframe[0].value["code"]) == [-127, 68, 35, -46]
    assert not any("clamped" in w.value for w in at.warning)


def test_number_lines_granularity_hardware_and_claims_render():
    at = page("formats")
    for section in ("Number lines", "Granularity", "Hardware"):
        at.session_state["formats_section"] = section
        at.run()
        no_errors(at)
    at.session_state["formats_section"] = "Granularity"
    at.run()
    table = at.dataframe[0].value
    assert {"per-tensor", "per-channel", "GGUF Q4_0", "GGUF Q8_0"} <= set(table["variant"])
    per = table.set_index("variant")["relative_mse"]
    assert per["group 32"] < per["per-channel"] < per["per-tensor"]
    at.session_state["formats_section"] = "Claims"
    at.run()
    no_errors(at)
    at.button(key="fx_run_accuracy").click().run()
    no_errors(at)
    claims = at.dataframe[0].value
    assert claims["measured_loss"].str.contains("nearest neighbours").all()


def test_concepts_sections_render_and_qat_trains():
    at = page("concepts")
    at.run()
    no_errors(at)
    records = at.dataframe[0].value.set_index("calibration")
    assert records.loc["percentile", "inlier_relative_mse"] < records.loc["minmax", "inlier_relative_mse"]
    at.session_state["concepts_section"] = "Static vs dynamic"
    at.run()
    no_errors(at)
    at.session_state["concepts_section"] = "PTQ vs QAT"
    at.run()
    at.button(key="cx_run_qat").click().run()
    no_errors(at)
    table = at.dataframe[0].value.set_index("bits")
    assert table.loc[2, "qat_accuracy"] > table.loc[2, "ptq_accuracy"]
    at.session_state["concepts_section"] = "GPTQ vs RTN"
    at.run()
    no_errors(at)
    layer = at.dataframe[0].value
    held_out = layer.set_index(["scheme", "algorithm"])["output_error_held_out"]
    assert held_out[("int4 g64", "gptq")] < held_out[("int4 g64", "rtn")]
