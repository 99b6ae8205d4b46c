"""Runs and their results: the ``Store`` that writes and reads them, and their statuses.

A *run* is one invocation (a sweep, a memory plan, a benchmark, ...) described by a ``RunMeta``
(``qlab.store.meta``), with its timings and status. Its *results* are the rows it produced, each with a ``kind``
and a JSON record, so later features store theirs without a schema change. An analysis owns how its records
look (``qlab.analyses.sensitivity.report_from_records``); ``stored_sensitivity`` only hands them back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import sqlite3
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlab.core.errors import QlabError
from qlab.core.paths import DB_ENV, default_path, resolve_path
from qlab.store.db import (
    SCHEMA_VERSION,
    STATUSES,
    connect,
    dumps,
    newer_schema_error,
    now,
    read,
    read_only_error,
    schema_version,
    seed_in,
    seed_out,
    snapshot,
    transaction,
    writable,
)
from qlab.store.meta import RunMeta
from qlab.store.transfer import export_payload, file_payload, insert_runs, runs_from_payload

ID_PREFIX_MIN = 4
# A run's closing record (timings of its phases...): stored as a result, not listed among its labels.
SUMMARY_KIND = "summary"
# Setting of a recommendation run that names the sensitivity run (same database) holding its analysis.
ANALYSIS_RUN = "analysis_run"
# Result object class name -> stored kind. Anything with ``to_record()`` or a plain mapping can be stored.
KIND_OF_CLASS = {"ResultRow": "sweep", "MemoryPlan": "memory"}


# --- results -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredResult:
    """One result of a run, as stored."""

    position: int
    kind: str
    label: str
    record: dict = field(hash=False)
    scheme: dict | None = field(default=None, hash=False)
    created_at: str | None = None


def _as_result(result: Any, kind: str | None, scheme: Any = None) -> tuple[str, str, dict, dict | None]:
    """(kind, label, record, scheme dict) of a ResultRow, a MemoryPlan, or a record mapping (whose scheme,
    a QuantScheme, may be given)."""
    if isinstance(result, Mapping):
        record = dict(result)
        kind = kind or record.get("kind")
        if not kind:
            raise QlabError("a stored result needs a kind (sweep, memory, sensitivity, bench, ...).")
        scheme = None if scheme is None else scheme.to_dict()
    else:
        record = result.to_record()
        kind = kind or KIND_OF_CLASS.get(type(result).__name__)
        if kind is None:
            raise QlabError(f"no result kind is known for {type(result).__name__}; pass kind=.")
        scheme = result.scheme.to_dict() if hasattr(getattr(result, "scheme", None), "to_dict") else None
    label = str(record.get("label") or record.get("scheme") or record.get("backend") or record.get("name") or kind)
    return kind, label, record, scheme


@dataclass(frozen=True)
class StoredRun:
    """A run with its results, read back from the store."""

    id: str
    kind: str
    status: str
    created_at: str
    finished_at: str | None
    seconds: float | None
    error: str | None
    meta: RunMeta
    results: tuple[StoredResult, ...] = ()
    # A recommendation made on the dashboard names the sensitivity run it was built on (settings
    # ``analysis_run``) instead of copying it; ``Store.get`` attaches that run here when the database holds it.
    analysis: StoredRun | None = field(default=None, compare=False, repr=False)

    @property
    def model(self) -> str:
        return self.meta.model

    def records(self, kind: str | None = "sweep") -> list[dict]:
        """The records of one kind (all kinds when ``kind`` is None), in the order they finished."""
        return [r.record for r in self.results if kind is None or r.kind == kind]

    def schemes(self) -> list[dict]:
        return list(self.meta.settings.get("schemes", []))

    def to_dict(self) -> dict:
        """The JSON form used by ``export``/``import``."""
        return {"id": self.id, "kind": self.kind, "status": self.status, "created_at": self.created_at,
                "finished_at": self.finished_at, "seconds": self.seconds, "error": self.error,
                "model": self.meta.model, "model_sha256": self.meta.model_sha256,
                "hardware": self.meta.hardware, "text_sha256": self.meta.text_sha256,
                "text_name": self.meta.text_name, "tokens": self.meta.tokens, "seed": self.meta.seed,
                "settings": self.meta.settings, "environment": self.meta.environment,
                "results": [{"position": r.position, "kind": r.kind, "label": r.label, "record": r.record,
                             "scheme": r.scheme, "created_at": r.created_at} for r in self.results]}


def stored_sensitivity(run: StoredRun):
    """The SensitivityReport a stored ``sensitivity``/``recommend`` run holds, or that of the analysis run a
    recommendation names (None without per-linear records); a run stopped half-way gives the units it finished."""
    from qlab.analyses.sensitivity import report_from_records

    linears = run.records("sensitivity_linear")
    if not linears:
        return None if run.analysis is None else stored_sensitivity(run.analysis)
    summary = next((r.record for r in run.results if r.kind == SUMMARY_KIND), {})
    return report_from_records(run.model, run.meta.settings, linears, run.records("sensitivity_block"),
                               summary.get("seconds", {}), run.meta.tokens)


# --- statuses ------------------------------------------------------------------------------------------------


class RunGone(QlabError):
    """The run a result was meant for is no longer in the database (deleted while it ran)."""


def _live_status(status: str, env: Mapping) -> str:
    """A run still marked running whose process is gone (same host) was killed: show it as interrupted."""
    if status != "running" or env.get("host") != socket.gethostname() or not env.get("pid"):
        return status
    try:
        os.kill(int(env["pid"]), 0)
    except ProcessLookupError:
        return "interrupted"
    except (PermissionError, OverflowError, ValueError):
        pass
    return status


def _writer_here(status: str, env: Mapping) -> bool:
    """Whether a live process on this machine is still writing the run (status running, its pid alive)."""
    return status == "running" and env.get("host") == socket.gethostname() and bool(env.get("pid")) \
        and _live_status(status, env) == "running"


def _stored_run(row: sqlite3.Row, results: Sequence[sqlite3.Row]) -> StoredRun:
    environment_record = json.loads(row["environment"])
    meta = RunMeta(kind=row["kind"], model=row["model"], settings=json.loads(row["settings"]),
                   model_sha256=row["model_sha256"], hardware=row["hardware"], text_sha256=row["text_sha256"],
                   text_name=row["text_name"], tokens=row["tokens"], seed=seed_out(row["seed"]),
                   environment=environment_record)
    return StoredRun(
        id=row["id"], kind=row["kind"], status=_live_status(row["status"], environment_record),
        created_at=row["created_at"], finished_at=row["finished_at"], seconds=row["seconds"],
        error=row["error"], meta=meta,
        results=tuple(StoredResult(r["position"], r["kind"], r["label"], json.loads(r["record"]),
                                   None if r["scheme"] is None else json.loads(r["scheme"]), r["created_at"])
                      for r in results))


# --- the store -------------------------------------------------------------------------------------------


def requested_path(db: str | os.PathLike | None, default: bool = False) -> Path | None:
    """The database a headless run stores into: ``--db`` if given, else ``QLAB_DB`` if set, else the user's
    default database when ``default`` (``sweep`` stores unless told not to), else None (store nothing).

    Checked now (``Store.require_writable``): every storing command calls this before it loads a model, so a
    read-only or unusable database stops it with one line instead of after minutes of work.
    """
    chosen = db or os.environ.get(DB_ENV) or (default_path() if default else None)
    if not chosen:
        return None
    path = Path(chosen).expanduser()
    Store(path).require_writable()
    return path


class Store:
    """The run database at ``path`` (``resolve_path``'s choice when None). Each call opens its own short
    connection, so one Store is safe to share between threads and processes."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = resolve_path(path)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    def _reading(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return read(self.path)

    def _writing(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return connect(self.path)

    def writable(self) -> bool:
        """False for a database this process can only read (read-only file, folder or mount)."""
        return writable(self.path)

    def require_writable(self) -> None:
        """Fail with one line before long work whose results could not be stored here: a read-only database,
        a file that is not one, or one written by a newer qlab."""
        if not self.writable():
            raise read_only_error(self.path)
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise newer_schema_error(self.path, version)

    def schema_version(self) -> int:
        """The schema version of the file as it is (reading never migrates it; 0 for a missing file)."""
        return schema_version(self.path)

    def integrity_ok(self) -> bool:
        with self._reading() as conn:
            return conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    # writing

    def start_run(self, meta: RunMeta, run_id: str | None = None) -> str:
        """Open a run (status ``running``) and return its id."""
        run_id = run_id or uuid.uuid4().hex[:12]
        with self._writing() as conn, transaction(conn):
            conn.execute(
                """INSERT INTO runs (id, created_at, kind, status, model, model_sha256, hardware, settings,
                   environment, text_sha256, text_name, tokens, seed)
                   VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (run_id, now(), meta.kind, meta.model, meta.model_sha256, meta.hardware,
                 dumps(meta.settings), dumps(meta.environment), meta.text_sha256, meta.text_name,
                 meta.tokens, seed_in(meta.seed)))
        return run_id

    def add_result(self, run_id: str, result: Any, kind: str | None = None, scheme: Any = None) -> int:
        """Save one finished result (ResultRow, MemoryPlan or a record mapping) now; returns its position."""
        return self.add_results(run_id, [result], kind, scheme)

    def add_results(self, run_id: str, results: Sequence[Any], kind: str | None = None, scheme: Any = None) -> int:
        """Save results that finished together in one transaction (all or none); returns the first position."""
        prepared = [_as_result(result, kind, scheme) for result in results]
        with self._writing() as conn, transaction(conn):
            if not conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone():
                raise RunGone(f"run {run_id} is no longer in {self.path} (it was deleted while it ran).")
            first = conn.execute("SELECT COUNT(*) FROM results WHERE run_id = ?", (run_id,)).fetchone()[0]
            conn.executemany(
                """INSERT INTO results (run_id, position, kind, label, record, scheme, created_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?)""",
                [(run_id, first + index, kind_, label, dumps(record),
                  None if scheme_ is None else dumps(scheme_), now())
                 for index, (kind_, label, record, scheme_) in enumerate(prepared)])
        return first

    def finish_run(self, run_id: str, status: str = "finished", error: str | None = None) -> None:
        if status not in STATUSES:
            raise QlabError(f"unknown run status '{status}'; use one of {', '.join(STATUSES)}.")
        with self._writing() as conn, transaction(conn):
            conn.execute(
                """UPDATE runs SET status = ?, finished_at = ?, error = ?,
                   seconds = ROUND((julianday(?) - julianday(created_at)) * 86400.0, 3) WHERE id = ?""",
                (status, now(), error, now(), run_id))

    def delete(self, run_ids: Iterable[str]) -> int:
        """Delete runs (and their results); returns how many were deleted. A run that a live process here is
        still writing is refused (its next result would have no run to go to), all in one transaction."""
        ids = [self.resolve_id(i) for i in run_ids]
        with self._writing() as conn, transaction(conn):
            for run_id in ids:
                row = conn.execute("SELECT status, environment FROM runs WHERE id = ?", (run_id,)).fetchone()
                env = json.loads(row["environment"]) if row else {}
                if row and _writer_here(row["status"], env):
                    raise QlabError(f"run {run_id} is still being written (process {env['pid']} on this machine); "
                                    "wait for it to finish or stop it, then delete it.")
            return sum(conn.execute("DELETE FROM runs WHERE id = ?", (i,)).rowcount for i in ids)

    # reading

    def resolve_id(self, run_id: str) -> str:
        """A full run id from itself or a unique prefix of at least 4 characters."""
        with self._reading() as conn:
            return self._resolve(conn, run_id)

    def _resolve(self, conn: sqlite3.Connection, run_id: str) -> str:
        run_id = run_id.strip()
        if conn.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone():
            return run_id
        # A plain prefix comparison: LIKE would read '%' and '_' in a typed id as wildcards ('%%%%' matches all).
        matches = ([r[0] for r in conn.execute("SELECT id FROM runs WHERE substr(id, 1, ?) = ?",
                                               (len(run_id), run_id))]
                   if len(run_id) >= ID_PREFIX_MIN else [])
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise QlabError(f"run id '{run_id}' is ambiguous ({', '.join(sorted(matches)[:4])}); give more "
                            "characters.")
        raise QlabError(f"no run '{run_id}' in {self.path}; `python -m qlab runs list` shows the ids.")

    def list_runs(self, model: str | None = None, kind: str | None = None,
                  limit: int | None = None) -> list[dict]:
        """One summary row per run, newest first: id, time, kind, status, model, hardware, results, labels."""
        # Each label once (a sensitivity run stores one result per linear and scheme), closing summaries left out.
        query = f"""SELECT runs.*, COUNT(results.id) AS results,
                   GROUP_CONCAT(DISTINCT CASE WHEN results.kind != '{SUMMARY_KIND}' THEN results.label END) AS labels
                   FROM runs LEFT JOIN results ON results.run_id = runs.id
                   WHERE (? IS NULL OR runs.model LIKE '%' || ? || '%') AND (? IS NULL OR runs.kind = ?)
                   GROUP BY runs.id ORDER BY runs.created_at DESC, runs.rowid DESC"""
        params: list[Any] = [model, model, kind, kind]
        if limit:
            query += " LIMIT ?"
            params.append(limit)
        with self._reading() as conn:
            rows = conn.execute(query, params).fetchall()
        return [{"id": r["id"], "created_at": r["created_at"], "kind": r["kind"],
                 "status": _live_status(r["status"], json.loads(r["environment"])), "model": r["model"],
                 "hardware": r["hardware"], "results": r["results"],
                 "labels": ", ".join((r["labels"] or "").split(",")) if r["labels"] else "",
                 "tokens": r["tokens"], "text_name": r["text_name"], "seconds": r["seconds"],
                 "qlab": json.loads(r["environment"]).get("qlab")} for r in rows]

    def get(self, run_id: str) -> StoredRun:
        """A run and all its results (``run_id`` may be a unique prefix)."""
        with self._reading() as conn:  # one connection: an older read-only file is copied once per call
            run = self._get(conn, self._resolve(conn, run_id))
            linked = run.meta.settings.get(ANALYSIS_RUN)
            if linked and not run.records("sensitivity_linear"):
                analysis = self._get(conn, linked) if conn.execute(
                    "SELECT 1 FROM runs WHERE id = ?", (linked,)).fetchone() else None
                run = dataclasses.replace(run, analysis=analysis)
        return run

    @staticmethod
    def _get(conn: sqlite3.Connection, run_id: str) -> StoredRun:
        row = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        results = conn.execute("SELECT * FROM results WHERE run_id = ? ORDER BY position", (run_id,)).fetchall()
        return _stored_run(row, results)

    def runs(self, run_ids: Iterable[str] | None = None) -> list[StoredRun]:
        """Several runs in full; all runs, oldest first, when ``run_ids`` is None."""
        if run_ids is None:
            run_ids = [r["id"] for r in reversed(self.list_runs())]
        return [self.get(i) for i in run_ids]

    def stored_schemes(self, model: str, model_sha: str | None, text_sha256: str, tokens: int) -> dict:
        """``{QuantScheme: sweep record}`` already measured for this model, weights, text and token budget,
        the newest run winning: what a dashboard can show again without recomputing."""
        from qlab.core.quant import QuantScheme

        with self._reading() as conn:
            rows = conn.execute(
                """SELECT results.scheme, results.record FROM results JOIN runs ON runs.id = results.run_id
                   WHERE runs.model = ? AND runs.model_sha256 IS ? AND runs.text_sha256 = ? AND runs.tokens = ?
                   AND results.kind = 'sweep' AND results.scheme IS NOT NULL
                   ORDER BY runs.created_at DESC, runs.rowid DESC, results.position""",
                (model, model_sha, text_sha256, tokens)).fetchall()
        found: dict = {}
        for row in rows:
            found.setdefault(QuantScheme.from_dict(json.loads(row["scheme"])), json.loads(row["record"]))
        return found

    def latest_run(self, kind: str, model: str, model_sha: str | None, settings: Mapping[str, Any] | None = None,
                   *, text_sha256: str | None = None, tokens: int | None = None, hardware: str | None = None,
                   holding: str | None = None, statuses: Sequence[str] | None = None) -> StoredRun | None:
        """The newest run of ``kind`` on this model and weights whose settings hold every item of ``settings``
        (other stored settings may differ), with the given text, token budget and hardware when given, at least
        one result of kind ``holding`` and a stored status among ``statuses``: what a page shows again after a
        reload instead of recomputing. None when there is none."""
        wanted = json.loads(dumps(dict(settings or {})))  # compared as stored: tuples are lists, keys strings
        query = ["SELECT id, settings FROM runs WHERE kind = ? AND model = ? AND model_sha256 IS ?"]
        params: list[Any] = [kind, model, model_sha]
        for column, value in (("text_sha256", text_sha256), ("tokens", tokens), ("hardware", hardware)):
            if value is not None:
                query.append(f"AND {column} = ?")
                params.append(value)
        if holding is not None:
            query.append("AND EXISTS (SELECT 1 FROM results WHERE results.run_id = runs.id AND results.kind = ?)")
            params.append(holding)
        if statuses is not None:
            query.append(f"AND status IN ({', '.join('?' * len(statuses))})")
            params.extend(statuses)
        query.append("ORDER BY created_at DESC, rowid DESC")
        with self._reading() as conn:
            rows = conn.execute(" ".join(query), params).fetchall()
        for row in rows:
            stored = json.loads(row["settings"])
            if all(stored.get(key) == value for key, value in wanted.items()):
                return self.get(row["id"])
        return None

    # export and import (the payload shapes: ``qlab.store.transfer``)

    def export(self, run_ids: Iterable[str] | None = None) -> dict:
        """JSON-ready payload of runs with their results (all runs when ``run_ids`` is None); a recommendation
        brings the analysis run it names, so it reads back whole wherever the payload is imported."""
        runs = self.runs(run_ids)
        ids = {run.id for run in runs}
        linked = [run.analysis for run in runs if run.analysis is not None and run.analysis.id not in ids]
        runs = list({run.id: run for run in linked}.values()) + runs
        return export_payload([run.to_dict() for run in runs])

    def import_payload(self, payload: Any, source_name: str = "import") -> list[str]:
        """Import an ``export`` payload, a ``sweep --json`` list of rows or a ``bench sweep`` JSON.

        Importing the same run twice adds nothing; a run that has more results than the stored copy (a
        finished copy of a run that was killed here) adds the missing ones. Returns the run ids touched.
        """
        runs = runs_from_payload(payload, source_name)
        with self._writing() as conn, transaction(conn):
            insert_runs(conn, runs)
        return [run["id"] for run in runs]

    def import_file(self, path: str | os.PathLike, name: str | None = None) -> list[str]:
        """Import a JSON file (see ``import_payload``) or another qlab SQLite database. ``name`` is what
        messages call the file (an upload's own name, not the temporary copy's path)."""
        path = Path(path).expanduser()
        payload = file_payload(path, name or str(path))
        if payload is None:
            with read_database(path, name or str(path)) as source:
                payload = source.export()
        return self.import_payload(payload, name or path.name)


class _Snapshot(Store):
    """A Store reading an in-memory copy through one connection (``read_database``); it cannot be written."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        super().__init__(path)
        self._conn = conn

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        yield self._conn

    def _writing(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        raise QlabError(f"{self.path} is opened here for reading only.")

    def writable(self) -> bool:
        return False


@contextlib.contextmanager
def read_database(path: str | os.PathLike, name: str | None = None) -> Iterator[Store]:
    """``with read_database(path) as source: source.export()``: a Store over an in-memory snapshot of another
    database (``qlab.store.snapshot``), so reading it never migrates, writes or keeps locking the original,
    and leaves no file behind; ``name`` is what messages call it."""
    path = Path(path)
    with snapshot(path, name) as conn:
        yield _Snapshot(path, conn)
