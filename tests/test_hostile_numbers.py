"""Numbers that overflow or underflow quietly (issue 17, family 7): ranges wider than float32's largest number,
grids whose ends pass it, scales a narrow scale dtype cannot hold, subnormal ranges, and number lines over
±1e39. Each is either computed correctly (checked against the values) or refused in one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from streamlit.testing.v1 import AppTest

from qlab.analyses import explain
from qlab.cli import main
from qlab.core.errors import QlabError
from qlab.core.quant import QuantScheme, quantize

FLT_MAX = torch.finfo(torch.float32).max


def step_of(qtensor) -> torch.Tensor:
    return qtensor.scale.to(torch.float64)


@pytest.mark.parametrize("values", [[2e38, -2e38, 1e38, -1e38], [3e38, -3e38, 0.0, 1.0], [3.3e38, -1e30, 5e37]],
                         ids=["issue example", "±3e38", "lopsided"])
@pytest.mark.parametrize("fmt", ["int8", "int4"])  # (int2/int3 over ±3e38: refused below, they cannot fit)
@pytest.mark.parametrize("scale_dtype", ["fp32", "bf16"])
def test_asymmetric_ranges_past_float32_are_computed_correctly(values, fmt, scale_dtype):
    x = torch.tensor(values)
    qtensor = quantize(x, QuantScheme(fmt, "tensor", symmetric=False, scale_dtype=scale_dtype))
    scale = qtensor.scale.item()
    assert math.isfinite(scale) and scale < FLT_MAX / 2
    restored = qtensor.dequantize().to(torch.float64)
    assert torch.isfinite(restored).all()
    # every value within a step (bf16 rounds the scale up by up to 2^-8 of itself) of where it was
    assert ((restored - x.to(torch.float64)).abs() <= step_of(qtensor) * 1.01).all(), (restored, x)


def test_the_issue_example_no_longer_dequantizes_1e38_to_zero(capsys):
    assert main(["quantize", "--values=2e38,-2e38,1e38,-1e38", "--asymmetric", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["scale"] < 2e36
    assert payload["dequantized"][2] == pytest.approx(1e38, rel=0.01)
    assert payload["dequantized"][3] == pytest.approx(-1e38, rel=0.01)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8_e4m3", "nf4"])
def test_mse_calibration_survives_an_overflowing_range(fmt):
    x = torch.tensor([2e38, -2e38, 1e38, -1e38] * 16)
    symmetric = fmt != "int8"
    qtensor = quantize(x, QuantScheme(fmt, "tensor", symmetric=symmetric, calibration="mse"))
    assert torch.isfinite(qtensor.dequantize()).all() and math.isfinite(qtensor.scale.item())


def test_one_overflowing_block_does_not_disturb_the_others():
    x = torch.tensor([[2e38, -2e38, 1e38, -1e38], [0.5, -0.25, 0.125, 0.0]])
    qtensor = quantize(x, QuantScheme("int8", "channel", symmetric=False))
    restored = qtensor.dequantize()
    assert torch.allclose(restored[1], x[1], atol=0.75 / 255)
    assert torch.allclose(restored[0], x[0], rtol=0.01)


CLI_REFUSALS = [
    ("int8 symmetric at float32's largest", ["quantize", "--values=3.4028234e38,-3.4028234e38"], "infinity"),
    ("int8 asymmetric at float32's largest", ["quantize", "--values=3.4028234e38,-3.4028234e38", "--asymmetric"],
     "infinity"),
    ("int4 asymmetric at float32's largest", ["quantize", "--values=3.4028234e38,-3.4028234e38", "--asymmetric",
                                              "--format", "int4"], "infinity"),
    ("a typed scale whose grid overflows", ["quantize", "--values=1,2", "--scale", "1e38"], "infinity"),
    ("a typed scale of 1e39", ["quantize", "--values=1,2", "--scale", "1e39"], "infinity"),
    ("a typed asymmetric scale whose grid overflows", ["quantize", "--values=1,2", "--asymmetric", "--scale",
                                                       "1e37", "--zero-point", "-128"], "infinity"),
    ("an fp16 scale that clips", ["quantize", "--values=1e7,-3", "--scale-dtype", "fp16"], "fp32"),
    ("an fp16 scale for an int4 range", ["quantize", "--values=1e6,-1e6", "--format", "int4", "--scale-dtype",
                                         "fp16"], "float16"),
    ("a value of 1e39 (infinite in float32)", ["quantize", "--values=1e39,1"], "infinite"),
    ("number line over ±1e39", ["explain", "numberline", "--low=-1e39", "--high=1e39"], "float32's largest"),
    ("number line from 0 to 1e39", ["explain", "numberline", "--low=0", "--high=1e39"], "float32's largest"),
    ("number line with absmax 1e39", ["explain", "numberline", "--absmax=1e39"], "float32 number"),
    ("number line with absmax nan", ["explain", "numberline", "--absmax=nan"], "float32 number"),
    ("bits with absmax 1e39", ["explain", "bits", "1", "--absmax=1e39"], "float32 number"),
    ("int2 asymmetric over ±3e38 (four levels cannot hold 0 and both ends)",
     ["quantize", "--values=3e38,-3e38", "--asymmetric", "--format", "int2"], "infinity"),
    ("int3 asymmetric over ±3e38", ["quantize", "--values=3e38,-3e38", "--asymmetric", "--format", "int3"],
     "infinity"),
    ("calibration with a 1e39 outlier", ["explain", "calibration", "--outlier=1e39"], "standard deviations"),
    ("calibration with a nan outlier", ["explain", "calibration", "--outlier=nan"], "standard deviations"),
    ("calibration with a -1e30 outlier", ["explain", "calibration", "--outlier=-1e30"], "standard deviations"),
    ("affine on values past float32", ["explain", "affine", "--values=1e39,1"], "infinite"),
    ("affine at float32's largest", ["explain", "affine", "--values=3.4028234e38,-3.4028234e38"], "infinity"),
]


@pytest.mark.parametrize("case, argv, needle", CLI_REFUSALS, ids=[c[0] for c in CLI_REFUSALS])
def test_numbers_that_cannot_be_computed_are_refused_in_one_line(case, argv, needle, capsys):
    assert main(argv) == 2, case
    captured = capsys.readouterr()
    assert captured.err.startswith("qlab: error: ") and captured.err.count("\n") == 1, captured.err
    assert needle.lower() in captured.err.lower() and "Traceback" not in captured.err
    assert captured.out == ""


@pytest.mark.parametrize("values", [[1e-45, 1e-46], [1e-45, -1e-45], [1e-40, 5e-41, 0.0, -1e-40], [3e-39, -1e-39]],
                         ids=["smallest subnormal", "± smallest subnormal", "subnormal range", "near 1/FLT_MAX"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_subnormal_ranges_keep_their_values(values, symmetric):
    """A scale under 1/FLT_MAX has an infinite reciprocal: values must not all round to the last code."""
    x = torch.tensor(values)
    qtensor = quantize(x, QuantScheme("int8", "tensor", symmetric=symmetric))
    restored = qtensor.dequantize().to(torch.float64)
    assert ((restored - x.to(torch.float64)).abs() <= step_of(qtensor) * 0.5 + 1e-45).all(), (restored, x)


def test_an_all_zero_tensor_still_gets_a_scale_of_one():
    qtensor = quantize(torch.zeros(8), QuantScheme("int8", "tensor", symmetric=False))
    assert qtensor.scale.item() == 1.0 and torch.equal(qtensor.dequantize(), torch.zeros(8))


def test_every_finite_fp32_value_and_no_infinity_is_counted():
    line = explain.number_line("fp32", -FLT_MAX, FLT_MAX)
    assert line.count == 2 * 255 * 2**23 - 1  # both signs, 255 finite exponents, one zero
    assert torch.isfinite(line.values).all()


def test_a_grid_step_past_float32_is_not_counted_as_a_value():
    line = explain.number_line("int8", -FLT_MAX, FLT_MAX, absmax=FLT_MAX)
    # -128 steps (and ±127 once the float32 scale rounds up) pass 3.4e38: infinities, not values
    assert 250 < line.count < 256 and torch.isfinite(line.values).all() and line.values.numel() == line.count


@pytest.mark.parametrize("low, high", [(-1e39, 1e39), (-1e39, 0.0), (0.0, 1e300)])
def test_rounding_errors_refuse_ranges_past_float32(low, high):
    with pytest.raises(QlabError, match="float32's largest"):
        explain.rounding_errors(("int8",), low, high)


@pytest.mark.slow
@pytest.mark.parametrize("state, needle", [
    ({"fx_line_low": -1e39, "fx_line_high": 1e39}, "float32's largest"),
    ({"fx_line_low": 0.0, "fx_line_high": 1e39}, "float32's largest"),
    ({"fx_line_absmax": 1e39}, "float32 number"),
], ids=["number line ±1e39", "number line 0..1e39", "absmax 1e39"])
def test_formats_page_number_lines_refuse_ranges_past_float32(state, needle):
    at = AppTest.from_file("../pages/formats.py", default_timeout=120)
    at.session_state["formats_section"] = "Number lines"
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1 and needle in at.error[0].value and "\n" not in at.error[0].value.strip()


@pytest.mark.slow
@pytest.mark.parametrize("manual", [False, True], ids=["calibrated", "the typed scale 0.019"])
def test_formats_page_affine_mapping_of_the_issue_example_is_finite(manual):
    at = AppTest.from_file("../pages/formats.py", default_timeout=120)
    at.session_state["formats_section"] = "Affine mapping"
    at.session_state["fx_affine_values"] = "2e38, -2e38, 1e38, -1e38"
    at.session_state["fx_affine_symmetric"] = False
    at.session_state["fx_affine_manual"] = manual
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = next(d.value for d in at.dataframe if any("dequant" in str(c).lower() for c in d.value.columns))
    column = next(c for c in table.columns if "dequant" in str(c).lower())
    assert all(math.isfinite(v) and v != 0 for v in table[column])


def test_affine_walk_through_of_values_far_past_a_typed_scale_shows_them_clamped(capsys):
    assert main(["explain", "affine", "--values=1e37,-2.45", "--scale", "0.01", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    first = payload["rows"][0]
    assert first["clamped"] and first["code"] == 127 and first["rounded"] > 1e38
    assert first["dequantized"] == pytest.approx(1.27)
