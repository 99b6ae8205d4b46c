"""``python -m qlab bench``: measured speed of real quantization backends (CPU), or the GPU benchmark; and
``python -m qlab bench sweep``, the time and memory a sweep costs.

    python -m qlab bench --model smollm2-135m --backends fp32,torch-dynamic-int8,llamacpp-q4_0 --json OUT
    python -m qlab bench --device cuda --model-config llama-3.1-8b --formats bf16,int8wo,int4wo,float8wo,nf4 \
        --json OUT
    python -m qlab bench sweep --model smollm2-135m --formats int8,int4 --json OUT
    python -m qlab bench sweep --model DIR --device cuda --formats bf16,int8,int4,nf4 --tokens 2048 --json OUT

The speed options sit on the ``bench`` parser itself, whose ``sweep`` sub-subcommand is therefore optional
(``required=False``): ``bench --model ...`` runs the speed benchmark, ``bench sweep ...`` the sweep benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from qlab.cli.common import (
    EXIT_USER_ERROR,
    Parser,
    add_scheme_arguments,
    db_option,
    device_options,
    emit,
    json_option,
    load_options,
    progress_bar,
    quiet_option,
    scheme_from_args,
)

DEFAULT_CPU_BACKENDS = "all"
DEFAULT_CPU_MODEL = "smollm2-135m"
DEFAULT_GPU_CONFIG = "llama-3.1-8b"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand (speed) and its ``bench sweep`` sub-subcommand to qlab's parser."""
    bench = subparsers.add_parser("bench", help="speed of real backends (default), or `bench sweep` (JSON out)")
    add_bench_arguments(bench)
    bench_sub = bench.add_subparsers(dest="bench", required=False, parser_class=Parser)
    sweep = bench_sub.add_parser("sweep", help="one evaluation vs each scheme of a sweep: time and peak memory")
    sweep.add_argument("--model", default="smollm2-135m")
    sweep.add_argument("--formats", default="fp16,bf16,int8,int4,nf4")
    sweep.add_argument("--tokens", type=int, default=2048)
    sweep.add_argument("--repeats", type=int, default=0,
                       help="after the sweep, measure each scheme this many times more, each between two base "
                            "evaluations, and report the median ratio (for a machine whose speed drifts)")
    device_options(sweep)
    add_scheme_arguments(sweep, granularity="group")
    db_option(sweep, "also store the result in this run database (default: $QLAB_DB if set)")
    json_option(sweep, "write the benchmark JSON")
    sweep.set_defaults(func=cmd_bench_sweep)
    return bench


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the speed-benchmark options to the ``bench`` parser and make it run ``cmd_bench`` by default."""
    from qlab.backends import gpu_recipe  # torch is loaded already by the CLI's error types; this adds ~20 ms
    parser.add_argument("--model", default=None,
                        help="bundled slug, local directory or HF id (default smollm2-135m); with --device cuda a "
                             "Llama-family model (llama, mistral, qwen2) whose shapes the GPU benchmark builds")
    parser.add_argument("--backends", default=DEFAULT_CPU_BACKENDS,
                        help="comma-separated backend slugs, or 'all' (every one for the model's kind; "
                             "unavailable ones are listed with the reason)")
    parser.add_argument("--device", default="cpu", help="cpu (real backends on --model) | cuda or cuda:N (GPU "
                                                        "benchmark on a random-initialised catalog config)")
    parser.add_argument("--device-map", default=None, choices=["auto"],
                        help="refused: the benchmark times one device (use --device cuda:N)")
    parser.add_argument("--dtype", default=None,
                        help="--model's precision on the CPU: its own (default), bf16, fp16 or fp32; with --device "
                             "cuda: bf16 (default) or fp32")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prefill length")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps per repetition")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded at once")
    parser.add_argument("--repetitions", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--sentences", type=int, default=32, help="embedding models: texts per timed batch")
    parser.add_argument("--accuracy-tokens", type=int, default=512,
                        help="evaluation tokens for accuracy vs FP32 and vs the simulated twin (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-bandwidth", action="store_true", help="skip the memory read-bandwidth test")
    parser.add_argument("--model-config", default=None,
                        help="--device cuda without --model: catalog config name (default llama-3.1-8b)")
    parser.add_argument("--formats", default=None,
                        help=f"--device cuda: {', '.join(gpu_recipe.FORMATS)} "
                             "(default: each format through its fastest kernel installed here)")
    parser.add_argument("--fuse-projections", action="store_true",
                        help="--device cuda: q/k/v and gate/up as one linear each (gpt-fast's layout)")
    quiet_option(parser)
    db_option(parser, "also store each backend's row, as it finishes, in this run database "
                      "(default: $QLAB_DB if set; CPU runs)")
    json_option(parser, "write the rows as JSON, rewritten after each backend")
    parser.set_defaults(func=cmd_bench)
    return parser


def cmd_bench(args: argparse.Namespace) -> None:
    """Run the CPU benchmark (or hand over to the GPU one) and print or write its rows."""
    from qlab.core.errors import QlabError
    from qlab.models.loading import placement_of

    placement = placement_of(args.device, args.device_map)  # a GPU that is not here: one line, before any work
    if placement == "auto":
        raise QlabError("the speed benchmark times one device, not a model spread over every GPU; use --device "
                        "cuda:N (one GPU) or cpu.")
    if placement != "cpu":
        _gpu(args, placement)
        return
    rows = run_cpu(args)
    if args.json is not None:
        emit(rows, args.json)
        return
    _print(rows)


def run_cpu(args: argparse.Namespace) -> list[dict]:
    """Measure every requested backend on ``--model`` on the CPU (in ``--dtype``, else its own); rows rewritten to
    ``args.json`` as they finish."""
    import torch

    from qlab import backends
    from qlab.backends import speed
    from qlab.models import hardware
    from qlab.models.loading import load
    from qlab.store import Recorder, bench_meta, requested_path

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = speed.SpeedSpec(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, batch=args.batch,
                           repetitions=args.repetitions, sentences=args.sentences)
    db = requested_path(getattr(args, "db", None))  # checked before the model loads
    loaded = load(args.model or DEFAULT_CPU_MODEL,
                  **({"dtype": args.dtype} if args.dtype else {}))  # given only when asked, as elsewhere
    chosen = ([b for b in backends.all_backends() if loaded.kind in b.kinds] if args.backends.strip() == "all"
              else backends.parse_backends(args.backends))
    bandwidth = None if args.no_bandwidth else speed.measure_bandwidth()
    machine = _machine(hardware.detect_this_machine(), bandwidth)
    rows: list[dict] = []
    meta = bench_meta(loaded, spec, [b.slug for b in chosen], args.accuracy_tokens or None, "cpu",
                      threads=torch.get_num_threads(), machine=machine,
                      dtype=str(loaded.dtype).removeprefix("torch.")) if db else None
    with (progress_bar(args.quiet, "bench", width=40) as progress,
          Recorder(db, meta) if db else contextlib.nullcontext() as recorder):
        for row in speed.run_bench(loaded, chosen, spec, "cpu", args.accuracy_tokens or None, bandwidth,
                                   progress=progress):
            rows.append({**row, **machine})
            speed.add_ratios(rows)
            if recorder:  # committed before the next backend starts: a killed run keeps it
                recorder.save(rows[-1], "bench")
            if args.json not in (None, "-"):
                emit(rows, args.json)
    return rows


def cmd_bench_sweep(args: argparse.Namespace) -> None:
    """Time one evaluation of the base model against each scheme of a sweep; write the JSON, then store it with
    ``--db``."""
    from qlab.analyses.sweep import parse_formats
    from qlab.analyses.sweep_benchmark import bench_sweep
    from qlab.store import requested_path

    schemes = [scheme_from_args(args, f) for f in parse_formats(args.formats)]
    requested_path(args.db)  # a database that cannot take the result is said before the benchmark, not after
    # The rows so far are written after each scheme (marked incomplete), so a later scheme that fails (out of
    # memory, a kernel that breaks) keeps what was measured; stdout gets the result once, at the end.
    to_file = args.json not in (None, "-")
    result = bench_sweep(args.model, schemes, args.tokens, on_row=(lambda partial: emit(partial, args.json))
                         if to_file else None, repeats=args.repeats, **load_options(args))
    # Written before it is stored: a database that fails now must not throw away minutes of benchmark.
    emit(result, args.json if args.json is not None else "-")
    store_bench_sweep(args, result)


def store_bench_sweep(args: argparse.Namespace, result: dict) -> str | None:
    """With ``--db`` (or ``QLAB_DB``), keep a ``bench sweep`` result as a ``bench`` run, exactly as
    ``runs import`` of its JSON would: sweep rows with their schemes (reusable by the Quantize page and History),
    the timing summary, the weights and text hashes and versions the result carries. The benchmark runs in one
    piece, so it is stored when it ends. Returns the run id (None when not storing)."""
    from qlab.store import Store, requested_path

    db = requested_path(args.db)
    if db is None:
        return None
    [run_id] = Store(db).import_payload(result, "bench sweep")
    return run_id


def _machine(host, bandwidth) -> dict:
    record = {"cpu_model": host.host.cpu_model, "cpu_flags": sorted(host.host.cpu_flags),
              "cpu_native_formats": list(host.host.cpu_native_formats), "usable_cores": host.host.usable_cores}
    if bandwidth is not None:
        record.update({k: v for k, v in bandwidth.to_record().items() if k.startswith("bandwidth")})
    return record


def _gpu(args: argparse.Namespace, placement: str) -> None:
    """Run the GPU benchmark (``qlab.backends.gpu_bench``) on the GPU ``placement`` names ("cuda:N"), on
    ``--model``'s own shapes or a catalog config's, and print its rows. With ``--json`` it writes them there after
    every step; a file named ``bench/results/gpu_speed*.json`` shows on the Speed page."""
    import json
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    from qlab.backends import gpu_bench
    from qlab.core.errors import QlabError

    if args.dtype not in (None, "bf16", "fp32"):
        raise QlabError(f"the GPU benchmark builds its model in bf16 or fp32, not '{args.dtype}'; use --dtype bf16 "
                        "or fp32.")
    if args.model and args.model_config:
        raise QlabError("give --model (your model's shapes) or --model-config (a catalog shape), not both.")
    formats = gpu_bench.check_formats(args.formats.split(",") if args.formats else gpu_bench.fastest_formats())
    with tempfile.TemporaryDirectory(prefix="qlab-gpu-bench-") as scratch:
        config = (gpu_bench.shapes_of(args.model, Path(scratch)) if args.model
                  else args.model_config or DEFAULT_GPU_CONFIG)
        out = Path(args.json).resolve() if args.json not in (None, "-") else Path(scratch) / "gpu_speed.json"
        command = gpu_bench.program_command(config, out, Path(scratch), formats=formats, dtype=args.dtype or "bf16",
                                            prompt_tokens=args.prompt_tokens, repetitions=args.repetitions,
                                            fuse_projections=args.fuse_projections)
        # The program runs on "cuda": showing it only the chosen GPU makes that GPU its cuda:0.
        gpu = {"CUDA_VISIBLE_DEVICES": gpu_bench.visible_index(placement)}
        try:
            subprocess.run(command, check=True, env={**os.environ, **gpu})
        except subprocess.CalledProcessError as error:
            kept = f"; the steps that finished are in {out}" if args.json not in (None, "-") and out.is_file() else ""
            raise QlabError(f"the GPU benchmark stopped with exit status {error.returncode}{kept}.") from None
        _print(json.loads(out.read_text()))


def fastest_gpu_formats() -> str:
    """The formats ``--device cuda`` measures unless ``--formats`` says otherwise (``gpu_bench.fastest_formats``)."""
    from qlab.backends import gpu_bench

    return ",".join(gpu_bench.fastest_formats())


def _print(rows: list[dict]) -> None:
    import pandas as pd

    columns = [c for c in ("backend", "path", "format", "prefill_ms", "decode_tokens_per_s",
                           "decode_tokens_per_s_spread_pct", "sentences_per_s", "speedup_vs_fp32", "kld_mean",
                           "twin_kld_mean", "cosine_mean", "twin_cosine_mean", "agrees_with_twin",
                           "roofline_fraction", "peak_memory_bytes", "error", "reason")
               if any(r.get(c) is not None for r in rows)]
    print(pd.DataFrame(rows).reindex(columns=columns).to_string(index=False))


def main(argv: list[str] | None = None) -> int:
    """Standalone entry for the speed benchmark alone (``python -m qlab.cli.bench ...``)."""
    from qlab.core.errors import QlabError

    parser = Parser(prog="qlab bench")
    add_bench_arguments(parser)

    try:
        args = parser.parse_args(argv)
        args.func(args)
    except QlabError as error:
        print(f"qlab: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
