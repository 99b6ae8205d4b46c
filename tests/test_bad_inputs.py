"""The bad-input matrix: every case gets one clear line and exit status 2, never a traceback.

Each row is (case id, CLI arguments, a fragment the message must contain). Files the cases need are made in
a temporary directory; `{tmp}` in an argument is replaced by it.
"""

import subprocess
import sys

import pytest
import torch

# Imported before any test patches qlab.models.loading.load: a first import under that patch binds the failing
# stand-in into sweep_benchmark for good, and later tests' bench sweeps call it.
import qlab.analyses.sweep_benchmark  # noqa: F401
from qlab.cli import main
from qlab.core.errors import QlabError
from qlab.core.quant import QuantScheme, quantize

CLI_CASES = [
    ("unknown model", ["sweep", "--model", "no-such-model"], "unknown model"),
    ("hub id offline", ["sweep", "--model", "someone/not-cached-model"], "cannot be reached"),
    ("dir without config", ["sweep", "--model", "{tmp}/empty"], "no config.json"),
    ("pickle weights", ["sweep", "--model", "{tmp}/pickled"], "pickle"),
    ("remote code", ["sweep", "--model", "{tmp}/remote_code"], "trust_remote_code"),
    ("broken config", ["sweep", "--model", "{tmp}/broken_config"], "not valid JSON"),
    ("path is a file", ["sweep", "--model", "{tmp}/empty.txt"], "not a directory"),
    ("config a JSON list", ["sweep", "--model", "{tmp}/list_config"], "JSON list"),
    ("corrupt safetensors", ["sweep", "--model", "{tmp}/corrupt_safetensors"], "not a readable safetensors"),
    ("corrupt gguf", ["sweep", "--model", "{tmp}/corrupt_gguf"], "not a readable gguf"),
    ("empty text", ["sweep", "--model", "minilm-l6", "--text-file", "{tmp}/empty.txt"], "empty"),
    ("binary text", ["sweep", "--model", "minilm-l6", "--text-file", "{tmp}/binary.bin"], "binary"),
    ("non-utf8 text", ["sweep", "--model", "minilm-l6", "--text-file", "{tmp}/latin1.txt"], "UTF-8"),
    ("huge text", ["sweep", "--model", "minilm-l6", "--text-file", "{tmp}/huge.txt"], "limit"),
    ("missing text file", ["sweep", "--text-file", "{tmp}/nope.txt"], "does not exist"),
    ("bits 0", ["sweep", "--formats", "int0"], "unknown format"),
    ("bits 1", ["sweep", "--formats", "int1"], "unknown format"),
    ("bits 9", ["sweep", "--formats", "int9"], "unknown format"),
    ("bits 99", ["quantize", "--values=1,2", "--format", "int99"], "unknown format"),
    ("no formats", ["sweep", "--formats", ","], "no formats"),
    ("group size 0", ["sweep", "--granularity", "group", "--group-size", "0"], "group size"),
    ("group size negative", ["sweep", "--granularity", "group", "--group-size", "-64"], "group size"),
    ("group size not an int", ["sweep", "--group-size", "sixty"], "invalid int"),
    ("group size does not divide", ["sweep", "--model", "minilm-l6", "--granularity", "group",
                                    "--group-size", "100", "--tokens", "64"], "does not divide"),
    ("unknown granularity", ["sweep", "--granularity", "row"], "granularity"),
    ("unknown calibration", ["sweep", "--calibration", "magic"], "calibration"),
    ("percentile > 100", ["sweep", "--calibration", "percentile", "--percentile", "101"], "percentile"),
    ("asymmetric nf4", ["quantize", "--values=1,2", "--format", "nf4", "--asymmetric"], "symmetric"),
    ("zero tokens", ["sweep", "--tokens", "0"], "token budget"),
    ("negative tokens", ["sweep", "--tokens", "-5"], "token budget"),
    ("absurd tokens", ["sweep", "--tokens", "100000000"], "cap"),
    ("NaN value", ["quantize", "--values=1,nan,2"], "NaN"),
    ("Inf value", ["quantize", "--values=1,inf"], "NaN or infinite"),
    ("not numbers", ["quantize", "--values=a,b"], "comma-separated numbers"),
    ("zero scale", ["quantize", "--values=1,2", "--scale", "0"], "scale must be positive"),
    ("negative scale", ["quantize", "--values=1,2", "--scale", "-0.1"], "scale must be positive"),
    ("zero-point out of range", ["quantize", "--values=1,2", "--asymmetric", "--zero-point", "300"],
     "zero-point"),
    ("zero-point when symmetric", ["quantize", "--values=1,2", "--zero-point", "3"], "asymmetric"),
    ("unwritable json", ["quantize", "--values=1,2", "--json", "/proc/qlab/out.json"], "cannot write"),
    ("negative context", ["memory", "--model", "llama-3.1-8b", "--context", "-1"], "context"),
    ("zero batch", ["memory", "--model", "llama-3.1-8b", "--batch", "0"], "batch"),
    ("absurd context", ["memory", "--model", "llama-3.1-8b", "--context", "99999999999999"], "context"),
    ("unknown hardware", ["memory", "--model", "llama-3.1-8b", "--hardware", "tpu-v9"], "hardware"),
    ("unknown kv dtype", ["memory", "--model", "llama-3.1-8b", "--kv-dtype", "int3"], "kv"),
    ("unknown catalog model", ["memory", "--model", "llama-9-900b"], "unknown"),
    ("unknown command", ["transmogrify"], "invalid choice"),
    ("unknown flag", ["sweep", "--frobnicate"], "unrecognized"),
]


