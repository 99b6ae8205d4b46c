"""Hostile model files and sources (issue 17, families 1 and 2): weights reached through a safetensors index
that are not safetensors, weight files that are FIFOs or devices, configs that claim more than the files hold,
Hub models checked (config, headers, disk, memory) before any download, and a shared link that never starts a
download without a click. Each case: exit status 2 with one line, no traceback, nothing unpickled or allocated,
and the user's files unchanged."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from streamlit.testing.v1 import AppTest

from qlab.cli import main
from qlab.core.errors import QlabError
from qlab.models import checkpoint, loading

MINILM = Path(loading.resolve("minilm-l6").path)
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@pytest.fixture(scope="module")
def minilm_tensors():
    return load_file(MINILM / "model.safetensors")


def model_dir(folder: Path, tensors: dict, index: dict | None = None, config: dict | None = None) -> Path:
    """MiniLM's config and tokenizer with ``tensors`` in one shard, and an index mapping tensor -> file."""
    folder.mkdir()
    for name in SIDE_FILES:
        shutil.copy(MINILM / name, folder / name)
    if config:
        merged = {**json.loads((folder / "config.json").read_text()), **config}
        (folder / "config.json").write_text(json.dumps(merged))
    if index is None:
        save_file(tensors, folder / "model.safetensors")
    else:
        save_file(tensors, folder / "model-00001-of-00002.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return folder


def shard_map(tensors: dict, odd_one: str, where: str) -> dict:
    """Every tensor in the real shard but the first, which ``where`` claims to hold."""
    first = sorted(tensors)[0]
    return {**{k: "model-00001-of-00002.safetensors" for k in tensors if k != first}, first: where}


@pytest.fixture
def nothing_unpickled(monkeypatch):
    """Fail the test if anything reaches torch.load or transformers' from_pretrained."""
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail(f"torch.load reached {a[:1]}"))
    import transformers

    for cls in (transformers.AutoModel, transformers.AutoModelForCausalLM):
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, **k: pytest.fail("the model was built"))


def build(case: str, tmp: Path, tensors: dict) -> Path:
    rest = {k: v for k, v in tensors.items() if k != sorted(tensors)[0]}
    if case == "index maps a tensor to a pickle (the issue's evil.bin)":
        folder = model_dir(tmp / "m", rest, shard_map(tensors, "", "evil.bin"))
        torch.save({sorted(tensors)[0]: tensors[sorted(tensors)[0]]}, folder / "evil.bin")
        return folder
    if case == "index maps a tensor to a .pt file":
        folder = model_dir(tmp / "m", rest, shard_map(tensors, "", "weights.pt"))
        (folder / "weights.pt").write_bytes(b"\x80\x04pickle")
        return folder
    if case == "index maps a tensor outside the directory":
        (tmp / "elsewhere").mkdir()
        save_file({sorted(tensors)[0]: tensors[sorted(tensors)[0]]}, tmp / "elsewhere" / "model.safetensors")
        return model_dir(tmp / "m", rest, shard_map(tensors, "", "../elsewhere/model.safetensors"))
    if case == "index maps a tensor to an absolute path":
        return model_dir(tmp / "m", rest, shard_map(tensors, "", "/etc/passwd"))
    if case == "index maps a tensor into a subfolder":
        folder = model_dir(tmp / "m", rest, shard_map(tensors, "", "sub/x.safetensors"))
        (folder / "sub").mkdir()
        return folder
    if case == "index maps a tensor to a hidden file":
        return model_dir(tmp / "m", rest, shard_map(tensors, "", ".x.safetensors"))
    if case == "index names a shard that is missing":
        return model_dir(tmp / "m", rest, shard_map(tensors, "", "model-00002-of-00002.safetensors"))
    if case == "index that is not JSON":
        folder = model_dir(tmp / "m", rest, {})
        (folder / "model.safetensors.index.json").write_text("{ not json")
        return folder
    if case == "index whose weight_map is a list":
        folder = model_dir(tmp / "m", rest, {})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["evil.bin"]}))
        return folder
    if case == "index whose file names are objects":
        return model_dir(tmp / "m", rest, {k: {"file": "evil.bin"} for k in rest})
    if case == "a .safetensors file that is a pickle":
        folder = model_dir(tmp / "m", rest)
        torch.save(rest, folder / "extra.safetensors")
        return folder
    if case == "model.safetensors is a FIFO":
        folder = model_dir(tmp / "m", rest)
        (folder / "model.safetensors").unlink()
        os.mkfifo(folder / "model.safetensors")
        return folder
    if case == "model.safetensors links to /dev/zero":
        folder = model_dir(tmp / "m", rest)
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors").symlink_to("/dev/zero")
        return folder
    if case == "a GGUF that is a FIFO":
        folder = tmp / "m"
        folder.mkdir()
        os.mkfifo(folder / "model.gguf")
        return folder
    if case == "config claims 6000 layers over six (the issue's example)":
        return model_dir(tmp / "m", tensors, config={"num_hidden_layers": 6000})
    if case == "config claims 60 layers":
        return model_dir(tmp / "m", tensors, config={"num_hidden_layers": 60})
    if case == "config claims a vocabulary of 50 million":
        return model_dir(tmp / "m", tensors, config={"vocab_size": 50_000_000})
    raise AssertionError(case)


