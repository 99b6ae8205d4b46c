"""Run store: round trips of every result kind, migration, import/export, statuses, kills and concurrency."""

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from qlab import store
from qlab.analyses import memory
from qlab.analyses.sweep import ResultRow
from qlab.core import paths
from qlab.core.errors import Cancelled, QlabError
from qlab.core.plan import SizeReport, layer_scheme_map, layer_schemes, quantized_copy
from qlab.core.quant import QuantScheme
from qlab.models.loading import model_sha256
from qlab.store import Recorder, RunMeta, Store
from qlab.store import db as database

REPO = Path(__file__).resolve().parents[1]
ENVIRONMENT = {"qlab": "0.1.0", "torch": "2.13.0", "transformers": "5.23.0", "host": "elsewhere", "pid": 1}


def meta(model="minilm-l6", kind="sweep", **changes) -> RunMeta:
    fields = dict(kind=kind, model=model, settings={"schemes": [QuantScheme("int4", "group", 64).to_dict()]},
                  model_sha256="ab" * 32, hardware="h100-sxm-80gb", text_sha256="cd" * 32,
                  text_name="pydoc", tokens=128, seed=7, environment=ENVIRONMENT)
    return RunMeta(**(fields | changes))


def row(fmt="int4", kld=0.01, size_bytes=1000) -> ResultRow:
    scheme = QuantScheme(fmt, "group", 64) if fmt not in ("fp32", "fp16") else QuantScheme(fmt)
    return ResultRow("smollm2-135m", scheme, SizeReport(800, size_bytes - 200, 50, 100, 200),
                     {"ppl": 12.5, "kld_mean": kld, "kld_p99": 10 * kld, "top1_agreement": 1 - kld},
                     0.5, 1.5, 512, {"baseline_ppl": 12.0})


def jsonable(record: dict) -> dict:
    return json.loads(json.dumps(record))


@pytest.fixture
def db(tmp_path) -> Store:
    return Store(tmp_path / "runs.sqlite")


