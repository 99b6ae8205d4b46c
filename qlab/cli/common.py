"""What every ``python -m qlab`` command shares: the parser class, the ``--json``/``--db``/scheme/evaluation/device
options, JSON output with atomic writes, and the progress bar on stderr.

Command modules import from here and never from each other or from ``qlab.cli`` (the router), so the package
has no import cycle.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from qlab.core.errors import QlabError
from qlab.core.files import partial_path, remove_stale_partials

EXIT_USER_ERROR = 2
DB_HELP = "run database (default: $QLAB_DB, else $XDG_DATA_HOME/qlab/runs.sqlite)"


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line instead of usage plus message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise QlabError(f"{message} (see `{self.prog} --help`)")


def json_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    """Add ``--json [OUT]``: JSON to stdout, or to the file OUT."""
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="OUT", type=output_file,
                        help=help_text + " (no path or '-': stdout)")


def db_option(parser: argparse.ArgumentParser, help_text: str = DB_HELP) -> None:
    """Add ``--db PATH``, the run database a command reads or stores into."""
    parser.add_argument("--db", default=None, metavar="PATH", help=help_text)


def quiet_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--quiet``, which turns ``progress_bar`` off."""
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def device_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--device``, ``--device-map`` and ``--dtype``: where the model loads and in which precision
    (``load_options`` reads them back)."""
    parser.add_argument("--device", default=None,
                        help="where the model runs: cpu (default), cuda, cuda:N (one GPU) or auto (every GPU)")
    parser.add_argument("--device-map", default=None, choices=["auto"],
                        help="'auto': spread a model too large for one device over every GPU (accelerate)")
    parser.add_argument("--dtype", default=None,
                        help="weights' precision: the checkpoint's own (default, e.g. bf16), bf16, fp16 or fp32")


def load_options(args: argparse.Namespace) -> dict[str, str]:
    """The ``qlab.models.loading.load`` keyword arguments that ``device_options`` were given (none by default)."""
    return {key: value for key in ("device", "device_map", "dtype") if (value := getattr(args, key)) is not None}


DEFAULT_GROUP_SIZE = 64


def add_scheme_arguments(parser: argparse.ArgumentParser, granularity: str) -> None:
    """Add the ``QuantScheme`` options but the format (each command names its own ``--format(s)``)."""
    # Both default to None so that scheme_from_args can tell a --group-size given alone (group granularity
    # meant) from one given beside a granularity that has no groups (refused, not ignored).
    parser.set_defaults(default_granularity=granularity)
    implied = "" if granularity == "group" else ", or group where --group-size is given"
    parser.add_argument("--granularity", default=None,
                        help=f"tensor | channel | group (default: {granularity}{implied})")
    parser.add_argument("--group-size", type=int, default=None,
                        help=f"values per group (default {DEFAULT_GROUP_SIZE}, which divides every layer of both "
                             "bundled models; 128 does not divide SmolLM2's 576)")
    parser.add_argument("--asymmetric", action="store_true", help="integer formats: use a zero-point")
    parser.add_argument("--calibration", default="minmax", help="minmax | percentile | mse")
    parser.add_argument("--percentile", type=float, default=99.9)
    parser.add_argument("--scale-dtype", default="auto", help="auto | fp32 | fp16 | bf16")


def add_algorithm_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--algorithm``, ``--static-groups`` and ``--sparsity``: how the weights are rounded and pruned
    (``scheme_from_args`` reads them back)."""
    parser.add_argument("--algorithm", default="rtn",
                        help="rtn (round to nearest) | gptq (error-compensating; Hessians from 4096 tokens at the "
                             "end of the evaluation text, apart from the tokens evaluated) | gptq-act-order (GPTQ, "
                             "inputs with the largest Hessian diagonal first) | awq (activation-aware input scales, "
                             "same calibration tokens) | hqq (calibration-free zero-point fit, integer formats, "
                             "always asymmetric)")
    parser.add_argument("--static-groups", action="store_true",
                        help="gptq-act-order with groups: group scales from the weights in input order, so no "
                             "group index is stored")
    parser.add_argument("--sparsity", default="none",
                        help="none | 2:4 (keep the two largest of every four inputs) | 2:4-sparsegpt (SparseGPT "
                             "from the calibration Hessians; with --algorithm gptq, or a plain fp16/bf16 format)")