MODEL_CASES = [
    ("index maps a tensor to a pickle (the issue's evil.bin)", "evil.bin"),
    ("index maps a tensor to a .pt file", "weights.pt"),
    ("index maps a tensor outside the directory", "not a safetensors file beside it"),
    ("index maps a tensor to an absolute path", "not a safetensors file beside it"),
    ("index maps a tensor into a subfolder", "not a safetensors file beside it"),
    ("index maps a tensor to a hidden file", "not a safetensors file beside it"),
    ("index names a shard that is missing", "missing"),
    ("index that is not JSON", "not a safetensors index"),
    ("index whose weight_map is a list", "not a safetensors index"),
    ("index whose file names are objects", "not a safetensors index"),
    ("a .safetensors file that is a pickle", "not a readable safetensors"),
    ("model.safetensors is a FIFO", "not a regular file"),
    ("model.safetensors links to /dev/zero", "not a regular file"),
    ("a GGUF that is a FIFO", "not a regular file"),
    ("config claims 6000 layers over six (the issue's example)", "6000 layers"),
    ("config claims 60 layers", "60 layers"),
    ("config claims a vocabulary of 50 million", "parameters"),
]


@pytest.mark.parametrize("case, needle", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_a_hostile_model_directory_is_refused_before_anything_is_read(case, needle, tmp_path, minilm_tensors,
                                                                      nothing_unpickled, capsys):
    folder = build(case, tmp_path, minilm_tensors)
    before = sorted(p.name for p in folder.iterdir())
    assert main(["sweep", "--model", str(folder), "--formats", "int8", "--tokens", "64", "--no-store"]) == 2, case
    err = capsys.readouterr().err
    assert err.startswith("qlab: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_the_same_directory_with_a_clean_index_loads(tmp_path, minilm_tensors, minilm):
    first = sorted(minilm_tensors)[0]
    folder = model_dir(tmp_path / "m", {k: v for k, v in minilm_tensors.items() if k != first},
                       shard_map(minilm_tensors, "", "model-00002-of-00002.safetensors"))
    save_file({first: minilm_tensors[first]}, folder / "model-00002-of-00002.safetensors")
    loaded = loading.load(str(folder))
    assert loaded.num_params == minilm.num_params


# --- Hub ids: checked before anything is downloaded --------------------------------------------------------------


def fake_metadata(tensors: dict, files: int = 1) -> SimpleNamespace:
    """What ``HfApi.get_safetensors_metadata`` returns for these tensors, split over ``files`` shards."""
    names = sorted(tensors)
    shards = {}
    for index in range(files):
        part, offset = {}, 0
        for name in names[index::files]:
            tensor = tensors[name]
            size = tensor.numel() * tensor.element_size()
            part[name] = SimpleNamespace(dtype={torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}[tensor.dtype],
                                         shape=list(tensor.shape), data_offsets=(offset, offset + size),
                                         parameter_count=tensor.numel())
            offset += size
        shards[f"model-{index:05d}.safetensors"] = SimpleNamespace(tensors=part)
    return SimpleNamespace(files_metadata=shards)


@pytest.fixture
def fake_hub(monkeypatch, tmp_path, minilm_tensors):
    """A reachable Hub holding 'org/x' (MiniLM's headers, its config as ``config``), nothing of it cached; the
    test fails if a weight download starts unless ``allow`` is set."""
    import huggingface_hub

    state = SimpleNamespace(config=json.loads((MINILM / "config.json").read_text()), tensors=minilm_tensors,
                            allow=False, downloads=[], metadata_error=None)

    def snapshot_download(repo_id, local_files_only=False, **kwargs):
        if local_files_only:
            raise FileNotFoundError("not cached")
        if not state.allow:
            pytest.fail(f"{repo_id} was downloaded before it was checked")
        state.downloads.append(repo_id)
        folder = tmp_path / "hub" / repo_id.replace("/", "--")
        if not folder.exists():
            folder.parent.mkdir(exist_ok=True)
            model_dir(folder, state.tensors)
        return str(folder)

    def hf_hub_download(repo_id, filename, **kwargs):
        assert filename == "config.json", filename
        path = tmp_path / "config-only" / "config.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(state.config))
        return str(path)

    class Api:
        def list_repo_files(self, repo_id):
            return ["config.json", "model.safetensors", "tokenizer.json"]

        def get_safetensors_metadata(self, repo_id):
            if state.metadata_error:
                raise state.metadata_error
            return fake_metadata(state.tensors)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout_s=3.0: True)
    return state


HUB_CASES = [
    ("config claims 6000 layers", {"num_hidden_layers": 6000}, None, "6000 layers"),
    ("config needs custom code", {"auto_map": {"AutoModel": "evil.Model"}}, None, "trust_remote_code"),
    ("weights larger than free RAM", {}, "ram", "GB of RAM"),
    ("weights larger than the free disk", {}, "disk", "GB free"),
    ("headers that cannot be read", {}, "headers", "weight headers"),
]


@pytest.mark.parametrize("case, config, squeeze, needle", HUB_CASES, ids=[c[0] for c in HUB_CASES])
def test_a_hub_model_is_checked_before_it_downloads(case, config, squeeze, needle, fake_hub, monkeypatch, capsys):
    fake_hub.config.update(config)
    if squeeze == "ram":
        monkeypatch.setattr(checkpoint.psutil, "virtual_memory", lambda: SimpleNamespace(available=10_000_000))
    if squeeze == "disk":
        monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**12, used=10**12, free=1000))
    if squeeze == "headers":
        fake_hub.metadata_error = OSError("range requests refused")
    assert main(["sweep", "--model", "org/x", "--formats", "int8", "--tokens", "64", "--no-store"]) == 2, case
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err, err
    assert fake_hub.downloads == []