def test_path_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("QLAB_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert paths.resolve_path() == tmp_path / "data" / "qlab" / "runs.sqlite"
    assert store.requested_path(None) is None  # headless runs store only when asked
    assert store.requested_path(None, default=True) == tmp_path / "data" / "qlab" / "runs.sqlite"  # sweep
    assert not (tmp_path / "data").exists()  # checking a database creates nothing
    monkeypatch.setenv("QLAB_DB", str(tmp_path / "env.sqlite"))
    assert paths.resolve_path() == store.requested_path(None) == tmp_path / "env.sqlite"
    assert paths.resolve_path(tmp_path / "flag.sqlite") == tmp_path / "flag.sqlite"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert paths.default_path() == Path.home() / ".local" / "share" / "qlab" / "runs.sqlite"


def test_sweep_rows_round_trip(db):
    rows = [row("fp16", 1e-7, 2000), row("int8", 1e-3, 1500), row("int4", 0.05, 1000)]
    run_id = db.start_run(meta())
    positions = [db.add_result(run_id, r) for r in rows]
    db.finish_run(run_id)
    run = db.get(run_id)
    assert positions == [0, 1, 2]
    assert run.status == "finished" and run.finished_at and run.seconds >= 0
    assert [r.kind for r in run.results] == ["sweep"] * 3
    assert run.records() == [jsonable(r.to_record()) for r in rows]
    assert [QuantScheme.from_dict(r.scheme) for r in run.results] == [r.scheme for r in rows]
    assert [r.label for r in run.results] == ["fp16", "int8 g64", "int4 g64"]
    assert run.meta == meta()  # every recorded field comes back as written


def test_unsigned_64_bit_seeds_round_trip(db):
    for seed in (0, 7, (1 << 63) - 1, 1 << 63, (1 << 64) - 1):  # torch.initial_seed() is any uint64
        assert db.get(db.start_run(meta(seed=seed))).meta.seed == seed


def test_memory_plan_round_trip(db):
    plan = memory.plan("llama-3.1-8b", QuantScheme("int4", "group", 128), 8192,
                       hardware_ids=["h100-sxm-80gb", "rtx-4090"])
    run_id = db.start_run(meta("llama-3.1-8b", "memory"))
    db.add_result(run_id, plan)
    stored = db.get(run_id).results[0]
    assert stored.kind == "memory" and stored.label == "int4 g128"
    assert stored.record == jsonable(plan.to_record())
    assert [t["fits"] for t in stored.record["targets"]] == [t.fits for t in plan.targets]


def test_generic_results_round_trip_and_need_a_kind(db):
    run_id = db.start_run(meta(kind="sensitivity"))
    layer = {"layer": "model.layers.0.mlp.down_proj", "kld_mean": 0.02, "per_format": {"int4": 0.02}}
    bench = {"kind": "bench", "label": "prefill 512", "prefill_ms": 12.5, "tokens_per_s": [1.0, 2.0]}
    db.add_result(run_id, layer, kind="sensitivity")
    db.add_result(run_id, bench)
    with pytest.raises(QlabError, match="needs a kind"):
        db.add_result(run_id, {"value": 1})
    run = db.get(run_id)
    assert run.records("sensitivity") == [layer] and run.records("bench") == [bench]
    assert run.records(None) == [layer, bench]
    assert run.results[1].label == "prefill 512"


def _v1_database(path: Path) -> None:
    """The first schema, written by hand as an old qlab would have left it, with two runs."""
    conn = sqlite3.connect(path)
    conn.executescript(f"""
        CREATE TABLE runs (id TEXT PRIMARY KEY, created_at TEXT NOT NULL, model TEXT NOT NULL,
            model_sha256 TEXT, hardware TEXT, settings TEXT NOT NULL, environment TEXT NOT NULL,
            text_sha256 TEXT, tokens INTEGER, seed INTEGER);
        CREATE TABLE rows (id INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE, label TEXT NOT NULL, record TEXT NOT NULL);
        INSERT INTO runs VALUES ('aaaa00000001', '2025-01-01T10:00:00+00:00', 'minilm-l6', 'ff', 'this-machine',
            '{{"schemes": []}}', '{json.dumps(ENVIRONMENT)}', 'ee', 64, 0);
        INSERT INTO runs VALUES ('bbbb00000002', '2025-01-02T10:00:00+00:00', 'smollm2-135m', NULL, 'l4',
            '{{}}', '{{}}', NULL, 512, NULL);
        INSERT INTO rows (run_id, label, record) VALUES ('aaaa00000001', 'fp16', '{{"label": "fp16"}}');
        INSERT INTO rows (run_id, label, record) VALUES ('bbbb00000002', 'int8', '{{"label": "int8"}}');
        INSERT INTO rows (run_id, label, record) VALUES ('aaaa00000001', 'int4', '{{"label": "int4"}}');
        PRAGMA user_version = 1;
    """)
    conn.close()


def test_migration_from_version_1_keeps_every_run_and_row(tmp_path, monkeypatch):
    path = tmp_path / "old.sqlite"
    _v1_database(path)
    db = Store(path)
    before = path.read_bytes()
    assert db.schema_version() == 1 and store.SCHEMA_VERSION == 2
    # Reading an older file this process may write migrates it once, in place (not a copy per read).
    copies = []
    monkeypatch.setattr(database, "migrated_copy", lambda *args: copies.append(args) or pytest.fail("copied"))
    assert [(r["id"], r["kind"], r["status"], r["results"]) for r in db.list_runs()] == [
        ("bbbb00000002", "sweep", "finished", 1), ("aaaa00000001", "sweep", "finished", 2)]
    assert path.read_bytes() != before and db.schema_version() == 2
    migrated = path.read_bytes()
    old = db.get("aaaa")
    assert [(r.position, r.label, r.kind) for r in old.results] == [(0, "fp16", "sweep"), (1, "int4", "sweep")]
    assert old.meta.tokens == 64 and old.meta.environment == ENVIRONMENT
    assert path.read_bytes() == migrated and not copies  # later reads read the file as it now is
    db.add_result(old.id, {"label": "nf4"}, kind="sweep")  # new rows continue the order
    assert [r.position for r in db.get(old.id).results] == [0, 1, 2]
    with sqlite3.connect(path) as conn:
        with pytest.raises(sqlite3.IntegrityError):  # the migration added the (run, position) uniqueness
            conn.execute("INSERT INTO results (run_id, position, kind, label, record) "
                         "VALUES ('aaaa00000001', 0, 'sweep', 'x', '{}')")
    assert db.integrity_ok()


def test_a_fresh_database_runs_every_migration(db):
    assert db.list_runs() == [] and not db.path.exists()  # reading a missing database creates nothing
    db.finish_run(db.start_run(meta()))  # the first write creates it
    assert db.schema_version() == len(store.MIGRATIONS)
    with sqlite3.connect(db.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"runs", "results"} <= tables and "rows" not in tables


def test_unusable_databases_fail_in_one_line(tmp_path):
    newer = tmp_path / "newer.sqlite"
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(QlabError, match="newer qlab"):
        Store(newer).list_runs()
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(QlabError, match="not a usable qlab run database"):
        Store(garbage).list_runs()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(QlabError, match="cannot open"):
        Store(blocker / "runs.sqlite").list_runs()


def test_ids_resolve_by_unique_prefix(db):
    first = db.start_run(meta(), run_id="abcd1111aaaa")
    db.start_run(meta(), run_id="abcd2222bbbb")
    assert db.resolve_id("abcd1") == first
    with pytest.raises(QlabError, match="ambiguous"):
        db.resolve_id("abcd")
    with pytest.raises(QlabError, match="no run 'abc'"):
        db.resolve_id("abc")  # shorter than 4 characters is never a prefix
    with pytest.raises(QlabError, match="no run"):
        db.get("ffff")


def test_delete_removes_the_results_too(db):
    keep, drop = db.start_run(meta()), db.start_run(meta())
    for run_id in (keep, drop):
        db.add_result(run_id, row())
    assert db.delete([drop[:6]]) == 1
    assert [r["id"] for r in db.list_runs()] == [keep]
    with sqlite3.connect(db.path) as conn:
        assert conn.execute("SELECT COUNT(*) FROM results WHERE run_id = ?", (drop,)).fetchone()[0] == 0


def test_list_filters_by_model_and_kind(db):
    db.start_run(meta("minilm-l6"))
    db.start_run(meta("smollm2-135m"))
    db.start_run(meta("llama-3.1-8b", "memory"))
    assert {r["model"] for r in db.list_runs(model="smol")} == {"smollm2-135m"}
    assert [r["model"] for r in db.list_runs(kind="memory")] == ["llama-3.1-8b"]
    assert len(db.list_runs(limit=2)) == 2


def test_export_import_round_trip_is_idempotent_and_merges_a_longer_copy(tmp_path, db):
    run_id = db.start_run(meta())
    db.add_result(run_id, row("int8"))
    partial = db.export()  # as if the server's sweep were still running (or had been killed)
    db.add_result(run_id, row("int4"))
    db.finish_run(run_id)
    here = Store(tmp_path / "here.sqlite")
    assert here.import_payload(partial) == [run_id]
    assert here.get(run_id).status == "running" and len(here.get(run_id).results) == 1
    full = db.export()
    here.import_payload(full)
    here.import_payload(full)  # twice: nothing is duplicated
    assert here.get(run_id).to_dict() == db.get(run_id).to_dict()
    assert json.loads(json.dumps(full))["runs"][0]["results"][1]["label"] == "int4 g64"


def test_import_a_database_file_without_touching_it(tmp_path):
    old = tmp_path / "server.sqlite"
    _v1_database(old)
    before = hashlib.sha256(old.read_bytes()).hexdigest()
    here = Store(tmp_path / "here.sqlite")
    assert sorted(here.import_file(old)) == ["aaaa00000001", "bbbb00000002"]
    assert hashlib.sha256(old.read_bytes()).hexdigest() == before  # read from a copy, migrated there
    assert [r.label for r in here.get("aaaa00000001").results] == ["fp16", "int4"]


def test_importing_a_database_leaves_no_temporary_file(tmp_path, monkeypatch):
    """The snapshot of an imported database lives in memory: nothing is left in the temporary folder, after
    a good import or a failed one, and the snapshot cannot be written by mistake."""
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    server = Store(tmp_path / "server.sqlite")
    run_id = server.start_run(meta())
    server.add_result(run_id, row())  # left running: a WAL file beside it, as on a server mid-sweep
    old = tmp_path / "old.sqlite"
    _v1_database(old)
    broken = tmp_path / "broken.sqlite"
    broken.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4096)
    here = Store(tmp_path / "here.sqlite")
    assert here.import_file(server.path) == [run_id] and here.get(run_id).records() == server.get(run_id).records()
    assert sorted(here.import_file(old)) == ["aaaa00000001", "bbbb00000002"]
    with pytest.raises(QlabError, match="broken.sqlite"):
        here.import_file(broken)
    with store.read_database(old) as source, pytest.raises(QlabError, match="for reading only"):
        source.delete(["aaaa00000001"])
    assert list(scratch.iterdir()) == [] and Store(old).schema_version() == 1


