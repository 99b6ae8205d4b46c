"""Run history in SQLite: every finished result is saved as it completes, so a killed run keeps what it did.

One file per user (``QLAB_DB`` or ``$XDG_DATA_HOME/qlab/runs.sqlite``), stdlib ``sqlite3`` in WAL mode: readers
never block the writer, each result is its own committed transaction, and a process killed mid-write leaves
the last committed state readable. The schema version is ``PRAGMA user_version``; ``MIGRATIONS`` upgrade it
step by step, and a fresh file is built by running them all from 0, so the upgrade path is exercised daily.
Reads (listing, showing, exporting, reports, the History page) use a connection that never writes, so a
read-only file, folder or mount, or a database copied from a GPU server, can be browsed as it is. The one
exception is an older schema in a file this process may write: the first read migrates it in place (as the
first write would), instead of every read migrating a copy; a read-only one is read through an in-memory copy.

A *run* is one invocation (a sweep, a memory plan, a benchmark, ...): model id and content hash, hardware,
settings (every scheme in full), qlab/torch/transformers versions, evaluation text hash and token budget, seed,
timings and status. Its *results* are the rows it produced, each with a ``kind`` and a JSON record, so later
features store theirs without a schema change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import socket
import sqlite3
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qlab.core.errors import Cancelled, QlabError
from qlab.core.paths import DB_ENV, default_path, resolve_path
from qlab.core.plan import layer_scheme_map
from qlab.models.loading import model_sha256

EXPORT_FORMAT = "qlab-runs"
STATUSES = ("running", "finished", "cancelled", "stopped", "failed", "interrupted")
BUSY_TIMEOUT_S = 30.0  # a writer waits this long for another process's transaction before giving up
ID_PREFIX_MIN = 4

# Each entry upgrades the schema from version i to i + 1; statements run in one transaction.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: the first layout: sweep runs and their rows.
    (
        """CREATE TABLE runs (
            id TEXT PRIMARY KEY, created_at TEXT NOT NULL, model TEXT NOT NULL, model_sha256 TEXT,
            hardware TEXT, settings TEXT NOT NULL, environment TEXT NOT NULL, text_sha256 TEXT,
            tokens INTEGER, seed INTEGER)""",
        """CREATE TABLE rows (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            label TEXT NOT NULL, record TEXT NOT NULL)""",
    ),
    # 2: results of any kind (sweep, memory, sensitivity, bench, ...), ordered per run; run kind, status, timings.
    (
        "ALTER TABLE rows RENAME TO results",
        "ALTER TABLE results ADD COLUMN kind TEXT NOT NULL DEFAULT 'sweep'",
        "ALTER TABLE results ADD COLUMN position INTEGER",
        "ALTER TABLE results ADD COLUMN scheme TEXT",
        "ALTER TABLE results ADD COLUMN created_at TEXT",
        """UPDATE results SET position = (SELECT COUNT(*) FROM results AS earlier
            WHERE earlier.run_id = results.run_id AND earlier.id < results.id)""",
        "CREATE UNIQUE INDEX results_position ON results(run_id, position)",
        "ALTER TABLE runs ADD COLUMN kind TEXT NOT NULL DEFAULT 'sweep'",
        "ALTER TABLE runs ADD COLUMN status TEXT NOT NULL DEFAULT 'finished'",
        "ALTER TABLE runs ADD COLUMN text_name TEXT",
        "ALTER TABLE runs ADD COLUMN finished_at TEXT",
        "ALTER TABLE runs ADD COLUMN seconds REAL",
        "ALTER TABLE runs ADD COLUMN error TEXT",
        "CREATE INDEX runs_created ON runs(created_at)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


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


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- what a run records ----------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """Versions and the machine a run executes on (what makes two runs comparable or not)."""
    import torch
    import transformers

    from qlab import __version__
    from qlab.models.hardware import detect_this_machine

    machine = detect_this_machine()
    return {"qlab": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "machine": machine.name, "host": socket.gethostname(), "pid": os.getpid()}


@dataclass(frozen=True)
class RunMeta:
    """Everything needed to compare a run with another and to replay it.

    ``settings`` holds the inputs in full: for a sweep ``{"schemes": [QuantScheme.to_dict(), ...]}`` plus
    any options; ``environment`` defaults to this process's versions and machine.
    """

    kind: str
    model: str
    settings: dict = field(hash=False)
    model_sha256: str | None = None
    hardware: str = "this-machine"
    text_sha256: str | None = None
    text_name: str | None = None
    tokens: int | None = None
    seed: int | None = None
    environment: dict = field(default_factory=environment, hash=False)


def run_meta(kind: str, loaded, spec=None, hardware: str = "this-machine", **settings: Any) -> RunMeta:
    """RunMeta for any run on a LoadedModel (sensitivity, bench, ...), with its EvalSpec when it evaluates;
    keyword settings are stored as given (JSON-ready values)."""
    import torch

    return RunMeta(kind=kind, model=loaded.name, settings=settings, model_sha256=model_sha256(loaded),
                   hardware=hardware, text_sha256=spec.text_sha256 if spec else None,
                   text_name=spec.text_name if spec else None, tokens=spec.tokens if spec else None,
                   # The process's torch seed, so anything that draws random numbers can be replayed.
                   seed=torch.initial_seed())


def sweep_meta(loaded, schemes: Sequence, spec, hardware: str = "this-machine", **settings: Any) -> RunMeta:
    """RunMeta of a sweep of ``schemes`` on a LoadedModel with an EvalSpec; extra keyword settings are kept."""
    return run_meta("sweep", loaded, spec, hardware, schemes=[s.to_dict() for s in schemes], **settings)


# --- results -------------------------------------------------------------------------------------------

# A run's closing record (timings of its phases...): stored as a result, not listed among its labels.
SUMMARY_KIND = "summary"
# Setting of a recommendation run that names the sensitivity run (same database) holding its analysis.
ANALYSIS_RUN = "analysis_run"
# Result object class name -> stored kind. Anything with ``to_record()`` or a plain mapping can be stored.
KIND_OF_CLASS = {"ResultRow": "sweep", "MemoryPlan": "memory"}


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


# --- the database ----------------------------------------------------------------------------------------


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise QlabError(f"{path} was written by a newer qlab (schema v{version}, this one knows "
                        f"v{SCHEMA_VERSION}); upgrade qlab or pass another --db.")
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Re-read inside the write lock: another process may have migrated while we waited.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for steps in MIGRATIONS[version:]:
            for statement in steps:
                conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def writable(path: Path) -> bool:
    """Whether this process may write the database at ``path`` and the -wal/-shm files beside it (a read-only
    file, directory or mount answers False; a missing file, whether its folder could hold one)."""
    if path.exists():
        return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)
    ancestor = next((p for p in path.parents if p.exists()), None)
    return ancestor is not None and ancestor.is_dir() and os.access(ancestor, os.W_OK)


def _read_only_error(path: Path) -> QlabError:
    return QlabError(f"{path} is read-only; pass --db (or set {DB_ENV}) to a writable path.")


def _is_wal(path: Path) -> bool:
    # Bytes 18 and 19 of a SQLite header are the write/read format versions: 2 means WAL.
    with open(path, "rb") as handle:
        return handle.read(20)[18:20] == b"\x02\x02"


def _uri(path: Path, **options: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return f"file:{urllib.parse.quote(str(path.absolute()))}?{query}"


def _reader(path: Path) -> sqlite3.Connection:
    """A connection that never writes the database: schema as found, nothing migrated, no journal mode set.

    A missing file reads as an empty database (in memory: nothing is created). A writable file is opened
    read-write but ``query_only``: SQLite then removes the -wal/-shm files it needed when it closes, where a
    ``mode=ro`` handle would leave them behind. A file this process cannot write is opened ``mode=ro``, and a
    WAL database with no -wal file beside it (all of it in the main file) ``immutable=1``, which needs no -shm
    file that a read-only folder could not hold.
    """
    if not path.exists():
        try:  # the folder a first write would use; a path no database can have is an error now, not later
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise QlabError(f"cannot open the run database {path} ({error}); pass a writable --db path "
                            f"or set {DB_ENV}.") from None
        return sqlite3.connect(":memory:", isolation_level=None)
    try:
        if writable(path):
            conn = sqlite3.connect(_uri(path, mode="rw"), uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            conn.execute("PRAGMA query_only=ON")
            return conn
        immutable = _is_wal(path) and not Path(f"{path}-wal").exists()
        options = {"mode": "ro", "immutable": "1"} if immutable else {"mode": "ro"}
        return sqlite3.connect(_uri(path, **options), uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except (OSError, sqlite3.DatabaseError) as error:
        raise QlabError(f"cannot open the run database {path} ({error}); pass a readable --db path "
                        f"or set {DB_ENV}.") from None


def _migrated_copy(conn: sqlite3.Connection, path: Path, version: int) -> sqlite3.Connection:
    """An in-memory copy of a database brought to the current schema: reading it never migrates the file."""
    memory = sqlite3.connect(":memory:", isolation_level=None)
    try:
        conn.backup(memory)
        _migrate(memory, path)
    except sqlite3.DatabaseError as error:
        memory.close()
        raise QlabError(f"{path} has an older qlab schema (v{version}) that cannot be read without migrating it "
                        f"({error}); open it once with a writable --db, or import it with `python -m qlab runs "
                        "import`.") from None
    except BaseException:  # a newer schema, an interrupt: the copy is not handed out, so close it here
        memory.close()
        raise
    return memory


@contextlib.contextmanager
def _read(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection for reading only (see ``_reader``), at the current schema: an older file this process may
    write is migrated once, in place (as its next write would); one it cannot write is read through a migrated
    in-memory copy, made again on each read."""
    conn = _reader(path)
    try:
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise QlabError(f"{path} was written by a newer qlab (schema v{version}, this one knows "
                                f"v{SCHEMA_VERSION}); upgrade qlab or pass another --db.")
            if version < SCHEMA_VERSION and path.exists() and writable(path):  # a missing file stays missing
                conn.close()
                with contextlib.suppress(QlabError), _connect(path):  # migrates; on failure, the copy below
                    pass
                conn = _reader(path)
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version < SCHEMA_VERSION:
                current = _migrated_copy(conn, path, version)
                conn.close()
                conn = current
        except sqlite3.DatabaseError as error:
            raise QlabError(f"{path} is not a usable qlab run database ({error}); pass another --db.") from None
        conn.row_factory = sqlite3.Row
        try:
            yield conn
        except sqlite3.OperationalError as error:  # locked past the timeout
            raise QlabError(f"the run database {path} could not be read ({error}); retry, or pass another "
                            "--db.") from None
    finally:
        conn.close()


