import json
import subprocess
import sys

import pytest

from qlab.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlab", *args], capture_output=True, text=True, timeout=600)


def test_quantize_seed_example(capsys):
    assert main(["quantize", "--values=-2.45,1.32,0.67,-0.89", "--format", "int8", "--scale", "0.019", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["codes"] == [-128, 69, 35, -47]
    assert payload["zero_point"] == 0 and payload["format"] == "int8"
    assert payload["scale"] == pytest.approx(0.019)
    assert payload["dequantized"][1] == pytest.approx(69 * 0.019, rel=1e-6)
    assert main(["quantize", "--values=-2.45,1.32,0.67,-0.89", "--format", "int8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["codes"] == [-127, 68, 35, -46]


@pytest.mark.parametrize("args", [
    ["quantize", "--values=a,b"],
    ["quantize", "--values=1,2", "--format", "int99"],
    ["quantize", "--values=1,2", "--scale", "-1"],
    ["quantize", "--values=1,2", "--zero-point", "3"],
    ["quantize", "--values=1,2", "--format", "nf4", "--asymmetric"],
    ["quantize", "--values=1,nan"],
    ["sweep", "--model", "no-such-model"],
    ["sweep", "--formats", ""],
    ["sweep", "--tokens", "-3"],
    ["sweep", "--granularity", "row"],
    ["sweep", "--group-size", "0", "--granularity", "group"],
    ["sweep", "--group-size", "32", "--granularity", "channel"],
    ["quantize", "--values=1,2", "--group-size", "2", "--granularity", "tensor"],
    ["nonsense-command"],
    ["sweep", "--unknown-flag"],
])
def test_bad_arguments_exit_2_with_one_line(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("qlab: error: ") and err.count("\n") == 1, err


def test_a_group_size_given_alone_means_groups_of_that_size(capsys):
    values = ",".join(str(v) for v in [0.01, 0.02, -0.03, 0.04, 5.0, -6.0, 7.0, 8.0])
    assert main(["quantize", f"--values={values}", "--format", "int4", "--json"]) == 0
    per_tensor = json.loads(capsys.readouterr().out)
    assert main(["quantize", f"--values={values}", "--format", "int4", "--group-size", "4", "--json"]) == 0
    grouped = json.loads(capsys.readouterr().out)
    assert (per_tensor["scheme"], grouped["scheme"]) == ("int4 per-tensor", "int4 g4")
    # the small first group gets its own scale, so its values survive where one scale for all rounds them away
    assert grouped["dequantized"][:4] != per_tensor["dequantized"][:4]


def test_bad_arguments_from_a_real_process_have_no_traceback():
    result = run_cli("sweep", "--model", "nope/nope")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


def test_formats_and_models_json(capsys):
    assert main(["formats", "--json"]) == 0
    names = [row["format"] for row in json.loads(capsys.readouterr().out)]
    for needed in ("fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8", "int4", "int3", "int2", "nf4",
                   "fp4_e2m1"):
        assert needed in names
    assert main(["models", "--json"]) == 0
    assert {row["model"] for row in json.loads(capsys.readouterr().out)} == {"smollm2-135m", "minilm-l6"}


@pytest.mark.slow
def test_sweep_writes_rows_json(tmp_path):
    out = tmp_path / "rows.json"
    result = run_cli("sweep", "--model", "minilm-l6", "--formats", "fp32,int8,int4", "--tokens", "128",
                     "--json", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [r["format"] for r in rows] == ["fp32", "int8", "int4"]
    for row in rows:
        for key in ("bits_per_weight", "size_bytes", "cosine_mean", "retrieval_agreement", "seconds"):
            assert key in row
    assert rows[0]["cosine_mean"] > rows[2]["cosine_mean"]


@pytest.mark.slow
def test_lm_sweep_json_on_stdout():
    result = run_cli("sweep", "--model", "smollm2-135m", "--formats", "fp16,int4", "--tokens", "64",
                     "--granularity", "group", "--group-size", "64", "--json", "--quiet")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    for key in ("ppl", "kld_mean", "kld_p99", "top1_agreement"):
        assert key in rows[0]
    assert rows[0]["kld_mean"] < rows[1]["kld_mean"]
    assert rows[1]["bits_per_weight"] == pytest.approx(4.25)