def test_import_plain_sweep_json_and_bench_json(tmp_path, db):
    records = [row("fp16").to_record(), row("int4").to_record()]
    sweep_file = tmp_path / "out.json"
    sweep_file.write_text(json.dumps(records))
    [run_id] = db.import_file(sweep_file)
    assert db.import_file(sweep_file) == [run_id]  # content-addressed id: a second import is a no-op
    assert len(db.list_runs()) == 1
    run = db.get(run_id)
    assert run.model == "smollm2-135m" and run.records() == records and run.meta.tokens == 512
    assert [QuantScheme.from_dict(s) for s in run.schemes()] == [QuantScheme("fp16"),
                                                                  QuantScheme("int4", "group", 64)]
    bench = {"benchmark": "sweep", "model": "smollm2-135m", "sweep_s": 12.0, "rows": records}
    [bench_id] = db.import_payload(bench)
    assert db.get(bench_id).kind == "bench"
    assert db.get(bench_id).records("bench")[0]["sweep_s"] == 12.0 and db.get(bench_id).records() == records


@pytest.mark.parametrize("content", ["{not json", json.dumps({"some": "thing"}), json.dumps([1, 2])])
def test_importing_something_else_fails_in_one_line(tmp_path, db, content):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(QlabError):
        db.import_file(path)
    with pytest.raises(QlabError, match="does not exist"):
        db.import_file(tmp_path / "missing.json")


def test_recorder_statuses(db):
    with Recorder(db, meta()) as rec:
        rec.save(row())
    with pytest.raises(Cancelled), Recorder(db, meta()) as rec:
        rec.save(row())
        raise Cancelled("cancelled by the user")
    with pytest.raises(RuntimeError), Recorder(db, meta()):
        raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt), Recorder(db, meta()):
        raise KeyboardInterrupt
    statuses = {r["status"]: r for r in db.list_runs()}
    assert set(statuses) == {"finished", "cancelled", "failed", "stopped"}
    assert statuses["cancelled"]["results"] == 1
    assert db.get(statuses["failed"]["id"]).error == "RuntimeError: boom"