@pytest.mark.parametrize("case, argv, needle", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(case, argv, needle, bad_files, capsys):
    argv = [a.replace("{tmp}", str(bad_files)) for a in argv]
    assert main(argv) == 2, case
    err = capsys.readouterr().err
    assert err.startswith("qlab: error: ") and err.count("\n") == 1, err
    assert needle.lower() in err.lower(), err
    assert "Traceback" not in err


def test_matrix_is_big_enough():
    assert len(CLI_CASES) >= 30


@pytest.mark.parametrize("argv", [["sweep", "--model", "{tmp}/pickled"], ["quantize", "--values=1,nan"],
                                  ["memory", "--model", "llama-3.1-8b", "--context", "0"]])
def test_real_process_prints_one_line_and_no_traceback(argv, bad_files):
    argv = [a.replace("{tmp}", str(bad_files)) for a in argv]
    result = subprocess.run([sys.executable, "-m", "qlab", *argv], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("tensor", [torch.zeros(4, 64), torch.full((4, 64), -2.7), torch.zeros(0)],
                         ids=["all zero", "constant", "empty"])
def test_degenerate_but_valid_tensors_quantize(tensor):
    for fmt in ("int8", "int4", "nf4", "fp8_e4m3"):
        scheme = QuantScheme(fmt, "channel") if tensor.dim() == 2 else QuantScheme(fmt, "tensor")
        if tensor.numel() == 0:
            with pytest.raises(QlabError):
                quantize(tensor, scheme)
            continue
        restored = quantize(tensor, scheme).dequantize()
        assert torch.allclose(restored, tensor, rtol=2**-8, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(bad):
    weight = torch.randn(8, 64)
    weight[3, 5] = bad
    with pytest.raises(QlabError, match="NaN or infinite"):
        quantize(weight, QuantScheme("int4", "group", 32))


def test_read_only_run_database_is_browsed_and_a_sweep_into_it_refused(tmp_path, monkeypatch, capsys):
    """`runs list/show/export` and `report` read a database this user cannot write; every command that stores
    into it (--db or QLAB_DB) exits 2 with one line before the model loads (the dashboard instead warns and keeps
    going)."""
    import hashlib
    import os

    from qlab.store import RunMeta, Store

    path = tmp_path / "shared.sqlite"
    run_id = Store(path).start_run(RunMeta("sweep", "minilm-l6", {"schemes": []}, environment={"qlab": "0.1.0"}))
    Store(path).finish_run(run_id)
    before = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if mode & os.W_OK and str(p).startswith(
        str(tmp_path)) else real(p, mode, *a, **k))  # root ignores chmod: say no the way a read-only mount does
    for argv in (["runs", "list"], ["runs", "show", run_id[:6]], ["runs", "export", "--json", "-"]):
        assert main([*argv, "--db", str(path)]) == 0, argv
        assert run_id in capsys.readouterr().out
    assert main(["report", "--run", run_id, "--out", str(tmp_path.parent / f"{tmp_path.name}.html"),
                 "--db", str(path)]) == 0
    capsys.readouterr()
    monkeypatch.setattr("qlab.models.loading.load", lambda *a, **k: pytest.fail("the model loaded before the refusal"))
    monkeypatch.setattr("qlab.analyses.sweep_benchmark.bench_sweep", lambda *a, **k: pytest.fail("the benchmark ran before the refusal"))
    for argv in STORING_COMMANDS:
        for db in (["--db", str(path)], []):  # given with --db, or chosen by QLAB_DB
            monkeypatch.delenv("QLAB_DB", raising=False)
            if not db:
                monkeypatch.setenv("QLAB_DB", str(path))
            assert main([*argv, *db]) == 2, argv
            err = capsys.readouterr().err
            assert err == f"qlab: error: {path} is read-only; pass --db (or set QLAB_DB) to a writable path.\n", argv
    assert (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.sqlite"]


# Every command that stores into a run database, with arguments that would otherwise run it.
STORING_COMMANDS = [
    ["sweep", "--model", "minilm-l6", "--formats", "int8", "--tokens", "64", "--quiet"],
    ["sensitivity", "--model", "minilm-l6", "--formats", "int8", "--tokens", "64", "--quiet"],
    ["recommend", "--model", "minilm-l6", "--formats", "int8,int4", "--tokens", "64", "--quiet", "--budget-bits", "6"],
    ["bench", "--model", "minilm-l6", "--backends", "fp32", "--quiet", "--no-bandwidth"],
    ["bench", "sweep", "--model", "minilm-l6", "--formats", "int8", "--tokens", "64"],
    ["memory", "--model", "llama-3.1-8b", "--json", "-"],
]


@pytest.mark.parametrize("argv", STORING_COMMANDS, ids=lambda argv: " ".join(argv[:2]).removesuffix(" --model"))
@pytest.mark.parametrize("content, message", [(b"not a database " * 300, "not a usable qlab run database"),
                                              (None, "written by a newer qlab")])
def test_an_unusable_run_database_is_refused_before_the_work(tmp_path, monkeypatch, capsys, argv, content, message):
    """A --db that is not a qlab database (or one from a newer qlab) stops every storing command up front."""
    import sqlite3

    path = tmp_path / "runs.sqlite"
    if content is None:
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA user_version = 99")
    else:
        path.write_bytes(content)
    monkeypatch.setattr("qlab.models.loading.load", lambda *a, **k: pytest.fail("the model loaded before the refusal"))
    monkeypatch.setattr("qlab.analyses.sweep_benchmark.bench_sweep", lambda *a, **k: pytest.fail("the benchmark ran before the refusal"))
    assert main([*argv, "--db", str(path)]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1 and captured.out == ""
