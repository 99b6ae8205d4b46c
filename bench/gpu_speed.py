"""GPU decode speed per format and code path: `python bench/gpu_speed.py [--install-wheels] [--json OUT]`.

Builds a random-initialised model from ``assets/model_configs/llama-3.1-8b.json`` and measures BF16 (eager HF
``generate`` and a compiled static-cache loop), torchao INT8/INT4/FP8 weight-only (compiled loop, and HF
``generate`` for INT8/INT4 to show the eager trap) and bitsandbytes NF4, batch 1. Each step runs in its own
subprocess with a time limit; the JSON (a list of rows) is rewritten after each step, so a cut-off run keeps
what it measured. On a device without network, ``--install-wheels`` installs the torchao and bitsandbytes
wheels carried in ``bench/wheels`` (``pip install --no-deps``) when they do not import.

Dry run on a CPU (a 2-layer, 256-wide config, a few tokens; checks every code path):
    python bench/gpu_speed.py --dry-run --device cpu --dtype fp32 --json /tmp/gpu_speed_dry.json
On the lent H100 (compiles take about 2-2.5 minutes each, so three compiled steps fit one 10-minute call), then
the rest, then one file (``--profile-steps 10`` adds the top kernels and host ops of ten decode steps to each row):
    python bench/gpu_speed.py --install-wheels --profile-steps 10 \
        --steps int8wo:compiled-loop,int4wo:compiled-loop,bf16:compiled-loop --json $OUT/gpu_speed.json
    python bench/gpu_speed.py --install-wheels --steps float8wo:compiled-loop,nf4:eager-loop,int8wo:hf-generate \
        --json $OUT/gpu_speed_2.json
    python bench/gpu_speed.py --merge first.json second.json --json bench/results/gpu_speed.json
On the lent H200 the six compiled steps (int8gl / float8gl: gemlite's 8-bit kernels, its sdist unpacked on
PYTHONPATH) compile side by side and are then timed one at a time, alone on the GPU (239 s in all):
    python bench/gpu_speed.py --parallel --profile-steps 10 --budget-s 320 --json $OUT/gpu_speed.json \
        --steps bf16:compiled-loop,int8wo:compiled-loop,int8gl:compiled-loop,int4wo:compiled-loop,float8wo:compiled-loop,float8gl:compiled-loop
gpt-fast's layout (q/k/v and gate/up each one linear) is a step of its own, so both layouts can share a run:
    python bench/gpu_speed.py --parallel --steps bf16:compiled-loop:fused-projections,int8gl:compiled-loop:fused-projections
Other variants of the recipe are recorded as their own path: ``--keep-subclasses`` (torchao weights compiled as tensor
subclasses: host-bound), ``--skip-guards`` (``compiled-loop:skip-guards``), a compile mode other than
reduce-overhead (``compiled-loop:max-autotune``; on torch 2.11 its int8 compile did not finish in 240 s), e.g.
    python bench/gpu_speed.py --install-wheels --compile-mode max-autotune \
        --steps bf16:compiled-loop,int8wo:compiled-loop,int4wo:compiled-loop --json $OUT/gpu_speed_autotune.json

The model and the measured step are ``qlab.backends.gpu_recipe``; this program owns the rest: the command line,
one subprocess per step (a compile can take minutes; an OOM or a crash must not lose the others), its output
streamed into ``<json>.log`` (or ``--work-dir``), the wheel installer and the merging of runs. ``python -m qlab bench --device cuda``
runs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

# Read before the slow imports below: if the parent ends before end_with_parent runs, getppid() changes.
STARTED_BY = os.getppid()

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from qlab.backends.gpu_recipe import FORMATS, Args, run_step  # noqa: E402

CONFIG_DIR = REPO / "assets" / "model_configs"

# (format slug from the CLI, code path) in the order they run: the goals first, the slow eager ones after.
STEP_ORDER = (
    ("bf16", "compiled-loop"), ("int8wo", "compiled-loop"), ("int4wo", "compiled-loop"),
    ("bf16", "hf-generate"), ("nf4", "eager-loop"), ("float8wo", "compiled-loop"), ("int8wo", "hf-generate"),
    ("bf16", "eager-loop"), ("int4wo", "hf-generate"),
)
OWN_OPTIONS = {"--json", "--budget-s", "--step-timeout-s", "--install-wheels", "--wheels", "--formats", "--paths",
               "--steps", "--parallel", "--work-dir"}
FLAGS = {"--install-wheels", "--parallel"}


def load_config(name_or_path: str) -> tuple[str, dict]:
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise SystemExit(f"gpu_speed: no model config '{name_or_path}' (looked in {CONFIG_DIR}).")
    # A model directory's config.json is named after its directory (``qlab bench --device cuda --model DIR``).
    return path.parent.name if path.name == "config.json" else path.stem, json.loads(path.read_text())


def install_wheels(directory: Path) -> tuple[str, str | None]:
    """``pip install --no-deps`` the carried torchao / bitsandbytes wheels when they do not import yet.

    Returns what happened and, when the interpreter's site-packages refused the install (an externally managed
    Python), the directory the wheels went to instead, for the steps' ``PYTHONPATH``.
    """
    import importlib.util

    missing = [name for name in ("torchao", "bitsandbytes") if importlib.util.find_spec(name) is None]
    wheels = [str(w) for w in sorted(directory.glob("*.whl")) if any(w.name.startswith(m) for m in missing)]
    if not wheels:
        return ("nothing to install" if not missing else f"no wheels for {missing} in {directory}"), None
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check"]
    done = subprocess.run([*pip, *wheels], capture_output=True, text=True, timeout=300, check=False)
    if done.returncode == 0:
        return f"installed {', '.join(Path(w).name for w in wheels)}", None
    target = directory.parent / ".gpu-site-packages"
    retry = subprocess.run([*pip, "--target", str(target), *wheels], capture_output=True, text=True, timeout=300,
                           check=False)
    last = (retry.stdout + retry.stderr).strip().splitlines()[-1:] or [""]
    return f"site-packages refused (exit {done.returncode}); --target {target}: exit {retry.returncode} {last[0]}", \
        str(target) if retry.returncode == 0 else None


def steps_for(formats: list[str], paths: list[str], explicit: str | None = None) -> list[tuple[str, str]]:
    """The (format, path) steps to run: ``explicit`` ("int8wo:hf-generate,nf4:eager-loop") or formats x paths."""
    if explicit:
        return [tuple(step.strip().split(":", 1)) for step in explicit.split(",") if step.strip()]
    wanted = [(f, p) for f, p in STEP_ORDER if f in formats and p in paths]
    extra = [(f, "compiled-loop") for f in formats if f not in {s[0] for s in STEP_ORDER}]
    return wanted + extra


def failed_row(fmt: str, path: str, device: str, error: str) -> dict:
    """The row of a step that produced none of its own (killed, crashed or never started)."""
    backend = FORMATS[fmt].backend if fmt in FORMATS else fmt
    return {"backend": backend, "format_slug": fmt, "path": path, "device": device, "error": error, "measured": False}


def orchestrate(ns: argparse.Namespace, passthrough: list[str]) -> list[dict]:
    """Run each step in a subprocess under the time budget; rewrite the JSON after each one."""
    out = Path(ns.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    _work_file(ns, "").mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    log_file = _work_file(ns, f"{out.stem}.log")
    deadline = time.monotonic() + ns.budget_s
    installed, extra_path = install_wheels(Path(ns.wheels)) if ns.install_wheels else ("not asked", None)
    notes = {"install": installed}
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, env.get("PYTHONPATH")]))
    for fmt, path in steps_for(ns.formats.split(","), ns.paths.split(","), ns.steps):
        left = deadline - time.monotonic()
        if left < 30:
            rows.append(failed_row(fmt, path, ns.device, "skipped: the time budget was spent"))
            continue
        row_file = _work_file(ns, f".{out.stem}.{fmt}.{path}.json")
        command = [sys.executable, str(REPO / "bench" / "gpu_speed.py"), "--step", f"{fmt}:{path}",
                   "--row-out", str(row_file), *passthrough]
        started = time.monotonic()
        # The step's output streams into one log beside the JSON, so a step killed at its time limit still
        # shows how far it got; its last lines (tracebacks, skipped CUDA graphs) also travel with its row.
        with log_file.open("a") as sink:
            sink.write(f"=== {fmt}:{path} ===\n")
            sink.flush()
            offset = sink.tell()
            try:
                done = subprocess.run(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                      timeout=min(ns.step_timeout_s, left), check=False)
                error = None if row_file.is_file() else f"step exited {done.returncode}"
            except subprocess.TimeoutExpired:
                error = f"step timed out after {min(ns.step_timeout_s, left):.0f} s"
        with log_file.open("rb") as source:
            source.seek(offset)
            tail = [line[:300] for line in source.read().decode(errors="replace").strip().splitlines()[-12:]]
        if error is None:
            row = json.loads(row_file.read_text())
        else:
            row = failed_row(fmt, path, ns.device, f"{error}: {' | '.join(tail[-3:])[:400]}")
        row["log_tail"] = tail
        row_file.unlink(missing_ok=True)
        row["step_seconds"] = round(time.monotonic() - started, 1)
        row["setup"] = notes
        rows.append(row)
        _write(out, rows)
    _write(out, rows)
    return rows


def orchestrate_parallel(ns: argparse.Namespace, passthrough: list[str]) -> list[dict]:
    """``--parallel``: start every loop step at once, so their compiles (minutes each, mostly one CPU core) overlap;
    once each has compiled (or died), let them time one after another, alone on the GPU. The rows are those of
    ``orchestrate``, each with its own log appended to ``<json>.log``. Other paths (HF generate) run after, one
    at a time."""
    import tempfile

    out = Path(ns.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    _work_file(ns, "").mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + ns.budget_s
    installed, extra_path = install_wheels(Path(ns.wheels)) if ns.install_wheels else ("not asked", None)
    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, env.get("PYTHONPATH")]))
    steps = steps_for(ns.formats.split(","), ns.paths.split(","), ns.steps)
    loops = [step for step in steps if step[1] != "hf-generate"]
    turns = Path(tempfile.mkdtemp(prefix="gpu-speed-turns-"))
    running = {}
    for fmt, path in loops:
        key = f"{fmt}.{path}"
        row_file = _work_file(ns, f".{out.stem}.{key}.json")
        log = _work_file(ns, f".{out.stem}.{key}.log")
        command = [sys.executable, str(REPO / "bench" / "gpu_speed.py"), "--step", f"{fmt}:{path}",
                   "--row-out", str(row_file), "--turn-dir", str(turns), *passthrough]
        sink = log.open("w")
        running[key] = (fmt, path, row_file, log, sink, time.monotonic(),
                        subprocess.Popen(command, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, env=env))
    # Everyone compiles at once; nobody times before every step has compiled or stopped.
    while time.monotonic() < deadline and any(
            proc.poll() is None and not (turns / f"{key}.ready").exists()
            for key, (*_, proc) in running.items()):
        time.sleep(0.5)
    rows = []
    for key, (fmt, path, row_file, log, sink, started, proc) in running.items():
        error = None
        if proc.poll() is None and (turns / f"{key}.ready").exists():
            (turns / f"{key}.go").touch()
            try:
                proc.wait(timeout=max(10.0, min(ns.step_timeout_s, deadline - time.monotonic() + 60)))
            except subprocess.TimeoutExpired:
                error = "timed out while being timed"
        elif proc.poll() is None:
            error = "had not compiled when the time budget was spent"
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sink.close()
        tail = [line[:300] for line in log.read_text(errors="replace").strip().splitlines()[-12:]]
        if error is None and row_file.is_file():
            row = json.loads(row_file.read_text())
        else:
            error = error or f"step exited {proc.returncode}"
            row = failed_row(fmt, path, ns.device, f"{error}: {' | '.join(tail[-3:])[:400]}")
        row["log_tail"] = tail
        row["step_seconds"] = round(time.monotonic() - started, 1)
        row["setup"] = {"install": installed, "parallel_compile": [k for k in running]}
        with _work_file(ns, f"{out.stem}.log").open("a") as whole:
            whole.write(f"=== {fmt}:{path} (parallel) ===\n{log.read_text(errors='replace')}")
        row_file.unlink(missing_ok=True)
        log.unlink(missing_ok=True)
        rows.append(row)
        _write(out, rows)
    shutil.rmtree(turns, ignore_errors=True)
    rest = [f"{fmt}:{path}" for fmt, path in steps if path == "hf-generate"]
    if rest and time.monotonic() < deadline:
        ns.steps, ns.install_wheels = ",".join(rest), False
        ns.budget_s = deadline - time.monotonic()
        earlier = rows
        rows = orchestrate(ns, passthrough)
        rows = earlier + rows
        _write(out, rows)
    return rows


def _work_file(ns: argparse.Namespace, name: str) -> Path:
    """Where a step's row file and the log go: ``--work-dir``, else beside the JSON."""
    return Path(ns.work_dir or Path(ns.json).parent) / name


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(rows, indent=2))
    os.replace(partial, path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-config", default="llama-3.1-8b", help="catalog config name or a config.json path")
    p.add_argument("--formats", default="bf16,int8wo,int4wo,float8wo,nf4")
    p.add_argument("--paths", default="compiled-loop,hf-generate,eager-loop",
                   help="compiled-loop (static cache + torch.compile), hf-generate (eager), eager-loop")
    p.add_argument("--device", default="cuda")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=200, help="decode steps per repetition (compiled/eager loop)")
    p.add_argument("--hf-new-tokens", type=int, default=48, help="decode steps per repetition of HF generate")
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--compile-mode", default="reduce-overhead", help="reduce-overhead | max-autotune | default")
    p.add_argument("--keep-head-bf16", action="store_true",
                   help="leave the output head in BF16 (torchao's benchmark quantizes every linear, the head too)")
    p.add_argument("--all-directions", action="store_true",
                   help="inductor coordinate_descent_check_all_directions (torchao sets it; much longer compiles)")
    p.add_argument("--keep-subclasses", action="store_true",
                   help="compile torchao's tensor-subclass weights as they are (no unwrap_tensor_subclass)")
    p.add_argument("--skip-guards", action="store_true",
                   help="time the compiled loop with torch.compiler.set_stance(skip_guard_eval_unsafe=True)")
    p.add_argument("--fuse-projections", action="store_true",
                   help="q/k/v and gate/up as one linear each (gpt-fast's layout); a step can ask for it alone "
                        "as compiled-loop:fused-projections")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="after timing, profile this many compiled decode steps (top kernels, launches) on CUDA")
    p.add_argument("--dtype", default="bf16", help="bf16 (GPU) | fp32 (a CPU dry run)")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (a quick dry run)")
    p.add_argument("--hidden", type=int, default=None, help="override hidden/intermediate/vocab (dry run)")
    p.add_argument("--budget-s", type=float, default=470.0, help="stop starting steps after this many seconds")
    p.add_argument("--step-timeout-s", type=float, default=240.0)
    p.add_argument("--install-wheels", action="store_true", help="pip install --no-deps the wheels in --wheels")
    p.add_argument("--wheels", default=str(REPO / "bench" / "wheels"))
    p.add_argument("--json", default="gpu_speed.json", help="output file (rewritten after each step)")
    p.add_argument("--work-dir", default=None,
                   help="folder for the steps' row files and the log (default: beside --json)")
    p.add_argument("--steps", default=None,
                   help="explicit steps instead of formats x paths, e.g. float8wo:compiled-loop,int8wo:hf-generate")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="merge earlier result files (later rows replace earlier ones of the same step) into --json")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)
    p.add_argument("--row-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--turn-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--parallel", action="store_true",
                   help="compile every loop step at the same time, then time them one after another")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny 2-layer config, few tokens (checks the code paths, e.g. on a CPU)")
    return p


