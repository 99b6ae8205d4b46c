"""``python -m qlab sensitivity`` and ``python -m qlab recommend``: per-layer sensitivity and mixed precision."""

from __future__ import annotations

import argparse
import contextlib
import functools
from collections.abc import Callable, Iterator

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

DEFAULT_FORMATS = "int8,int4"
TABLE_COLUMNS = ("layer", "label", "estimated_delta", "block_delta", "linear_delta", "predicted_delta",
                 "relative_mse", "sqnr_db", "weight_kurtosis", "input_outlier_channels")
QUICK_COLUMNS = ("layer", "scheme", "score", "output_error", "error_cost", "sqnr_db")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``sensitivity`` and ``recommend`` subcommands to qlab's parser."""
    sensitivity = subparsers.add_parser(
        "sensitivity", help="per-layer sensitivity: output error per linear, end-to-end delta per block")
    _common_arguments(sensitivity)
    sensitivity.add_argument("--unit", default="block", choices=("block", "linear"),
                             help="measure end to end one block at a time (default) or one linear at a time")
    sensitivity.add_argument("--reverse", action="store_true",
                             help="reverse view: everything quantized except one unit (as AIMET reports it)")
    sensitivity.add_argument("--no-blocks", action="store_true", help="per-linear error only (fastest)")
    sensitivity.add_argument("--no-predict", action="store_true",
                             help="skip the curvature pass that predicts each linear's own delta")
    sensitivity.add_argument("--quick", action="store_true",
                             help="quick ranking from one forward and one backward pass (no end-to-end replays; "
                                  "--unit and --reverse do not apply)")
    add_scheme_arguments(sensitivity, granularity="group")
    add_algorithm_arguments(sensitivity)
    json_option(sensitivity, "write one row per linear layer and format as JSON")
    sensitivity.set_defaults(func=cmd_sensitivity)

    recommend = subparsers.add_parser(
        "recommend", help="a format per layer under a size budget, measured against uniform formats")
    _common_arguments(recommend)
    budget = recommend.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-bits", type=float, default=None, metavar="BITS",
                        help="average bits per quantized weight, scales included (e.g. 4.5)")
    budget.add_argument("--budget-gb", type=float, default=None, metavar="GB",
                        help="whole model as stored, in GB (1e9 bytes); other tensors count at fp16")
    recommend.add_argument("--unit", default="block", choices=("block", "linear"),
                           help="end-to-end measurements per block (default) or per linear (slower, exact)")
    recommend.add_argument("--no-blocks", action="store_true",
                           help="no end-to-end replays: choose by the second-order predictions alone (fastest)")
    recommend.add_argument("--plan", default=None, metavar="PATH",
                           help="also write the plan alone (qlab, torchao FqnToConfig, optimum-quanto map)")
    add_scheme_arguments(recommend, granularity="group")
    add_algorithm_arguments(recommend)
    json_option(recommend, "print the recommendation and the measurements as JSON")
    recommend.set_defaults(func=cmd_recommend)


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="bundled slug, local directory or HF id")
    parser.add_argument("--formats", default=DEFAULT_FORMATS, help="formats to choose among, e.g. int8,int4")
    add_eval_arguments(parser)
    quiet_option(parser)
    db_option(parser, "also store the results, each as it finishes, in this run database "
                      "(default: $QLAB_DB if set)")
    device_options(parser)


@contextlib.contextmanager
def _recording(db, make_meta: Callable[[], object]) -> Iterator[object | None]:
    """A ``qlab.store.Recorder`` into ``db`` (``_setup``'s choice), else None; the run ends with the block."""
    from qlab.store import Recorder

    if db is None:
        yield None
        return
    with Recorder(db, make_meta()) as recorder:
        yield recorder


def _setup(args: argparse.Namespace):
    """Model, schemes and evaluation spec the arguments describe, and the database to store into (``--db`` or
    ``QLAB_DB``, checked before the model loads; None when not storing). A text too short to calibrate the
    schemes' algorithm on is refused here, before any work."""
    from qlab.analyses.sensitivity import check_calibration
    from qlab.analyses.sweep import parse_formats
    from qlab.models.loading import load
    from qlab.store import requested_path

    schemes = [scheme_from_args(args, f) for f in parse_formats(args.formats)]
    spec = eval_spec(args)
    db = requested_path(args.db)
    loaded = load(args.model, **load_options(args))
    check_calibration(loaded, schemes, spec)
    return loaded, schemes, spec, db


def _calibrate(loaded, schemes, spec, progress: Callable[[float, str], None], at: float):
    """``calibrate``'s statistics and record, the bar held at ``at`` meanwhile, and the run settings that
    store the record (as the sweep stores its calibration tokens)."""
    from qlab.analyses.sensitivity import calibrate

    stats, record = calibrate(loaded, schemes, spec, lambda f, m: progress(at, f"calibration: {m}"))
    return stats, record, ({"calibration": record} if record else {})