def scheme_from_args(args: argparse.Namespace, fmt: str):
    """The ``QuantScheme`` for format ``fmt`` that ``add_scheme_arguments``' options describe."""
    from qlab.core.quant import QuantScheme

    granularity = args.granularity or ("group" if args.group_size is not None else args.default_granularity)
    if args.group_size is not None and granularity != "group":
        raise QlabError(f"--group-size applies to --granularity group, not {granularity}; drop one of them.")
    group_size = DEFAULT_GROUP_SIZE if args.group_size is None else args.group_size
    return QuantScheme(format=fmt, granularity=granularity, group_size=group_size,
                       symmetric=not args.asymmetric, calibration=args.calibration,
                       percentile=args.percentile, scale_dtype=args.scale_dtype,
                       algorithm=getattr(args, "algorithm", "rtn"),
                       static_groups=getattr(args, "static_groups", False), sparsity=getattr(args, "sparsity", "none"))


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--tokens`` and ``--text-file``, read back by ``eval_spec``."""
    parser.add_argument("--tokens", type=int, default=512, help="evaluation token budget")
    parser.add_argument("--text-file", default=None, help="UTF-8 text to evaluate on (default: pydoc topics)")


def eval_spec(args: argparse.Namespace):
    """The ``EvalSpec`` that ``add_eval_arguments``' options describe."""
    from qlab.models.evaluate import EvalSpec, decode_text

    if args.text_file:
        path = Path(args.text_file)
        if not path.is_file():
            raise QlabError(f"--text-file {path} does not exist or is not a file.")
        return EvalSpec(tokens=args.tokens, text=decode_text(path.read_bytes()), text_name=path.name)
    return EvalSpec(tokens=args.tokens)


def csv_floats(text: str) -> list[float]:
    """The numbers of a ``--values`` list such as ``-2.45,1.32,0.67``."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise QlabError(f"--values must be comma-separated numbers, got '{text}'.") from None
    if not values:
        raise QlabError("--values is empty; give numbers like --values=-2.45,1.32,0.67,-0.89.")
    return values


def emit(payload, destination: str | None) -> None:
    """Print JSON to stdout (``--json`` alone or ``--json -``) or write it to a file atomically."""
    text = json.dumps(payload, indent=2, default=float)
    if destination in (None, "-"):
        print(text)
        return
    write_atomic(destination, text)


def output_file(path: str) -> str:
    """``path`` unchanged if a file may be written there (``-`` is stdout); else a ``QlabError``, raised while
    the arguments are parsed so that no work is done for output that cannot be written."""
    if path != "-":
        _existing_output(path)
    return path


def _existing_output(path: str | os.PathLike) -> os.stat_result | None:
    if not str(path).strip():  # Path("") would be the current directory
        raise QlabError("the output path is empty; name a file to write.")
    try:
        existing = Path(path).lstat()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise QlabError(f"cannot write {path}: {error.strerror}; choose a writable path.") from None
    # A rename would put a regular file where a device, FIFO or link was, and a symlink may point anywhere
    # (a file planted in a shared folder): refuse rather than replace or follow.
    if not stat.S_ISREG(existing.st_mode):
        what = "a directory" if stat.S_ISDIR(existing.st_mode) else (
            "a symbolic link" if stat.S_ISLNK(existing.st_mode) else "not a regular file")
        raise QlabError(f"{path} is {what}; qlab writes only regular files, so name a file (or '-' for stdout).")
    return existing


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to the regular file ``path`` whole or not at all; a path that is not (or cannot be) a
    regular file is a ``QlabError``, and nothing a failed write started is left behind."""
    existing = _existing_output(path)
    path = Path(path)
    partial = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(path)
        name = partial_path(path)
        # O_EXCL | O_NOFOLLOW: never write through a file or link someone else left under that name.
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
        partial = name
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            if existing is not None:
                os.fchmod(handle.fileno(), stat.S_IMODE(existing.st_mode))
            handle.write(text)
        os.replace(partial, path)  # write-then-rename: a reader (or a kill) never sees half a file
    except BaseException as error:  # a full disk, or Ctrl-C mid-write: remove what was started
        if partial is not None:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise QlabError(f"cannot write {path}: {error.strerror or error}; choose a writable path.") from None
        raise


@contextlib.contextmanager
def progress_bar(quiet: bool, title: str, width: int = 48) -> Iterator[Callable[[float, str], None]]:
    """A bar on stderr; yields the ``progress(fraction, message)`` callback the analyses take."""
    from tqdm import tqdm

    with tqdm(total=1000, desc=title, unit="‰", file=sys.stderr, disable=quiet,
              bar_format="{desc} {bar} {percentage:3.0f}% [{elapsed}<{remaining}]") as bar:
        def progress(fraction: float, message: str) -> None:
            bar.set_description_str(message[:width].ljust(width))
            bar.update(max(0, int(fraction * 1000) - bar.n))

        yield progress
