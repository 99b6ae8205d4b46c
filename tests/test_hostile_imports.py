"""Malformed run imports (issue 17, family 6, the import half): every field of an imported run is checked
against a schema (``qlab.store.run_schema``) before anything is written. Each case: exit status 2 with one line
naming the run and the field, no traceback, and the database the user had is unchanged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from qlab.cli import main
from qlab.store import RunMeta, Store

SCHEME = {"format": "int8", "granularity": "channel", "group_size": 128, "symmetric": True,
          "calibration": "minmax", "percentile": 99.9, "scale_dtype": "fp32", "algorithm": "rtn"}


GOOD = {"id": "abcdef123456", "kind": "sweep", "status": "finished", "created_at": "2025-01-01T00:00:00+00:00",
        "finished_at": "2025-01-01T00:00:05+00:00", "seconds": 5.0, "error": None, "model": "minilm-l6",
        "model_sha256": "0" * 64, "hardware": "this-machine", "text_sha256": "1" * 64, "text_name": "pydoc",
        "tokens": 64, "seed": 42, "settings": {"schemes": [SCHEME]}, "environment": {"qlab": "0.1.0"},
        "results": [{"position": 0, "kind": "sweep", "label": "int8", "record": {"label": "int8", "kld_mean": 0.01},
                     "scheme": SCHEME, "created_at": "2025-01-01T00:00:04+00:00"}]}


def good_run() -> dict:
    return json.loads(json.dumps(GOOD))  # a deep copy: cases change nested fields


def change(path: str, value) -> dict:
    """``good_run`` with the field at ``path`` (dots; ``results.0.label``) set to ``value`` (``...`` removes it)."""
    run = good_run()
    *parents, last = path.split(".")
    target = run
    for part in parents:
        target = target[int(part)] if part.isdigit() else target[part]
    if value is ...:
        del target[int(last) if last.isdigit() else last]
    else:
        target[int(last) if last.isdigit() else last] = value
    return run


IMPORT_CASES = [
    # the examples
    ("a run without results", change("results", ...), "has no 'results'"),
    ("a result without a label", change("results.0.label", ...), "has no 'results[0].label'"),
    ("an id that is an object", change("id", {"$ne": None}), "'s id is {"),
    ("seed 10**30", change("seed", 10**30), "seed"),
    ("created_at null", change("created_at", None), "created_at"),
    ("an unknown status", change("status", "pwned"), "not a run status"),
    # more of the same family
    ("results null", change("results", None), "results"),
    ("results an object", change("results", {"0": {}}), "results"),
    ("a result that is a string", change("results", ["int8"]), "results[0]"),
    ("a result without a kind", change("results.0.kind", ...), "results[0].kind"),
    ("a result without a record", change("results.0.record", ...), "results[0].record"),
    ("a record that is a list", change("results.0.record", [1, 2]), "results[0].record"),
    ("a label that is a number", change("results.0.label", 8), "results[0].label"),
    ("a label of a megabyte", change("results.0.label", "x" * 2**20), "results[0].label"),
    ("a negative position", change("results.0.position", -1), "results[0].position"),
    ("a scheme that is no scheme", change("results.0.scheme", {"format": "int99"}), "not a quantization scheme"),
    ("a scheme with an object group size", change("results.0.scheme.group_size", {"a": 1}), "results[0].scheme"),
    ("settings listing a bad scheme", change("settings.schemes", [{"format": 5}]), "settings.schemes[0]"),
    ("settings that are a list", change("settings", [1]), "settings"),
    ("an id with a path in it", change("id", "../../etc/passwd"), "id"),
    ("an id too short", change("id", "ab"), "id"),
    ("an empty id", change("id", ""), "id"),
    ("a model that is null", change("model", None), "model"),
    ("an empty model", change("model", ""), "model"),
    ("a model that is a list", change("model", ["llama"]), "model"),
    ("created_at not a time", change("created_at", "yesterday"), "created_at"),
    ("created_at a number", change("created_at", 1700000000), "created_at"),
    ("finished_at not a time", change("finished_at", "later"), "finished_at"),
    ("tokens as a string", change("tokens", "64"), "tokens"),
    ("tokens negative", change("tokens", -64), "tokens"),
    ("tokens 10**30", change("tokens", 10**30), "tokens"),
    ("tokens true", change("tokens", True), "tokens"),
    ("a negative seed", change("seed", -1), "seed"),
    ("seed 2**64", change("seed", 2**64), "seed"),
    ("seed a float", change("seed", 1.5), "seed"),
    ("seconds negative", change("seconds", -5), "seconds"),
    ("seconds a string", change("seconds", "5"), "seconds"),
    ("status null", change("status", None), "status"),
    ("status 'interrupted ' with a space", change("status", "interrupted "), "status"),
    ("environment a string", change("environment", "python 3.11"), "environment"),
    ("kind empty", change("kind", ""), "kind"),
    ("hardware an object", change("hardware", {"gpu": "h100"}), "hardware"),
]


def write_payload(folder: Path, runs) -> Path:
    path = folder / "import.json"
    path.write_text(json.dumps({"format": "qlab-runs", "schema_version": 2, "runs": runs}))
    return path


@pytest.fixture
def existing(tmp_path, monkeypatch):
    """The user's database, holding one run already, and its fingerprint."""
    path = tmp_path / "runs.sqlite"
    monkeypatch.setenv("QLAB_DB", str(path))
    store = Store(path)
    store.finish_run(store.start_run(RunMeta("sweep", "m", {"schemes": []}, environment={}), run_id="0123456789ab"))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(json.dumps(Store(path).export()["runs"], sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("case, run, needle", IMPORT_CASES, ids=[c[0] for c in IMPORT_CASES])
def test_a_malformed_run_is_refused_naming_the_field(case, run, needle, existing, tmp_path, capsys):
    before = digest(existing)
    # the bad run second: the good first one must not be stored either (all or nothing)
    good = {**good_run(), "id": "fedcba654321"}
    assert main(["runs", "import", str(write_payload(tmp_path, [good, run]))]) == 2, case
    err = capsys.readouterr().err
    assert err.startswith("qlab: error: import.json: ") and err.count("\n") == 1, err
    assert needle.lower() in err.lower() and "Traceback" not in err, err
    assert len(err) < 600, err  # a megabyte label is not echoed back
    assert digest(existing) == before


def test_the_well_formed_run_imports_and_round_trips(existing, tmp_path, capsys):
    assert main(["runs", "import", str(write_payload(tmp_path, [good_run()]))]) == 0
    stored = Store(existing).get("abcdef123456").to_dict()
    assert {k: stored[k] for k in ("status", "seed", "tokens", "model")} == \
        {"status": "finished", "seed": 42, "tokens": 64, "model": "minilm-l6"}
    assert main(["runs", "import", str(write_payload(tmp_path, [stored]))]) == 0  # its own export, again


def test_an_export_of_every_status_and_an_empty_run_imports(existing, tmp_path):
    from qlab.store import STATUSES

    runs = [{**good_run(), "id": f"{i:012x}", "status": status} for i, status in enumerate(STATUSES, start=1)]
    runs.append({**good_run(), "id": "eeeeeeeeeeee", "results": [], "seed": None, "finished_at": None})
    assert main(["runs", "import", str(write_payload(tmp_path, runs))]) == 0
    assert Store(existing).get("eeeeeeeeeeee").results == ()


BARE_CASES = [
    ("sweep rows whose label is an object", [{"label": {"a": 1}, "format": "int8"}], "label"),
    ("sweep rows with a format that is a number", [{"label": "x", "format": 5}], "format"),
    ("sweep rows with a model that is a list", [{"label": "x", "model": ["m"]}], "model"),
    ("a bench sweep whose rows hold a seed of 10**30", {"benchmark": "sweep", "seed": 10**30, "rows": []}, "seed"),
]


@pytest.mark.parametrize("case, payload, needle", BARE_CASES, ids=[c[0] for c in BARE_CASES])
def test_json_written_without_a_store_is_checked_too(case, payload, needle, existing, tmp_path, capsys):
    before = digest(existing)
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(payload))
    assert main(["runs", "import", str(path)]) == 2, case
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err
    assert digest(existing) == before


def test_a_malformed_run_inside_a_sqlite_file_is_refused(existing, tmp_path, capsys):
    """The same check for a copied database: a run written there by hand with an unknown status."""
    import sqlite3

    other = tmp_path / "copied.sqlite"
    Store(other).finish_run(Store(other).start_run(RunMeta("sweep", "m", {"schemes": []}, environment={}),
                                                   run_id="aaaaaaaaaaaa"))
    with sqlite3.connect(other) as conn:
        conn.execute("UPDATE runs SET status = 'pwned'")
    before = digest(existing)
    assert main(["runs", "import", str(other)]) == 2
    err = capsys.readouterr().err
    assert "run aaaaaaaaaaaa's status is 'pwned'" in err and err.count("\n") == 1
    assert digest(existing) == before


@pytest.mark.slow
@pytest.mark.parametrize("case, run, needle", [IMPORT_CASES[i] for i in (0, 1, 2, 3, 4, 5, 15)],
                         ids=[IMPORT_CASES[i][0] for i in (0, 1, 2, 3, 4, 5, 15)])
def test_history_upload_of_a_malformed_run_is_one_line(case, run, needle, existing, tmp_path):
    before = digest(existing)
    at = AppTest.from_file("../pages/history.py", default_timeout=120).run()
    data = json.dumps({"format": "qlab-runs", "schema_version": 2, "runs": [run]}).encode()
    at.file_uploader(key="history_upload").set_value(("colleague.json", data, "application/json")).run()
    at.button(key="history_import").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.error) == 1, [e.value for e in at.error]
    message = at.error[0].value
    assert message.startswith("colleague.json: ") and needle.lower() in message.lower() and "/tmp" not in message
    assert digest(existing) == before


