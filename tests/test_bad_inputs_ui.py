"""The bad-input matrix through the dashboard (Streamlit AppTest): the UI half of tests/test_bad_inputs.py.

Each row types one bad input where a user could (the sidebar's model box, an upload, a number box, a hand-edited
shared link, a broken run database, a backend that is not installed) and checks that the page answers with one
clear line of the expected kind (what is wrong, what to do), raises no exception, stores nothing partial in the
run database, and works again once the input is fixed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from pages import common
from qlab.models import checkpoint
from qlab.models import loading as models

pytestmark = pytest.mark.slow  # most rows load MiniLM (once for the whole file) before or after the bad input

MINILM_DIR = models.resolve("minilm-l6").path
OTHER = common.OTHER_MODEL
Action = Callable[[AppTest, Path], object]


@dataclass(frozen=True)
class Case:
    """One bad input: where it goes, what the page must say, and how a user recovers."""

    id: str
    page: str
    needle: str  # a fragment the one message must contain (case-insensitive)
    state: dict = field(default_factory=dict)  # session state before the first run ({tmp} is the files folder)
    query: dict = field(default_factory=dict)  # URL query parameters of the first run (a shared link)
    act: Action | None = None  # what the user does after the first run (upload, click, type), then reruns
    kind: str = "error"  # the message's element (error, warning), or "none" where the widget holds its bound
    expect: Callable[[AppTest], bool] | None = None  # what must hold after the bad input besides the message
    fix: Action | None = None  # the user's correction; the page must then render without error
    patch: Callable[[pytest.MonkeyPatch], None] | None = None  # the environment (RAM, installed packages)


def model_box(path: str) -> dict:
    return {"model_choice": OTHER, "custom_model": path}


def group_size_fitted(at: AppTest) -> bool:
    """MiniLM's layers are 384 and 1536 wide: 256 is not offered, 128 is used, and the sidebar says so."""
    offered = [int(option) for option in at.select_slider(key="group_size").options]
    return (offered == [32, 64, 128] and at.session_state["group_size"] == 128
            and any("Group size 256 does not divide" in c.value for c in at.sidebar.caption))


def pick_minilm(at: AppTest, _tmp: Path) -> None:
    at.selectbox(key="model_choice").select("minilm-l6").run()


def upload(name: str, data: bytes | Callable[[Path], bytes], key: str = "text_upload") -> Action:
    def act(at: AppTest, tmp: Path) -> None:
        if key == "text_upload":
            at.radio(key="text_source").set_value("Upload a file").run()
        if key == "memory_config":
            at.radio(key="memory_source").set_value("Upload a config.json").run()
        content = data(tmp) if callable(data) else data
        at.file_uploader(key=key).set_value((name, content, "application/octet-stream")).run()
    return act


def upload_then_sweep(name: str, data: bytes) -> Action:
    def act(at: AppTest, tmp: Path) -> None:
        upload(name, data)(at, tmp)
        at.button(key="run_sweep").click().run()
    return act


def builtin_text(at: AppTest, _tmp: Path) -> None:
    at.radio(key="text_source").set_value("Built-in text").run()


def set_number(key: str, value) -> Action:
    def act(at: AppTest, _tmp: Path) -> None:
        at.number_input(key=key).set_value(value).run()
    return act


def click(key: str) -> Action:
    def act(at: AppTest, _tmp: Path) -> None:
        at.button(key=key).click().run()
    return act


def rerun(at: AppTest, _tmp: Path) -> None:
    at.run()


def fresh_database(at: AppTest, _tmp: Path) -> None:
    """The user moves the broken file away (or points QLAB_DB elsewhere) and reloads."""
    Path(os.environ["QLAB_DB"]).unlink()
    at.run()


def too_little_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tight:
        available = 10_000_000  # 10 MB: MiniLM's 91 MB of FP32 weights need ~230 MB

    monkeypatch.setattr(checkpoint.psutil, "virtual_memory", lambda: Tight())


def without_packages(*names: str) -> Callable[[pytest.MonkeyPatch], None]:
    """Make optional packages look uninstalled to qlab's backend registry (find_spec answers None)."""
    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *args: None if name.split(".")[0] in names else real(name, *args))
    return patch


def backend_row(at: AppTest, slug: str):
    listing = next(d.value for d in at.dataframe if "available here" in d.value.columns)
    return listing[listing["backend"] == slug].iloc[0]


