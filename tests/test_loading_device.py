"""Loading on a device in the checkpoint's own dtype: what the headers say, what is refused before any
allocation (a config that claims more than the files hold, a device that is not there, too little memory)."""

import json

import pytest
import torch

from qlab.core.errors import QlabError
from qlab.models import loading


def _no_allocation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded although the check should have refused first")

    monkeypatch.setattr(loading, "_load_pretrained", refuse)


def test_headers_give_the_checkpoints_own_dtype_and_counts(bf16_llama_dir):
    checkpoint = loading.inspect_checkpoint(loading.resolve(str(bf16_llama_dir)))
    assert checkpoint.dtype == torch.bfloat16
    assert checkpoint.layers == checkpoint.config_layers == 2
    assert checkpoint.params == checkpoint.config_params == 139_584
    assert checkpoint.largest_params == 512 * 64  # the embedding (and the untied head)


def test_loads_in_its_own_dtype_unless_fp32_is_asked(bf16_llama_dir):
    loaded = loading.load(str(bf16_llama_dir))
    assert (loaded.device, loaded.dtype) == ("cpu", torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.weight_bytes == 2 * loaded.num_params
    wide = loading.load(str(bf16_llama_dir), dtype="fp32")
    assert wide.dtype == torch.float32 and {p.dtype for p in wide.model.parameters()} == {torch.float32}
    assert torch.equal(wide.model.lm_head.weight, loaded.model.lm_head.weight.float())  # bf16 -> fp32 is exact
    with pytest.raises(QlabError, match="unknown dtype 'int3'"):
        loading.load(str(bf16_llama_dir), dtype="int3")


def test_bundled_models_stay_fp32():
    for slug in ("minilm-l6", "smollm2-135m"):
        assert loading.inspect_checkpoint(loading.resolve(slug)).dtype == torch.float32


@pytest.mark.parametrize("field, value, needle", [
    ("num_hidden_layers", 80, "describes 80 layers but the weight files hold only 2"),
    ("intermediate_size", 128 * 40, r"describes 0\.\d+ B parameters but the weight files hold 0\.00 B"),
])
def test_a_config_claiming_more_than_the_files_hold_is_refused_before_allocation(bf16_llama_dir, tmp_path, monkeypatch,
                                                                                   field, value, needle):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in bf16_llama_dir.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, field: value}))
    _no_allocation(monkeypatch)
    with pytest.raises(QlabError, match=needle) as error:
        loading.load(str(broken))
    assert "\n" not in str(error.value)


def _one_gpu(monkeypatch, free_bytes: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_bytes, 80_000_000_000))


@pytest.mark.parametrize("device, needle", [
    ("cuda:3", r"there is no GPU cuda:3; this machine has 1 \(cuda:0\)"),
    ("tpu", "unknown device 'tpu'"),
])
def test_a_device_that_is_not_there_is_one_line(bf16_llama_dir, monkeypatch, device, needle):
    _one_gpu(monkeypatch, 80_000_000_000)
    _no_allocation(monkeypatch)
    with pytest.raises(QlabError, match=needle) as error:
        loading.load(str(bf16_llama_dir), device=device)
    assert "\n" not in str(error.value)


def test_no_cuda_is_one_line(bf16_llama_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _no_allocation(monkeypatch)
    with pytest.raises(QlabError, match="device 'cuda' needs a CUDA GPU and none is visible"):
        loading.load(str(bf16_llama_dir), device="cuda")


def test_a_gpu_with_too_little_free_memory_says_needed_and_free(bf16_llama_dir, monkeypatch):
    _one_gpu(monkeypatch, 5_000_000)
    _no_allocation(monkeypatch)
    with pytest.raises(QlabError, match=r"needs about 1\.0 GB on cuda:0 .* but only 0\.0 GB is free") as error:
        loading.load(str(bf16_llama_dir), device="cuda")
    assert "bfloat16 weights" in str(error.value)


def test_choices_list_each_gpu_and_all_of_them(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert loading.device_choices() == ["cpu", "cuda:0", "cuda:1", "auto"]
    assert loading.default_device() == "cuda:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loading.device_choices() == ["cpu"] and loading.default_device() == "cpu"
    assert loading.device_label("cpu") == "This CPU"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_loads_on_the_gpu_in_bf16(bf16_llama_dir):
    loaded = loading.load(str(bf16_llama_dir), device="cuda")
    assert loaded.device == "cuda:0" and loaded.dtype == torch.bfloat16
    assert {p.device.type for p in loaded.model.parameters()} == {"cuda"}


def test_a_bf16_model_goes_through_sensitivity(bf16_llama_dir):
    import math

    from qlab.analyses.sensitivity import analyze
    from qlab.core.quant import QuantScheme
    from qlab.models.evaluate import EvalSpec, compute_baseline

    loaded = loading.load(str(bf16_llama_dir))
    report = analyze(loaded, [QuantScheme("int8"), QuantScheme("int4")], compute_baseline(loaded, EvalSpec(tokens=64)))
    # The untied head is outside the decoder pass the probes watch (it reads no tokens there).
    errors = {(r["layer"], r["label"]): r["relative_mse"] for r in report.linears if r["tokens"]}
    assert all(math.isfinite(e) and e > 0 for e in errors.values())
    assert errors[("model.layers.0.mlp.up_proj", "int4 per-channel")] > errors[("model.layers.0.mlp.up_proj",
                                                                                "int8 per-channel")]


@pytest.mark.slow
def test_the_sidebar_runs_the_model_where_the_user_chose(monkeypatch):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file("../app.py", default_timeout=300)
    at.session_state["model_choice"] = "minilm-l6"
    at.switch_page("pages/model.py")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    [run_on] = [box for box in at.selectbox if box.label == "Run on"]
    assert run_on.options == [loading.device_label(d) for d in loading.device_choices()]
    assert run_on.value == loading.default_device()
    assert not at.error, [e.value for e in at.error]
