"""``python -m qlab report``: a self-contained HTML report of stored runs, side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

from qlab.cli.common import db_option, output_file, write_atomic


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``report`` subcommand to qlab's parser."""
    report = subparsers.add_parser("report", help="self-contained HTML report of stored runs")
    report.add_argument("--run", action="append", required=True, metavar="ID",
                        help="run id; repeat to compare several side by side")
    report.add_argument("--out", required=True, metavar="PATH", type=output_file, help="HTML file to write")
    report.add_argument("--title", default=None)
    db_option(report)
    report.set_defaults(func=cmd_report)
    return report


def cmd_report(args: argparse.Namespace) -> None:
    """Render the runs to one HTML file and say where it is and how large."""
    from qlab.store import Store
    from qlab.store.report import render_html

    store = Store(args.db)
    runs = [store.get(r) for r in args.run]
    out = Path(args.out)
    write_atomic(args.out, render_html(runs, args.title))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {len(runs)} run(s))")
