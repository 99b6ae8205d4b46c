"""Foreign and shared run databases (issue 17, family 4): another application's SQLite file is refused in one
line and never written (no tables, no user_version, no WAL); a run a live sweep is writing cannot be deleted,
and one deleted from elsewhere does not kill the sweep; a lock held past the busy timeout loses no finished
result, from the database or from --json; an id prefix is a prefix, not a LIKE pattern."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sqlite3
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from qlab.analyses.sweep import ResultRow
from qlab.cli import main
from qlab.core.plan import SizeReport
from qlab.core.quant import QuantScheme
from qlab.store import RunMeta, Store
from qlab.store import db as store_db
from qlab.store.recorder import Recorder, store_rows
from tests.tiny_models import tiny_bert

# --- another application's database ---------------------------------------------------------------------

FOREIGN = {
    "notes app": ("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT); INSERT INTO notes (body) VALUES ('hi');",
                  0, False),
    "its own runs table": ("CREATE TABLE runs (id TEXT, started TEXT, status TEXT); "
                           "INSERT INTO runs VALUES ('r1r1r1', 'today', 'ok');", 0, False),
    "runs and results, not qlab's columns": ("CREATE TABLE runs (id TEXT, x TEXT); CREATE TABLE results (y);", 2,
                                             False),
    "user_version 5": ("CREATE TABLE t (a); INSERT INTO t VALUES (1);", 5, False),
    "user_version 99": ("CREATE TABLE t (a);", 99, False),
    "in WAL mode": ("CREATE TABLE events (at TEXT); INSERT INTO events VALUES ('now');", 3, True),
    "browser history": ("CREATE TABLE moz_places (id INTEGER, url TEXT); CREATE TABLE moz_bookmarks (id INTEGER);"
                        "CREATE TABLE moz_origins (id); CREATE TABLE moz_keywords (id); CREATE TABLE moz_meta (k);"
                        "CREATE TABLE moz_anno (id);", 0, False),
}


def make_foreign(path: Path, kind: str) -> None:
    script, version, wal = FOREIGN[kind]
    conn = sqlite3.connect(path)
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(script)
    conn.execute(f"PRAGMA user_version = {version}")
    conn.commit()
    conn.close()


def fingerprint(folder: Path) -> dict:
    """Every file in ``folder`` with its bytes' hash (a -wal or -shm file appearing shows too)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def describe(path: Path) -> tuple:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return (conn.execute("PRAGMA user_version").fetchone()[0], conn.execute("PRAGMA journal_mode").fetchone()[0],
                sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master")))


COMMANDS = {
    "runs list": ["runs", "list"],
    "runs show": ["runs", "show", "r1r1"],
    "runs export": ["runs", "export"],
    "runs export csv": ["runs", "export", "--csv", "-"],
    "runs delete": ["runs", "delete", "r1r1"],
    "report": ["report", "--run", "r1r1", "--out", "{tmp}/report.html"],
    "sweep": ["sweep", "--model", "minilm-l6", "--formats", "int8", "--tokens", "64", "--quiet"],
    "memory": ["memory", "--model", "llama-3.1-8b", "--json", "-"],
    "runs import (as the source)": ["runs", "import", "{db}", "--db", "{tmp}/mine.sqlite"],
}


