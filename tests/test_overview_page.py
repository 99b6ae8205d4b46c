"""The Overview page under Streamlit's AppTest: nothing stored, partly stored, all stored, a format that does
not fit, a cancelled piece, a model change while a piece runs, and a mistyped local path. MiniLM with a small
token budget; each test uses its own token count, so the page's shared registry gives every test a fresh
answer."""

import dataclasses
import threading
import time

import pytest
from streamlit.testing.v1 import AppTest

from qlab.analyses import overview, verdict
from qlab.core.errors import Cancelled
from qlab.core.quant import QuantScheme
from qlab.models import hardware
from qlab.models.evaluate import EvalSpec
from qlab.store import Store
from qlab.store import overview as recorded

pytestmark = pytest.mark.slow

FORMATS = ["fp16", "int8", "int4"]
COMPUTING = "Computing what is not stored yet"


@pytest.fixture
def db(tmp_path, monkeypatch):
    monkeypatch.setenv("QLAB_DB", str(tmp_path / "runs.sqlite"))
    yield Store(tmp_path / "runs.sqlite")
    # The page's jobs run on their own threads: let each finish before its database goes away.
    for thread in threading.enumerate():
        if thread.name.startswith("overview "):
            thread.join(300)


def page(tokens: int, formats=FORMATS, hardware_id: str = "h100-sxm-80gb", bound: float | None = None) -> AppTest:
    at = AppTest.from_file("../app.py", default_timeout=300)
    state = at.session_state
    state["model_choice"], state["formats"], state["tokens"] = "minilm-l6", list(formats), tokens
    state["hardware"], state["overview_measure"] = hardware_id, False
    if bound is not None:
        state["overview_bound_embedding"] = bound
    return at


def run(at: AppTest) -> AppTest:
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def computing(at: AppTest) -> bool:
    return any(c.value.startswith(COMPUTING) for c in at.caption)


def settle(at: AppTest, timeout_s: float = 600) -> AppTest:
    """Rerun (as the page's own polling does) until no piece is being computed."""
    deadline = time.monotonic() + timeout_s
    while computing(run(at)):
        assert time.monotonic() < deadline, [c.value for c in at.caption]
        time.sleep(0.5)
    return at


def headline(at: AppTest) -> str:
    return at.subheader[0].value


def stored_request(tokens: int, formats=FORMATS, hardware_id: str = "h100-sxm-80gb") -> overview.OverviewRequest:
    schemes = tuple(QuantScheme(f) if f in ("fp16", "fp32") else QuantScheme(f, "group", 64) for f in formats)
    return overview.OverviewRequest(schemes, hardware_id, EvalSpec(tokens))


def test_nothing_stored_then_every_piece_arrives(db):
    at = run(page(64))
    assert at.title[0].value == "Overview"
    assert "which precision should you ship this model in" in at.markdown[0].value
    assert headline(at).startswith("No accuracy measured yet")
    assert computing(at) and at.button(key="overview_cancel_sweep")
    settle(at)
    assert not at.error, [e.value for e in at.error]
    assert headline(at).startswith("Ship ") and "on NVIDIA H100 SXM" in headline(at)
    assert any(c.value.startswith("Rule: Among the formats that fit") for c in at.caption)
    charts = at.get("plotly_chart")
    assert len(charts) == 5  # four panels and the histogram of the most sensitive layer
    assert not at.info or all("Waiting for" not in i.value for i in at.info)
    kinds = {r.kind for r in db.runs()}
    assert "sweep" in kinds and not kinds & {"memory", "roofline"}  # arithmetic is recomputed, never stored
    assert all(r.status == "finished" for r in db.runs())