def affine(values: str) -> Action:
    def act(at: AppTest, _tmp: Path) -> None:
        at.radio(key="formats_section").set_value("Affine mapping").run()
        at.text_input(key="fx_affine_values").input(values).run()
    return act


def newer_database(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 999")


CASES = [
    # --- the sidebar's model box (every page that loads a model goes through common.current_model) ---
    Case("unknown model name", "model", "unknown model", model_box("no-such-model"), fix=pick_minilm),
    Case("hub id while offline", "model", "cannot be reached", model_box("someone/not-cached-model"), fix=pick_minilm),
    Case("path that does not exist", "model", "not a directory", model_box("/no/such/model"), fix=pick_minilm),
    Case("path is a file", "model", "not a directory", model_box("{tmp}/notes.txt"), fix=pick_minilm),
    Case("empty model box", "model", "no model given", model_box("   "), fix=pick_minilm),
    Case("directory without config.json", "model", "no config.json", model_box("{tmp}/empty"), fix=pick_minilm),
    Case("system directory", "model", "no config.json", model_box("/etc"), fix=pick_minilm),
    Case("pickle .bin weights only", "model", "pickle", model_box("{tmp}/pickled"), fix=pick_minilm),
    Case("trust_remote_code (auto_map)", "model", "trust_remote_code", model_box("{tmp}/remote_code"),
         fix=pick_minilm),
    Case("config.json not JSON", "model", "not valid JSON", model_box("{tmp}/broken_config"), fix=pick_minilm),
    Case("config.json a JSON list", "model", "config.json", model_box("{tmp}/list_config"), fix=pick_minilm),
    Case("config without weights", "model", "no *.safetensors", model_box("{tmp}/no_weights"), fix=pick_minilm),
    Case("corrupt safetensors", "model", "safetensors", model_box("{tmp}/corrupt_safetensors"), fix=pick_minilm),
    Case("corrupt GGUF", "model", "gguf", model_box("{tmp}/corrupt_gguf"), fix=pick_minilm),
    Case("unsupported architecture", "model", "could not load", model_box("{tmp}/unknown_arch"), fix=pick_minilm),
    Case("model too big for free RAM", "model", "GB of RAM", model_box(MINILM_DIR), fix=pick_minilm,
         patch=too_little_ram),
    Case("bad model on the Quantize page", "quantize", "unknown model", model_box("no-such-model"),
         fix=pick_minilm),
    Case("bad model on the Weights page", "weights", "pickle", model_box("{tmp}/pickled"), fix=pick_minilm),
    Case("bad model on the Memory page", "memory", "trust_remote_code",
         {**model_box("{tmp}/remote_code"), "memory_source": "The sidebar's model"}, fix=pick_minilm),
    # --- the Quantize page's evaluation text ---
    Case("empty upload", "quantize", "empty", {"model_choice": "minilm-l6"}, act=upload("empty.txt", b""),
         fix=builtin_text),
    Case("binary upload", "quantize", "binary", {"model_choice": "minilm-l6"},
         act=upload("weights.txt", bytes(range(256)) * 4), fix=builtin_text),
    Case("non-UTF-8 upload", "quantize", "UTF-8", {"model_choice": "minilm-l6"},
         act=upload("latin1.txt", "café crème brûlée".encode("latin-1")), fix=builtin_text),
    Case("upload over the size limit", "quantize", "limit", {"model_choice": "minilm-l6"},
         act=upload("huge.txt", b"word " * 4_000_001), fix=builtin_text),
    Case("upload shorter than the evaluation needs", "quantize", "paragraph",
         {"model_choice": "minilm-l6", "formats": ["int8"], "tokens": 64},
         act=upload_then_sweep("short.txt", b"Too short to embed."), fix=builtin_text),
    Case("upload shorter than one evaluation window (SmolLM2)", "quantize", "fewer than one evaluation window",
         {"model_choice": "smollm2-135m", "formats": ["int8"], "tokens": 64},
         act=upload_then_sweep("short.txt", b"Hello there."), fix=builtin_text),
    Case("no format chosen", "quantize", "at least one format", {"model_choice": "minilm-l6", "formats": []},
         fix=lambda at, _: at.multiselect(key="formats").set_value(["int8"]).run()),
    # The sidebar offers only group sizes that divide the model's layers: a size that does not (from an earlier
    # model or a link) is replaced by the largest that fits, and the sidebar says so.
    Case("group size that does not divide a layer", "quantize", "does not divide",
         {"model_choice": "minilm-l6", "formats": ["int4"], "group_size": 256, "tokens": 64}, kind="none",
         expect=group_size_fitted, fix=lambda at, _: at.select_slider(key="group_size").set_value(64).run()),
    # --- a shared link typed or truncated by hand ---
    Case("tokens=-5 in the link", "model", "tokens", {"model_choice": "minilm-l6"}, {"tokens": "-5"},
         kind="warning", fix=rerun),
    Case("tokens=999999999 in the link", "model", "tokens", {"model_choice": "minilm-l6"},
         {"tokens": "999999999"}, kind="warning", fix=rerun),
    Case("tokens above the dashboard's cap in the link", "model", "tokens", {"model_choice": "minilm-l6"},
         {"tokens": "20000"}, kind="warning", fix=rerun),
    Case("tokens=abc in the link", "model", "tokens", {"model_choice": "minilm-l6"}, {"tokens": "abc"},
         kind="warning", fix=rerun),
    Case("unknown format in the link", "model", "int99", {"model_choice": "minilm-l6"}, {"formats": "int99"},
         kind="warning", fix=rerun),
    Case("unknown hardware in the link", "model", "tpu-v9", {"model_choice": "minilm-l6"}, {"hw": "tpu-v9"},
         kind="warning", fix=rerun),
    Case("group size 100 in the link", "model", "group", {"model_choice": "minilm-l6"}, {"group": "100"},
         kind="warning", fix=rerun),
    Case("unknown granularity in the link", "model", "gran", {"model_choice": "minilm-l6"}, {"gran": "row"},
         kind="warning", fix=rerun),
    Case("path traversal as the model in the link", "model", "not a directory", {}, {"model": "../../no/such"},
         fix=pick_minilm),
    Case("markup as the model in the link", "model", "model", {"model_choice": "minilm-l6"},
         {"model": "<script>alert(1)</script>"}, kind="warning", fix=rerun),
    # --- the Memory page's numbers and uploaded config ---
    Case("negative context (the box holds its minimum)", "memory", "", act=set_number("memory_context", -5),
         kind="none", expect=lambda at: at.session_state["memory_context"] == 1,
         fix=set_number("memory_context", 4096)),
    Case("absurd context", "memory", "context", act=set_number("memory_context", 10**15),
         fix=set_number("memory_context", 4096)),
    Case("zero batch (the box holds its minimum)", "memory", "", act=set_number("memory_batch", 0), kind="none",
         expect=lambda at: at.session_state["memory_batch"] == 1, fix=set_number("memory_batch", 2)),
    Case("absurd batch", "memory", "batch", act=set_number("memory_batch", 10**12), fix=set_number("memory_batch", 1)),
    Case("config upload not JSON", "memory", "JSON", act=upload("config.json", b"{ nope", key="memory_config"),
         fix=lambda at, _: at.radio(key="memory_source").set_value("Catalog architecture").run()),
    Case("config upload binary", "memory", "JSON", act=upload("config.json", bytes(range(256)), key="memory_config"),
         fix=lambda at, _: at.radio(key="memory_source").set_value("Catalog architecture").run()),
    Case("config upload a JSON list", "memory", "JSON object", act=upload("config.json", b"[1, 2]",
                                                                          key="memory_config"),
         fix=lambda at, _: at.radio(key="memory_source").set_value("Catalog architecture").run()),
    Case("config upload missing keys", "memory", "model_type",
         act=upload("config.json", json.dumps({"architectures": ["LlamaForCausalLM"]}).encode(),
                    key="memory_config"),
         fix=lambda at, _: at.radio(key="memory_source").set_value("Catalog architecture").run()),
    Case("config upload with zero layers", "memory", "num_hidden_layers",
         act=upload("config.json", json.dumps({
             "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512,
             "num_hidden_layers": 0, "num_attention_heads": 8, "intermediate_size": 1024,
             "vocab_size": 1000}).encode(), key="memory_config"),
         fix=lambda at, _: at.radio(key="memory_source").set_value("Catalog architecture").run()),
    Case("tokens typed above the cap (the box holds it)", "model", "", {"model_choice": "minilm-l6"},
         act=set_number("tokens", 10**9), kind="none", expect=lambda at: 16 <= at.session_state["tokens"] <= 8192,
         fix=set_number("tokens", 256)),
    Case("tokens typed as zero (the box holds its minimum)", "model", "", {"model_choice": "minilm-l6"},
         act=set_number("tokens", 0), kind="none", expect=lambda at: at.session_state["tokens"] == 16,
         fix=set_number("tokens", 256)),
    Case("bits 0, 1 and 9 in the link", "model", "int0", {"model_choice": "minilm-l6"},
         {"formats": "int0,int1,int9,int4"}, kind="warning",
         expect=lambda at: at.session_state["formats"] == ["int4"], fix=rerun),
    Case("malformed run ids in the link", "model", "runs", {"model_choice": "minilm-l6"}, {"runs": "zz;drop"},
         kind="warning", fix=rerun),
    Case("well-formed run id this database lacks in the link", "history", "import it first", {},
         {"runs": "0123456789ab"}, kind="warning", fix=rerun),
    # --- the other pages' own inputs ---
    Case("group size that does not divide a layer (Weights)", "weights", "does not divide",
         {"model_choice": "minilm-l6", "formats": ["int4"], "group_size": 256}, kind="none",
         expect=group_size_fitted, fix=lambda at, _: at.select_slider(key="group_size").set_value(64).run()),
    Case("group size that does not divide a layer (Sensitivity)", "sensitivity", "does not divide",
         {"model_choice": "minilm-l6", "formats": ["int4"], "group_size": 256, "tokens": 64}, kind="none",
         expect=group_size_fitted, fix=lambda at, _: at.select_slider(key="group_size").set_value(64).run()),
    Case("affine values that are not numbers", "formats", "numbers", act=affine("a, b"),
         fix=lambda at, _: at.text_input(key="fx_affine_values").input("-2.45, 1.32").run()),
    Case("NaN among the affine values", "formats", "NaN", act=affine("1, nan, 2"),
         fix=lambda at, _: at.text_input(key="fx_affine_values").input("-2.45, 1.32").run()),
    Case("infinity among the affine values", "formats", "infinite", act=affine("1, inf"),
         fix=lambda at, _: at.text_input(key="fx_affine_values").input("-2.45, 1.32").run()),
    Case("no affine values", "formats", "value", act=affine(" , "),
         fix=lambda at, _: at.text_input(key="fx_affine_values").input("-2.45, 1.32").run()),
    # --- optional packages and devices (Speed page) ---
    Case("onnxruntime not installed", "speed", "", {"model_choice": "minilm-l6"}, kind="none",
         patch=without_packages("onnxruntime"),
         expect=lambda at: "not installed" in backend_row(at, "onnxruntime-int8")["why not"]
         and "onnxruntime-int8" not in at.multiselect(key="speed_backends").options),
    Case("bitsandbytes not installed", "speed", "", {"model_choice": "minilm-l6"}, kind="none",
         patch=without_packages("bitsandbytes"),
         expect=lambda at: not backend_row(at, "bnb-nf4")["available here"]),
    Case("a chosen backend's package went missing", "speed", "", {"model_choice": "minilm-l6",
         "speed_backends": ["fp32", "onnxruntime-int8"]}, kind="none", patch=without_packages("onnxruntime"),
         expect=lambda at: at.session_state["speed_backends"] == ["fp32"]),
    Case("a backend for the other model kind stays chosen", "speed", "", {"model_choice": "minilm-l6",
         "speed_backends": ["fp32", "llamacpp-q4_0"]}, kind="none",
         expect=lambda at: at.session_state["speed_backends"] == ["fp32"]),
    Case("no GPU for a CUDA-only backend", "speed", "", {"model_choice": "minilm-l6"}, kind="none",
         expect=lambda at: "CUDA" in backend_row(at, "bnb-int8")["why not"]),
    # --- the run database ---
    Case("unwritable run database path on History", "history", "cannot open", {"db": "/proc/qlab/runs.sqlite"}),
    Case("run database from a newer qlab", "history", "newer qlab", {"db": "newer"}, fix=fresh_database),
    Case("unwritable run database under a sweep", "quantize", "not being saved",
         {"db": "/proc/qlab/runs.sqlite", "model_choice": "minilm-l6", "formats": ["int8"], "tokens": 64},
         act=click("run_sweep"), kind="warning",
         expect=lambda at: list(at.dataframe[0].value["label"]) == ["int8 g64"]),
    Case("read-only run database under a sweep", "quantize", "is read-only",
         {"db": "readonly", "model_choice": "minilm-l6", "formats": ["int8"], "tokens": 64},
         act=click("run_sweep"), kind="warning",
         expect=lambda at: list(at.dataframe[0].value["label"]) == ["int8 g64"]),
    Case("corrupted run database on History", "history", "not a usable", {"db": "corrupt"}, fix=fresh_database),
    Case("corrupted run database under a sweep", "quantize", "not being saved",
         {"db": "corrupt", "model_choice": "minilm-l6", "formats": ["int8"], "tokens": 64},
         act=click("run_sweep"), kind="warning", fix=fresh_database),
    Case("history import of a file qlab did not write", "history", "my-runs.json is neither",
         act=lambda at, _: (at.file_uploader(key="history_upload").set_value(
             ("my-runs.json", b"this is not json", "application/json")).run(),
             at.button(key="history_import").click().run()),
         expect=lambda at: "/tmp" not in at.error[0].value),  # the upload's name, not the server's temp copy
    Case("history import of a damaged SQLite file", "history", "gpu-box.sqlite is not a readable SQLite",
         act=lambda at, _: (at.file_uploader(key="history_upload").set_value(
             ("gpu-box.sqlite", b"SQLite format 3\x00" + b"\xff" * 2000, "application/octet-stream")).run(),
             at.button(key="history_import").click().run()),
         expect=lambda at: "/tmp" not in at.error[0].value),
]


def messages(at: AppTest, kind: str) -> list[str]:
    return [element.value for element in getattr(at, kind)]


def run_count(path: Path) -> int:
    if not path.is_file():
        return 0
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_ui_bad_input(case: Case, bad_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "runs.sqlite"
    state = dict(case.state)
    broken = state.pop("db", None)
    if broken == "corrupt":
        db.write_bytes(b"this is not a database" * 100)
    elif broken == "newer":
        newer_database(db)
    elif broken == "readonly":  # a database shared read-only: one stored run, and no write may reach it
        from qlab.store import RunMeta, Store

        Store(db).finish_run(Store(db).start_run(RunMeta("sweep", "minilm-l6", {"schemes": []}, environment={})))
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if mode & os.W_OK and str(p).startswith(
            str(db)) else real_access(p, mode, *a, **k))  # tests run as root: chmod would change nothing
    elif broken:
        db = Path(broken)
    monkeypatch.setenv("QLAB_DB", str(db))
    if case.patch:
        case.patch(monkeypatch)
    at = AppTest.from_file(f"../pages/{case.page}.py", default_timeout=120)
    for key, value in state.items():
        at.session_state[key] = value.replace("{tmp}", str(bad_files)) if isinstance(value, str) else value
    for key, value in case.query.items():
        at.query_params[key] = value
    at.run()
    if case.act:
        case.act(at, bad_files)

    assert not at.exception, [e.value for e in at.exception]
    if case.kind == "none":
        assert not at.error and not at.warning, (messages(at, "error"), messages(at, "warning"))
    else:
        shown = messages(at, case.kind)
        assert len(shown) == 1, (case.kind, shown, messages(at, "error"))
        text = shown[0]
        assert "\n" not in text.strip() and "Traceback" not in text and "Exception" not in text, text
        assert case.needle.lower() in text.lower(), text
    if case.kind != "error":
        assert not at.error, messages(at, "error")
    if case.expect:
        assert case.expect(at)
    if not broken:
        assert run_count(db) == 0, "the bad input left a stored run behind"
    if broken == "readonly":
        assert not Path(f"{db}-wal").exists() and run_count(db) == 1, "a write reached the read-only database"

    if case.fix:
        monkeypatch.undo()
        monkeypatch.setenv("QLAB_DB", str(db))
        case.fix(at, bad_files)
        assert not at.exception, [e.value for e in at.exception]
        assert not at.error, messages(at, "error")


def test_matrix_is_big_enough():
    assert len(CASES) >= 30
    assert os.environ.get("QLAB_DB")