@pytest.mark.parametrize("kind", list(FOREIGN))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_another_applications_database_is_named_and_never_written(kind, command, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / "other.sqlite"
    make_foreign(path, kind)
    before, described = fingerprint(folder), describe(path)
    monkeypatch.setattr("qlab.models.loading.load", lambda *a, **k: pytest.fail("the model loaded first"))
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{db}", str(path)) for a in COMMANDS[command]]
    if "--db" not in argv:
        argv += ["--db", str(path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "is not a qlab run database but another application's SQLite file" in err
    assert "older qlab schema" not in err and "newer qlab" not in err
    assert fingerprint(folder) == before and describe(path) == described
    assert not (tmp_path / "mine.sqlite").exists() and not (tmp_path / "report.html").exists()


def test_an_empty_file_and_qlab_databases_are_still_used(tmp_path, capsys):
    empty = tmp_path / "empty.sqlite"
    empty.touch()  # what `touch runs.sqlite` gives: no tables yet, so a new qlab database
    assert main(["runs", "list", "--db", str(empty)]) == 0
    run_id = Store(empty).start_run(RunMeta("sweep", "m", {"schemes": []}, environment={}))
    assert main(["runs", "show", run_id[:6], "--db", str(empty)]) == 0
    assert run_id in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["notes app", "its own runs table", "in WAL mode"])
def test_history_page_names_a_foreign_database_and_leaves_it_alone(kind, tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / "other.sqlite"
    make_foreign(path, kind)
    before = fingerprint(folder)
    monkeypatch.setenv("QLAB_DB", str(path))
    at = AppTest.from_file("../pages/history.py", default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1 and "another application's SQLite file" in at.error[0].value
    assert fingerprint(folder) == before


@pytest.mark.slow
def test_history_import_of_a_foreign_database_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "other.sqlite"
    make_foreign(path, "its own runs table")
    monkeypatch.setenv("QLAB_DB", str(tmp_path / "runs.sqlite"))
    at = AppTest.from_file("../pages/history.py", default_timeout=120).run()
    at.file_uploader(key="history_upload").set_value(("app.sqlite", path.read_bytes(), "application/x-sqlite3")).run()
    at.button(key="history_import").click().run()
    assert not at.exception and len(at.error) == 1, [e.value for e in at.error]
    assert "app.sqlite is not a qlab run database" in at.error[0].value and "/tmp" not in at.error[0].value


# --- id prefixes are prefixes --------------------------------------------------------------------------------


@pytest.fixture
def two_runs(tmp_path, monkeypatch):
    path = tmp_path / "runs.sqlite"
    monkeypatch.setenv("QLAB_DB", str(path))
    store = Store(path)
    ids = [store.start_run(RunMeta("sweep", "m", {"schemes": []}, environment={}), run_id=i)
           for i in ("a1a1a1a1a1a1", "b2b2b2b2b2b2")]
    for run_id in ids:
        store.finish_run(run_id)
    return store, ids


@pytest.mark.parametrize("prefix", ["%%%%", "____", "%a1%", "a1a_", "a1%%", "b2b2%", "\\%%%", "''%'"])
@pytest.mark.parametrize("verb", ["show", "delete"])
def test_a_like_wildcard_is_not_a_prefix_of_every_run(prefix, verb, two_runs, capsys):
    store, ids = two_runs
    assert main(["runs", verb, prefix]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no run '{prefix}'" in err, err
    assert [r["id"] for r in store.list_runs()] == ids[::-1]


def test_a_real_prefix_still_resolves(two_runs):
    store, ids = two_runs
    assert store.resolve_id("a1a1") == ids[0] and store.resolve_id("b2b2b2") == ids[1]


# --- deleting a run a sweep is writing ----------------------------------------------------------------------


def running_run(store: Store, pid: int, host: str | None = None) -> str:
    env = {"pid": pid, "host": host or socket.gethostname()}
    return store.start_run(RunMeta("sweep", "m", {"schemes": []}, environment=env))


def dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_deleting_a_run_a_live_process_writes_is_refused(two_runs, capsys):
    store, ids = two_runs
    live = running_run(store, os.getpid())
    assert main(["runs", "delete", live]) == 2
    err = capsys.readouterr().err
    assert "still being written" in err and err.count("\n") == 1
    # several ids at once: all or nothing
    assert main(["runs", "delete", ids[0], live]) == 2
    assert {r["id"] for r in store.list_runs()} == {*ids, live}


def test_a_killed_or_foreign_hosts_running_run_can_be_deleted(two_runs, capsys):
    store, _ = two_runs
    killed = running_run(store, dead_pid())
    elsewhere = running_run(store, os.getpid(), host="gpu-server-that-is-not-this-one")
    assert main(["runs", "delete", killed, elsewhere]) == 0
    assert killed not in {r["id"] for r in store.list_runs()}


def test_a_sweep_whose_run_is_deleted_from_elsewhere_finishes_its_work(tmp_path):
    path = tmp_path / "runs.sqlite"
    rows = [{"label": f"int{bits}", "kld_mean": 0.1 / bits} for bits in (8, 4, 2)]

    def produce():
        for index, row in enumerate(rows):
            if index == 1:  # another machine (or a raw DELETE) removes the run mid-sweep
                with sqlite3.connect(path) as conn:
                    conn.execute("DELETE FROM runs")
            yield row

    recorder = Recorder(path, RunMeta("sweep", "m", {"schemes": []}, environment={}))
    with recorder:
        seen = []
        for row in produce():
            recorder.save(row, "sweep")
            seen.append(row)
    assert seen == rows and recorder.saved == 1 and "deleted while it ran" in recorder.error
    assert Store(path).list_runs() == []


@pytest.mark.slow
def test_history_refuses_to_delete_a_run_being_written(tmp_path, monkeypatch):
    path = tmp_path / "runs.sqlite"
    monkeypatch.setenv("QLAB_DB", str(path))
    live = running_run(Store(path), os.getpid())
    at = AppTest.from_file("../pages/history.py", default_timeout=120)
    at.query_params["runs"] = live
    at.run()
    at.checkbox(key="history_confirm_delete").check().run()
    at.button(key="history_delete").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "still being written" in at.error[0].value
    assert [r["id"] for r in Store(path).list_runs()] == [live]


# --- a lock held past the busy timeout ---------------------------------------------------------------------


@contextlib.contextmanager
def held_lock(path: Path):
    """Another process's write transaction on the database (as a long import or a stuck writer holds)."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=0)
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def fake_rows(formats=("int8", "int4", "nf4")):
    return [ResultRow("tiny-bert", QuantScheme(fmt, "channel"), SizeReport(100, 50, 4, 10, 40), {"cosine_mean": 0.9},
                      0.01, 0.02, 64) for fmt in formats]


@pytest.fixture
def short_busy_timeout(monkeypatch):
    monkeypatch.setattr(store_db, "BUSY_TIMEOUT_S", 0.2)


def test_results_computed_while_the_database_is_locked_are_stored_once_it_frees(tmp_path, short_busy_timeout):
    path = tmp_path / "runs.sqlite"
    Store(path).list_runs()  # the file exists (WAL) before the lock
    Store(path).finish_run(Store(path).start_run(RunMeta("sweep", "m", {"schemes": []}, environment={})))
    lock = held_lock(path)
    passed = []
    rows = fake_rows()
    for index, row in enumerate(store_rows(path, RunMeta("sweep", "tiny-bert", {"schemes": []}, environment={}),
                                           iter(rows))):
        passed.append(row)
        if index == 0:
            lock.__enter__()  # held while the second scheme is computed and saved
        if index == 1:
            lock.__exit__(None, None, None)
    assert passed == rows
    newest = Store(path).get(Store(path).list_runs()[0]["id"])
    assert [r.label for r in newest.results] == [r.scheme.label for r in rows]
    assert newest.status == "finished"


def sweep_cli(monkeypatch, rows, between=None):
    """`python -m qlab sweep` on a tiny model whose schemes 'finish' as ``rows``; ``between(i)`` runs after row i."""
    from qlab.models import loading

    loaded = tiny_bert()
    monkeypatch.setattr(loading, "load", lambda *a, **k: loaded)

    def run_sweep(_loaded, _schemes, _spec, progress=None):
        for index, row in enumerate(rows):
            yield row
            if between:
                between(index)

    monkeypatch.setattr("qlab.analyses.sweep.run_sweep", run_sweep)


def test_a_sweep_through_a_lock_longer_than_the_timeout_loses_nothing(tmp_path, monkeypatch, short_busy_timeout,
                                                                      capsys):
    path = tmp_path / "runs.sqlite"
    Store(path).list_runs()
    lock = held_lock(path)
    rows = fake_rows()
    sweep_cli(monkeypatch, rows, between=lambda i: lock.__enter__() if i == 0 else (
        lock.__exit__(None, None, None) if i == 1 else None))
    out = tmp_path / "rows.json"
    assert main(["sweep", "--model", "tiny", "--formats", "int8,int4,nf4", "--db", str(path), "--json", str(out),
                 "--quiet", "--text-file", str(text_file(tmp_path))]) == 0
    assert [r["label"] for r in json.loads(out.read_text())] == [r.scheme.label for r in rows]
    stored = Store(path).get(Store(path).list_runs()[0]["id"])
    assert [r.label for r in stored.results] == [r.scheme.label for r in rows] and stored.status == "finished"


def test_a_lock_that_outlasts_the_sweep_keeps_every_row_in_json_and_says_so(tmp_path, monkeypatch,
                                                                            short_busy_timeout, capsys):
    path = tmp_path / "runs.sqlite"
    Store(path).list_runs()
    lock = held_lock(path)
    rows = fake_rows()
    sweep_cli(monkeypatch, rows, between=lambda i: lock.__enter__() if i == 0 else None)
    out = tmp_path / "rows.json"
    try:
        assert main(["sweep", "--model", "tiny", "--formats", "int8,int4,nf4", "--db", str(path), "--json",
                     str(out), "--quiet", "--text-file", str(text_file(tmp_path))]) == 2
    finally:
        lock.__exit__(None, None, None)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 finished result(s) could not be stored" in err and "locked" in err, err
    assert [r["label"] for r in json.loads(out.read_text())] == [r.scheme.label for r in rows]
    stored = Store(path).get(Store(path).list_runs()[0]["id"])
    assert [r.label for r in stored.results] == [rows[0].scheme.label]  # what went in before the lock


def test_the_dashboard_recorder_keeps_working_through_a_lock(tmp_path, short_busy_timeout):
    path = tmp_path / "runs.sqlite"
    Store(path).list_runs()
    recorder = Recorder(path, RunMeta("sweep", "m", {"schemes": []}, environment={}), strict=False)
    with recorder:
        with held_lock(path):
            recorder.save({"label": "int8"}, "sweep")
            assert recorder.error is None and len(recorder.pending) == 1
        recorder.save({"label": "int4"}, "sweep")
    assert recorder.saved == 2 and recorder.error is None and not recorder.pending
    assert [r.label for r in Store(path).get(recorder.run_id).results] == ["int8", "int4"]


def text_file(tmp_path: Path) -> Path:
    from qlab.models.evaluate import default_text

    path = tmp_path / "text.txt"
    path.write_text(default_text()[:20_000])
    return path


# --- a database path that is not a regular file ------------------------------------------------------------


@pytest.mark.parametrize("what", ["/dev/null", "a FIFO", "a directory"])
@pytest.mark.parametrize("command", ["runs list", "runs export", "sweep", "memory"])
def test_a_database_path_that_is_not_a_regular_file_is_refused(what, command, tmp_path, capsys, monkeypatch):
    target = {"/dev/null": Path("/dev/null"), "a FIFO": tmp_path / "fifo", "a directory": tmp_path / "folder"}[what]
    if what == "a FIFO":
        os.mkfifo(target)
    if what == "a directory":
        target.mkdir()
    before = sorted(os.listdir(target.parent))
    monkeypatch.setattr("qlab.models.loading.load", lambda *a, **k: pytest.fail("the model loaded first"))
    assert main([*COMMANDS[command], "--db", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"{target} is not a regular file" in err and err.count("\n") == 1, err
    assert sorted(os.listdir(target.parent)) == before  # no -wal or -shm beside it (not even in /dev)