def test_store_rows_passes_rows_through_and_stops_cleanly(db):
    rows = [row("fp16"), row("int8"), row("int4")]
    consumer = store.store_rows(db, meta(), iter(rows))
    assert next(consumer) is rows[0]
    consumer.close()  # the caller stopped early: the run says so and keeps the finished row
    [summary] = db.list_runs()
    assert summary["status"] == "stopped" and summary["results"] == 1
    assert list(store.store_rows(db, meta(), iter(rows))) == rows


def test_lenient_recorder_keeps_working_when_the_database_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with Recorder(blocker / "runs.sqlite", meta(), strict=False) as rec:
        rec.save(row())
    assert rec.error.startswith("results are not being saved") and rec.saved == 0
    with pytest.raises(QlabError), Recorder(blocker / "runs.sqlite", meta()):
        pass


def test_a_running_run_whose_process_is_gone_shows_as_interrupted(db):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    pid = int(dead.stdout)
    import socket

    env = {**ENVIRONMENT, "host": socket.gethostname()}
    db.start_run(meta(environment={**env, "pid": pid}), run_id="dead00000000")
    db.start_run(meta(environment={**env, "pid": os.getpid()}), run_id="live00000000")
    db.start_run(meta(environment={**env, "pid": pid, "host": "another-host"}), run_id="away00000000")
    statuses = {r["id"]: r["status"] for r in db.list_runs()}
    assert statuses == {"dead00000000": "interrupted", "live00000000": "running", "away00000000": "running"}
    assert db.get("dead0").status == "interrupted"


def test_stored_schemes_match_model_weights_text_and_budget(db):
    base = meta()
    first = db.start_run(base)
    db.add_result(first, row("int4", 0.05))
    db.add_result(first, row("int8", 0.01))
    later = db.start_run(base)
    db.add_result(later, row("int4", 0.04))  # newer measurement of the same scheme wins
    db.start_run(meta(tokens=256))
    found = db.stored_schemes(base.model, base.model_sha256, base.text_sha256, base.tokens)
    assert {s.label: r["kld_mean"] for s, r in found.items()} == {"int4 g64": 0.04, "int8 g64": 0.01}
    assert db.stored_schemes(base.model, "00" * 32, base.text_sha256, base.tokens) == {}
    assert db.stored_schemes(base.model, base.model_sha256, base.text_sha256, 256) == {}


def test_latest_run_matches_kind_weights_settings_text_results_and_status(db):
    spec = {"unit": "block", "view": "forward", "schemes": [QuantScheme("int4", "group", 64).to_dict()]}
    older = db.start_run(meta(kind="sensitivity", settings={**spec, "eval_tokens": 128}))
    db.add_result(older, {"label": "q", "value": 1}, "sensitivity_linear")
    db.finish_run(older)
    newer = db.start_run(meta(kind="sensitivity", settings={**spec, "eval_tokens": 128}))
    db.add_result(newer, {"label": "q", "value": 2}, "sensitivity_linear")
    db.finish_run(newer, "stopped")
    db.start_run(meta(kind="sensitivity", settings=spec))  # newest of all, but it holds no result yet
    other = db.start_run(meta(kind="sensitivity", settings={**spec, "view": "reverse"}))
    db.add_result(other, {"label": "q", "value": 3}, "sensitivity_linear")

    def latest(**changes):
        found = db.latest_run(**({"kind": "sensitivity", "model": "minilm-l6", "model_sha": "ab" * 32,
                                  "settings": spec, "holding": "sensitivity_linear"} | changes))
        return found and found.id

    assert latest() == newer  # the newest with a result, whatever its other settings (eval_tokens) say
    assert latest(statuses=["finished"]) == older
    assert latest(settings={**spec, "view": "reverse"}) == other
    # Settings compare as stored (a tuple of schemes is the stored list), text, budget and weights must match.
    assert latest(settings={**spec, "schemes": tuple(spec["schemes"])}) == newer
    assert latest(text_sha256="cd" * 32, tokens=128, hardware="h100-sxm-80gb") == newer
    assert latest(tokens=256) is None and latest(text_sha256="ef" * 32) is None
    assert latest(model_sha="00" * 32) is None and latest(kind="recommend") is None
    assert latest(settings={**spec, "unit": "linear"}) is None
    assert db.get(latest(holding=None)).records(None) == []  # without ``holding``, the empty newest run
    assert db.latest_run("sensitivity", "minilm-l6", "ab" * 32, spec, holding="sensitivity_linear").records(
        "sensitivity_linear") == [{"label": "q", "value": 2}]


