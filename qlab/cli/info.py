"""``python -m qlab formats`` and ``python -m qlab models``: the format registry and the bundled models."""

from __future__ import annotations

import argparse

from qlab.cli.common import emit, json_option


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``formats`` and ``models`` subcommands to qlab's parser."""
    formats = subparsers.add_parser("formats", help="list the format registry")
    json_option(formats, "print JSON")
    formats.set_defaults(func=cmd_formats)

    models = subparsers.add_parser("models", help="list the bundled models")
    json_option(models, "print JSON")
    models.set_defaults(func=cmd_models)


def cmd_formats(args: argparse.Namespace) -> None:
    """One row per registered number format."""
    from qlab.core.formats import FORMATS

    rows = [{"format": f.name, "bits": f.bits, "kind": f.kind, "scaled": f.scaled,
             "max_abs": f.max_abs, "description": f.description} for f in FORMATS.values()]
    if args.json is not None:
        emit(rows, args.json)
        return
    for row in rows:
        print(f"{row['format']:10} {row['bits']:>2} bits  {row['kind']:8} {row['description']}")


def cmd_models(args: argparse.Namespace) -> None:
    """One row per bundled model."""
    from qlab.models.loading import bundled_models

    rows = [{"model": m.slug, "kind": m.kind, "title": m.title, "hf_id": m.hf_id, "caveat": m.caveat}
            for m in bundled_models().values()]
    if args.json is not None:
        emit(rows, args.json)
        return
    for row in rows:
        print(f"{row['model']:14} {row['kind']:10} {row['title']}")
