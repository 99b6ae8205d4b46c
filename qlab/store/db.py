"""The run database as a file: schema migrations, connections that write and connections that only read.

One file per user (``QLAB_DB`` or ``$XDG_DATA_HOME/qlab/runs.sqlite``), stdlib ``sqlite3`` in WAL mode: readers
never block the writer, each result is its own committed transaction, and a process killed mid-write leaves
the last committed state readable. The schema version is ``PRAGMA user_version``; ``MIGRATIONS`` upgrade it
step by step, and a fresh file is built by running them all from 0, so the upgrade path is exercised daily.
Reads use a connection that never writes, so a read-only file, folder or mount, or a database copied from a GPU
server, can be browsed as it is. The one exception is an older schema in a file this process may write: the
first read migrates it in place (as the first write would), instead of every read migrating a copy; a
read-only one is read through an in-memory copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qlab.core.errors import QlabError
from qlab.core.paths import DB_ENV

BUSY_TIMEOUT_S = 30.0  # a writer waits this long for another process's transaction before giving up

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
# What ``runs.status`` may hold (``interrupted``: a run still marked running whose process is gone).
STATUSES = ("running", "finished", "cancelled", "stopped", "failed", "interrupted")


def now() -> str:
    """The current UTC time as stored (ISO 8601, seconds)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def dumps(value: Any) -> str:
    """JSON as stored: numpy and other number types become floats, NaN is kept."""
    return json.dumps(value, default=float, allow_nan=True)


def seed_in(seed: int | None) -> int | None:
    """A torch seed (unsigned 64-bit) as a SQLite integer (signed): the same 64 bits."""
    return None if seed is None else int(seed) - (1 << 64) if int(seed) >= 1 << 63 else int(seed)


def seed_out(stored: int | None) -> int | None:
    """The torch seed ``seed_in`` stored."""
    return None if stored is None else stored % (1 << 64)


class DatabaseBusy(QlabError):
    """Another process held the database's write lock past the busy timeout: retrying later may succeed."""


# What makes a SQLite file qlab's: these columns in ``runs``, and ``rows`` (v1) or ``results`` (v2 on) beside it.
RUN_COLUMNS = frozenset({"id", "created_at", "model", "settings", "environment"})


def check_ours(conn: sqlite3.Connection, path: Path) -> int:
    """The schema version of a database qlab may read and migrate: empty (a new file), or holding qlab's tables.
    Another application's SQLite file (its own tables, perhaps its own ``runs``, any ``user_version``) is
    refused before anything (migration, WAL) is written to it."""
    # One statement, so one snapshot: a qlab process creating the file commits its tables and version together.
    version, tables, columns = conn.execute(
        """SELECT user_version,
                  (SELECT group_concat(name, char(31)) FROM (SELECT name FROM sqlite_master WHERE type = 'table'
                   AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name)),
                  (SELECT group_concat(name, char(31)) FROM pragma_table_info('runs'))
           FROM pragma_user_version""").fetchone()
    tables = tables.split("\x1f") if tables else []
    columns = set(columns.split("\x1f")) if columns else set()
    if not tables:
        return version
    if version >= 1 and RUN_COLUMNS <= columns and ("rows" if version == 1 else "results") in tables:
        return version
    shown = ", ".join(tables[:5]) + (f" and {len(tables) - 5} more" if len(tables) > 5 else "")
    raise QlabError(f"{path} is not a qlab run database but another application's SQLite file (tables {shown}; "
                    f"user_version {version}); qlab leaves it untouched and uses only its own, so pass another file.")


def _lock_error(path: Path, error: sqlite3.OperationalError) -> QlabError:
    """A ``DatabaseBusy`` for a lock held past the busy timeout, a plain QlabError for anything else."""
    if "locked" in str(error) or "busy" in str(error):
        return DatabaseBusy(f"the run database {path} stayed locked by another process for over "
                            f"{BUSY_TIMEOUT_S:g} s ({error}); retry, or pass another --db.")
    return QlabError(f"the run database {path} could not be used ({error}); retry, or pass another --db.")


def newer_schema_error(path: Path, version: int) -> QlabError:
    return QlabError(f"{path} was written by a newer qlab (schema v{version}, this one knows "
                     f"v{SCHEMA_VERSION}); upgrade qlab or pass another --db.")


def read_only_error(path: Path) -> QlabError:
    return QlabError(f"{path} is read-only; pass --db (or set {DB_ENV}) to a writable path.")


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise newer_schema_error(path, version)
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


def is_wal(path: Path) -> bool:
    """Whether the file at ``path`` is a SQLite database in WAL mode."""
    # Bytes 18 and 19 of a SQLite header are the write/read format versions: 2 means WAL.
    with open(path, "rb") as handle:
        return handle.read(20)[18:20] == b"\x02\x02"


