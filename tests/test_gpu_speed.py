"""The GPU benchmark program (``bench/gpu_speed.py``): its command line, the steps it runs in subprocesses, the
wheel installer and merging of runs, on a tiny config on the CPU."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from qlab.backends import gpu_recipe
from tests.test_gpu_recipe import gpu_speed, tiny_args


def test_dry_run_shrinks_the_catalog_config():
    args = tiny_args()
    assert args.config_name == "llama-3.1-8b"
    assert args.config["num_hidden_layers"] == 2 and args.config["hidden_size"] == 256
    assert args.config["num_attention_heads"] % args.config["num_key_value_heads"] == 0


@pytest.mark.slow  # two subprocesses, each importing torch and transformers
def test_orchestrator_keeps_steps_apart_and_writes_json(tmp_path):
    out = tmp_path / "gpu.json"
    argv = ["--dry-run", "--device", "cpu", "--dtype", "fp32", "--formats", "bf16,nf4", "--paths", "eager-loop",
            "--json", str(out), "--budget-s", "200"]
    assert gpu_speed.step_arguments(argv) == ["--dry-run", "--device", "cpu", "--dtype", "fp32"]
    assert gpu_speed.main(argv) == 0
    rows = json.loads(out.read_text())
    assert [(r["format_slug"], r["path"]) for r in rows] == [("nf4", "eager-loop"), ("bf16", "eager-loop")]
    nf4, bf16 = rows
    assert bf16["decode_tokens_per_s"] > 0 and bf16["error"] is None
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "bitsandbytes" in nf4["error"]
    assert not list(tmp_path.glob(".*.json"))  # per-step files are cleaned up
    # Each step's output streams into one log beside the JSON, and its last lines travel with the row.
    log = (tmp_path / "gpu.log").read_text()
    assert "=== nf4:eager-loop ===" in log and "=== bf16:eager-loop ===" in log
    assert any("repetition 1" in line for line in bf16["log_tail"])


@pytest.mark.slow  # two subprocesses, each importing torch and transformers
def test_parallel_steps_of_both_layouts_each_get_their_turn(tmp_path, monkeypatch):
    out, work, scratch = tmp_path / "mine" / "gpu.json", tmp_path / "work", tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    argv = ["--dry-run", "--device", "cpu", "--dtype", "fp32", "--parallel", "--json", str(out), "--budget-s", "150",
            "--steps", "bf16:eager-loop,bf16:eager-loop:fused-projections", "--work-dir", str(work)]
    assert "--work-dir" not in gpu_speed.step_arguments(argv)
    assert gpu_speed.main(argv) == 0
    # with --work-dir the log and the steps' files go there; beside the JSON there is only the JSON
    assert [p.name for p in out.parent.iterdir()] == ["gpu.json"]
    assert [p.name for p in work.iterdir()] == ["gpu.log"]
    rows = json.loads(out.read_text())
    assert [r["path"] for r in rows] == ["eager-loop", "eager-loop:fused-projections"]
    for row in rows:
        assert row["error"] is None and row["decode_tokens_per_s"] > 0
        # A step whose turn never came waits out its timeout (900 s) or the budget; these were let go at once.
        assert row["waited_for_turn_seconds"] < 60
    assert not list(scratch.iterdir())  # the folder where the steps took turns is gone


@pytest.mark.slow  # the step imports torch and transformers
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_step_ends_when_the_process_that_started_it_is_killed(tmp_path):
    # What the Speed page's server is to the program, and the program to its steps: killed, it must take them
    # along (a step waiting for its turn would otherwise wait 900 s, holding the GPU's memory).
    step = [sys.executable, str(gpu_speed.REPO / "bench" / "gpu_speed.py"), "--step", "bf16:eager-loop",
            "--row-out", str(tmp_path / "row.json"), "--turn-dir", str(tmp_path),
            "--dry-run", "--device", "cpu", "--dtype", "fp32"]
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               f"print(subprocess.Popen({step!r}).pid, flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    pid = None

    def alive() -> bool:
        try:  # a killed child nobody has reaped yet is a zombie: ended
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
        except FileNotFoundError:
            return False

    try:
        pid = int(parent.stdout.readline())
        deadline = time.monotonic() + 120
        while not (tmp_path / "bf16.eager-loop.ready").exists():  # compiled, now waiting for its turn
            assert time.monotonic() < deadline, "the step never got to wait for its turn"
            time.sleep(0.2)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive()
    finally:
        parent.kill()
        if pid is not None and alive():
            os.kill(pid, signal.SIGKILL)


def test_explicit_steps_and_merging_runs(tmp_path):
    assert gpu_speed.steps_for([], [], "float8wo:compiled-loop, nf4:eager-loop") == [
        ("float8wo", "compiled-loop"), ("nf4", "eager-loop")]
    assert gpu_speed.steps_for(["int4wo", "bf16"], ["compiled-loop"])[:2] == [
        ("bf16", "compiled-loop"), ("int4wo", "compiled-loop")]
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps([
        {"format_slug": "int8wo", "path": "compiled-loop", "decode_tokens_per_s": 190.0},
        {"format_slug": "float8wo", "path": "compiled-loop", "decode_tokens_per_s": None, "error": "skipped"}]))
    second.write_text(json.dumps([
        {"format_slug": "float8wo", "path": "compiled-loop", "decode_tokens_per_s": 170.0},
        {"format_slug": "bf16", "path": "compiled-loop", "decode_tokens_per_s": 120.0}]))
    merged = gpu_speed.merge([str(first), str(second)], str(tmp_path / "out.json"))
    assert [(r["format_slug"], r["decode_tokens_per_s"]) for r in merged] == [
        ("bf16", 120.0), ("int8wo", 190.0), ("float8wo", 170.0)]
    assert json.loads((tmp_path / "out.json").read_text()) == merged
    several = tmp_path / "runs.json"  # runs of different GPUs must not be mixed into one
    several.write_text(json.dumps({"runs": [{"rows": []}, {"rows": []}]}))
    with pytest.raises(SystemExit, match="holds several runs"):
        gpu_speed.merge([str(first), str(several)], str(tmp_path / "out.json"))


def test_missing_wheels_are_reported_not_fatal(tmp_path):
    message, extra = gpu_speed.install_wheels(tmp_path)
    assert extra is None and ("nothing to install" in message or "no wheels" in message)


def test_command_line_reaches_the_recipe_switches():
    ns = gpu_speed.parser().parse_args(["--dry-run", "--device", "cpu", "--dtype", "fp32", "--keep-head-bf16",
                                        "--keep-subclasses", "--skip-guards", "--profile-steps", "5",
                                        "--fuse-projections"])
    args = gpu_speed.args_from(ns)
    assert not args.quantize_head and not args.unwrap_subclasses and args.skip_guards and args.profile_steps == 5
    assert args.fuse_projections
    defaults = tiny_args()
    assert defaults.quantize_head and defaults.unwrap_subclasses and not defaults.skip_guards
    assert not defaults.fuse_projections
    with gpu_recipe._guard_stance(False), gpu_recipe._guard_stance(True):
        pass  # both are context managers on this torch