def cmd_sensitivity(args: argparse.Namespace) -> None:
    """Rows per linear layer and format: output error, weight statistics, end-to-end deltas."""
    from qlab.analyses.sensitivity import analyze
    from qlab.models.evaluate import compute_baseline
    from qlab.store import save_summary, sensitivity_meta, sensitivity_saver

    if args.quick:
        _quick(args)
        return
    loaded, schemes, spec, db = _setup(args)
    view = "reverse" if args.reverse else "forward"
    with progress_bar(args.quiet, "sensitivity") as progress:
        baseline = compute_baseline(loaded, spec, lambda f, m: progress(0.1 * f, f"baseline: {m}"))
        stats, record, stored = _calibrate(loaded, schemes, spec, progress, 0.1)
        meta = functools.partial(sensitivity_meta, "sensitivity", loaded, schemes, spec, baseline, unit=args.unit,
                                 view=view, blocks=not args.no_blocks, predict=not args.no_predict, **stored)
        with _recording(db, meta) as recorder:
            report = analyze(loaded, schemes, baseline, blocks=not args.no_blocks, unit=args.unit, view=view,
                             predict=not args.no_predict, progress=lambda f, m: progress(0.1 + 0.9 * f, m),
                             on_records=recorder and sensitivity_saver(recorder), calibration=stats,
                             calibration_record=record)
            if recorder:
                save_summary(recorder, seconds=report.seconds)
    rows = report.rows()
    if args.json is not None:
        emit(rows, args.json)
        return
    import pandas as pd

    frame = pd.DataFrame(rows)
    columns = [c for c in TABLE_COLUMNS if c in frame.columns and frame[c].notna().any()]
    order = "estimated_delta" if "estimated_delta" in columns else "relative_mse"
    print(frame.sort_values(order, ascending=False)[columns].to_string(index=False))
    if loaded.source.caveat:
        print(f"note: {loaded.source.caveat}")


def _quick(args: argparse.Namespace) -> None:
    """``--quick``: every linear's quick score per format, stored as the Overview stores its quick ranking."""
    from qlab.analyses.sensitivity_quick import quick_sensitivity
    from qlab.core.errors import QlabError
    from qlab.store import run_meta

    if args.reverse or args.unit != "block":
        raise QlabError("--quick measures no end-to-end units, so --reverse and --unit do not apply; drop them.")
    loaded, schemes, spec, db = _setup(args)
    meta = functools.partial(run_meta, "sensitivity_quick", loaded, spec, "this-machine",
                             schemes=[s.to_dict() for s in schemes], method="quick")
    with progress_bar(args.quiet, "quick sensitivity") as progress, _recording(db, meta) as recorder:
        result = quick_sensitivity(loaded, schemes, spec, progress=progress)
        if recorder:
            recorder.save_many(result.to_records(), "sensitivity_quick")
    if args.json is not None:
        emit(result.to_records(), args.json)
        return
    import pandas as pd

    frame = pd.DataFrame(result.records)
    print(frame.sort_values("score", ascending=False)[list(QUICK_COLUMNS)].to_string(index=False))
    if loaded.source.caveat:
        print(f"note: {loaded.source.caveat}")


def cmd_recommend(args: argparse.Namespace) -> None:
    """Analyse, solve for the budget, measure the mix and each uniform format, print the comparison."""
    from qlab.analyses.mixed import Budget, choices_from, compare, recommendation_record
    from qlab.analyses.sensitivity import analyze
    from qlab.core.errors import QlabError
    from qlab.models.evaluate import compute_baseline

    if args.budget_gb is not None and args.budget_gb <= 0:
        raise QlabError("--budget-gb must be positive.")
    budget = Budget(bits_per_weight=args.budget_bits,
                    size_bytes=None if args.budget_gb is None else int(args.budget_gb * 1e9))
    from qlab.store import save_summary, sensitivity_meta, sensitivity_saver

    loaded, schemes, spec, db = _setup(args)
    with progress_bar(args.quiet, "recommend") as progress:
        baseline = compute_baseline(loaded, spec, lambda f, m: progress(0.05 * f, f"baseline: {m}"))
        stats, calibrated, stored = _calibrate(loaded, schemes, spec, progress, 0.05)
        meta = functools.partial(sensitivity_meta, "recommend", loaded, schemes, spec, baseline, unit=args.unit,
                                 blocks=not args.no_blocks, budget_bits=args.budget_bits, budget_gb=args.budget_gb,
                                 **stored)
        with _recording(db, meta) as recorder:
            report = analyze(loaded, schemes, baseline, blocks=not args.no_blocks, unit=args.unit,
                             progress=lambda f, m: progress(0.05 + 0.75 * f, m),
                             on_records=recorder and sensitivity_saver(recorder), calibration=stats,
                             calibration_record=calibrated)
            choices = choices_from(loaded, report)
            mixes, rows = compare(loaded, choices, [budget], baseline,
                                  progress=lambda f, m: progress(0.8 + 0.2 * f, f"measure {m}"),
                                  on_row=recorder and (lambda row: recorder.save(row, "mix")), calibration=stats)
            record = recommendation_record(loaded, report, choices, mixes[0], rows)
            if recorder:
                recorder.save({**record, "label": mixes[0].label}, "recommendation")
                save_summary(recorder, seconds=report.seconds)
    if args.plan:
        emit(record["plan"], args.plan)
    if args.json is not None:
        emit(record, args.json)
        return
    print(f"{loaded.name}: {len(record['assignment'])} linears, budget {budget.label}, "
          f"mix at {record['bits_per_weight']:.3f} bits/weight, {record['size_bytes'] / 1e6:.1f} MB")
    counts: dict[str, int] = {}
    for fmt in record["assignment"].values():
        counts[fmt] = counts.get(fmt, 0) + 1
    print("  layers per format: " + ", ".join(f"{fmt} {n}" for fmt, n in counts.items()))
    for row in rows:
        print(f"  {row['label']:28} {row['bits_per_weight']:7.3f} b/w  {row['size_bytes'] / 1e6:8.1f} MB  "
              f"{report.metric} {row[report.metric]:.6g}")
    if loaded.source.caveat:
        print(f"note: {loaded.source.caveat}")