def test_model_sha256_hashes_weight_files_and_trusts_hub_blob_names(tmp_path):
    from qlab.models.loading import ModelSource

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights v1")
    source = ModelSource("m", "embedding", str(folder))
    expected = hashlib.sha256(f"model.safetensors:{hashlib.sha256(b'weights v1').hexdigest()}\n".encode())
    assert model_sha256(source) == expected.hexdigest()
    time.sleep(0.01)
    (folder / "model.safetensors").write_bytes(b"weights v2")  # edited: hashed again, not served from cache
    assert model_sha256(source) != expected.hexdigest()
    assert model_sha256(ModelSource("e", "embedding", str(tmp_path / "empty"))) is None
    blob_hash = "0123456789abcdef" * 4
    (tmp_path / "hub" / "blobs").mkdir(parents=True)
    (tmp_path / "hub" / "snapshot").mkdir()
    (tmp_path / "hub" / "blobs" / blob_hash).write_bytes(b"not what the name says")
    (tmp_path / "hub" / "snapshot" / "model.safetensors").symlink_to(tmp_path / "hub" / "blobs" / blob_hash)
    hub = ModelSource("org/m", "embedding", str(tmp_path / "hub" / "snapshot"))
    assert model_sha256(hub) == hashlib.sha256(f"model.safetensors:{blob_hash}\n".encode()).hexdigest()


def test_layer_scheme_map_is_the_exact_recipe():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 64))
    plan = {"0": QuantScheme("int4", "group", 32), "2": QuantScheme("nf4", "group", 32)}
    exported = json.loads(json.dumps(layer_scheme_map(model, plan)))
    assert exported == {name: scheme.to_dict() for name, scheme in plan.items()}
    rebuilt = {name: QuantScheme.from_dict(s) for name, s in exported.items()}
    assert layer_schemes(model, rebuilt) == plan
    x = torch.randn(3, 64)
    assert torch.equal(quantized_copy(model, rebuilt)(x), quantized_copy(model, plan)(x))
    assert set(layer_scheme_map(model, QuantScheme("int8"))) == {"0", "2"}


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from qlab.store import RunMeta, Store
    db, shared, name, count, go = Store(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), Path(sys.argv[5])
    own = db.start_run(RunMeta("bench", name, {}, environment={}))
    Path(go.with_name(name + ".ready")).touch()
    while not go.exists():
        time.sleep(0.005)
    for i in range(count):
        db.add_result(shared, {"writer": name, "i": i}, kind="bench")
        db.add_result(own, {"writer": name, "i": i}, kind="bench")
""")


def test_two_processes_writing_at_once_lose_nothing(tmp_path, db):
    shared = db.start_run(meta(kind="bench"))
    go = tmp_path / "go"
    count = 150
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(db.path), shared, name, str(count), str(go)],
                                cwd=REPO, stderr=subprocess.PIPE, text=True) for name in ("one", "two")]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"{n}.ready").exists() for n in ("one", "two")):
        assert time.monotonic() < deadline and all(w.poll() is None for w in writers), \
            [w.stderr.read() for w in writers if w.poll() is not None]
        time.sleep(0.01)
    go.touch()  # both start writing at the same moment
    for writer in writers:
        assert writer.wait(timeout=120) == 0, writer.stderr.read()
    results = db.get(shared).results
    assert [r.position for r in results] == list(range(2 * count))
    for name in ("one", "two"):
        mine = [r.record["i"] for r in results if r.record["writer"] == name]
        assert mine == list(range(count))  # every write arrived, in each writer's order
    writes = {r["model"]: r["results"] for r in db.list_runs(kind="bench") if r["id"] != shared}
    assert writes == {"one": count, "two": count}
    timeline = [r.record["writer"] for r in results]
    assert sum(a != b for a, b in zip(timeline, timeline[1:])) > 1, "the writers did not overlap"
    assert db.integrity_ok()


SWEEP = textwrap.dedent("""
    import sys, time
    from qlab import store
    from qlab.models.evaluate import EvalSpec
    from qlab.models.loading import load
    from qlab.core.quant import QuantScheme
    from qlab.analyses.sweep import run_sweep
    loaded = load("minilm-l6")
    schemes = [QuantScheme(f, "group", 64) for f in ("fp16", "int8", "int4", "nf4")]
    spec = EvalSpec(tokens=16)
    rows = store.store_rows(sys.argv[1], store.sweep_meta(loaded, schemes, spec), run_sweep(loaded, schemes, spec))
    for number, row in enumerate(rows, 1):
        print(number, row.scheme.label, flush=True)
        if number == 2:
            time.sleep(600)  # a slow third scheme: the test kills us here
