"""The GPU benchmark as the Speed page runs it (``qlab.backends.gpu_bench``): the real program on the CPU's dry run,
with its rows handed over as they are written, its progress, a failure in one line and a stop that kills it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlab.backends import gpu_bench
from qlab.core.errors import QlabError


@pytest.fixture
def on_the_cpu(monkeypatch):
    """The program's CPU dry run (the last --device and --dtype win in argparse), and eager steps: inductor's
    compile of the compiled loop would take minutes on two cores and measures nothing this test looks at."""
    real = gpu_bench.program_command
    monkeypatch.setattr(gpu_bench, "program_command", lambda *a, **k: [
        *real(*a, **k), "--device", "cpu", "--dtype", "fp32", "--dry-run", "--budget-s", "200"])
    monkeypatch.setattr(gpu_bench, "compiled_steps", lambda formats, fuse: [
        f"{fmt}:eager-loop{gpu_bench.FUSED if fuse else ''}" for fmt in formats])


def test_check_formats_names_what_the_benchmark_lacks():
    assert gpu_bench.check_formats(["bf16", "int4gl"]) == ["bf16", "int4gl"]
    with pytest.raises(QlabError, match="no format 'int4pk'; choose from bf16, "):
        gpu_bench.check_formats(["bf16", "int4pk"])
    with pytest.raises(QlabError, match="no format given"):
        gpu_bench.check_formats([])


@pytest.mark.slow  # the program and its step processes each import torch
def test_rows_are_handed_over_as_the_program_writes_them(bf16_llama_dir, tmp_path, on_the_cpu):
    handed, reports = [], []
    rows = gpu_bench.run_compiled(str(bf16_llama_dir), "cuda:0", ["bf16", "int8wo"], tmp_path,
                                  fuse_projections=True, on_row=handed.append,
                                  progress=lambda fraction, message: reports.append((fraction, message)),
                                  poll_s=0.2)
    assert rows == handed and [(r["format_slug"], r["path"]) for r in rows] == [
        ("bf16", "eager-loop:fused-projections"), ("int8wo", "eager-loop:fused-projections")]
    assert all(r["decode_tokens_per_s"] > 0 and r["model"] == bf16_llama_dir.name for r in rows)
    assert reports[0][0] == 0.0 and reports[-1][0] == 1.0
    assert [f for f, _ in reports] == sorted(f for f, _ in reports)  # never backwards
    assert "2 of 2 formats measured" in reports[-1][1]
    # everything the program wrote stayed in the scratch folder it was given
    assert {p.name for p in tmp_path.iterdir()} == {"gpu_speed.json", "gpu_speed.log", bf16_llama_dir.name}


@pytest.mark.slow  # the program imports torch before it starts its steps
def test_a_stopped_job_kills_the_program_and_its_steps(bf16_llama_dir, tmp_path, on_the_cpu, monkeypatch):
    started = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", recording_popen)

    class Stopped(Exception):
        pass

    calls = []

    def stop_when_steps_run(fraction, message):
        calls.append(message)
        if len(calls) == 20:  # a few seconds in: the program has started its step processes
            raise Stopped

    with pytest.raises(Stopped):
        gpu_bench.run_compiled(str(bf16_llama_dir), "cuda:0", ["bf16", "int8wo"], tmp_path,
                               progress=stop_when_steps_run, poll_s=0.3)
    [program] = started
    assert program.poll() is not None
    assert running_with(str(tmp_path)) == []  # no step process outlives the job


def running_with(text: str) -> list[str]:
    """The processes whose command line holds ``text`` (Linux's /proc)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:  # ended while we looked
            continue
    return found


def test_a_program_that_fails_is_one_line(bf16_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_bench, "program_command",
                        lambda *a, **k: [sys.executable, "-c", "import sys; sys.exit(3)"])
    with pytest.raises(QlabError, match=r"^the GPU benchmark stopped with exit status 3 after 0 of 1 formats\.$"):
        gpu_bench.run_compiled(str(bf16_llama_dir), "cuda:0", ["bf16"], tmp_path, poll_s=0.05)
