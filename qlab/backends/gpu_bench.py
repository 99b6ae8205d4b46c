"""The GPU decode benchmark (``bench/gpu_speed.py``, beside the package in the checkout) for one model's shapes on
one GPU: the compiled static-cache loop with each format's fastest installed kernel, on random weights (speed
does not depend on the values). It runs as a subprocess, because each step compiles for minutes and a crash in a
kernel library must not take the caller with it. ``qlab bench --device cuda`` and the Speed page call it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from qlab.backends.gpu_recipe import FORMATS, FUSED
from qlab.core.errors import QlabError

PROGRAM = Path(__file__).resolve().parents[2] / "bench" / "gpu_speed.py"
# Decoders the benchmark's compact Llama builds with the model's own shapes (a Qwen2 bias on q/k/v is left out).
MODEL_TYPES = ("llama", "mistral", "qwen2")


def fastest_formats() -> list[str]:
    """Each weight format through the fastest kernel measured on the H100 and H200 that is installed here:
    gemlite's int8 and fp8 GEMV over torchao's inductor-fused ones, qlab's Triton int4 GEMV over tinygemm (2.04x
    and 2.07x BF16 end to end on two H100s against 1.96x and 1.97x; Triton comes with every CUDA build of torch),
    bitsandbytes for nf4."""
    import importlib.util

    gemlite = importlib.util.find_spec("gemlite") is not None
    triton = importlib.util.find_spec("triton") is not None
    return ["bf16", "int8gl" if gemlite else "int8wo", "int4tq" if triton else "int4wo",
            "float8gl" if gemlite else "float8wo", "nf4"]


def check_formats(formats: list[str]) -> list[str]:
    """``formats`` if the benchmark has each of them; a QlabError naming the others."""
    unknown = [fmt for fmt in formats if fmt not in FORMATS]
    if unknown or not formats:
        raise QlabError(f"the GPU benchmark has no format {', '.join(map(repr, unknown)) or 'given'}; choose from "
                        f"{', '.join(FORMATS)}.")
    return formats


def shapes_of(model: str, scratch: Path) -> Path:
    """A copy of ``model``'s config.json, checked, in a folder of ``scratch`` named after the model (the benchmark
    names its rows by that folder); the path to hand the GPU program."""
    from qlab.models.checkpoint import converted_dir
    from qlab.models.config_schema import validate_text
    from qlab.models.loading import resolve

    # resolve() refuses a config.json that is not a JSON object or needs custom code; a GGUF's is qlab's own.
    source = resolve(model)
    found = [file for file in (Path(source.path) / "config.json",
                               converted_dir(source) / "config.json" if source.gguf_file else None)
             if file is not None and file.is_file()]
    if not found:
        raise QlabError(f"{model} has no config.json to build its shapes from; open it once in qlab (a GGUF file "
                        "is converted then) or use --model-config with a catalog shape.")
    config = json.loads(found[0].read_text())
    validate_text(config, f" of {model}")
    if config["model_type"] not in MODEL_TYPES:
        raise QlabError(f"the GPU benchmark builds Llama-family decoders ({', '.join(MODEL_TYPES)}); {model} is "
                        f"'{config['model_type']}'. Its CPU speed: --device cpu.")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(model.rstrip("/")).name or "model").strip("-.") or "model"
    folder = scratch / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


def visible_index(placement: str) -> str:
    """The CUDA_VISIBLE_DEVICES entry of torch's "cuda:N" under the visibility this process already has."""
    index = int(placement.partition(":")[2] or 0)
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)


def program_command(config: Path | str, out: Path, work_dir: Path, *, formats: list[str] | None = None,
                    steps: list[str] | None = None, dtype: str = "bf16", prompt_tokens: int = 128,
                    repetitions: int = 3, fuse_projections: bool = False, parallel: bool = False) -> list[str]:
    """The program's command line: ``formats`` x its default code paths, or exactly ``steps`` ("fmt:path");
    rows to ``out``, its log and per-step files to ``work_dir`` (so ``out`` is the only file written)."""
    chosen = ["--steps", ",".join(steps)] if steps else ["--formats", ",".join(formats or fastest_formats())]
    return [sys.executable, str(PROGRAM), "--model-config", str(config), "--device", "cuda", "--dtype", dtype,
            "--prompt-tokens", str(prompt_tokens), "--repetitions", str(repetitions), *chosen,
            "--json", str(out), "--work-dir", str(work_dir),
            *(["--fuse-projections"] if fuse_projections else []), *(["--parallel"] if parallel else [])]


def compiled_steps(formats: list[str], fuse_projections: bool) -> list[str]:
    """One compiled-loop step per format, in the layout asked: the path that shows each kernel's speed."""
    return [f"{fmt}:compiled-loop{FUSED if fuse_projections else ''}" for fmt in formats]


def run_compiled(model: str, placement: str, formats: list[str], scratch: Path, *, fuse_projections: bool = False,
                 on_row: Callable[[dict], None] | None = None,
                 progress: Callable[[float, str], None] | None = None, poll_s: float = 1.0) -> list[dict]:
    """Measure ``model``'s shapes on ``placement`` ("cuda:N"), one compiled-loop step per format, the steps
    compiled side by side and then timed one at a time. ``on_row`` gets each row as the program writes it;
    ``progress`` is called at least every ``poll_s`` (a caller that stops the job raises from it: the program and
    its steps are killed then). A program that fails is a QlabError; rows already handed over stay handed over."""
    steps = compiled_steps(check_formats(formats), fuse_projections)
    config = shapes_of(model, scratch)
    out = scratch / "gpu_speed.json"
    command = program_command(config, out, scratch, steps=steps, fuse_projections=fuse_projections, parallel=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible_index(placement)}
    # Its own process group: stopping the job must also stop the step processes it started.
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    rows: list[dict] = []
    started = time.monotonic()
    try:
        while True:
            finished = process.poll() is not None
            written = json.loads(out.read_text()) if out.is_file() else []
            for row in written[len(rows):]:
                rows.append(row)
                if on_row is not None:
                    on_row(row)
            if progress is not None:
                elapsed = time.monotonic() - started
                progress(len(rows) / len(steps), f"{len(rows)} of {len(steps)} formats measured; "
                         + ("compiling them side by side" if not rows else "timing one at a time")
                         + f" ({elapsed:.0f} s so far)")
            if finished:
                break
            time.sleep(poll_s)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if process.returncode != 0:
        raise QlabError(f"the GPU benchmark stopped with exit status {process.returncode} after "
                        f"{len(rows)} of {len(steps)} formats.")
    return rows
