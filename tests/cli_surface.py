"""The CLI's outward surface: every command's ``--help`` text and the JSON keys of the quick commands.

``tests/data/cli_surface.json`` holds it as it was before the package reshaping; ``test_cli_surface.py``
compares. Regenerate on purpose with ``python -m tests.cli_surface`` after a deliberate CLI change.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
from pathlib import Path

SNAPSHOT = Path(__file__).parent / "data" / "cli_surface.json"

# Commands cheap enough to run in a unit test (no model load); their JSON's key structure is the schema.
QUICK_COMMANDS = {
    "quantize": ["quantize", "--values=-2.45,1.32,0.67,-0.89", "--format", "int8", "--json"],
    "formats": ["formats", "--json"],
    "models": ["models", "--json"],
    "memory": ["memory", "--model", "llama-3.1-8b", "--format", "int4", "--group-size", "128",
               "--hardware", "h100-sxm-80gb", "--json"],
    "explain bits": ["explain", "bits", "0.87654321", "--json"],
    "explain affine": ["explain", "affine", "--values=-2.45,1.32,0.67,-0.89", "--scale", "0.019", "--json"],
}


def _help_texts(parser: argparse.ArgumentParser, path: str, out: dict[str, str]) -> None:
    out[path] = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                _help_texts(child, f"{path} {name}", out)


def _shape(value):
    """Keys and value types, not values: what a consumer of the JSON relies on."""
    if isinstance(value, dict):
        return {key: _shape(item) for key, item in sorted(value.items())}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return type(value).__name__


def surface() -> dict:
    from qlab.cli import build_parser, main

    os.environ["COLUMNS"] = "120"
    helps: dict[str, str] = {}
    _help_texts(build_parser(), "qlab", helps)
    schemas = {}
    for name, argv in QUICK_COMMANDS.items():
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            status = main(argv)
        schemas[name] = {"status": status, "shape": _shape(json.loads(buffer.getvalue()))}
    return {"help": helps, "json": schemas}


if __name__ == "__main__":
    SNAPSHOT.write_text(json.dumps(surface(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT}")