def _check_regular(path: Path) -> None:
    """A database is a regular file: SQLite would read a device (``/dev/null``) as an empty database and put its
    -wal and -shm files beside it, and block on a FIFO."""
    if path.exists() and not path.is_file():
        raise QlabError(f"{path} is not a regular file; pass a database file with --db (or set {DB_ENV}).")


def _uri(path: Path, **options: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in options.items())
    return f"file:{urllib.parse.quote(str(path.absolute()))}?{query}"


def reader(path: Path) -> sqlite3.Connection:
    """A connection that never writes the database: schema as found, nothing migrated, no journal mode set.

    A missing file reads as an empty database (in memory: nothing is created). A writable file is opened
    read-write but ``query_only``: SQLite then removes the -wal/-shm files it needed when it closes, where a
    ``mode=ro`` handle would leave them behind. A file this process cannot write is opened ``mode=ro``, and a
    WAL database with no -wal file beside it (all of it in the main file) ``immutable=1``, which needs no -shm
    file that a read-only folder could not hold.
    """
    _check_regular(path)
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
        immutable = is_wal(path) and not Path(f"{path}-wal").exists()
        options = {"mode": "ro", "immutable": "1"} if immutable else {"mode": "ro"}
        return sqlite3.connect(_uri(path, **options), uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except (OSError, sqlite3.DatabaseError) as error:
        raise QlabError(f"cannot open the run database {path} ({error}); pass a readable --db path "
                        f"or set {DB_ENV}.") from None


def migrated_copy(conn: sqlite3.Connection, path: Path, version: int) -> sqlite3.Connection:
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
def read(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection for reading only (see ``reader``), at the current schema: an older file this process may
    write is migrated once, in place (as its next write would); one it cannot write is read through a migrated
    in-memory copy, made again on each read."""
    conn = reader(path)
    try:
        try:
            version = check_ours(conn, path)
            if version > SCHEMA_VERSION:
                raise newer_schema_error(path, version)
            if version < SCHEMA_VERSION and path.exists() and writable(path):  # a missing file stays missing
                conn.close()
                with contextlib.suppress(QlabError), connect(path):  # migrates; on failure, the copy below
                    pass
                conn = reader(path)
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version < SCHEMA_VERSION:
                current = migrated_copy(conn, path, version)
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
def connect(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection for writing: autocommit (transactions are explicit), WAL, foreign keys, schema migrated."""
    _check_regular(path)
    if path.exists() and not writable(path):
        raise read_only_error(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
    except (OSError, sqlite3.OperationalError) as error:
        raise QlabError(f"cannot open the run database {path} ({error}); pass a writable --db path "
                        f"or set {DB_ENV}.") from None
    try:
        conn.row_factory = sqlite3.Row
        try:
            check_ours(conn, path)  # before WAL and migrations: another application's file is never written
            conn.execute("PRAGMA journal_mode=WAL")
            # With WAL, NORMAL loses nothing when a process is killed (only on power loss); it avoids an
            # fsync per result.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            _migrate(conn, path)
        except sqlite3.DatabaseError as error:
            if "readonly" in str(error):
                raise read_only_error(path) from None
            if isinstance(error, sqlite3.OperationalError) and "locked" in str(error):  # another writer migrating
                raise _lock_error(path, error) from None
            raise QlabError(f"{path} is not a usable qlab run database ({error}); pass another --db.") from None
        try:
            yield conn
        except sqlite3.OperationalError as error:  # locked past the timeout, read-only, disk full
            if "readonly" in str(error):
                raise read_only_error(path) from None
            raise _lock_error(path, error) from None
    finally:
        conn.close()


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction on a ``connect`` connection: committed at the end, rolled back on any exception."""
    # IMMEDIATE takes the write lock up front, so two writers queue (busy timeout) instead of deadlocking.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def schema_version(path: Path) -> int:
    """The schema version of the file as it is (reading never migrates it; 0 for a missing file)."""
    if not path.exists():
        return 0
    with contextlib.closing(reader(path)) as conn:
        try:
            return check_ours(conn, path)
        except sqlite3.DatabaseError as error:
            raise QlabError(f"{path} is not a usable qlab run database ({error}); pass another --db.") from None


@contextlib.contextmanager
def snapshot(path: Path, name: str | None = None) -> Iterator[sqlite3.Connection]:
    """An in-memory copy of the database at ``path`` (possibly older, possibly mid-write) at this schema: reading
    it never migrates, writes or keeps locking the original, and leaves no file behind; ``name`` is what
    messages call it."""
    try:
        with contextlib.closing(reader(path)) as source:
            version = check_ours(source, path if name is None else Path(name))
            # The backup API copies a consistent snapshot, WAL included; the copy is brought to this schema.
            copy = migrated_copy(source, path, version)
    except sqlite3.DatabaseError as error:
        raise QlabError(f"{name or path} is not a readable SQLite database ({error}).") from None
    try:
        copy.row_factory = sqlite3.Row
        yield copy
    finally:
        copy.close()