def test_a_hub_model_that_passes_the_checks_downloads_and_loads(fake_hub):
    fake_hub.allow = True
    loaded = loading.load("org/x")
    assert fake_hub.downloads == ["org/x"] and loaded.name == "org/x"


def test_a_cached_hub_model_with_a_pickle_in_its_index_is_refused_not_downloaded_again(tmp_path, minilm_tensors,
                                                                                     monkeypatch, nothing_unpickled):
    import huggingface_hub

    rest = {k: v for k, v in minilm_tensors.items() if k != sorted(minilm_tensors)[0]}
    cached = model_dir(tmp_path / "cache", rest, shard_map(minilm_tensors, "", "evil.bin"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, local_files_only=False, **k:
                        str(cached) if local_files_only else pytest.fail("downloaded again"))
    with pytest.raises(QlabError, match="evil.bin"):
        loading.load("org/cached")


def test_would_download_only_for_an_uncached_hub_id(fake_hub, tmp_path):
    assert loading.would_download("org/x")
    assert not loading.would_download("minilm-l6") and not loading.would_download(str(tmp_path))
    assert not loading.would_download("not-a-hub-id")


# --- a shared link never starts a download by itself --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("page", ["model", "quantize", "weights"])
def test_a_shared_link_to_a_hub_model_waits_for_a_click(page, fake_hub, monkeypatch):
    loads = []
    monkeypatch.setattr(loading, "load", lambda name, **k: loads.append(name) or pytest.fail("loaded on open"))
    at = AppTest.from_file(f"../pages/{page}.py", default_timeout=120)
    at.query_params["model"] = "org/x"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert loads == [] and fake_hub.downloads == []
    assert any("Hugging Face Hub" in i.value for i in at.info)
    assert at.button(key="link_download").label == "Download and load it"


@pytest.mark.slow
def test_the_click_loads_it(fake_hub, monkeypatch):
    from tests.tiny_models import tiny_bert

    loads = []
    monkeypatch.setattr(loading, "load", lambda name, **k: loads.append(name) or tiny_bert())
    at = AppTest.from_file("../pages/model.py", default_timeout=120)
    at.query_params["model"] = "org/y"
    at.run()
    assert loads == []
    at.button(key="link_download").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert loads and set(loads) == {"org/y"}
    at.run()  # later reruns do not ask again
    assert not [b for b in at.button if b.key == "link_download"]


@pytest.mark.slow
def test_a_shared_link_to_a_bundled_or_cached_model_loads_at_once(monkeypatch):
    at = AppTest.from_file("../pages/model.py", default_timeout=120)
    at.query_params["model"] = "minilm-l6"
    at.run()
    assert not at.exception and not [b for b in at.button if b.key == "link_download"]