@pytest.mark.parametrize("text", ["[" * 200_000 + "]" * 200_000, '{"a":' * 100_000 + "1" + "}" * 100_000],
                         ids=["arrays nested 200k deep", "objects nested 100k deep"])
def test_json_nested_too_deeply_is_one_line(text, existing, tmp_path, capsys):
    before = digest(existing)
    path = tmp_path / "deep.json"
    path.write_text(text)
    assert main(["runs", "import", str(path)]) == 2
    err = capsys.readouterr().err
    assert "nests its JSON too deeply" in err and err.count("\n") == 1 and "Traceback" not in err
    assert digest(existing) == before


RECORD_CASES = [
    ("a sweep metric that is text", "sweep", {"label": "x", "kld_mean": "low"}, "record's kld_mean is 'low', not a number"),
    ("a size that is an object", "sweep", {"label": "x", "size_bytes": {"a": 1}}, "record's size_bytes"),
    ("memory targets that are text", "memory", {"scheme": "x", "targets": "gpu"}, "targets is 'gpu'"),
    ("a memory target's bytes as text", "memory", {"scheme": "x", "targets": [{"total_bytes": "many"}]},
     "target's total_bytes"),
    ("a bench backend that is a number", "bench", {"backend": 5}, "backend is 5, not text"),
    ("a recommendation's assignment as a list", "recommendation", {"label": "x", "assignment": [1, 2]},
     "assignment"),
    ("a sensitivity layer that is a number", "sensitivity_linear", {"layer": 1, "label": "x"}, "layer is 1"),
    ("a mix's error as text", "mix", {"label": "x", "error": "big"}, "record's error is 'big'"),
    ("a speed of true", "bench", {"backend": "fp32", "decode_tokens_per_s": True}, "decode_tokens_per_s is True"),
]