""")


@pytest.mark.slow
def test_a_sweep_killed_after_two_schemes_keeps_exactly_those(tmp_path):
    path = tmp_path / "runs.sqlite"
    sweep = subprocess.Popen([sys.executable, "-c", SWEEP, str(path)], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = [sweep.stdout.readline() for _ in range(2)]
    sweep.send_signal(signal.SIGKILL)
    sweep.wait(timeout=30)
    assert lines[1].startswith("2 "), (lines, sweep.stderr.read()[-3000:])
    assert sweep.returncode == -signal.SIGKILL
    db = Store(path)
    assert db.integrity_ok()
    [summary] = db.list_runs()
    assert summary["status"] == "interrupted"
    run = db.get(summary["id"])
    assert [r.label for r in run.results] == ["fp16", "int8 g64"]
    assert all(0.9 < r.record["cosine_mean"] <= 1.0 + 1e-6 for r in run.results)
    assert len(run.schemes()) == 4 and run.meta.model_sha256 and run.meta.tokens == 16
    db.add_result(run.id, {"label": "after"}, kind="note")  # still writable


def _sweep_cli_stores() -> bool:
    from qlab.cli import build_parser

    return hasattr(build_parser().parse_args(["sweep"]), "db")


@pytest.mark.slow
@pytest.mark.skipif(not _sweep_cli_stores(), reason="`python -m qlab sweep` has no --db yet (the lead wires it)")
def test_the_sweep_cli_killed_mid_run_keeps_its_finished_schemes(tmp_path):
    path = tmp_path / "runs.sqlite"
    formats = ["fp16", "int8", "int4", "nf4", "int3", "int2", "fp4_e2m1", "fp8_e4m3"]
    sweep = subprocess.Popen([sys.executable, "-m", "qlab", "sweep", "--model", "minilm-l6", "--formats",
                              ",".join(formats), "--granularity", "group", "--group-size", "64", "--tokens", "16",
                              "--quiet", "--db", str(path)], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    try:
        while True:  # poll the database itself, as another process would, until two schemes are in
            assert sweep.poll() is None and time.monotonic() < deadline, sweep.stderr.read()[-2000:]
            if path.exists() and Store(path).list_runs() and Store(path).list_runs()[0]["results"] >= 2:
                break
            time.sleep(0.02)
    finally:
        sweep.send_signal(signal.SIGKILL)
        sweep.wait(timeout=30)
    db = Store(path)
    assert db.integrity_ok()
    run = db.get(db.list_runs()[0]["id"])
    labels = [r.label for r in run.results]
    expected = [QuantScheme(f, "group", 64).label for f in formats]
    assert 2 <= len(labels) < len(expected) and labels == expected[:len(labels)]  # finished ones, in order
    assert all("cosine_mean" in r.record and "size_bytes" in r.record for r in run.results)
    assert run.status == "interrupted" and run.meta.model_sha256


# --- every result type: sensitivity, recommendation, bench (sweep and memory above) ----------------------------

@pytest.fixture(scope="module")
def tiny_analysis():
    """A tiny Llama, its baseline on a short text, and the schemes analysed (real code paths, milliseconds)."""
    from qlab.models.evaluate import EvalSpec, compute_baseline, default_text
    from tests.tiny_models import tiny_llama

    loaded = tiny_llama(seed=5)
    spec = EvalSpec(tokens=128, text=default_text()[:20_000], text_name="pydoc excerpt")
    schemes = [QuantScheme("int8", "group", 32), QuantScheme("int4", "group", 32)]
    return loaded, spec, compute_baseline(loaded, spec), schemes


def _stored_report(db, tiny_analysis, kind="sensitivity", cancel=None):
    from qlab.analyses.sensitivity import analyze

    loaded, spec, baseline, schemes = tiny_analysis
    meta_ = store.sensitivity_meta(kind, loaded, schemes, spec, baseline, unit="block")
    with Recorder(db, meta_) as recorder:
        report = analyze(loaded, schemes, baseline, on_records=store.sensitivity_saver(recorder), cancel=cancel)
        store.save_summary(recorder, seconds=report.seconds)
    return report, recorder.run_id


def test_sensitivity_round_trip_rebuilds_the_report(db, tiny_analysis):
    report, run_id = _stored_report(db, tiny_analysis)
    run = db.get(run_id)
    rebuilt = store.stored_sensitivity(run)
    assert rebuilt.rows() == jsonable_rows(report.rows())
    assert rebuilt.blocks == jsonable_rows(report.blocks) and len(rebuilt.blocks) == 2 * 3  # 3 blocks x 2 schemes
    assert (rebuilt.metric, rebuilt.kind, rebuilt.view, rebuilt.unit, rebuilt.tokens) == \
        (report.metric, report.kind, report.view, report.unit, report.tokens)
    assert rebuilt.schemes == report.schemes and rebuilt.seconds == pytest.approx(report.seconds)
    assert run.meta.text_name == "pydoc excerpt" and run.meta.tokens == 128
    # The listing names each scheme once, not once per linear, and leaves the summary out.
    [summary] = db.list_runs()
    assert summary["labels"] == "int8 g32, int4 g32" and summary["kind"] == "sensitivity"


def jsonable_rows(rows: list[dict]) -> list[dict]:
    return [jsonable(r) for r in rows]


def test_a_cancelled_sensitivity_run_keeps_the_units_it_finished(db, tiny_analysis):
    from qlab.analyses.sensitivity import analyze

    loaded, spec, baseline, schemes = tiny_analysis
    finished_blocks = []
    meta_ = store.sensitivity_meta("sensitivity", loaded, schemes, spec, baseline, unit="block")
    with pytest.raises(Cancelled), Recorder(db, meta_) as recorder:
        saver = store.sensitivity_saver(recorder)

        def on_records(part, records):
            saver(part, records)
            finished_blocks.extend(records if part == "block" else [])

        analyze(loaded, schemes, baseline, on_records=on_records, cancel=lambda: len(finished_blocks) >= 2)
    run = db.get(recorder.run_id)
    assert run.status == "cancelled"
    rebuilt = store.stored_sensitivity(run)
    assert rebuilt.blocks == jsonable_rows(finished_blocks) and len(rebuilt.blocks) == 2
    rows = rebuilt.rows()  # the unmeasured units' linears are there, without a measured delta
    assert len(rows) == 2 * 21 and sum(r["block_delta"] is not None for r in rows) == 2 * 7


def test_recommendation_round_trip(db, tiny_analysis):
    from qlab.analyses.mixed import Budget, choices_from, compare, recommendation_record
    from qlab.analyses.sensitivity import analyze

    loaded, spec, baseline, schemes = tiny_analysis
    meta_ = store.sensitivity_meta("recommend", loaded, schemes, spec, baseline, unit="block", budget_bits=6.0)
    with Recorder(db, meta_) as recorder:
        report = analyze(loaded, schemes, baseline, on_records=store.sensitivity_saver(recorder))
        choices = choices_from(loaded, report)
        mixes, rows = compare(loaded, choices, [Budget(6.0)], baseline, on_row=lambda r: recorder.save(r, "mix"))
        record = recommendation_record(loaded, report, choices, mixes[0], rows)
        recorder.save({**record, "label": mixes[0].label}, "recommendation")
    run = db.get(recorder.run_id)
    assert run.kind == "recommend" and run.meta.settings["budget_bits"] == 6.0
    assert run.records("mix") == jsonable_rows(rows) and {r["label"] for r in rows} == \
        {"int8 g32", "int4 g32", "mix @ 6 bits/weight"}
    assert all(r["predicted_error"] is not None for r in run.records("mix") if r["kind"] == "mix")
    [stored] = run.records("recommendation")
    assert stored["assignment"] == record["assignment"] and stored["plan"] == jsonable(record["plan"])
    assert store.stored_sensitivity(run).rows() == jsonable_rows(report.rows())


def test_bench_rows_round_trip(db, tiny_analysis):
    from qlab.backends.speed import SpeedSpec

    loaded = tiny_analysis[0]
    spec = SpeedSpec(prompt_tokens=16, new_tokens=4, repetitions=2)
    rows = [{"model": "tiny-llama", "kind": "causal-lm", "backend": "fp32", "library": "torch", "available": True,
             "error": None, "decode_tokens_per_s": 50.0, "kld_mean": 0.0, "size_bytes": 1000},
            {"model": "tiny-llama", "kind": "causal-lm", "backend": "bnb-nf4", "library": "bitsandbytes",
             "available": False, "reason": "needs CUDA", "error": None}]
    with Recorder(db, store.bench_meta(loaded, spec, ["fp32", "bnb-nf4"], 64, threads=2)) as recorder:
        for bench_row in rows:
            recorder.save(bench_row, "bench")
    run = db.get(recorder.run_id)
    assert run.kind == "bench" and run.records("bench") == rows  # the row's own "kind" field is kept as is
    assert [r.label for r in run.results] == ["fp32", "bnb-nf4"]
    settings = run.meta.settings
    assert (settings["prompt_tokens"], settings["new_tokens"], settings["repetitions"], settings["backends"],
            settings["threads"]) == (16, 4, 2, ["fp32", "bnb-nf4"], 2)
    assert run.meta.tokens == 64


# --- read-only databases -------------------------------------------------------------------------------------


def read_only(monkeypatch, *paths: Path) -> None:
    """Make ``paths`` (and what is beside them) look unwritable: tests run as root, for whom chmod changes nothing."""
    real = os.access
    names = [str(p) for p in paths]

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and any(str(path).startswith(n) or n.startswith(str(path)) for n in names):
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def fingerprint(path: Path) -> tuple:
    folder = sorted(p.name for p in path.parent.iterdir())
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns, folder


def every_read(db: Store, run_id: str) -> None:
    from qlab.cli.runs import export_csv
    from qlab.store.report import render_html

    assert [r["id"] for r in db.list_runs()] == [run_id]
    assert db.get(run_id[:6]).records()[0]["label"] == "int4 g64"
    assert db.export()["runs"][0]["id"] == run_id
    assert run_id in export_csv(db)
    assert "int4 g64" in render_html(db.runs())
    assert db.stored_schemes("minilm-l6", "ab" * 32, "cd" * 32, 128)
    assert db.integrity_ok() and db.schema_version() == store.SCHEMA_VERSION


@pytest.mark.parametrize("locked", [False, True], ids=["writable", "read-only"])
def test_reading_leaves_the_file_untouched_and_creates_no_wal(tmp_path, monkeypatch, locked):
    db = Store(tmp_path / "runs.sqlite")
    run_id = db.start_run(meta())
    db.add_result(run_id, row())
    db.finish_run(run_id)
    assert database.is_wal(db.path) and sorted(p.name for p in tmp_path.iterdir()) == ["runs.sqlite"]
    time.sleep(0.02)  # an mtime written by a read would differ from the one taken now
    before = fingerprint(db.path)
    opened = []
    real_connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda target, *a, **k: opened.append(str(target))
                        or real_connect(target, *a, **k))
    if locked:
        read_only(monkeypatch, tmp_path)
        assert not db.writable()
    every_read(db, run_id)
    assert fingerprint(db.path) == before
    to_the_file = [uri for uri in opened if "runs.sqlite" in uri]
    assert to_the_file and all(uri.startswith("file:") for uri in to_the_file)
    # Read-only: SQLite itself refuses writes, and a WAL file at rest is read without a -shm file.
    assert all(uri.endswith("?mode=ro&immutable=1" if locked else "?mode=rw") for uri in to_the_file), to_the_file


def test_a_read_only_database_refuses_writes_in_one_line(tmp_path, monkeypatch):
    db = Store(tmp_path / "runs.sqlite")
    run_id = db.start_run(meta())
    db.finish_run(run_id)
    before = fingerprint(db.path)
    read_only(monkeypatch, db.path)
    for write in (lambda: db.start_run(meta()), lambda: db.delete([run_id]), lambda: db.import_payload(db.export())):
        with pytest.raises(QlabError, match=r"runs.sqlite is read-only; pass --db") as caught:
            write()
        assert "\n" not in str(caught.value)
    with Recorder(db, meta(), strict=False) as rec:  # the dashboard keeps working and says why nothing is saved
        rec.save(row())
    assert "is read-only" in rec.error and rec.saved == 0
    assert fingerprint(db.path) == before


def test_sqlite_refusing_a_write_reads_as_read_only(tmp_path, monkeypatch):
    """Where os.access says yes but SQLite cannot write (a read-only handle, a mount that lies)."""
    db = Store(tmp_path / "runs.sqlite")
    db.finish_run(db.start_run(meta()))
    real_connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda path, *a, **k: real_connect(
        f"file:{path}?mode=ro", *a, **{**k, "uri": True}) if str(path) == str(db.path) else real_connect(path, *a, **k))
    with pytest.raises(QlabError, match="is read-only; pass --db"):
        db.start_run(meta())


def test_an_older_read_only_database_is_read_through_a_copy(tmp_path, monkeypatch):
    path = tmp_path / "old.sqlite"
    _v1_database(path)
    read_only(monkeypatch, tmp_path)
    before = fingerprint(path)
    db = Store(path)
    assert [r["id"] for r in db.list_runs()] == ["bbbb00000002", "aaaa00000001"]
    assert [r.label for r in db.get("aaaa").results] == ["fp16", "int4"]
    assert fingerprint(path) == before and db.schema_version() == 1
    with pytest.raises(QlabError, match="is read-only"):
        db.add_result("aaaa00000001", {"label": "nf4"}, kind="sweep")


@pytest.mark.parametrize("locked", [True, False], ids=["read-only", "writable"])
def test_an_older_schema_that_cannot_be_migrated_is_one_clear_error(tmp_path, monkeypatch, locked):
    path = tmp_path / "odd.sqlite"
    with sqlite3.connect(path) as conn:  # version 1 by its number, but not the layout version 1 had
        conn.executescript("CREATE TABLE runs (id TEXT); PRAGMA user_version = 1;")
    if locked:
        read_only(monkeypatch, tmp_path)
    # Not qlab's layout at any version: another application's file (issue 17), never migrated or written.
    with pytest.raises(QlabError, match=r"not a qlab run database but another application's SQLite file \(tables "
                                        r"runs; user_version 1\)"):
        Store(path).list_runs()


def test_a_recommendation_names_its_analysis_run_and_reads_it_back(tmp_path, db):
    """A dashboard recommendation stores `analysis_run` instead of a copy: reading follows it, an export
    brings the analysis along, and a recommendation whose analysis was deleted still opens (without it)."""
    analysis = db.start_run(RunMeta("sensitivity", "m", {"schemes": [], "metric": "kld_mean", "eval_tokens": 64},
                                    environment={}))
    linears = [{"layer": f"l{i}", "label": "int4 g64", "relative_mse": 0.1 * i} for i in range(3)]
    db.add_results(analysis, linears, "sensitivity_linear")
    db.finish_run(analysis)
    recommend = db.start_run(RunMeta("recommend", "m", {"schemes": [], store.ANALYSIS_RUN: analysis},
                                     environment={}))
    db.add_result(recommend, {"label": "mix @ 4.5 bits/weight", "assignment": {}}, "recommendation")
    db.finish_run(recommend)
    run = db.get(recommend[:6])
    assert run.analysis.id == analysis and not run.records("sensitivity_linear")
    assert store.stored_sensitivity(run).linears == linears
    payload = db.export([recommend])
    assert [r["id"] for r in payload["runs"]] == [analysis, recommend]  # the analysis first, once
    assert [r["id"] for r in db.export([analysis, recommend])["runs"]] == [analysis, recommend]
    elsewhere = Store(tmp_path / "elsewhere.sqlite")
    elsewhere.import_payload(json.loads(json.dumps(payload)))
    assert store.stored_sensitivity(elsewhere.get(recommend)).linears == linears
    db.delete([analysis])
    orphan = db.get(recommend)
    assert orphan.analysis is None and store.stored_sensitivity(orphan) is None
    assert orphan.records("recommendation")[0]["label"] == "mix @ 4.5 bits/weight"
