"""``python -m qlab``: every dashboard feature, headless, with ``--json`` output.

This module only routes: each command lives in its own module with an ``add_parser(sub)``, and what they share
(parser class, options, JSON output, progress bar) in ``qlab.cli.common``. A ``QlabError`` becomes one line on
stderr and exit status 2; so do argparse's own complaints.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from qlab.cli.common import EXIT_USER_ERROR, Parser
from qlab.core.errors import QlabError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """qlab's argument parser, every command wired."""
    # Imported here, not at the top: `python -m qlab.cli.bench` must not find its module already imported.
    from qlab.cli import (
        bench,
        explain,
        export,
        info,
        memory,
        overview,
        placement,
        quantize,
        report,
        runs,
        sensitivity,
        sweep,
    )

    parser = Parser(prog="qlab", description="Quantization lab: measure precision trade-offs headless.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    # In the order `qlab --help` lists them.
    for command in (overview, quantize, sweep, info, memory, sensitivity, runs, report, explain, export, bench,
                    placement):
        command.add_parser(sub)
    return parser


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
    """Parse ``argv`` (default: the command line), run the command; return the exit status."""
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
