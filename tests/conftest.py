"""Shared fixtures: bundled models load once per test session (they are read-only everywhere)."""

import os
import sys
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Runs that tests store (CLI sweeps, the Quantize page) go to a throwaway database, not the user's.
os.environ.setdefault("QLAB_DB", os.path.join(tempfile.mkdtemp(prefix="qlab-tests-"), "runs.sqlite"))


@pytest.fixture(scope="session", autouse=True)
def _private_run_db(tmp_path_factory):
    """Runs stored during tests (dashboard, CLI, browser) go to a throwaway database, never the user's."""
    os.environ["QLAB_DB"] = str(tmp_path_factory.mktemp("runs") / "runs.sqlite")


@pytest.fixture(autouse=True)
def _no_overview_job_outlives_its_test():
    """An AppTest that lands on the Overview starts its background job (sweep, sensitivity, speed runs); left
    running, it competed with every later test for the cores and moved the process's memory under the peak-memory
    tests. Stopped here, as interpreter exit stops it."""
    yield
    overview = sys.modules.get("qlab.store.overview")  # nothing to stop if no test imported it
    if overview is not None:
        overview.stop_live_jobs()


@pytest.fixture(params=[({"avx2", "fma"}, "float32"), ({"avx512_bf16"}, "bfloat16")], ids=["avx2", "bf16"])
def cpu_bf16_math(request, monkeypatch):
    """This CPU's flags set to a CPU without (avx2) and with (bf16) native bf16 math, whatever the machine has;
    gives the dtype a bf16 model's evaluations then compute in."""
    import torch

    from qlab.models import evaluate as evaluation

    flags, computes_in = request.param
    monkeypatch.setattr(evaluation, "cpu_flags", lambda: frozenset(flags))
    return getattr(torch, computes_in)


@pytest.fixture
def probe_dtypes(monkeypatch):
    """``probe_dtypes(probe_class)``: the set, filled as the analysis runs, of (input, output, weight) dtypes each
    call of that forward-hook probe sees."""

    def watch(probe_class) -> set:
        seen = set()
        call = probe_class.__call__

        def recording(self, module, args, output):
            seen.add((args[0].dtype, output.dtype, module.weight.dtype))
            return call(self, module, args, output)

        monkeypatch.setattr(probe_class, "__call__", recording)
        return seen

    return watch


@pytest.fixture(scope="session")
def minilm():
    from qlab.models.loading import load

    return load("minilm-l6")


@pytest.fixture(scope="session")
def smollm():
    from qlab.models.loading import load

    return load("smollm2-135m")


TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": 512, "max_position_embeddings": 1024, "tie_word_embeddings": False,
              "rms_norm_eps": 1e-5}


@pytest.fixture(scope="session")
def bf16_llama_dir(tmp_path_factory):
    """A two-block Llama in bf16 safetensors with an offline tokenizer, built by bench/random_checkpoint.py (read
    only: tests that need a changed copy copy it)."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import random_checkpoint

    root = tmp_path_factory.mktemp("bf16-llama")
    (root / "config.json").write_text(json.dumps(TINY_LLAMA))
    random_checkpoint.build(str(root / "config.json"), root / "model")
    return root / "model"


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory):
    """One folder of bad models and bad texts for the CLI and the UI bad-input matrices (tests/test_bad_inputs*.py)."""
    import json

    import torch
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("bad")
    bert = json.dumps({"architectures": ["BertModel"]})
    folders = {
        "empty": {},
        "pickled": {"config.json": bert, "pytorch_model.bin": b"\x80\x04not loaded"},
        "remote_code": {"config.json": json.dumps({"auto_map": {"AutoModel": "evil.Model"}})},
        "broken_config": {"config.json": "{ not json"},
        "list_config": {"config.json": "[1, 2, 3]"},
        "no_weights": {"config.json": bert},
        "corrupt_safetensors": {"config.json": bert, "model.safetensors": b"\x10\x00\x00\x00garbage, not a header"},
        "corrupt_gguf": {"model.gguf": b"GGUF" + bytes(60)},
        "unknown_arch": {"config.json": json.dumps({"architectures": ["FooModel"], "model_type": "foo"})},
    }
    for folder, files in folders.items():
        (tmp / folder).mkdir()
        for name, content in files.items():
            data = content if isinstance(content, bytes) else content.encode()
            (tmp / folder / name).write_bytes(data)
    save_file({"weight": torch.zeros(4, 4)}, tmp / "unknown_arch" / "model.safetensors")
    (tmp / "notes.txt").write_text("not a model")
    (tmp / "empty.txt").write_text("")
    (tmp / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (tmp / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"))
    (tmp / "huge.txt").write_bytes(b"word " * 4_000_001)
    return tmp
