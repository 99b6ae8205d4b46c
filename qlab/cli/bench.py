"""``python -m qlab bench``: measured speed of real quantization backends (CPU), or the GPU benchmark.

    python -m qlab bench --model smollm2-135m --backends fp32,torch-dynamic-int8,llamacpp-q4_0 --json OUT
    python -m qlab bench --device cuda --model-config llama-3.1-8b --formats bf16,int8wo,int4wo,float8wo,nf4 \
        --json OUT

``qlab.cli.build_parser`` wires it with ``add_bench_arguments(bench_parser, json_option)`` on the ``bench``
parser itself, whose ``sweep`` sub-subcommand then becomes optional (``required=False``): ``bench sweep ...``
keeps working, and ``bench --model ...`` runs this. ``qlab.cli`` is imported inside functions (no cycle).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable

DEFAULT_CPU_BACKENDS = "all"


def add_bench_arguments(parser: argparse.ArgumentParser,
                        json_option: Callable[[argparse.ArgumentParser, str], None]) -> argparse.ArgumentParser:
    """Add the speed-benchmark options to the ``bench`` parser and make it run ``cmd_bench`` by default."""
    parser.add_argument("--model", default="smollm2-135m", help="bundled slug, local directory or HF id (CPU)")
    parser.add_argument("--backends", default=DEFAULT_CPU_BACKENDS,
                        help="comma-separated backend slugs, or 'all' (every one for the model's kind; "
                             "unavailable ones are listed with the reason)")
    parser.add_argument("--device", default="cpu", help="cpu (real backends on a bundled model) | cuda (GPU "
                                                        "benchmark on a random-initialised catalog config)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prefill length")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps per repetition")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded at once")
    parser.add_argument("--repetitions", type=int, default=3, help="timed runs after one warm-up")
    parser.add_argument("--sentences", type=int, default=32, help="embedding models: texts per timed batch")
    parser.add_argument("--accuracy-tokens", type=int, default=512,
                        help="evaluation tokens for accuracy vs FP32 and vs the simulated twin (0: skip)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-bandwidth", action="store_true", help="skip the memory read-bandwidth test")
    parser.add_argument("--model-config", default="llama-3.1-8b", help="--device cuda: catalog config name")
    parser.add_argument("--formats", default="bf16,int8wo,int4wo,float8wo,nf4",
                        help="--device cuda: bf16, int8wo, int4wo, float8wo, nf4, int8dq")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--db", default=None, metavar="PATH",
                        help="also store each backend's row, as it finishes, in this run database "
                             "(default: $QLAB_DB if set; CPU runs)")
    json_option(parser, "write the rows as JSON, rewritten after each backend")
    parser.set_defaults(func=cmd_bench)
    return parser


def cmd_bench(args: argparse.Namespace) -> None:
    """Run the CPU benchmark (or hand over to the GPU one) and print or write its rows."""
    if args.device == "cuda":
        _gpu(args)
        return
    from qlab.cli import _emit

    rows = run_cpu(args)
    if args.json is not None:
        _emit(rows, args.json)
        return
    _print(rows)


def run_cpu(args: argparse.Namespace) -> list[dict]:
    """Measure every requested backend on a bundled model; rows rewritten to ``args.json`` as they finish."""
    import torch
    from tqdm import tqdm

    from qlab import backends

    from qlab.models.loading import hardware

    from qlab.backends import speed
    from qlab.cli import _emit
    from qlab.core.errors import QlabError
    from qlab.models.loading import load
    from qlab.store import Recorder, bench_meta, requested_path

    if args.device != "cpu":
        raise QlabError(f"unknown device '{args.device}'; use cpu or cuda.")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = speed.SpeedSpec(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, batch=args.batch,
                           repetitions=args.repetitions, sentences=args.sentences)
    db = requested_path(getattr(args, "db", None))  # checked before the model loads
    loaded = load(args.model)
    chosen = ([b for b in backends.all_backends() if loaded.kind in b.kinds] if args.backends.strip() == "all"
              else backends.parse_backends(args.backends))
    bandwidth = None if args.no_bandwidth else speed.measure_bandwidth()
    machine = _machine(hardware.detect_this_machine(), bandwidth)
    rows: list[dict] = []
    meta = bench_meta(loaded, spec, [b.slug for b in chosen], args.accuracy_tokens or None, "cpu",
                      threads=torch.get_num_threads(), machine=machine) if db else None
    with (tqdm(total=1000, desc="bench", unit="‰", file=sys.stderr, disable=args.quiet,
               bar_format="{desc} {bar} {percentage:3.0f}% [{elapsed}<{remaining}]") as bar,
          Recorder(db, meta) if db else contextlib.nullcontext() as recorder):
        def progress(fraction: float, message: str) -> None:
            bar.set_description_str(message[:40].ljust(40))
            bar.update(int(fraction * 1000) - bar.n)

        for row in speed.run_bench(loaded, chosen, spec, "cpu", args.accuracy_tokens or None, bandwidth,
                                   progress=progress):
            rows.append({**row, **machine})
            speed.add_ratios(rows)
            if recorder:  # committed before the next backend starts: a killed run keeps it
                recorder.save(rows[-1], "bench")
            if args.json not in (None, "-"):
                _emit(rows, args.json)
    return rows


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


def _gpu(args: argparse.Namespace) -> None:
    import torch

    from qlab import gpu_bench
    from qlab.core.errors import QlabError

    if not torch.cuda.is_available():
        raise QlabError("--device cuda needs a CUDA GPU, and torch sees none here; run it on a GPU machine "
                        "(`python bench/gpu_speed.py --dry-run --device cpu --dtype fp32` checks the code paths).")

    step_args = ["--model-config", args.model_config, "--device", "cuda", "--prompt-tokens",
                 str(args.prompt_tokens), "--repetitions", str(args.repetitions)]
    out = args.json if args.json not in (None, "-") else "bench/results/gpu_speed.json"
    ns = gpu_bench.parser().parse_args([*step_args, "--formats", args.formats, "--json", out])
    _print(gpu_bench.orchestrate(ns, step_args))


def _print(rows: list[dict]) -> None:
    import pandas as pd

    columns = [c for c in ("backend", "path", "format", "prefill_ms", "decode_tokens_per_s",
                           "decode_tokens_per_s_spread_pct", "sentences_per_s", "speedup_vs_fp32", "kld_mean",
                           "twin_kld_mean", "cosine_mean", "twin_cosine_mean", "agrees_with_twin",
                           "roofline_fraction", "peak_memory_bytes", "error", "reason")
               if any(r.get(c) is not None for r in rows)]
    print(pd.DataFrame(rows).reindex(columns=columns).to_string(index=False))


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m qlab.cli.bench ...``) until ``qlab.cli`` wires ``bench`` to it."""
    from qlab.cli import _Parser

    parser = _Parser(prog="qlab bench")

    def json_option(p: argparse.ArgumentParser, help_text: str) -> None:
        p.add_argument("--json", nargs="?", const="-", default=None, metavar="OUT",
                       help=help_text + " (no path or '-': stdout)")

    add_bench_arguments(parser, json_option)
    from qlab.core.errors import QlabError

    try:
        args = parser.parse_args(argv)
        args.func(args)
    except QlabError as error:
        print(f"qlab: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