@contextlib.contextmanager
def _connect(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection for writing: autocommit (transactions are explicit), WAL, foreign keys, schema migrated."""
    if path.exists() and not writable(path):
        raise _read_only_error(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except (OSError, sqlite3.OperationalError) as error:
        raise QlabError(f"cannot open the run database {path} ({error}); pass a writable --db path "
                        f"or set {DB_ENV}.") from None
    try:
        conn.row_factory = sqlite3.Row
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            # With WAL, NORMAL loses nothing when a process is killed (only on power loss); it avoids an
            # fsync per result.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            _migrate(conn, path)
        except sqlite3.DatabaseError as error:
            if "readonly" in str(error):
                raise _read_only_error(path) from None
            raise QlabError(f"{path} is not a usable qlab run database ({error}); pass another --db.") from None
        try:
            yield conn
        except sqlite3.OperationalError as error:  # locked past the timeout, read-only, disk full
            if "readonly" in str(error):
                raise _read_only_error(path) from None
            raise QlabError(f"the run database {path} could not be used ({error}); retry, or pass another "
                            "--db.") from None
    finally:
        conn.close()


@contextlib.contextmanager
def _write(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    # IMMEDIATE takes the write lock up front, so two writers queue (busy timeout) instead of deadlocking.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _seed_in(seed: int | None) -> int | None:
    # torch seeds are unsigned 64-bit; SQLite integers are signed: store the same 64 bits, read them back.
    return None if seed is None else int(seed) - (1 << 64) if int(seed) >= 1 << 63 else int(seed)


def _seed_out(stored: int | None) -> int | None:
    return None if stored is None else stored % (1 << 64)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=float, allow_nan=True)


class Store:
    """The run database at ``path`` (``resolve_path``'s choice when None). Each call opens its own short
    connection, so one Store is safe to share between threads and processes."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = resolve_path(path)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    def _reading(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return _read(self.path)

    def _writing(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return _connect(self.path)

    def writable(self) -> bool:
        """False for a database this process can only read (read-only file, folder or mount)."""
        return writable(self.path)

    def require_writable(self) -> None:
        """Fail with one line before long work whose results could not be stored here: a read-only database,
        a file that is not one, or one written by a newer qlab."""
        if not self.writable():
            raise _read_only_error(self.path)
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise QlabError(f"{self.path} was written by a newer qlab (schema v{version}, this one knows "
                            f"v{SCHEMA_VERSION}); upgrade qlab or pass another --db.")

    def schema_version(self) -> int:
        """The schema version of the file as it is (reading never migrates it; 0 for a missing file)."""
        if not self.path.exists():
            return 0
        with contextlib.closing(_reader(self.path)) as conn:
            try:
                return conn.execute("PRAGMA user_version").fetchone()[0]
            except sqlite3.DatabaseError as error:
                raise QlabError(f"{self.path} is not a usable qlab run database ({error}); pass another "
                                "--db.") from None

    def integrity_ok(self) -> bool:
        with self._reading() as conn:
            return conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    # writing

    def start_run(self, meta: RunMeta, run_id: str | None = None) -> str:
        """Open a run (status ``running``) and return its id."""
        run_id = run_id or uuid.uuid4().hex[:12]
        with self._writing() as conn, _write(conn):
            conn.execute(
                """INSERT INTO runs (id, created_at, kind, status, model, model_sha256, hardware, settings,
                   environment, text_sha256, text_name, tokens, seed)
                   VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (run_id, _now(), meta.kind, meta.model, meta.model_sha256, meta.hardware,
                 _dumps(meta.settings), _dumps(meta.environment), meta.text_sha256, meta.text_name,
                 meta.tokens, _seed_in(meta.seed)))
        return run_id

    def add_result(self, run_id: str, result: Any, kind: str | None = None, scheme: Any = None) -> int:
        """Save one finished result (ResultRow, MemoryPlan or a record mapping) now; returns its position."""
        return self.add_results(run_id, [result], kind, scheme)

    def add_results(self, run_id: str, results: Sequence[Any], kind: str | None = None, scheme: Any = None) -> int:
        """Save results that finished together in one transaction (all or none); returns the first position."""
        prepared = [_as_result(result, kind, scheme) for result in results]
        with self._writing() as conn, _write(conn):
            first = conn.execute("SELECT COUNT(*) FROM results WHERE run_id = ?", (run_id,)).fetchone()[0]
            conn.executemany(
                """INSERT INTO results (run_id, position, kind, label, record, scheme, created_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?)""",
                [(run_id, first + index, kind_, label, _dumps(record), None if scheme_ is None else _dumps(scheme_),
                  _now()) for index, (kind_, label, record, scheme_) in enumerate(prepared)])
        return first

    def finish_run(self, run_id: str, status: str = "finished", error: str | None = None) -> None:
        if status not in STATUSES:
            raise QlabError(f"unknown run status '{status}'; use one of {', '.join(STATUSES)}.")
        with self._writing() as conn, _write(conn):
            conn.execute(
                """UPDATE runs SET status = ?, finished_at = ?, error = ?,
                   seconds = ROUND((julianday(?) - julianday(created_at)) * 86400.0, 3) WHERE id = ?""",
                (status, _now(), error, _now(), run_id))

    def delete(self, run_ids: Iterable[str]) -> int:
        """Delete runs (and their results); returns how many were deleted."""
        ids = [self.resolve_id(i) for i in run_ids]
        with self._writing() as conn, _write(conn):
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
        matches = ([r[0] for r in conn.execute("SELECT id FROM runs WHERE id LIKE ? || '%'", (run_id,))]
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

    # export and import

    def export(self, run_ids: Iterable[str] | None = None) -> dict:
        """JSON-ready payload of runs with their results (all runs when ``run_ids`` is None); a recommendation
        brings the analysis run it names, so it reads back whole wherever the payload is imported."""
        runs = self.runs(run_ids)
        ids = {run.id for run in runs}
        linked = [run.analysis for run in runs if run.analysis is not None and run.analysis.id not in ids]
        runs = list({run.id: run for run in linked}.values()) + runs
        return {"format": EXPORT_FORMAT, "schema_version": SCHEMA_VERSION, "exported_at": _now(),
                "runs": [run.to_dict() for run in runs]}

    def import_payload(self, payload: Any, source_name: str = "import") -> list[str]:
        """Import an ``export`` payload, a ``sweep --json`` list of rows or a ``bench sweep`` JSON.

        Importing the same run twice adds nothing; a run that has more results than the stored copy (a
        finished copy of a run that was killed here) adds the missing ones. Returns the run ids touched.
        """
        runs = _runs_from_payload(payload, source_name)
        with self._writing() as conn, _write(conn):
            for run in runs:
                conn.execute(
                    """INSERT INTO runs (id, created_at, kind, status, model, model_sha256, hardware,
                       settings, environment, text_sha256, text_name, tokens, seed, finished_at, seconds, error)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT(id) DO UPDATE SET status = excluded.status,
                       finished_at = excluded.finished_at, seconds = excluded.seconds, error = excluded.error
                       WHERE runs.status = 'running'""",
                    (run["id"], run["created_at"], run["kind"], run["status"], run["model"],
                     run.get("model_sha256"), run.get("hardware"), _dumps(run.get("settings") or {}),
                     _dumps(run.get("environment") or {}), run.get("text_sha256"), run.get("text_name"),
                     run.get("tokens"), _seed_in(run.get("seed")), run.get("finished_at"), run.get("seconds"),
                     run.get("error")))
                for position, result in enumerate(run["results"]):
                    conn.execute(
                        """INSERT OR IGNORE INTO results (run_id, position, kind, label, record, scheme,
                           created_at) VALUES (?, ?, ?, ?, ?, ?, ?)""",
                        (run["id"], result.get("position", position), result["kind"], result["label"],
                         _dumps(result["record"]),
                         None if result.get("scheme") is None else _dumps(result["scheme"]),
                         result.get("created_at")))
        return [run["id"] for run in runs]

    def import_file(self, path: str | os.PathLike, name: str | None = None) -> list[str]:
        """Import a JSON file (see ``import_payload``) or another qlab SQLite database. ``name`` is what
        messages call the file (an upload's own name, not the temporary copy's path)."""
        path = Path(path).expanduser()
        shown = name or str(path)
        if not path.is_file():
            raise QlabError(f"{shown} does not exist or is not a file; give a JSON export or a .sqlite file.")
        with open(path, "rb") as handle:
            head = handle.read(16)
        if head.startswith(b"SQLite format 3"):
            with read_database(path, shown) as source:
                payload = source.export()
            return self.import_payload(payload, name or path.name)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise QlabError(f"{shown} is neither a qlab SQLite database nor JSON ({error}); export it with "
                            "`python -m qlab runs export` or `sweep --json`.") from None
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
    database (possibly older, possibly mid-write), so reading it never migrates, writes or keeps locking the
    original, and leaves no file behind; ``name`` is what messages call it."""
    path = Path(path)
    try:
        with contextlib.closing(_reader(path)) as source:
            version = source.execute("PRAGMA user_version").fetchone()[0]
            # The backup API copies a consistent snapshot, WAL included; the copy is brought to this schema.
            snapshot = _migrated_copy(source, path, version)
    except sqlite3.DatabaseError as error:
        raise QlabError(f"{name or path} is not a readable SQLite database ({error}).") from None
    try:
        snapshot.row_factory = sqlite3.Row
        yield _Snapshot(path, snapshot)
    finally:
        snapshot.close()


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


def _stored_run(row: sqlite3.Row, results: Sequence[sqlite3.Row]) -> StoredRun:
    environment_record = json.loads(row["environment"])
    meta = RunMeta(kind=row["kind"], model=row["model"], settings=json.loads(row["settings"]),
                   model_sha256=row["model_sha256"], hardware=row["hardware"], text_sha256=row["text_sha256"],
                   text_name=row["text_name"], tokens=row["tokens"], seed=_seed_out(row["seed"]),
                   environment=environment_record)
    return StoredRun(
        id=row["id"], kind=row["kind"], status=_live_status(row["status"], environment_record),
        created_at=row["created_at"], finished_at=row["finished_at"], seconds=row["seconds"],
        error=row["error"], meta=meta,
        results=tuple(StoredResult(r["position"], r["kind"], r["label"], json.loads(r["record"]),
                                   None if r["scheme"] is None else json.loads(r["scheme"]), r["created_at"])
                      for r in results))


def _runs_from_payload(payload: Any, source_name: str) -> list[dict]:
    """Normalise the JSON shapes qlab writes into a list of run dicts with results."""
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
    run_id = hashlib.sha256(_dumps([sweep_rows, others]).encode()).hexdigest()[:12]
    results = ([{"kind": "sweep", "label": r["label"], "record": r, "scheme": scheme}
                for r, scheme in zip(sweep_rows, schemes, strict=True)]
               + [{"kind": o.get("kind", kind), "label": str(o.get("label") or o.get("scheme") or kind),
                   "record": o} for o in others])
    settings = {"schemes": [s for s in schemes if s is not None], "imported_from": source_name,
                **{k: described[k] for k in ("benchmark", "formats") if k in described}}
    return {"id": run_id, "created_at": _now(), "kind": kind, "status": "finished",
            "model": str(described.get("model", "unknown")), "hardware": described.get("hardware"),
            "model_sha256": described.get("model_sha256"), "text_sha256": described.get("text_sha256"),
            "text_name": described.get("text_name"), "seed": described.get("seed"),
            "tokens": described.get("eval_tokens") or described.get("tokens"), "settings": settings,
            "environment": {k: described[k] for k in ("qlab", "torch", "transformers", "cpu", "threads")
                            if k in described}, "results": results}


# --- recording as results arrive ---------------------------------------------------------------------------


class Recorder:
    """``with Recorder(db, meta) as rec: rec.save(result)``: one run whose results are committed one by one.

    The run ends ``finished``; ``cancelled`` on qlab's Cancelled; ``stopped`` when the caller stops early
    (KeyboardInterrupt, a Streamlit rerun or stop); ``failed`` on an error, with its message. A process killed
    outright leaves ``running``, which listings show as ``interrupted`` once the process is gone.
    With ``strict=False`` (the dashboard) a database that cannot be written does not stop the work: saving
    is skipped and the reason is kept in ``error``.
    """

    def __init__(self, db: str | os.PathLike | Store | None, meta: RunMeta, strict: bool = True) -> None:
        self.store = db if isinstance(db, Store) else Store(db)
        self.meta = meta
        self.strict = strict
        self.run_id: str | None = None
        self.saved = 0
        self.error: str | None = None

    def _guard(self, action, *args) -> None:
        if self.error is not None:
            return
        try:
            action(*args)
        except QlabError as error:
            if self.strict:
                raise
            self.error = f"results are not being saved: {error}"

    def __enter__(self) -> Recorder:
        def start() -> None:
            self.run_id = self.store.start_run(self.meta)

        self._guard(start)
        return self

    def save(self, result: Any, kind: str | None = None, scheme: Any = None) -> None:
        self._guard(self.store.add_result, self.run_id, result, kind, scheme)
        self.saved += self.error is None

    def save_many(self, results: Sequence[Any], kind: str | None = None) -> None:
        """Results that finished together (a sensitivity analysis's per-linear records), in one transaction."""
        if results:
            self._guard(self.store.add_results, self.run_id, results, kind)
            self.saved += len(results) if self.error is None else 0

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            status, error = "finished", None
        elif issubclass(exc_type, Cancelled):
            status, error = "cancelled", str(exc)
        elif issubclass(exc_type, Exception):
            status, error = "failed", f"{exc_type.__name__}: {exc}"[:500]
        else:  # KeyboardInterrupt, GeneratorExit, Streamlit's stop/rerun (BaseException subclasses)
            status, error = "stopped", None
        self._guard(self.store.finish_run, self.run_id, status, error)


def store_rows(db: str | os.PathLike | Store | None, meta: RunMeta, rows: Iterable[Any]) -> Iterator[Any]:
    """Pass ``rows`` through unchanged, committing each to a new run before yielding it.

    ``for row in store_rows(db, sweep_meta(loaded, schemes, spec), run_sweep(...))``: a killed sweep keeps
    every scheme that finished.
    """
    with Recorder(db, meta) as recorder:
        for row in rows:
            recorder.save(row)
            yield row


# --- sensitivity, recommendation and speed runs ------------------------------------------------------------
#
# A sensitivity run stores its per-linear records (kind ``sensitivity_linear``, all at once, when the probe
# pass ends) and then each end-to-end unit as it is measured (``sensitivity_block``); a recommendation run adds
# each measured plan (``mix``) and the recommendation itself; a speed run stores one ``bench`` row per backend.
# Everything needed to redraw them (schemes, metric, view, unit, token count) is in the run's settings, so
# ``stored_sensitivity`` rebuilds the report without recomputing, even for a run killed half-way.


def sensitivity_meta(kind: str, loaded, schemes: Sequence, spec, baseline, *, unit: str, view: str = "forward",
                     blocks: bool = True, predict: bool = True, hardware: str = "this-machine",
                     **settings: Any) -> RunMeta:
    """RunMeta of a ``sensitivity`` (or ``recommend``) run: what ``stored_sensitivity`` needs to rebuild it."""
    from qlab.analyses.sensitivity import METRIC

    return run_meta(kind, loaded, spec, hardware, schemes=[s.to_dict() for s in schemes], unit=unit, view=view,
                    blocks=blocks, predict=predict, model_kind=loaded.kind, metric=METRIC[loaded.kind],
                    eval_tokens=baseline.tokens, **settings)


def sensitivity_saver(recorder: Recorder) -> Callable[[str, list[dict]], None]:
    """An ``on_records`` callback for ``qlab.analyses.sensitivity.analyze`` that commits records as they finish."""
    def save(part: str, records: list[dict]) -> None:
        recorder.save_many(records, f"sensitivity_{part}")

    return save


def save_sensitivity(recorder: Recorder, report) -> None:
    """Copy a finished SensitivityReport into a run: a recommendation built on an analysis already shown whose
    own run cannot be named (it was not stored, or is gone); otherwise settings ``analysis_run`` names it."""
    recorder.save_many(report.linears, "sensitivity_linear")
    recorder.save_many(report.blocks, "sensitivity_block")


def save_summary(recorder: Recorder, **values: Any) -> None:
    """The run's closing record (phase timings...), saved last."""
    recorder.save({"label": SUMMARY_KIND, **values}, SUMMARY_KIND)


def stored_sensitivity(run: StoredRun):
    """The SensitivityReport a stored ``sensitivity``/``recommend`` run holds, or that of the analysis run a
    recommendation names (None without per-linear records); a run stopped half-way gives the units it finished."""
    from qlab.analyses.sensitivity import SensitivityReport
    from qlab.core.quant import QuantScheme

    linears = run.records("sensitivity_linear")
    if not linears:
        return None if run.analysis is None else stored_sensitivity(run.analysis)
    settings = run.meta.settings
    summary = next((r.record for r in run.results if r.kind == SUMMARY_KIND), {})
    schemes = tuple(QuantScheme.from_dict(s) for s in settings.get("schemes", []))
    return SensitivityReport(run.model, settings.get("model_kind", "causal-lm"),
                             settings.get("metric") or linears[0].get("metric", "kld_mean"), schemes, linears,
                             run.records("sensitivity_block"), dict(summary.get("seconds", {})),
                             int(settings.get("eval_tokens") or run.meta.tokens or 0),
                             settings.get("view", "forward"), settings.get("unit", "block"))


def bench_meta(loaded, spec, backends: Sequence[str], accuracy_tokens: int | None, device: str = "cpu",
               **settings: Any) -> RunMeta:
    """RunMeta of a speed run (``qlab.backends.speed.run_bench``): the SpeedSpec, backends and accuracy token budget."""
    from qlab.models.evaluate import EvalSpec

    accuracy = EvalSpec(tokens=accuracy_tokens) if accuracy_tokens else None
    return run_meta("bench", loaded, accuracy, backends=list(backends), device=device,
                    accuracy_tokens=accuracy_tokens, **dataclasses.asdict(spec), **settings)


# --- exporting a simulated quantized model --------------------------------------------------------------


def scheme_export(loaded, plan) -> dict:
    """The per-layer scheme JSON of a simulated quantization, with the model's id and content hash."""
    from qlab.core.plan import unquantized_format

    return {"format": "qlab-layer-schemes", "model": loaded.name, "model_sha256": model_sha256(loaded),
            "unquantized_format": unquantized_format(plan), "layers": layer_scheme_map(loaded.model, plan)}
