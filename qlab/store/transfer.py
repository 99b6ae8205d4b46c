"""What crosses the run database's boundary: the export payload, the JSON shapes an import accepts, and a
simulated scheme's per-layer JSON.

``Store.export`` / ``Store.import_payload`` / ``Store.import_file`` (``qlab.store.runs``) are built on these;
nothing here opens a database of its own, so the store's import methods can call it without a cycle.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qlab.core.errors import QlabError
from qlab.store.db import SCHEMA_VERSION, dumps, now, seed_in
from qlab.store.run_schema import validate_runs

EXPORT_FORMAT = "qlab-runs"


def export_payload(runs: Sequence[dict]) -> dict:
    """The JSON-ready ``runs export`` payload of runs already in their ``StoredRun.to_dict`` form."""
    return {"format": EXPORT_FORMAT, "schema_version": SCHEMA_VERSION, "exported_at": now(), "runs": list(runs)}


def runs_from_payload(payload: Any, source_name: str) -> list[dict]:
    """Normalise the JSON shapes qlab writes into a list of run dicts with results, each checked against
    ``qlab.store.run_schema`` (one QlabError naming the run and field otherwise)."""
    runs = _runs_of(payload, source_name)
    validate_runs(runs, source_name)
    return runs


def _runs_of(payload: Any, source_name: str) -> list[dict]:
    if isinstance(payload, dict) and payload.get("format") == EXPORT_FORMAT:
        runs = payload.get("runs")
        if not isinstance(runs, list) or not all(isinstance(r, dict) and "id" in r for r in runs):
            raise QlabError(f"{source_name} is a qlab export without a valid 'runs' list; export it again.")
        return runs
    if isinstance(payload, list) and payload and all(isinstance(r, dict) and "label" in r for r in payload):
        return [_bare_run("sweep", payload, [], source_name)]
    if isinstance(payload, dict) and payload.get("benchmark") and isinstance(payload.get("rows"), list):
        summary = {k: v for k, v in payload.items() if k != "rows"}
        return [_bare_run("bench", payload["rows"], [summary], source_name)]
    if isinstance(payload, dict) and "kv_cache_bytes" in payload:
        return [_bare_run("memory", [], [{**payload, "kind": "memory"}], source_name)]
    raise QlabError(f"{source_name} is not something qlab wrote: expected `runs export` JSON, `sweep --json` "
                    "rows, `bench sweep` JSON or `memory --json`.")


def _bare_run(kind: str, sweep_rows: list[dict], others: list[dict], source_name: str) -> dict:
    """A run for JSON written without a store (``sweep --json``, ``bench sweep``): settings rebuilt from the rows
    themselves, provenance (weights and text hashes, seed, versions) from a ``bench sweep`` summary when there is
    one."""
    from qlab.core.quant import QuantScheme

    names = {f for f in QuantScheme.__dataclass_fields__}
    schemes = [QuantScheme.from_dict({k: row[k] for k in names if k in row}).to_dict() if "format" in row else None
               for row in sweep_rows]
    # The first row names model and token budget; a bench summary adds what rows do not carry.
    described = {**(sweep_rows or others)[0], **(others[0] if others else {})}
    # The id is a hash of the content, so importing the same file twice is a no-op.
    run_id = hashlib.sha256(dumps([sweep_rows, others]).encode()).hexdigest()[:12]
    results = ([{"kind": "sweep", "label": r["label"], "record": r, "scheme": scheme}
                for r, scheme in zip(sweep_rows, schemes, strict=True)]
               + [{"kind": o.get("kind", kind), "label": str(o.get("label") or o.get("scheme") or kind),
                   "record": o} for o in others])
    settings = {"schemes": [s for s in schemes if s is not None], "imported_from": source_name,
                **{k: described[k] for k in ("benchmark", "formats") if k in described}}
    # A `bench sweep` file written before its last scheme (one that failed) holds the schemes measured so far.
    status = "stopped" if described.get("complete") is False else "finished"
    return {"id": run_id, "created_at": now(), "kind": kind, "status": status,
            "model": described.get("model", "unknown"), "hardware": described.get("hardware"),
            "model_sha256": described.get("model_sha256"), "text_sha256": described.get("text_sha256"),
            "text_name": described.get("text_name"), "seed": described.get("seed"),
            "tokens": described.get("eval_tokens") or described.get("tokens"), "settings": settings,
            "environment": {k: described[k] for k in ("qlab", "torch", "transformers", "cpu", "threads")
                            if k in described}, "results": results}


def insert_runs(conn: sqlite3.Connection, runs: Sequence[dict]) -> None:
    """Write ``runs_from_payload``'s runs inside the caller's transaction. A run already stored gains the results
    it lacks (a finished copy of a run killed here) and, if it was still running, the copy's ending."""
    for run in runs:
        conn.execute(
            """INSERT INTO runs (id, created_at, kind, status, model, model_sha256, hardware,
               settings, environment, text_sha256, text_name, tokens, seed, finished_at, seconds, error)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(id) DO UPDATE SET status = excluded.status,
               finished_at = excluded.finished_at, seconds = excluded.seconds, error = excluded.error
               WHERE runs.status = 'running'""",
            (run["id"], run["created_at"], run["kind"], run["status"], run["model"],
             run.get("model_sha256"), run.get("hardware"), dumps(run.get("settings") or {}),
             dumps(run.get("environment") or {}), run.get("text_sha256"), run.get("text_name"),
             run.get("tokens"), seed_in(run.get("seed")), run.get("finished_at"), run.get("seconds"),
             run.get("error")))
        for position, result in enumerate(run["results"]):
            conn.execute(
                """INSERT OR IGNORE INTO results (run_id, position, kind, label, record, scheme,
                   created_at) VALUES (?, ?, ?, ?, ?, ?, ?)""",
                (run["id"], result.get("position", position), result["kind"], result["label"],
                 dumps(result["record"]), None if result.get("scheme") is None else dumps(result["scheme"]),
                 result.get("created_at")))


def file_payload(path: Path, shown: str) -> Any | None:
    """The JSON in a file to import, or None when it is a SQLite database (read it with ``read_database``);
    ``shown`` is what messages call the file."""
    if not path.is_file():
        raise QlabError(f"{shown} does not exist or is not a file; give a JSON export or a .sqlite file.")
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(b"SQLite format 3"):
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise QlabError(f"{shown} is neither a qlab SQLite database nor JSON ({error}); export it with "
                        "`python -m qlab runs export` or `sweep --json`.") from None
    except RecursionError:  # arrays nested thousands deep: no export is shaped like that
        raise QlabError(f"{shown} nests its JSON too deeply to be a qlab export; export it with "
                        "`python -m qlab runs export` or `sweep --json`.") from None


def scheme_export(loaded, plan) -> dict:
    """The per-layer plan JSON (``qlab.core.plan.plan_record``) of a scheme or plan on a LoadedModel, with the
    model's id and weights' content hash."""
    from qlab.core.plan import plan_record
    from qlab.models.loading import model_sha256

    return plan_record(loaded.model, plan, loaded.name, model_sha256(loaded))
