"""``python -m qlab runs list|show|export|import|delete|export-scheme``: the run history headless.

A sweep stored on a GPU server (``--db`` or ``QLAB_DB``) is exported there and imported here, or its ``.sqlite``
file is imported directly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qlab.cli.common import Parser, db_option, emit, json_option, write_atomic
from qlab.core.errors import QlabError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``runs`` subcommand and its verbs to qlab's parser."""
    runs = subparsers.add_parser("runs", help="stored runs: list, show, export, import, delete")
    verbs = runs.add_subparsers(dest="runs_command", required=True, parser_class=Parser)

    listing = verbs.add_parser("list", help="one line per stored run, newest first")
    listing.add_argument("--model", default=None, help="only runs whose model id contains this")
    listing.add_argument("--kind", default=None, help="only runs of this kind (sweep, memory, bench, ...)")
    listing.add_argument("--limit", type=int, default=None, help="at most this many runs")
    show = verbs.add_parser("show", help="a run's settings, versions and results")
    show.add_argument("run", help="run id (or a unique prefix of 4+ characters)")
    export = verbs.add_parser("export", help="runs with their results as JSON (default) or CSV")
    export.add_argument("runs", nargs="*", help="run ids (default: every run)")
    export.add_argument("--csv", nargs="?", const="-", default=None, metavar="OUT",
                        help="one CSV row per result instead of JSON (no path or '-': stdout)")
    imports = verbs.add_parser("import", help="import runs from `runs export` JSON, a .sqlite database, "
                                              "`sweep --json` or `bench sweep` output")
    imports.add_argument("files", nargs="+", help="files to import")
    delete = verbs.add_parser("delete", help="delete runs and their results")
    delete.add_argument("runs", nargs="+", help="run ids")
    scheme = verbs.add_parser("export-scheme", help="per-layer scheme JSON of one stored scheme "
                                                    "(module -> QuantScheme), loading the run's model")
    scheme.add_argument("run", help="run id")
    scheme.add_argument("--label", required=True, help="scheme label as `runs show` prints it, e.g. 'int4 g64'")
    for verb, help_text in ((listing, "print the runs as JSON"), (show, "print the run as JSON"),
                            (export, "write the export JSON"), (imports, "print the imported run ids as JSON"),
                            (delete, "print what was deleted as JSON"), (scheme, "write the scheme JSON")):
        db_option(verb)
        json_option(verb, help_text)
    runs.set_defaults(func=cmd_runs)
    return runs


def cmd_runs(args: argparse.Namespace) -> None:
    """Run the ``runs`` verb the arguments name on the run database."""
    from qlab.store import Store

    store = Store(args.db)
    {"list": _list, "show": _show, "export": _export, "import": _import, "delete": _delete,
     "export-scheme": _export_scheme}[args.runs_command](store, args)


def _list(store, args: argparse.Namespace) -> None:
    rows = store.list_runs(model=args.model, kind=args.kind, limit=args.limit)
    if args.json is not None:
        emit(rows, args.json)
        return
    if not rows:
        print(f"no runs in {store.path}")
        return
    for row in rows:
        labels = row["labels"] if len(row["labels"]) <= 60 else row["labels"][:57] + "..."
        print(f"{row['id']}  {row['created_at'][:19]}  {row['kind']:8} {row['status']:11} {row['model']:16} "
              f"{row['results']:3} result(s)  {labels}")


def _show(store, args: argparse.Namespace) -> None:
    import pandas as pd

    from qlab.store.report import TABLE_COLUMNS, environment_table, settings_table

    run = store.get(args.run)
    if args.json is not None:
        emit(run.to_dict(), args.json)
        return
    for setting, value in settings_table(run).itertuples(index=False):
        print(f"{setting:29} {value}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in environment_table(run).itertuples(index=False)))
    for kind in dict.fromkeys(r.kind for r in run.results):
        frame = pd.DataFrame(run.records(kind))
        columns = [c for c in TABLE_COLUMNS if c in frame] if kind == "sweep" else \
            [c for c in frame if frame[c].map(lambda v: not isinstance(v, list | dict)).all()][:10]
        print(f"\n{kind} results:")
        print(frame[columns].to_string(index=False))


def _export(store, args: argparse.Namespace) -> None:
    ids = [store.resolve_id(r) for r in args.runs] or None
    if args.csv is not None:
        text = export_csv(store, ids)
        if args.csv == "-":
            print(text, end="")
        else:
            write_atomic(Path(args.csv), text)
        return
    emit(store.export(ids), args.json if args.json is not None else "-")


def export_csv(store, run_ids: list[str] | None = None) -> str:
    """One CSV row per stored result: run fields first, then the result's record (nested values as JSON; text
    that a spreadsheet would run as a formula starts with an apostrophe)."""
    import pandas as pd

    from qlab.store.report import csv_text

    rows = []
    for run in store.runs(run_ids):
        for result in run.results:
            rows.append({"run_id": run.id, "run_created_at": run.created_at, "run_kind": run.kind,
                         "run_status": run.status, "run_model": run.model, "run_hardware": run.meta.hardware,
                         "result_kind": result.kind, "result_label": result.label, **result.record})
    return csv_text(pd.DataFrame(rows))


def _import(store, args: argparse.Namespace) -> None:
    imported = {str(path): store.import_file(path) for path in args.files}
    if args.json is not None:
        emit({"db": str(store.path), "imported": imported}, args.json)
        return
    for path, ids in imported.items():
        print(f"{path}: {len(ids)} run(s) into {store.path}: {', '.join(ids)}")


def _delete(store, args: argparse.Namespace) -> None:
    ids = [store.resolve_id(r) for r in args.runs]
    deleted = store.delete(ids)
    if args.json is not None:
        emit({"deleted": ids, "count": deleted}, args.json)
        return
    print(f"deleted {deleted} run(s) from {store.path}")


def _export_scheme(store, args: argparse.Namespace) -> None:
    from qlab.core.quant import QuantScheme
    from qlab.models.loading import load, model_sha256
    from qlab.store import scheme_export

    run = store.get(args.run)
    matches = [r for r in run.results if r.label == args.label and r.scheme]
    if not matches:
        labels = ", ".join(f"'{r.label}'" for r in run.results if r.scheme) or "none"
        raise QlabError(f"run {run.id} has no scheme labelled '{args.label}'; its schemes are {labels}.")
    loaded = load(run.model)
    if run.meta.model_sha256 and model_sha256(loaded) != run.meta.model_sha256:
        raise QlabError(f"the weights of '{run.model}' here differ from those run {run.id} measured "
                        "(different SHA-256); export the scheme where the run was made.")
    emit(scheme_export(loaded, QuantScheme.from_dict(matches[-1].scheme)),
         args.json if args.json is not None else "-")