def test_partly_stored_shows_the_verdict_at_once(db, minilm):
    request = stored_request(65)
    pieces = overview.Pieces()
    todo = [s for s in recorded.steps(minilm, request, pieces, measure_here=False) if s.piece == "sweep"]
    recorded.OverviewJob(minilm, request, pieces, todo, db).run()
    at = run(page(65))
    assert headline(at).startswith("Ship "), headline(at)  # accuracy from the store, before any job finishes
    assert computing(at)
    settle(at)
    assert len([r for r in db.runs() if r.kind == "sweep"]) == 1  # the stored sweep was not run again


def test_all_stored_starts_nothing(db, minilm):
    request = stored_request(66)
    pieces = overview.Pieces()
    recorded.OverviewJob(minilm, request, pieces, recorded.steps(minilm, request, pieces, measure_here=False),
                         db).run()
    before = len(db.list_runs())
    at = run(page(66))
    assert not computing(at) and headline(at).startswith("Ship ")
    assert len(at.get("plotly_chart")) == 5
    assert len(db.list_runs()) == before
    at.number_input(key="overview_bound_embedding").set_value(1.0)  # every format is now within the bound
    run(at)
    assert headline(at).startswith("Ship int4 g64"), headline(at)
    html = at.get("download_button")
    assert html and not computing(at)


def test_a_shared_link_sets_the_bound_the_verdict_uses_and_a_bad_one_is_said(db, minilm):
    request = stored_request(70)
    pieces = overview.Pieces()
    recorded.OverviewJob(minilm, request, pieces, recorded.steps(minilm, request, pieces, measure_here=False),
                         db).run()
    at = page(70)
    at.query_params["bound"] = "1"
    run(at)
    assert at.number_input(key="overview_bound_embedding").value == 1.0
    assert headline(at).startswith("Ship int4 g64"), headline(at)  # every format is within the linked bound
    assert at.query_params["bound"] == "1.0"
    at.number_input(key="overview_bound_embedding").set_value(0.25)
    run(at)
    assert at.query_params["bound"] == "0.25" and at.number_input(key="overview_bound_embedding").value == 0.25
    for text in ("nan", "-1", "lots"):
        bad = page(70)
        bad.query_params["bound"] = text
        run(bad)
        assert not bad.error, [e.value for e in bad.error]
        assert any(f"bound={text}" in w.value for w in bad.warning), [w.value for w in bad.warning]
        default = verdict.loss_measure("embedding").default_bound
        assert bad.number_input(key="overview_bound_embedding").value == default
        assert bad.query_params["bound"] == repr(default)


def test_a_format_that_does_not_fit(db, monkeypatch, minilm):
    plans = overview.memory_piece(minilm, stored_request(67, hardware_id=hardware.THIS_MACHINE_ID),
                                  stored_request(67).schemes)
    # A device with room for MiniLM at 4 bits (weights, activations) but not at 8 or 16.
    room = (plans["int4 g64"]["total_bytes"] + plans["int8 g64"]["total_bytes"]) // 2
    original = hardware.get

    def small(hardware_id: str) -> hardware.Hardware:
        found = original(hardware_id)
        return dataclasses.replace(found, memory_bytes=room, name="a small device") \
            if hardware_id == hardware.THIS_MACHINE_ID else found

    monkeypatch.setattr(hardware, "get", small)
    at = settle(page(67, hardware_id=hardware.THIS_MACHINE_ID, bound=0.5))
    assert headline(at).startswith("Ship int4 g64 on a small device"), headline(at)
    details = next(m.value for m in at.markdown if "Does not fit" in m.value)
    assert "Does not fit a small device: fp16" in details and "int8 g64" in details.split("Does not fit")[1]
    at.number_input(key="overview_bound_embedding").set_value(0.0)
    run(at)
    assert headline(at).startswith("No format that fits loses at most 0"), headline(at)


def blocking_sweep(real):
    """run_sweep that stops after its first scheme until the page's Cancel reaches it."""
    def sweep(loaded, schemes, spec, baseline=None, progress=None, cancel=None):
        for index, row in enumerate(real(loaded, schemes, spec, baseline=baseline, progress=progress,
                                         cancel=cancel)):
            yield row
            if index == 0:
                deadline = time.monotonic() + 120
                while not cancel() and time.monotonic() < deadline:
                    time.sleep(0.05)
                raise Cancelled("cancelled; results finished so far are kept.")
    return sweep


