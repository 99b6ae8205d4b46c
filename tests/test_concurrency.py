"""Two sessions sweeping the same cached model at once, and a sweep killed half-way."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from qlab.analyses.sweep import run_sweep
from qlab.core.quant import QuantScheme
from qlab.models.evaluate import EvalSpec
from qlab.models.loading import weights_digest

pytestmark = pytest.mark.slow


def test_parallel_sweeps_on_one_model_match_sequential_ones(minilm):
    spec = EvalSpec(tokens=256)
    before = weights_digest(minilm.model)
    jobs = {"a": [QuantScheme("int4", "group", 32), QuantScheme("nf4", "group", 64)],
            "b": [QuantScheme("int8", "channel"), QuantScheme("int3", "group", 32)]}
    alone = {k: [r.metrics for r in run_sweep(minilm, schemes, spec)] for k, schemes in jobs.items()}
    together: dict[str, list] = {}
    errors: list[BaseException] = []

    def worker(key: str) -> None:
        try:
            together[key] = [r.metrics for r in run_sweep(minilm, jobs[key], spec)]
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(k,)) for k in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for key in jobs:
        for solo, shared in zip(alone[key], together[key], strict=True):
            assert shared == pytest.approx(solo, rel=1e-6, abs=1e-7)
    assert weights_digest(minilm.model) == before


def test_killed_sweep_keeps_every_finished_scheme(tmp_path):
    out = tmp_path / "rows.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "qlab", "sweep", "--model", "minilm-l6", "--formats",
         "fp32,fp16,bf16,int8,int4,int3,int2,nf4", "--tokens", "2048", "--json", str(out), "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    rows: list = []
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists():
            rows = json.loads(out.read_text())  # never half-written: the CLI writes then renames
            if len(rows) >= 2:
                break
        time.sleep(0.05)
    assert process.poll() is None, "the sweep finished before it could be killed; give it more work"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    rows = json.loads(out.read_text())
    assert len(rows) >= 2
    formats = ["fp32", "fp16", "bf16", "int8", "int4", "int3", "int2", "nf4"]
    assert [r["format"] for r in rows] == formats[: len(rows)]
    assert all("cosine_mean" in r and "size_bytes" in r for r in rows)
