import json
from pathlib import Path

import pytest
import torch

from qlab.core.errors import QlabError
from qlab.models import checkpoint
from qlab.models import loading as models


def test_bundled_catalog_resolves_without_importing_the_packages():
    for slug in ("smollm2-135m", "minilm-l6"):
        source = models.resolve(slug)
        assert source.kind in models.KINDS
    smol = models.resolve("smollm2-135m")
    assert smol.gguf_file and (models.Path(smol.path) / smol.gguf_file).is_file()
    assert "Q4_1" in smol.caveat


def test_fp32_estimate_from_headers_matches_the_loaded_model(minilm):
    # The safetensors header also lists the int64 position_ids buffer (512 values), not a parameter.
    estimate = checkpoint.fp32_bytes_estimate(minilm.source)
    assert 0 <= estimate - minilm.fp32_bytes <= 4 * 512


@pytest.mark.parametrize("name, needle", [
    ("", "no model given"),
    ("definitely-not-a-model", "unknown model"),
    ("/nonexistent/dir", "not a directory"),
])
def test_bad_model_names_fail_in_one_line(name, needle):
    with pytest.raises(QlabError, match=needle) as error:
        models.resolve(name)
    assert "\n" not in str(error.value)


def test_offline_hub_id_is_refused_quickly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QlabError, match="offline"):
        models.resolve("someone/some-model-that-is-not-cached")


def test_local_directory_rules(tmp_path):
    with pytest.raises(QlabError, match="no config.json"):
        models.resolve(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(QlabError, match="pickle"):
        models.resolve(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["X"], "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(QlabError, match="trust_remote_code"):
        models.resolve(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(QlabError, match="not valid JSON"):
        models.resolve(str(tmp_path))


def test_ram_guard_refuses_before_loading(monkeypatch):
    class TinyMemory:
        available = 10_000_000

    monkeypatch.setattr(checkpoint.psutil, "virtual_memory", lambda: TinyMemory())
    with pytest.raises(QlabError, match="GB of RAM"):
        models.load("minilm-l6")


@pytest.mark.slow
def test_loaded_models_are_frozen_fp32_and_list_their_linears(minilm, smollm):
    assert minilm.num_params == 22_713_216
    assert smollm.num_params == 134_515_008
    for loaded in (minilm, smollm):
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in loaded.model.parameters())
    names = [name for name, _ in models.quantizable_linears(smollm.model)]
    assert len(names) == 30 * 7  # q, k, v, o, gate, up, down per block; the tied head is excluded
    assert "lm_head" not in names
    table = models.layer_table(smollm)
    assert sum(row.params for row in table) == smollm.num_params
    assert sum(row.params for row in table if row.quantized) == sum(
        m.weight.numel() for _, m in models.quantizable_linears(smollm.model))


@pytest.mark.slow
def test_converted_gguf_copy_equals_a_direct_gguf_load(smollm, tmp_path):
    from transformers import AutoModelForCausalLM

    direct = AutoModelForCausalLM.from_pretrained(smollm.source.path, gguf_file=smollm.source.gguf_file,
                                                  dtype=torch.float32)
    for name, tensor in direct.state_dict().items():
        assert torch.equal(tensor, smollm.model.state_dict()[name]), name


def test_weights_digest_sees_a_one_bit_change():
    layer = torch.nn.Linear(4, 4)
    before = models.weights_digest(layer)
    with torch.no_grad():
        layer.weight.view(-1)[0] = torch.nextafter(layer.weight.view(-1)[0], torch.tensor(1.0))
    assert models.weights_digest(layer) != before


def test_device_map_is_checked_before_anything_loads(monkeypatch):
    with pytest.raises(QlabError, match="unknown device map 'balanced'"):
        models.load("minilm-l6", device_map="balanced")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(QlabError, match="needs CUDA GPUs"):
        models.load("minilm-l6", device_map="auto")



@pytest.mark.slow
def test_gguf_size_estimate_from_the_converted_copy_equals_the_gguf_header(smollm):
    from gguf import GGUFReader

    reader = GGUFReader(Path(smollm.source.path) / smollm.source.gguf_file)
    from_gguf = 4 * sum(int(t.n_elements) for t in reader.tensors)
    assert checkpoint.fp32_bytes_estimate(smollm.source) == from_gguf  # read from the cached FP32 copy's header


def test_a_cache_that_cannot_be_written_is_named_not_blamed_on_the_gguf(tmp_path, monkeypatch):
    """Reading the GGUF worked; writing its FP32 copy failed: the message names the cache, and no partial copy
    is left behind."""
    import transformers

    from tests.tiny_models import tiny_llama

    tiny = tiny_llama(layers=1)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny.model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny.tokenizer)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("x")
    monkeypatch.setenv("QLAB_CACHE_DIR", str(blocker))
    source = models.ModelSource("tiny", "causal-lm", str(tmp_path), "tiny.gguf", "tiny")
    with pytest.raises(QlabError, match="cannot write the converted FP32 copy under .*QLAB_CACHE_DIR") as error:
        models._convert_gguf(source, blocker / "converted" / "tiny")
    assert "\n" not in str(error.value) and "gguf file" not in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-directory"]
