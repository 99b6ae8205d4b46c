"""A real-sized model on this CPU-only machine, the bad inputs around it: a model that cannot fit is refused with
the numbers before anything is allocated (CLI and dashboard), a GPU that is not here is one line (CLI) and never
offered (sidebar), and an out-of-memory error in the middle of a sweep is one line that keeps the finished
schemes and leaves the cached base model as it was."""

from __future__ import annotations

import json
import math
import re
import struct
import sys
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from pages import common
from qlab.cli import main
from qlab.core.errors import QlabError
from qlab.core.quant import QuantScheme
from qlab.models import checkpoint
from qlab.models import loading as models
from qlab.store import RunMeta, Store

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import random_checkpoint  # noqa: E402  (the program builds the checkpoints these tests load)

APP = str(REPO / "app.py")
FORMATS = ["fp16", "int8", "int4", "nf4"]


def headers_only_checkpoint(config_name: str, directory: Path) -> None:
    """A model directory whose config.json and safetensors headers are a real model's (every tensor's name, shape
    and bf16 dtype, 5 GB shards and their index) while the data are holes of sparse files: all that the checks
    before loading read, at no cost in disk or memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = random_checkpoint.read_config(config_name)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    directory.mkdir(parents=True)
    shards = random_checkpoint._shards(shapes, torch.bfloat16.itemsize)
    weight_map = {}
    for index, names in enumerate(shards, start=1):
        file = directory / f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names:
            size = math.prod(shapes[name]) * torch.bfloat16.itemsize
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[name] = file.name
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(file, "wb") as handle:
            handle.write(struct.pack("<Q", len(text)) + text)
            handle.truncate(8 + len(text) + offset)
        if file.stat().st_blocks * 512 > 100_000_000:
            pytest.skip("this file system does not keep sparse files sparse")
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config.save_pretrained(directory)


@pytest.fixture(scope="module")
def llama_70b(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("headers") / "llama-3.1-70b"
    headers_only_checkpoint("llama-3.1-70b", directory)
    return directory


@pytest.fixture
def no_allocation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded although the check should have refused first")

    monkeypatch.setattr(models, "_load_pretrained", refuse)


def needed_gb(directory: Path) -> str:
    found = checkpoint.inspect_checkpoint(models.resolve(str(directory)))
    return f"{checkpoint.memory_needed(found, torch.bfloat16) / 1e9:.1f}"


def test_the_headers_describe_the_whole_70b_model(llama_70b):
    found = checkpoint.inspect_checkpoint(models.resolve(str(llama_70b)))
    assert found.params == found.config_params == 70_553_706_496  # the Hub's exact count
    assert (found.dtype, found.layers, found.config_layers) == (torch.bfloat16, 80, 80)
    checkpoint.check_checkpoint(found, "llama-3.1-70b")  # files and config agree: only its size is in the way


@pytest.mark.parametrize("command", [
    ["sweep", "--formats", "int8", "--no-store"],
    ["sensitivity", "--formats", "int8", "--quick"],
    ["recommend", "--formats", "int8,int4", "--budget-bits", "4.5"],
    ["bench", "sweep", "--formats", "int8"],
    ["bench", "--backends", "fp32", "--no-bandwidth"],
], ids=" ".join)
def test_the_cli_refuses_a_model_too_big_for_ram_with_needed_and_free(llama_70b, no_allocation, capsys, command):
    assert main([*command, "--model", str(llama_70b)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error
    assert re.search(rf"needs about {needed_gb(llama_70b)} GB of RAM \(1\.3x its 141\.1 GB of bfloat16 weights.*"
                     r"but only \d+\.\d GB is free", error), error


def test_the_dashboard_refuses_it_on_the_model_page_and_the_overview_then_works_again(llama_70b, bf16_llama_dir,
                                                                                        no_allocation, monkeypatch):
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["model_choice"] = common.OTHER_MODEL
    at.session_state["custom_model"] = str(llama_70b)
    at.switch_page("pages/model.py").run()
    assert not at.exception, [e.value for e in at.exception]
    [error] = [e.value for e in at.error]
    assert re.search(rf"needs about {needed_gb(llama_70b)} GB of RAM .* but only \d+\.\d GB is free", error)
    at.switch_page("pages/overview.py").run()
    at.button(key="overview_open").click().run()  # a local model waits for this click
    assert not at.exception, [e.value for e in at.exception]
    [again] = [e.value for e in at.error]
    assert again.partition(" but only")[0] == error.partition(" but only")[0]  # free RAM moves between the two
    monkeypatch.undo()  # the user types a model that fits: it loads
    at.text_input(key="custom_model").input(str(bf16_llama_dir))
    at.switch_page("pages/model.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.metric[0].value == "0.14 M"
    # Loaded in its own bf16: the size shown is 2 bytes a parameter, the FP32 size only in the help.
    assert at.metric[1].label == "Size as loaded (BF16)"


@pytest.mark.parametrize("command", [
    ["sweep", "--no-store"], ["sensitivity"], ["recommend", "--budget-bits", "4.5"], ["bench", "sweep"], ["bench"],
    ["export", "--scheme-json", "--format", "int8", "--out", "{tmp}/scheme.json"],
], ids=lambda command: " ".join(command[:2]))
def test_a_gpu_that_is_not_here_is_one_line(bf16_llama_dir, no_allocation, capsys, monkeypatch, tmp_path, command):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    command = [part.replace("{tmp}", str(tmp_path)) for part in command]
    assert main([*command, "--model", str(bf16_llama_dir), "--device", "cuda:3"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == ("qlab: error: device 'cuda:3' needs a CUDA GPU and none is visible; leave it out (or use cpu) to "
                     "load on the CPU.")


def test_bench_refuses_a_model_spread_over_gpus_and_a_dtype_the_gpu_benchmark_lacks(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert main(["bench", "--device-map", "auto"]) == 2
    assert "times one device" in capsys.readouterr().err
    assert main(["bench", "--device", "cuda:1", "--dtype", "fp16"]) == 2
    assert "bf16 or fp32, not 'fp16'" in capsys.readouterr().err


def test_bench_runs_the_gpu_benchmark_on_the_chosen_gpu(monkeypatch, tmp_path):
    """``--device cuda:1`` shows the GPU program only that GPU (its cuda:0), in the asked dtype."""
    import subprocess

    from qlab.cli import bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    calls = []

    def fake_run(argv, check, env):
        calls.append((argv, env["CUDA_VISIBLE_DEVICES"]))
        Path(argv[argv.index("--json") + 1]).write_text("[]")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(bench, "_print", lambda rows: None)
    assert main(["bench", "--device", "cuda:1", "--dtype", "fp32", "--json", str(tmp_path / "gpu.json")]) == 0
    [(argv, visible)] = calls
    assert visible == "1" and argv[argv.index("--dtype") + 1] == "fp32" and argv[argv.index("--device") + 1] == "cuda"
    assert "--fuse-projections" not in argv
    assert main(["bench", "--device", "cuda:0", "--fuse-projections", "--json", str(tmp_path / "gpu.json")]) == 0
    assert "--fuse-projections" in calls[-1][0]
    # every option handed on is one the GPU program accepts
    import gpu_speed  # beside random_checkpoint in bench/

    gpu_speed.parser().parse_args(calls[-1][0][2:])


def test_bench_on_the_gpu_builds_the_users_own_model_shapes_and_writes_only_where_asked(
        bf16_llama_dir, monkeypatch, tmp_path, capsys):
    """``--model DIR --device cuda``: the GPU program gets a copy of DIR's config.json in a folder named after DIR
    (its rows' model name); without ``--json`` its rows go to a scratch file and are printed, and nothing is
    written under bench/results."""
    import json
    import subprocess

    from qlab.backends.speed import RESULTS_DIR
    from qlab.cli import bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    handed, formats = [], []

    def fake_run(argv, check, env):
        config = Path(argv[argv.index("--model-config") + 1])
        out = Path(argv[argv.index("--json") + 1])
        handed.append((json.loads(config.read_text()), config.parent.name, out) if config.is_file()
                      else (None, str(config), out))  # a catalog name
        formats.append(argv[argv.index("--formats") + 1])
        out.write_text(json.dumps([{"backend": "bf16", "path": "compiled-loop", "decode_tokens_per_s": 99.5}]))

    monkeypatch.setattr(subprocess, "run", fake_run)
    results_before = sorted(RESULTS_DIR.iterdir())
    assert main(["bench", "--device", "cuda:0", "--model", str(bf16_llama_dir), "--formats", "bf16"]) == 0
    [(config, name, out)] = handed
    assert config == json.loads((bf16_llama_dir / "config.json").read_text()) and name == bf16_llama_dir.name
    assert "99.5" in capsys.readouterr().out
    assert not out.exists() and sorted(RESULTS_DIR.iterdir()) == results_before  # the scratch file is gone
    import gpu_speed  # the program names the rows after the model's folder

    assert gpu_speed.load_config(str(bf16_llama_dir / "config.json"))[0] == bf16_llama_dir.name
    asked = tmp_path / "mine.json"
    assert main(["bench", "--device", "cuda:0", "--model", str(bf16_llama_dir), "--json", str(asked)]) == 0
    assert handed[-1][2] == asked and json.loads(asked.read_text())[0]["decode_tokens_per_s"] == 99.5
    # the catalog shape when no model is named, as before; each format through its fastest installed kernel
    assert main(["bench", "--device", "cuda:0", "--json", str(asked)]) == 0
    assert handed[-1][1] == bench.DEFAULT_GPU_CONFIG == "llama-3.1-8b"
    assert formats == ["bf16", bench.fastest_gpu_formats(), bench.fastest_gpu_formats()]
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: object() if name == "gemlite" else None)
    assert bench.fastest_gpu_formats() == "bf16,int8gl,int4wo,float8gl,nf4"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: object() if name == "triton" else None)
    assert bench.fastest_gpu_formats() == "bf16,int8wo,int4tq,float8wo,nf4"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None)
    assert bench.fastest_gpu_formats() == "bf16,int8wo,int4wo,float8wo,nf4"


def test_bench_on_the_gpu_refuses_an_unknown_format_and_reports_a_failed_program_in_one_line(
        monkeypatch, tmp_path, capsys):
    import json
    import subprocess

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("the GPU program must not start"))
    assert main(["bench", "--device", "cuda:0", "--formats", "bf16,int4pk"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("qlab: error: the GPU benchmark has no format 'int4pk'; choose from bf16,")
    assert "\n" not in error
    mine = tmp_path / "mine.json"

    def dies_after_one_step(argv, check, env):
        assert check  # the program's failure is what this test turns into one line
        assert Path(argv[argv.index("--work-dir") + 1]) != mine.parent  # its log goes elsewhere
        mine.write_text(json.dumps([{"format_slug": "bf16", "path": "compiled-loop", "decode_tokens_per_s": 1.0}]))
        raise subprocess.CalledProcessError(1, argv)

    monkeypatch.setattr(subprocess, "run", dies_after_one_step)
    assert main(["bench", "--device", "cuda:0", "--formats", "bf16,int4wo", "--json", str(mine)]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"qlab: error: the GPU benchmark stopped with exit status 1; the steps that finished are in {mine}."
    assert json.loads(mine.read_text())[0]["decode_tokens_per_s"] == 1.0  # kept
    assert [p.name for p in tmp_path.iterdir()] == ["mine.json"]


@pytest.mark.parametrize("case, message", [
    ("bert", "builds Llama-family decoders (llama, mistral, qwen2)"),
    ("both", "not both"),
    ("missing", "is not a directory"),
    ("custom code", "trust_remote_code"),
    ("broken", "is not valid JSON"),
])
def test_bench_on_the_gpu_refuses_a_model_it_cannot_build_in_one_line(bf16_llama_dir, monkeypatch, tmp_path,
                                                                      capsys, case, message):
    import json
    import shutil
    import subprocess

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("the GPU program must not start"))
    model = tmp_path / "model"
    shutil.copytree(bf16_llama_dir, model)
    config = json.loads((model / "config.json").read_text())
    extra = []
    if case == "bert":
        config["model_type"] = "bert"
    elif case == "both":
        extra = ["--model-config", "llama-3.1-8b"]
    elif case == "missing":
        model = tmp_path / "nowhere"
    elif case == "custom code":
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_mine.Mine"}
    if model.exists():
        (model / "config.json").write_text(json.dumps(config)[:-1] if case == "broken" else json.dumps(config))
    assert main(["bench", "--device", "cuda:0", "--model", str(model), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_the_sidebar_offers_only_devices_that_are_here(bf16_llama_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["model_choice"] = common.OTHER_MODEL
    at.session_state["custom_model"] = str(bf16_llama_dir)
    at.session_state["device"] = "cuda:3"  # left from a session on a machine that had it
    at.switch_page("pages/model.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.selectbox(key="device").options == ["This CPU"]
    assert at.selectbox(key="device").value == "cpu"


def test_history_re_run_keeps_the_sidebars_device_when_the_runs_is_not_here(bf16_llama_dir, monkeypatch, tmp_path):
    from qlab.analyses.sweep import ResultRow
    from qlab.core.plan import SizeReport
    from tests.test_history_page import ENV

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("QLAB_DB", str(tmp_path / "runs.sqlite"))
    store = Store()
    scheme = QuantScheme("int8")
    run_id = store.start_run(RunMeta("sweep", str(bf16_llama_dir), {"schemes": [scheme.to_dict()], "device": "cuda:0"},
                                     tokens=64, environment=ENV))
    store.add_result(run_id, ResultRow(str(bf16_llama_dir), scheme, SizeReport(800, 600, 40, 100, 200), {"kld_mean": 0.01},
                                       0.1, 0.2, 64))
    store.finish_run(run_id)
    at = AppTest.from_file(APP, default_timeout=120)
    at.switch_page("pages/history.py").run()
    at.multiselect(key="history_selected").select(run_id).run()
    [note] = [c.value for c in at.caption if c.value.startswith("Re-run:")]
    assert "ran on cuda" in note and "this machine does not have; the sidebar" in note
    at.button(key="history_rerun").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.title[0].value == "Quantize"
    assert (at.session_state["custom_model"], at.session_state["device"]) == (str(bf16_llama_dir), "cpu")


# --- an out-of-memory error in the middle of a sweep ------------------------------------------------------------


def fail_on_third(monkeypatch, error: BaseException, seen: list) -> None:
    """The sweep's evaluation of a scheme runs out of memory on the third scheme; ``seen`` gets each call's model
    and the hash of its weights then."""
    from qlab.analyses import sweep

    real = sweep.evaluate_streamed

    def evaluate(loaded, *args, **kwargs):
        seen.append((loaded.model, models.weights_digest(loaded.model)))
        if len(seen) == 3:
            raise error
        return real(loaded, *args, **kwargs)

    monkeypatch.setattr(sweep, "evaluate_streamed", evaluate)


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 2147483648 bytes."),
], ids=["cuda", "cpu"])
def test_out_of_memory_mid_sweep_is_one_line_keeps_finished_rows_and_the_base_model(monkeypatch, error):
    from qlab.analyses.sweep import run_sweep
    from qlab.models.evaluate import EvalSpec
    from tests.tiny_models import tiny_llama

    loaded = tiny_llama()
    before = models.weights_digest(loaded.model)
    fail_on_third(monkeypatch, error, [])
    rows = []
    with pytest.raises(QlabError) as raised:
        rows.extend(run_sweep(loaded, [QuantScheme(f) for f in FORMATS], EvalSpec(tokens=64)))
    assert [r.scheme.format for r in rows] == ["fp16", "int8"]
    assert str(raised.value) == ("'tiny-llama' ran out of memory on the CPU while measuring int4 per-channel (the 2 "
                                 "finished before it are kept); free memory (other programs or dashboard sessions), "
                                 "lower the evaluation tokens, or pick another device.")
    assert raised.value.__context__ is None  # nothing keeps the failed scheme's tensors alive
    assert models.weights_digest(loaded.model) == before


def test_any_other_runtime_error_stays_a_bug(monkeypatch):
    from qlab.analyses.sweep import run_sweep
    from qlab.models.evaluate import EvalSpec
    from tests.tiny_models import tiny_llama

    fail_on_third(monkeypatch, RuntimeError("shape mismatch"), [])
    with pytest.raises(RuntimeError, match="shape mismatch"):
        list(run_sweep(tiny_llama(), [QuantScheme(f) for f in FORMATS], EvalSpec(tokens=64)))


def test_out_of_memory_in_a_cli_sweep_keeps_the_written_and_stored_rows(bf16_llama_dir, monkeypatch, capsys, tmp_path):
    fail_on_third(monkeypatch, torch.OutOfMemoryError("CUDA out of memory."), seen := [])
    out, db = tmp_path / "rows.json", tmp_path / "runs.sqlite"
    assert main(["sweep", "--model", str(bf16_llama_dir), "--formats", ",".join(FORMATS), "--tokens", "64", "--quiet",
                 "--db", str(db), "--json", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "ran out of memory on the CPU while measuring int4 per-channel" in error
    assert [r["format"] for r in json.loads(out.read_text())] == ["fp16", "int8"]
    [run] = Store(db).list_runs()
    assert (run["status"], run["results"]) == ("failed", 2)
    assert len({digest for _, digest in seen}) == 1  # the base model's weights, the same at every scheme


@pytest.mark.slow
def test_out_of_memory_on_the_quantize_page_keeps_two_rows_and_the_page_works(bf16_llama_dir, monkeypatch):
    at = AppTest.from_file(APP, default_timeout=300)
    for key, value in dict(model_choice=common.OTHER_MODEL, custom_model=str(bf16_llama_dir), formats=FORMATS, tokens=64,
                           granularity="channel").items():
        at.session_state[key] = value
    at.switch_page("pages/quantize.py").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    fail_on_third(monkeypatch, torch.OutOfMemoryError("CUDA out of memory."), seen := [])
    at.button(key="run_sweep").click().run()
    assert not at.exception, [e.value for e in at.exception]
    [error] = [e.value for e in at.error]
    assert error.startswith(f"'{bf16_llama_dir.name}' ran out of memory on the CPU while measuring int4 per-channel (the 2 "
                            "finished before it are kept)")
    [(base, digest)] = {(id(model), digest): (model, digest) for model, digest in seen}.values()  # one model, intact
    at.run()  # the next visit shows what finished
    assert not at.exception and not at.error
    assert list(at.dataframe[0].value["label"]) == ["fp16", "int8 per-channel"]
    monkeypatch.undo()  # memory was freed: the rest runs
    at.button(key="run_sweep").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert list(at.dataframe[0].value["label"]) == ["fp16", "int8 per-channel", "int4 per-channel",
                                                    "nf4 per-channel"]
    assert {d for _, d in seen} == {digest} and models.weights_digest(base) == digest


# --- the dashboard benchmark ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_dashboard_benchmark_drives_every_step_of_a_two_layer_variant(tmp_path):
    import subprocess

    config = json.loads((REPO / "assets" / "model_configs" / "llama-3.2-1b.json").read_text())
    config.update(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, vocab_size=512)
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "dashboard_1b.py"), "--config",
                           str(tmp_path / "config.json"), "--checkpoint", str(tmp_path / "model"), "--tokens", "64",
                           "--no-overview-speed", "--json", str(out)], timeout=900, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    steps = {s["step"]: s for s in result["steps"]}
    assert result["all_ok"] and list(steps) == ["choose the model in the sidebar", "Model page", "Quantize page",
                                                "Quantize: Run sweep", "Overview", "Memory page",
                                                "Sensitivity: Analyse", "Sensitivity: Recommend and measure"]
    assert result["checkpoint"]["built"] and result["checkpoint"]["dtype"] == "bfloat16"
    assert steps["choose the model in the sidebar"]["run_on_options"] == ["This CPU"]
    assert steps["Model page"]["metrics"]["Parameters"] == "0.36 M"
    assert [r["label"] for r in steps["Quantize: Run sweep"]["rows"]] == ["fp16", "int8 g64", "int4 g64", "nf4 g64"]
    assert steps["Overview"]["pieces"] == {"sensitivity": {"state": "done", "note": ""}}  # the sweep was stored
    assert steps["Overview"]["verdict"].startswith(("Ship ", "No "))
    analysis = steps["Sensitivity: Analyse"]
    assert analysis["formats_analysed"] == ["int8 g64", "int4 g64"]
    assert analysis["rows"] == 2 * 14 and analysis["blocks_measured"] == analysis["rows"]  # 2 blocks of 7 linears
    mixes = steps["Sensitivity: Recommend and measure"]["mixes"]
    assert {"uniform", "mix"} <= {m["kind"] for m in mixes} and all(m["error"] >= 0 for m in mixes)
    assert all(0 < s["peak_rss_over_libraries_bytes"] < s["peak_rss_bytes"] for s in result["steps"])
