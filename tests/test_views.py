"""Shareable views: dashboard choices to URL query parameters and back."""

from urllib.parse import parse_qsl, urlencode

import pytest

from qlab.views import params_to_view, view_to_params

FULL = {"model": "smollm2-135m", "hardware": "h100-sxm-80gb", "formats": ["fp16", "int8", "nf4"],
        "granularity": "group", "group_size": 64, "symmetric": False, "calibration": "mse", "tokens": 1024,
        "page": "quantize", "runs": ["abcd12345678", "ef0123456789"]}


def test_round_trip_through_a_real_url():
    params = view_to_params(FULL)
    url_query = urlencode(params)  # what the browser's address bar holds
    assert params_to_view(dict(parse_qsl(url_query))) == FULL
    assert params == {"model": "smollm2-135m", "hw": "h100-sxm-80gb", "formats": "fp16,int8,nf4", "gran": "group",
                      "group": "64", "sym": "0", "calib": "mse", "tokens": "1024", "page": "quantize",
                      "runs": "abcd12345678,ef0123456789"}


@pytest.mark.parametrize("model", ["minilm-l6", "HuggingFaceTB/SmolLM2-135M", "/data/models/my-model",
                                   "~/models/x", "./local"])
def test_model_ids_and_paths_survive(model):
    assert params_to_view(view_to_params({"model": model})) == {"model": model}


def test_unset_keys_are_left_out_and_partial_views_round_trip():
    assert view_to_params({"model": None, "formats": [], "tokens": 512}) == {"tokens": "512"}
    assert params_to_view({}) == {}
    assert params_to_view(view_to_params({"symmetric": True})) == {"symmetric": True}


def test_bad_values_are_dropped_not_raised():
    view = params_to_view({"model": "<script>alert(1)</script>", "hw": "x" * 500, "formats": "int4,bogus,INT8,int4",
                           "gran": "rows", "group": "-3", "sym": "maybe", "calib": "magic", "tokens": "10e9",
                           "runs": "zz,abcd1234,../etc", "unknown": "1"})
    assert view == {"formats": ["int4", "int8"], "runs": ["abcd1234"]}
    assert params_to_view({"formats": "bogus", "tokens": "999999", "group": "0"}) == {}


def test_repeated_parameters_take_the_last_value():
    assert params_to_view({"tokens": ["128", "256"], "formats": []}) == {"tokens": 256}
