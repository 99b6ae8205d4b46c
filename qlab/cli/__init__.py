"""``python -m qlab``: every dashboard feature, headless, with ``--json`` output.

A ``QlabError`` becomes one line on stderr and exit status 2; so do argparse's own complaints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from qlab.core.errors import QlabError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line instead of usage plus message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise QlabError(f"{message} (see `{self.prog} --help`)")


def _csv_floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise QlabError(f"--values must be comma-separated numbers, got '{text}'.") from None
    if not values:
        raise QlabError("--values is empty; give numbers like --values=-2.45,1.32,0.67,-0.89.")
    return values


def _add_scheme_arguments(parser: argparse.ArgumentParser, granularity: str) -> None:
    parser.add_argument("--granularity", default=granularity, help="tensor | channel | group")
    parser.add_argument("--group-size", type=int, default=64,
                        help="values per group (64 divides every layer of both bundled models; 128 does not divide SmolLM2's 576)")
    parser.add_argument("--asymmetric", action="store_true", help="integer formats: use a zero-point")
    parser.add_argument("--calibration", default="minmax", help="minmax | percentile | mse")
    parser.add_argument("--percentile", type=float, default=99.9)
    parser.add_argument("--scale-dtype", default="auto", help="auto | fp32 | fp16 | bf16")


def _scheme(args: argparse.Namespace, fmt: str):
    from qlab.core.quant import QuantScheme

    return QuantScheme(format=fmt, granularity=args.granularity, group_size=args.group_size,
                       symmetric=not args.asymmetric, calibration=args.calibration,
                       percentile=args.percentile, scale_dtype=args.scale_dtype,
                       algorithm=getattr(args, "algorithm", "rtn"))


def _emit(payload, destination: str | None) -> None:
    """Print JSON to stdout (``--json`` alone or ``--json -``) or write it to a file atomically."""
    text = json.dumps(payload, indent=2, default=float)
    if destination in (None, "-"):
        print(text)
        return
    _write_atomic(Path(destination), text)


def _write_atomic(path: Path, text: str) -> None:
    # Write-then-rename: a reader (or a kill) never sees half a file.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(text)
        os.replace(partial, path)
    except OSError as error:
        raise QlabError(f"cannot write {path}: {error.strerror}; choose a writable path.") from None


def cmd_quantize(args: argparse.Namespace) -> None:
    import torch

    from qlab.core.quant import quantize

    values = torch.tensor(_csv_floats(args.values), dtype=torch.float32)
    scheme = _scheme(args, args.format)
    qtensor = quantize(values, scheme, scale=args.scale, zero_point=args.zero_point)
    payload = {
        "format": scheme.format,
        "scheme": scheme.label,
        "values": values.tolist(),
        "codes": qtensor.codes.to(torch.float32).tolist() if scheme.fmt.kind == "float"
        else qtensor.codes.to(torch.int64).tolist(),
        "dequantized": qtensor.dequantize().tolist(),
        "scale": None if qtensor.scale is None else _scalar_or_list(qtensor.scale.to(torch.float64)),
        "zero_point": 0 if qtensor.zero_point is None else _scalar_or_list(qtensor.zero_point.to(torch.int64)),
        "nbytes": qtensor.nbytes,
        "fp32_bytes": 4 * values.numel(),
        "bits_per_weight": qtensor.bits_per_weight,
    }
    if args.json is not None:
        _emit(payload, args.json)
        return
    for key in ("format", "codes", "dequantized", "scale", "zero_point", "nbytes"):
        print(f"{key:12} {payload[key]}")


def _scalar_or_list(tensor):
    values = tensor.reshape(-1).tolist()
    return values[0] if len(values) == 1 else values


def cmd_formats(args: argparse.Namespace) -> None:
    from qlab.core.formats import FORMATS

    rows = [{"format": f.name, "bits": f.bits, "kind": f.kind, "scaled": f.scaled,
             "max_abs": f.max_abs, "description": f.description} for f in FORMATS.values()]
    if args.json is not None:
        _emit(rows, args.json)
        return
    for row in rows:
        print(f"{row['format']:10} {row['bits']:>2} bits  {row['kind']:8} {row['description']}")


def cmd_models(args: argparse.Namespace) -> None:
    from qlab.models.loading import bundled_models

    rows = [{"model": m.slug, "kind": m.kind, "title": m.title, "hf_id": m.hf_id, "caveat": m.caveat}
            for m in bundled_models().values()]
    if args.json is not None:
        _emit(rows, args.json)
        return
    for row in rows:
        print(f"{row['model']:14} {row['kind']:10} {row['title']}")


def _eval_spec(args: argparse.Namespace):
    from qlab.models.evaluate import EvalSpec, decode_text

    if args.text_file:
        path = Path(args.text_file)
        if not path.is_file():
            raise QlabError(f"--text-file {path} does not exist or is not a file.")
        return EvalSpec(tokens=args.tokens, text=decode_text(path.read_bytes()), text_name=path.name)
    return EvalSpec(tokens=args.tokens)


def cmd_sweep(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from qlab.models.loading import load
    from qlab.store import requested_path
    from qlab.analyses.sweep import check_schemes, parse_formats, run_sweep

    schemes = [_scheme(args, f) for f in parse_formats(args.formats)]
    spec = _eval_spec(args)
    db = None if args.no_store else requested_path(args.db, default=True)  # checked before the model loads
    loaded = load(args.model, device_map=args.device_map)
    check_schemes(loaded, schemes)
    records: list[dict] = []
    with tqdm(total=1000, desc="sweep", unit="‰", file=sys.stderr, disable=args.quiet,
              bar_format="{desc} {bar} {percentage:3.0f}% [{elapsed}<{remaining}]") as bar:
        def progress(fraction: float, message: str) -> None:
            bar.set_description_str(message[:48].ljust(48))
            bar.update(int(fraction * 1000) - bar.n)

        rows = run_sweep(loaded, schemes, spec, progress=progress)
        if db is not None:  # each scheme is committed to the run store as it finishes
            from qlab.store import store_rows, sweep_meta

            meta = sweep_meta(loaded, schemes, spec, args.hardware, device_map=args.device_map)
            rows = store_rows(db, meta, rows)
        for row in rows:
            records.append(row.to_record())
            if args.json not in (None, "-"):
                _emit(records, args.json)  # after every scheme: a killed sweep keeps what it finished
    if args.json == "-":
        _emit(records, "-")
    elif args.json is None:
        _print_table(records)


def _print_table(records: list[dict]) -> None:
    import pandas as pd

    columns = [c for c in ("label", "bits_per_weight", "size_bytes", "ppl", "kld_mean", "kld_p99",
                           "top1_agreement", "cosine_mean", "retrieval_agreement", "seconds")
               if c in records[0]]
    print(pd.DataFrame(records)[columns].to_string(index=False))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qlab", description="Quantization lab: measure precision trade-offs headless.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def json_option(p: argparse.ArgumentParser, help_text: str) -> None:
        p.add_argument("--json", nargs="?", const="-", default=None, metavar="OUT",
                       help=help_text + " (no path or '-': stdout)")

    quant = sub.add_parser("quantize", help="quantize a few numbers and show codes, scale, zero-point")
    quant.add_argument("--values", required=True, help="comma-separated floats, e.g. --values=-2.45,1.32")
    quant.add_argument("--format", default="int8")
    quant.add_argument("--scale", type=float, default=None, help="explicit scale (overrides calibration)")
    quant.add_argument("--zero-point", type=int, default=None, help="explicit zero-point (asymmetric)")
    _add_scheme_arguments(quant, granularity="tensor")
    json_option(quant, "print JSON")
    quant.set_defaults(func=cmd_quantize)

    sweep = sub.add_parser("sweep", help="quantize a model at several formats and measure accuracy")
    sweep.add_argument("--model", default="smollm2-135m", help="bundled slug, local directory or HF id")
    sweep.add_argument("--formats", default="fp32,fp16,int8,int4")
    sweep.add_argument("--tokens", type=int, default=512, help="evaluation token budget")
    sweep.add_argument("--text-file", default=None, help="UTF-8 text to evaluate on (default: pydoc topics)")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep.add_argument("--db", default=None, metavar="PATH",
                       help="run database to store into (default: $QLAB_DB, else the user's data directory)")
    sweep.add_argument("--no-store", action="store_true", help="do not record this sweep in the run database")
    sweep.add_argument("--hardware", default="this-machine", help="hardware id recorded with the run")
    sweep.add_argument("--algorithm", default="rtn",
                       help="rtn (round to nearest) | gptq (error-compensating; Hessians from 4096 tokens at the "
                            "end of the evaluation text, apart from the tokens evaluated)")
    sweep.add_argument("--device-map", default=None, choices=["auto"],
                       help="'auto': spread a model too large for one device over every GPU (accelerate)")
    _add_scheme_arguments(sweep, granularity="channel")
    json_option(sweep, "write the result rows as JSON, rewritten after each scheme")
    sweep.set_defaults(func=cmd_sweep)

    formats = sub.add_parser("formats", help="list the format registry")
    json_option(formats, "print JSON")
    formats.set_defaults(func=cmd_formats)

    models = sub.add_parser("models", help="list the bundled models")
    json_option(models, "print JSON")
    models.set_defaults(func=cmd_models)

    from qlab.cli.bench import add_bench_arguments
    from qlab.cli.explain import add_parser as add_explain_parser
    from qlab.cli.export import add_parser as add_export_parser
    from qlab.cli.memory import add_parser as add_memory_parser
    from qlab.cli.runs import add_parser as add_runs_parser
    from qlab.cli.sensitivity import add_parser as add_sensitivity_parser

    add_memory_parser(sub, json_option)
    add_sensitivity_parser(sub, json_option)
    add_runs_parser(sub, json_option)
    add_explain_parser(sub, json_option)
    add_export_parser(sub, json_option)

    bench = sub.add_parser("bench", help="speed of real backends (default), or `bench sweep` (JSON out)")
    add_bench_arguments(bench, json_option)
    bench_sub = bench.add_subparsers(dest="bench", required=False, parser_class=_Parser)
    bench_sweep = bench_sub.add_parser("sweep", help="one FP32 evaluation vs a full sweep: time and peak RSS")
    bench_sweep.add_argument("--model", default="smollm2-135m")
    bench_sweep.add_argument("--formats", default="fp16,bf16,int8,int4,nf4")
    bench_sweep.add_argument("--tokens", type=int, default=2048)
    _add_scheme_arguments(bench_sweep, granularity="group")
    bench_sweep.add_argument("--db", default=None, metavar="PATH",
                             help="also store the result in this run database (default: $QLAB_DB if set)")
    json_option(bench_sweep, "write the benchmark JSON")
    bench_sweep.set_defaults(func=cmd_bench_sweep)
    return parser


def cmd_bench_sweep(args: argparse.Namespace) -> None:
    from qlab.analyses.sweep_benchmark import bench_sweep
    from qlab.store import requested_path
    from qlab.analyses.sweep import parse_formats

    schemes = [_scheme(args, f) for f in parse_formats(args.formats)]
    requested_path(args.db)  # a database that cannot take the result is said before the benchmark, not after
    result = bench_sweep(args.model, schemes, args.tokens)
    # Written before it is stored: a database that fails now must not throw away minutes of benchmark.
    _emit(result, args.json if args.json is not None else "-")
    from qlab.cli.bench import store_bench_sweep

    store_bench_sweep(args, result)


def _quiet_libraries() -> None:
    """Keep library warnings (torch, torchao, transformers) off stderr, which carries qlab's own one-line
    errors and progress; set QLAB_DEBUG=1 to see them."""
    if os.environ.get("QLAB_DEBUG"):
        return
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    for name in ("torch", "torchao", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except QlabError as error:
        print(f"qlab: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("qlab: interrupted; finished results were already written.", file=sys.stderr)
        return 130
    return 0