@pytest.mark.parametrize("case, kind, record, needle", RECORD_CASES, ids=[c[0] for c in RECORD_CASES])
def test_a_record_field_of_the_wrong_type_for_its_reader_is_refused(case, kind, record, needle, existing, tmp_path,
                                                                    capsys):
    """Fields the History page, the report and the charts compute with (they crashed on these before)."""
    before = digest(existing)
    run = change("results.0", {"kind": kind, "label": "x", "record": record})
    assert main(["runs", "import", str(write_payload(tmp_path, [run]))]) == 2, case
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert digest(existing) == before


def test_every_kind_qlab_stores_round_trips_through_the_schema(tmp_path, monkeypatch, capsys):
    """Runs written by qlab's own code paths (sweep, sensitivity, recommendation, speed, memory) import again."""
    from tests.test_history_page import recommend_run, stored_bench_run, stored_sensitivity_run, sweep

    source = Store(tmp_path / "source.sqlite")
    monkeypatch.setenv("QLAB_DB", str(source.path))
    sweep(source, "smollm2-135m", {"int8": 1e-3, "int4": 0.05})
    stored_bench_run(source)
    recommend_run(source)
    stored_sensitivity_run(source, monkeypatch, tmp_path)
    assert main(["memory", "--model", "llama-3.1-8b", "--json", str(tmp_path / "plan.json"), "--db",
                 str(source.path)]) == 0
    kinds = {run["kind"] for run in source.list_runs()}
    assert {"sweep", "bench", "recommend", "sensitivity", "memory"} <= kinds
    target = tmp_path / "target.sqlite"
    assert main(["runs", "import", str(source.path), str(tmp_path / "plan.json"), "--db", str(target)]) == 0
    assert len(Store(target).list_runs()) == len(source.list_runs()) + 1