def first_scheme_stored(db: Store, at: AppTest, timeout_s: float = 300) -> None:
    """Rerun until the sweep's first scheme is in the store (the blocking sweep then waits for Cancel)."""
    deadline = time.monotonic() + timeout_s
    while not any(r.kind == "sweep" and r.records("sweep") for r in db.runs()):
        assert time.monotonic() < deadline, [c.value for c in at.caption]
        time.sleep(0.3)
        run(at)


def keys(at: AppTest) -> set[str]:
    return {b.key for b in at.button}


def test_a_cancelled_piece_keeps_what_finished_and_resumes(db, monkeypatch):
    real = overview.run_sweep
    monkeypatch.setattr(overview, "run_sweep", blocking_sweep(real))
    at = run(page(68))
    first_scheme_stored(db, at)
    at.button(key="overview_cancel_sweep").click()
    settle(run(at))
    assert any("Accuracy of each format: cancelled; kept fp16 (1 of 3)." in c.value for c in at.caption), \
        [c.value for c in at.caption]
    assert "overview_resume_sweep" in keys(at)
    assert headline(at).startswith("Ship fp16")  # what is measured still answers
    sweep = next(r for r in db.runs() if r.kind == "sweep")
    assert sweep.status == "cancelled" and [r["label"] for r in sweep.records("sweep")] == ["fp16"]
    monkeypatch.setattr(overview, "run_sweep", real)
    at.button(key="overview_resume_sweep").click()
    settle(run(at))
    assert "overview_resume_sweep" not in keys(at)
    labels = {r["label"] for run_ in db.runs() if run_.kind == "sweep" for r in run_.records("sweep")}
    assert labels == {"fp16", "int8 g64", "int4 g64"}  # only the two missing schemes were run again
    assert sum(len(r.records("sweep")) for r in db.runs() if r.kind == "sweep") == 3


def test_a_model_change_mid_run_stops_the_old_job_and_waits_for_a_click(db, monkeypatch, tmp_path):
    import torch
    from safetensors.torch import save_file

    monkeypatch.setattr(overview, "run_sweep", blocking_sweep(overview.run_sweep))
    at = run(page(69))
    first_scheme_stored(db, at)
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["BertModel"], "model_type": "bert"}')
    save_file({"weight": torch.zeros(2, 2)}, folder / "model.safetensors")
    at.session_state["model_choice"] = "Other: Hugging Face id or local directory"
    at.session_state["custom_model"] = str(folder)
    run(at)
    assert not at.error, [e.value for e in at.error]
    assert "overview_open" in keys(at) and not computing(at)  # a model that is not bundled waits for a click
    # Half the blocking sweep's own wait: the job must stop because the page cancelled it, not because it timed out.
    deadline = time.monotonic() + 60
    while next(r for r in db.runs() if r.kind == "sweep").status == "running":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    sweep = next(r for r in db.runs() if r.kind == "sweep")
    assert sweep.status == "cancelled"  # the job the session left behind stopped, keeping what it finished
    assert [r["label"] for r in sweep.records("sweep")] == ["fp16"]


@pytest.mark.parametrize("typed", ["missing-folder", "~/missing-folder"])
def test_a_mistyped_local_path_is_one_clear_line_and_starts_nothing(db, tmp_path, monkeypatch, typed):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = str(tmp_path / typed) if not typed.startswith("~") else typed
    at = page(70)
    at.session_state["model_choice"] = "Other: Hugging Face id or local directory"
    at.session_state["custom_model"] = path
    run(at)
    assert len(at.error) == 1 and "missing-folder" in at.error[0].value, [e.value for e in at.error]
    assert "overview_open" not in keys(at) and not computing(at)  # no button offered for a model that is not there
    assert not db.runs()
