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


@pytest.mark.slow  # builds, loads and evaluates the model
def test_a_two_four_row_has_its_own_label_and_stores_its_metadata(bench, tied_llama, tmp_path):
    import torch
    from safetensors.torch import load_file
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    out = tmp_path / "sparsity.json"
    assert bench.main(["--models", tied_llama, "--formats", "int4", "--algorithms", "rtn", "--sparsity",
                       "none,2:4,2:4-sparsegpt", "--group-size", "64", "--tokens", "32", "--json", str(out)]) == 0
    [model] = json.loads(out.read_text())["models"]
    [refused] = model["left_out"]  # SparseGPT rounds with GPTQ only
    assert refused.startswith("int4 rtn 2:4-sparsegpt: ") and "gptq" in refused
    dense, sparse = model["rows"]
    assert (dense["label"], sparse["label"]) == ("int4 g64 asym", "int4 g64 asym 2:4")
    assert dense["metadata_bytes"] == 0 and sparse["kld_mean"] > dense["kld_mean"]

    # Counted apart from qlab: every linear of the checkpoint (the tied head is the embedding, left as it is)
    # keeps 2 int4 codes of 4 plus torch's own CUTLASS metadata for them (4 bits per group of 4), and one fp16
    # scale and one 4-bit zero-point per 64 inputs of a row, as the dense row stores.
    weights = [w for name, w in load_file(str(Path(tied_llama) / "model.safetensors")).items()
               if name.endswith("_proj.weight")]
    values = sum(w.numel() for w in weights)
    metadata = 0
    for w in weights:
        kept = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float16).repeat(w.shape[0], w.shape[1] // 4)
        _, meta = sparse_semi_structured_from_dense_cutlass(kept)
        metadata += meta.numel() * meta.element_size()
    scales = values // 64 * (2 + 0.5)
    assert sparse["metadata_bytes"] == metadata == values // 8
    assert sparse["quantized_bytes"] == values // 2 // 2 + metadata + scales
    assert dense["quantized_bytes"] == values // 2 + scales
    assert sparse["bits_per_weight"] == pytest.approx(8 * sparse["quantized_bytes"] / values, abs=1e-6) == 3.3125
