"""``qlab explain ...`` through argparse, as the lead wires it into ``qlab.cli.build_parser``."""

import json

import pytest

from qlab.cli.common import Parser
from qlab.cli.explain import add_parser
from qlab.core.errors import QlabError


def run(argv: list[str], capsys) -> str:
    parser = Parser(prog="qlab")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_parser(sub)
    args = parser.parse_args(argv)
    args.func(args)
    return capsys.readouterr().out


def test_affine_reproduces_the_seed_example(capsys):
    payload = json.loads(run(["explain", "affine", "--values=-2.45,1.32,0.67,-0.89", "--scale", "0.019",
                              "--json"], capsys))
    assert [r["code"] for r in payload["rows"]] == [-128, 69, 35, -47]
    assert payload["rows"][0]["clamped"] and payload["storage"]["total_bytes"] == 8
    payload = json.loads(run(["explain", "affine", "--json"], capsys))
    assert [r["code"] for r in payload["rows"]] == [-127, 68, 35, -46]
    text = run(["explain", "affine"], capsys)
    assert "2.45 / 127" in text and "total_bytes 8" in text


def test_bits_numberline_calibration_and_qat(capsys):
    rows = json.loads(run(["explain", "bits", "70000", "--formats", "fp16,bf16", "--json"], capsys))
    assert rows[0]["stored"] == float("inf") and "overflow" in rows[0]["flags"] and rows[1]["stored"] == 70144.0
    assert "01111110" in run(["explain", "bits", "0.87654321"], capsys)
    lines = json.loads(run(["explain", "numberline", "--formats", "fp16,int4", "--low", "0", "--high", "1",
                            "--json"], capsys))
    assert [line["count"] for line in lines] == [15361, 8]
    records = json.loads(run(["explain", "calibration", "--outlier", "30", "--json"], capsys))
    assert [r["calibration"] for r in records] == ["minmax", "percentile", "mse"]
    results = json.loads(run(["explain", "qat", "--bits", "2", "--json"], capsys))
    assert results[0]["qat_accuracy"] > results[0]["ptq_accuracy"] and results[0]["history"]


def test_bad_arguments_are_one_line_errors(capsys):
    with pytest.raises(QlabError, match="int"):
        run(["explain", "qat", "--bits", "two"], capsys)
    with pytest.raises(QlabError, match="integer formats"):
        run(["explain", "affine", "--format", "nf4"], capsys)


@pytest.mark.slow
def test_model_views_on_minilm(capsys):
    payload = json.loads(run(["explain", "granularity", "--model", "minilm-l6", "--json"], capsys))
    assert payload["layer"] and {"per-tensor", "GGUF Q4_0"} <= {r["variant"] for r in payload["rows"]}
    payload = json.loads(run(["explain", "gptq-layer", "--model", "minilm-l6", "--formats", "int3",
                              "--tokens", "128", "--calibration-tokens", "512", "--json"], capsys))
    errors = {r["algorithm"]: r["output_error_calibration"] for r in payload["rows"]}
    assert errors["gptq"] < errors["rtn"]
    payload = json.loads(run(["explain", "activations", "--model", "minilm-l6", "--tokens", "64",
                              "--calibration-tokens", "256", "--json"], capsys))
    assert payload["layer"].endswith("output.dense") and len(payload["per_token"]) > 0