def args_from(ns: argparse.Namespace) -> Args:
    name, config = load_config(ns.model_config)
    if ns.dry_run:
        ns.layers = ns.layers or 2
        ns.hidden = ns.hidden or 256
        ns.new_tokens, ns.hf_new_tokens, ns.prompt_tokens, ns.repetitions = 8, 4, 16, 1
    if ns.layers:
        config = {**config, "num_hidden_layers": ns.layers}
    if ns.hidden:
        heads = config["num_attention_heads"]
        config = {**config, "hidden_size": ns.hidden, "intermediate_size": 4 * ns.hidden, "vocab_size": 8 * ns.hidden,
                  "num_attention_heads": max(1, ns.hidden // 64), "head_dim": 64,
                  "num_key_value_heads": max(1, min(config.get("num_key_value_heads", heads), ns.hidden // 64))}
    return Args(config, name, ns.device, ns.prompt_tokens, ns.new_tokens, ns.hf_new_tokens, ns.repetitions,
                ns.compile_mode, {"bf16": torch.bfloat16, "fp32": torch.float32}[ns.dtype],
                quantize_head=not ns.keep_head_bf16, profile_steps=ns.profile_steps, all_directions=ns.all_directions,
                unwrap_subclasses=not ns.keep_subclasses, skip_guards=ns.skip_guards, turn_dir=ns.turn_dir,
                fuse_projections=ns.fuse_projections)


def merge(files: list[str], out: str) -> list[dict]:
    """One result list from several runs: the last measured row of each (format, path) wins, in step order."""
    rows: dict[tuple[str, str], dict] = {}
    for file in files:
        data = json.loads(Path(file).read_text())
        # A run's file is a list; a committed result holds its rows under "rows", or several runs under "runs",
        # whose GPUs may differ, so one of those is merged only as its own run's file.
        if isinstance(data, dict) and "runs" in data:
            raise SystemExit(f"gpu_speed: {file} holds several runs; merge the file of one run.")
        for row in data["rows"] if isinstance(data, dict) else data:
            key = (row.get("format_slug"), row.get("path"))
            if row.get("decode_tokens_per_s") or key not in rows:
                rows[key] = row
    order = {step: i for i, step in enumerate(STEP_ORDER)}
    merged = sorted(rows.values(), key=lambda r: order.get((r.get("format_slug"), r.get("path")), len(order)))
    _write(Path(out), merged)
    return merged


def step_arguments(argv: list[str]) -> list[str]:
    """The command line minus the orchestrator's own options: what each step's subprocess gets."""
    kept, skip_next = [], False
    for token in argv:
        if skip_next:
            skip_next = False
            continue
        key = token.split("=", 1)[0]
        if key in OWN_OPTIONS:
            skip_next = "=" not in token and key not in FLAGS
            continue
        kept.append(token)
    return kept


def end_with_parent() -> None:
    """Have Linux kill this process when the process that started it ends. The Speed page starts this program,
    which starts a step process per format: were the dashboard's server killed, they would otherwise hold the GPU
    and its memory until their own time budget (minutes) ran out."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    set_parent_death_signal = 1  # PR_SET_PDEATHSIG, <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(set_parent_death_signal, int(signal.SIGKILL))
    if os.getppid() != STARTED_BY:  # the parent ended before the request was made
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parser().parse_args(argv)
    if ns.step:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
        fmt, path = ns.step.split(":", 1)
        row = run_step(args_from(ns), fmt, path)
        Path(ns.row_out).write_text(json.dumps(row, indent=2))
        return 0
    if ns.merge:
        rows = merge(ns.merge, ns.json)
    elif ns.parallel:
        rows = orchestrate_parallel(ns, step_arguments(argv))
    else:
        rows = orchestrate(ns, step_arguments(argv))
    for row in rows:
        rate = row.get("decode_tokens_per_s")
        shown = f"{rate:.1f} tok/s" if rate else row.get("error")
        print(f"{row.get('format_slug', '?'):9} {row.get('path', '?'):14} {shown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    end_with_parent()
    sys.exit(main())
