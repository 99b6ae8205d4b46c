"""The per-layer ceiling benchmark (``bench/layer_ceiling.py``) on the dry run's tiny shapes, on the CPU: the
lead runs it on a lent GPU, so its bookkeeping must not fail there for a reason a CPU could have shown."""

import importlib
import json

import pytest

from tests.test_gpu_recipe import gpu_speed  # noqa: F401  (puts bench/ on the path, which the program imports from)

layer_ceiling = importlib.import_module("layer_ceiling")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("ceiling") / "ceiling.json"
    argv = ["--dry-run", "--device", "cpu", "--dtype", "fp32", "--eager", "--calls", "2", "--repetitions", "2",
            "--formats", "bf16,int8wo,no-such-format", "--json", str(out)]
    assert layer_ceiling.main(argv) == 0
    return json.loads(out.read_text())


def test_every_shape_of_a_block_and_the_head_is_timed(result):
    bf16, int8, _ = result["rows"]
    assert list(bf16["shapes"]) == ["wqkv", "w13", "wo", "w2", "output"]  # gpt-fast's layout: four a block
    hidden = 256  # the dry run's width
    assert bf16["shapes"]["w13"]["out_features"] == 2 * 4 * hidden and bf16["shapes"]["w2"]["in_features"] == 4 * hidden
    for row in (bf16, int8):
        shapes = row["shapes"]
        assert all(shape["us_per_call"] > 0 and shape["us_min"] <= shape["us_per_call"] <= shape["us_max"]
                   for shape in shapes.values())
        block_us = sum(shape["us_per_call"] for name, shape in shapes.items() if name != "output")
        assert row["step_matmul_ms"] == pytest.approx((row["layers"] * block_us + shapes["output"]["us_per_call"])
                                                      / 1000, rel=1e-3)


def test_bytes_read_are_each_format_s_own(result):
    bf16, int8, _ = result["rows"]
    for name, shape in bf16["shapes"].items():
        assert shape["weight_bytes"] == 4 * shape["out_features"] * shape["in_features"]  # the dry run is fp32
        # torchao int8 per channel: one byte a weight plus a few bytes of scale (and zero point) per output row
        codes = shape["out_features"] * shape["in_features"]
        assert codes < int8["shapes"][name]["weight_bytes"] <= codes + 8 * shape["out_features"]


def test_ratios_are_against_bf16_of_the_same_run(result):
    bf16, int8, _ = result["rows"]
    assert bf16["step_matmul_speedup_over_bf16"] == 1.0
    # the stored ratio is the stored times' ratio, rounded as stored (three decimals)
    assert int8["step_matmul_speedup_over_bf16"] == round(bf16["step_matmul_ms"] / int8["step_matmul_ms"], 3)
    assert int8["shapes"]["w2"]["speedup_over_bf16"] == round(
        bf16["shapes"]["w2"]["us_per_call"] / int8["shapes"]["w2"]["us_per_call"], 3)
    assert int8["kernel"].startswith("inductor") and int8["format"] == "int8"


def test_a_format_that_fails_keeps_the_others(result):
    failed = result["rows"][2]
    assert failed["format_slug"] == "no-such-format" and failed["error"] and "shapes" not in failed
