"""``python -m qlab sweep``: quantize a model at several formats and measure accuracy against the base model."""

from __future__ import annotations

import argparse

from qlab.cli.common import (
    add_algorithm_arguments,
    add_eval_arguments,
    add_scheme_arguments,
    db_option,
    device_options,
    emit,
    eval_spec,
    json_option,
    load_options,
    progress_bar,
    quiet_option,
    scheme_from_args,
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``sweep`` subcommand to qlab's parser."""
    parser = subparsers.add_parser("sweep", help="quantize a model at several formats and measure accuracy")
    parser.add_argument("--model", default="smollm2-135m", help="bundled slug, local directory or HF id")
    parser.add_argument("--formats", default="fp32,fp16,int8,int4")
    add_eval_arguments(parser)
    quiet_option(parser)
    db_option(parser, "run database to store into (default: $QLAB_DB, else the user's data directory)")
    parser.add_argument("--no-store", action="store_true", help="do not record this sweep in the run database")
    parser.add_argument("--hardware", default="this-machine", help="hardware id recorded with the run")
    add_algorithm_arguments(parser)
    device_options(parser)
    add_scheme_arguments(parser, granularity="channel")
    json_option(parser, "write the result rows as JSON, rewritten after each scheme")
    parser.set_defaults(func=cmd_sweep)
    return parser


def cmd_sweep(args: argparse.Namespace) -> None:
    """Run the sweep, storing and writing each scheme's row as it finishes; print a table without ``--json``."""
    from qlab.analyses.sweep import check_schemes, parse_formats, run_sweep
    from qlab.models.loading import load
    from qlab.store import requested_path

    schemes = [scheme_from_args(args, f) for f in parse_formats(args.formats)]
    spec = eval_spec(args)
    db = None if args.no_store else requested_path(args.db, default=True)  # checked before the model loads
    loaded = load(args.model, **load_options(args))
    check_schemes(loaded, schemes, spec)  # before the baseline: a text too short to calibrate on stores nothing
    records: list[dict] = []
    with progress_bar(args.quiet, "sweep") as progress:
        rows = run_sweep(loaded, schemes, spec, progress=progress)
        if db is not None:  # each scheme is committed to the run store as it finishes
            from qlab.store import store_rows, sweep_meta

            meta = sweep_meta(loaded, schemes, spec, args.hardware)  # run_meta records where the model ran
            rows = store_rows(db, meta, rows)
        for row in rows:
            records.append(row.to_record())
            if args.json not in (None, "-"):
                emit(records, args.json)  # after every scheme: a killed sweep keeps what it finished
    if args.json == "-":
        emit(records, "-")
    elif args.json is None:
        _print_table(records)


def _print_table(records: list[dict]) -> None:
    import pandas as pd

    columns = [c for c in ("label", "bits_per_weight", "size_bytes", "ppl", "kld_mean", "kld_p99",
                           "top1_agreement", "cosine_mean", "retrieval_agreement", "seconds")
               if c in records[0]]
    print(pd.DataFrame(records)[columns].to_string(index=False))
