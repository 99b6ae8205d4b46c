"""The rounding-methods benchmark program (``bench/rounding_methods.py``) on a tiny tied Llama: each row is saved
as it finishes, later calls merge into the rows already saved, and bad settings are refused before any work."""

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import TINY_LLAMA

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _module("rounding_methods")


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory):
    """A two-block Llama whose head is tied to its embedding, as SmolLM2's and Llama-3.2-1B's are (the sweep
    calibrates the decoder only, so an untied head is refused by GPTQ)."""
    root = tmp_path_factory.mktemp("tied-llama")
    (root / "config.json").write_text(json.dumps({**TINY_LLAMA, "tie_word_embeddings": True}))
    _module("random_checkpoint").build(str(root / "config.json"), root / "model")
    return str(root / "model")


def rows(path: Path) -> dict[str, dict]:
    [model] = json.loads(path.read_text())["models"]
    return {row["label"]: row for row in model["rows"]}


@pytest.mark.slow  # loads the model and computes its baseline in each call
def test_rows_are_saved_one_by_one_and_later_calls_keep_them(bench, tied_llama, tmp_path, monkeypatch, capsys):
    out = tmp_path / "rounding.json"
    common = ["--models", tied_llama, "--formats", "int4", "--tokens", "32", "--json", str(out)]
    # A run stopped in its second scheme keeps its first.
    import qlab.core.algorithms as algorithms

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(algorithms, "hqq_quantize", stopped)
        with pytest.raises(KeyboardInterrupt):
            bench.main([*common, "--algorithms", "rtn,hqq"])
    first = rows(out)
    assert list(first) == ["int4 g64 asym"]
    assert "int4 g64 asym" in capsys.readouterr().out  # a progress line per finished row
    rtn = first["int4 g64 asym"]
    assert rtn["rounding_seconds"] == rtn["quantize_seconds"] > 0 and rtn["kld_mean"] >= 0

    assert bench.main([*common, "--algorithms", "hqq"]) == 0
    second = rows(out)
    assert list(second) == ["int4 g64 asym", "int4 g64 asym hqq"]  # methods in the table's order
    assert second["int4 g64 asym"] == rtn
    model = json.loads(out.read_text())["models"][0]
    assert model["base_weights_unchanged"] is True and model["group_size"] == 64

    # Calibrated: the one calibration pass is kept apart from the method's rounding time.
    assert bench.main([*common, "--algorithms", "gptq,rtn"]) == 0
    third = rows(out)
    assert list(third) == ["int4 g64 asym", "int4 g64 asym gptq", "int4 g64 asym hqq"]
    gptq = third["int4 g64 asym gptq"]
    assert gptq["rounding_seconds"] == pytest.approx(gptq["quantize_seconds"] - gptq["calibration_seconds"], abs=2e-3)
    assert json.loads(out.read_text())["models"][0]["calibration_seconds"] == gptq["calibration_seconds"]

    # Other settings would mix rows that do not compare: refused, the file untouched.
    before = out.read_text()
    assert bench.main([*common[:-4], "--tokens", "48", "--json", str(out), "--algorithms", "rtn"]) == 2
    assert "eval_tokens 32 (now 48)" in capsys.readouterr().err and out.read_text() == before
    assert bench.main([*common, "--replace", "--algorithms", "hqq"]) == 0
    assert list(rows(out)) == ["int4 g64 asym hqq"]


@pytest.mark.slow  # builds and loads the model
def test_a_text_too_short_to_calibrate_is_refused_before_any_work(bench, tied_llama, tmp_path, monkeypatch, capsys):
    from qlab.analyses import activations

    monkeypatch.setattr(activations, "CALIBRATION_TOKENS", 32)  # fewer than the 128 inputs of the widest layer
    out = tmp_path / "short.json"
    argv = ["--models", tied_llama, "--formats", "int4", "--algorithms", "gptq", "--tokens", "32", "--json", str(out)]
    assert bench.main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "fewer than the 128 inputs" in error and "--allow-short-calibration" in error
    assert not out.exists()
    assert bench.main(["--models", tied_llama, "--algorithms", "gptq,nope", "--json", str(out)]) == 2
    assert "--algorithms takes rtn" in capsys.readouterr().err


@pytest.mark.slow
def test_a_timing_run_on_short_calibration_says_so_once_and_records_it(bench, tied_llama, tmp_path, monkeypatch,
                                                                       capsys):
    from qlab.analyses import activations

    monkeypatch.setattr(activations, "CALIBRATION_TOKENS", 32)
    out = tmp_path / "short.json"
    assert bench.main(["--models", tied_llama, "--formats", "int4", "--algorithms", "gptq", "--tokens", "32",
                       "--json", str(out), "--allow-short-calibration"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("accuracy does not") == 1
    model = json.loads(out.read_text())["models"][0]
    assert "fewer than the 128 inputs" in model["calibration_note"] and len(model["rows"]) == 1
