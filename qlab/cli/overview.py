"""``python -m qlab overview``: the dashboard's Overview headless: which format to ship on a target, and why."""

from __future__ import annotations

import argparse
import math
import sys

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
    output_file,
    progress_bar,
    quiet_option,
    scheme_from_args,
    write_atomic,
)
from qlab.core.errors import QlabError

TOP_LAYERS = 10
SENSITIVITY_COLUMNS = ("layer", "scheme", "layer_type", "score", "output_error", "sqnr_db")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``overview`` subcommand to qlab's parser."""
    parser = subparsers.add_parser(
        "overview", help="the verdict: which format to ship on a target, with memory, accuracy, speed and "
                         "sensitivity")
    parser.add_argument("--model", default="smollm2-135m", help="bundled slug, local directory or HF id")
    parser.add_argument("--hardware", default="this-machine",
                        help="target: a catalog id such as h100-sxm-80gb or rtx-4090, or this-machine")
    parser.add_argument("--formats", default="fp32,fp16,int8,int4,nf4")
    parser.add_argument("--bound", type=float, default=None,
                        help="accuracy bound: the most KL divergence (nats/token, LMs) or 1 - cosine (embedding "
                             "models) a format may lose (default 0.01 and 0.001)")
    parser.add_argument("--no-measure", action="store_true", help="skip the short speed measurement here")
    parser.add_argument("--speed-cap", type=float, default=None, metavar="SECONDS",
                        help="time cap of the speed measurement, all formats together: each format's runs repeat "
                             "until they agree within 10 %% or its share of the cap is spent (default 30)")
    device_options(parser)
    add_eval_arguments(parser)
    add_scheme_arguments(parser, granularity="group")
    add_algorithm_arguments(parser)
    quiet_option(parser)
    db_option(parser, "run database to reuse results from and store into (default: $QLAB_DB, else the user's "
                      "data directory)")
    parser.add_argument("--no-store", action="store_true", help="neither reuse nor store results")
    parser.add_argument("--html", default=None, metavar="OUT", type=output_file,
                        help="also write the overview as one self-contained HTML file")
    json_option(parser, "write the verdict and every piece as JSON")
    parser.set_defaults(func=cmd_overview)
    return parser


def cmd_overview(args: argparse.Namespace) -> None:
    """Restore what the run store holds, compute the rest cheapest first (each piece stored as it finishes),
    then print the verdict, or write it with every piece as JSON."""
    from qlab.analyses import overview
    from qlab.analyses.sweep import check_schemes, parse_formats
    from qlab.analyses.verdict import details, loss_measure
    from qlab.models import hardware
    from qlab.models.loading import load
    from qlab.store import Store, requested_path
    from qlab.store import overview as recorded

    hardware.get(args.hardware)  # an unknown target and a bad bound are said before the model loads
    if args.bound is not None and not (math.isfinite(args.bound) and args.bound >= 0):
        raise QlabError(f"--bound must be a number of 0 or more, got {args.bound:g}.")
    schemes = tuple(scheme_from_args(args, f) for f in parse_formats(args.formats))
    cap = {} if args.speed_cap is None else {"speed_cap_s": args.speed_cap}
    request = overview.OverviewRequest(schemes, args.hardware, eval_spec(args), **cap)
    db = None if args.no_store else requested_path(args.db, default=True)
    loaded = load(args.model, **load_options(args))
    check_schemes(loaded, list(schemes), request.spec)
    bound = loss_measure(loaded.kind).default_bound if args.bound is None else args.bound
    store = Store(db) if db is not None else None
    pieces = recorded.restore(store, loaded, request) if store is not None else overview.Pieces()
    recorded.fill_arithmetic(loaded, request, pieces)
    todo = recorded.steps(loaded, request, pieces, measure_here=not args.no_measure)
    if not args.quiet:
        for step in todo:
            if step.announced:
                print(f"{step.title}: about {step.seconds:.0f} s", file=sys.stderr)
    with progress_bar(args.quiet, "overview") as progress:
        job = recorded.OverviewJob(loaded, request, pieces, todo, store,
                                   listener=lambda step, fraction, message: progress(
                                       (todo.index(step) + fraction) / len(todo), f"{step.title}: {message}"))
        job.run()
    for piece, state in job.state.items():
        if state == "failed":
            print(f"qlab: {overview.TITLES[piece]} failed: {job.notes[piece]}", file=sys.stderr)
    answer = overview.decide(pieces, request, loaded.kind, bound)
    if args.html:
        layer = overview.most_sensitive_layer(pieces, request)
        grids = overview.layer_grids(loaded, layer, schemes) if layer else None
        notes = [loaded.source.caveat] if loaded.source.caveat else []
        write_atomic(args.html, recorded.overview_html(loaded.name, request, answer,
                                                       recorded.panel_figures(pieces, request, answer, grids), notes))
    if args.json is not None:
        emit(payload(loaded, request, pieces, answer, job), args.json)
        return
    print(answer.headline)
    for line in details(answer):
        print(f"- {line}")
    print(f"Rule: {answer.rule}")


def payload(loaded, request, pieces, answer, job) -> dict:
    """The JSON form: the verdict, each piece's records in the request's order, and how each step ended."""
    from qlab.analyses.overview import REFERENCE
    from qlab.store.overview import sensitivity_frame

    labels = [s.label for s in request.schemes]
    with_reference = labels + ([REFERENCE.label] if REFERENCE.label not in labels else [])
    top = sensitivity_frame(pieces, request, TOP_LAYERS)
    return {
        "model": loaded.name, "kind": loaded.kind, "hardware": request.hardware_id,
        "formats": labels, "tokens": request.spec.tokens, "context_tokens": request.context_for(loaded),
        "verdict": answer.to_record(),
        "memory": [pieces.memory[label] for label in labels if label in pieces.memory],
        "sweep": [pieces.sweep[label] for label in labels if label in pieces.sweep],
        "predicted": [pieces.predicted[label] for label in with_reference if label in pieces.predicted],
        "measured": [pieces.measured[label] for label in with_reference if label in pieces.measured],
        "sensitivity_top": [] if top.empty else top[[c for c in SENSITIVITY_COLUMNS if c in top]].to_dict("records"),
        "steps": [{"piece": step.piece, "estimated_seconds": round(step.seconds, 1), "state": job.state[step.piece],
                   "note": job.notes.get(step.piece) or None} for step in job.todo],
        "skipped": dict(pieces.skipped),
        "caveat": loaded.source.caveat,
    }
