"""qlab.backends.export: really quantized models saved as safetensors (never pickles) with their scheme, reloaded from
config.json alone, giving bit-identical outputs; clear one-line errors for everything else."""

import json
import struct

import pytest
import torch

from qlab import backends, cli
from qlab.backends import export
from qlab.core.errors import QlabError
from qlab.models.loading import weights_digest
from tests.tiny_models import tiny_bert, tiny_llama


def outputs(model, loaded) -> torch.Tensor:
    batch = loaded.tokenizer(["A quantized model, saved and reloaded.", "Second sentence, longer than the first."],
                             return_tensors="pt", padding=True)
    with torch.no_grad():
        result = model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")})
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def assert_safetensors_only(path) -> dict:
    """The weight file is safetensors: an 8-byte header length, a JSON header, raw bytes; no zip or pickle."""
    raw = path.read_bytes()
    assert not raw.startswith(b"PK\x03\x04") and raw[:1] != b"\x80"  # torch.save's zip, a bare pickle
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    assert all(v["dtype"] in {"F32", "F16", "BF16", "I8", "U8", "I32", "I64", "F8_E4M3"} for k, v in header.items()
               if k != "__metadata__")
    return header


@pytest.mark.slow
@pytest.mark.parametrize("slug", ["quanto-int8", "quanto-int4", "torchao-int8wo"])
def test_minilm_exports_reload_bit_exact(minilm, tmp_path, slug):
    before = weights_digest(minilm.model)
    result = export.export_quantized(minilm, slug, tmp_path / "out")
    assert weights_digest(minilm.model) == before  # the shared model is untouched
    assert {"model.safetensors", "config.json", "qlab_scheme.json", "tokenizer.json"} <= set(result.files)
    assert_safetensors_only(tmp_path / "out" / "model.safetensors")
    scheme = json.loads((tmp_path / "out" / "qlab_scheme.json").read_text())
    backend = backends.get_backend(slug)
    assert (scheme["backend"], scheme["model"], scheme["model_kind"]) == (slug, "minilm-l6", "embedding")
    assert len(scheme["model_sha256"]) == 64 and len(scheme["layers"]) == 37
    if slug.startswith("quanto"):
        assert scheme["quantization_map"]["encoder.layer.0.attention.self.query"]["weights"] == \
            {"quanto-int8": "qint8", "quanto-int4": "qint4"}[slug]
        assert scheme["layers"] == {k: v.to_dict() for k, v in export_layers(backend, minilm).items()}
    else:
        assert scheme["scheme"] == backend.twin(minilm.model).to_dict()
    reloaded = export.load_exported(tmp_path / "out")
    # Same packed codes and scales, same kernels: identical, not merely close.
    assert torch.equal(outputs(reloaded, minilm), outputs(backend.apply(minilm), minilm))


def export_layers(backend, loaded):
    from qlab.core.plan import layer_schemes

    return layer_schemes(loaded.model, backend.twin(loaded.model))


@pytest.mark.parametrize("slug", ["quanto-int8", "torchao-int8wo"])
def test_tied_embeddings_are_saved_once_and_tied_again(tmp_path, slug):
    loaded = tiny_llama(seed=6)  # tie_word_embeddings=True, as SmolLM2
    result = export.export_quantized(loaded, slug, tmp_path / "out")
    header = assert_safetensors_only(tmp_path / "out" / "model.safetensors")
    assert "lm_head.weight" not in header and "model.embed_tokens.weight" in header
    assert "tokenizer.json" not in result.files  # the test tokenizer has none to save
    reloaded = export.load_exported(tmp_path / "out")
    inner = getattr(reloaded, "model", reloaded) if slug.startswith("quanto") else reloaded
    assert inner.lm_head.weight is inner.model.embed_tokens.weight
    assert torch.equal(outputs(reloaded, loaded), outputs(backends.get_backend(slug).apply(loaded), loaded))


def test_a_changed_weight_file_is_refused(tmp_path):
    loaded = tiny_bert(seed=1)
    export.export_quantized(loaded, "quanto-int8", tmp_path / "out")
    weights = tmp_path / "out" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    with pytest.raises(QlabError, match="SHA-256"):
        export.load_exported(tmp_path / "out")
    with pytest.raises(QlabError, match="not a qlab export"):
        export.load_exported(tmp_path)


@pytest.mark.parametrize("slug, message", [
    ("no-such-backend", "unknown backend 'no-such-backend'; backends that can export: "),
    ("torch-dynamic-int8", "torch-dynamic-int8 cannot be exported"),
    ("onnxruntime-int8", "onnxruntime-int8 cannot be exported"),
])
def test_backends_that_cannot_export_say_which_can(tmp_path, slug, message):
    with pytest.raises(QlabError) as error:
        export.export_quantized(tiny_bert(), slug, tmp_path / "out")
    text = str(error.value)
    assert text.startswith(message) and "\n" not in text and "quanto-int8" in text
    assert not (tmp_path / "out").exists()


def test_a_non_empty_directory_needs_force_and_an_unwritable_one_fails_cleanly(tmp_path):
    loaded = tiny_bert()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(QlabError, match="not empty.*--force"):
        export.export_quantized(loaded, "quanto-int8", tmp_path / "out")
    # --force replaces an earlier export only: a mistyped --out (a home directory, a project) is never deleted.
    with pytest.raises(QlabError, match="holds no qlab export"):
        export.export_quantized(loaded, "quanto-int8", tmp_path / "out", force=True)
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep me"
    first = export.export_quantized(loaded, "quanto-int8", tmp_path / "first")
    (first.out_dir / "stale.txt").write_text("from the first export")
    result = export.export_quantized(loaded, "quanto-int4", tmp_path / "first", force=True)
    assert "stale.txt" not in result.files and export.read_scheme(tmp_path / "first")["backend"] == "quanto-int4"
    with pytest.raises(QlabError, match="filesystem root"):
        export.export_quantized(loaded, "quanto-int8", "/", force=True)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(QlabError, match="cannot write"):
        export.export_quantized(loaded, "quanto-int8", blocker / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "first", "out"]  # no partial directory left


def test_cli_exports_and_fails_in_one_line_with_exit_2(tmp_path, capsys, monkeypatch):
    from qlab.models import loading as models

    loaded = tiny_bert(seed=2)
    monkeypatch.setattr(models, "load", lambda name: loaded)
    out = tmp_path / "out"
    assert cli.main(["export", "--model", "tiny", "--backend", "quanto-int4", "--out", str(out), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["backend"] == "quanto-int4" and record["weights_file"] == "model.safetensors"
    assert record["weights_bytes"] == (out / "model.safetensors").stat().st_size
    for argv in (["export", "--model", "tiny", "--backend", "quanto-int4", "--out", str(out)],
                 ["export", "--model", "tiny", "--backend", "bf16", "--out", str(tmp_path / "b")],
                 ["export", "--model", "tiny"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("qlab: error: ") and err.count("\n") == 1
    assert cli.main(["export", "--model", "tiny", "--scheme-json", "--format", "int4", "--group-size", "32",
                     "--out", str(tmp_path / "scheme.json")]) == 0
    scheme = json.loads((tmp_path / "scheme.json").read_text())
    assert scheme["format"] == "qlab-plan/1" and len(scheme["layers"]) == 19
    assert {s["format"] for s in scheme["layers"].values()} == {"int4"}


@pytest.mark.slow
def test_smollm_gguf_export_reloads_with_identical_logits(smollm, tmp_path, monkeypatch):
    """llama.cpp's Q8_0 file is copied as written: the reload gives the in-memory backend model's logits."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test installs it)")
    built = []
    write_gguf = export.WRITERS["llama-cpp-python"]

    def keep_the_backend_model(model, directory):
        built.append(model)  # the model backend.apply built in memory, before its file is copied
        return write_gguf(model, directory)

    monkeypatch.setitem(export.WRITERS, "llama-cpp-python", keep_the_backend_model)
    before = weights_digest(smollm.model)
    result = export.export_quantized(smollm, "llamacpp-q8_0", tmp_path / "out")
    assert weights_digest(smollm.model) == before
    assert result.weights_file == "model.gguf" and {"config.json", "qlab_scheme.json"} <= set(result.files)
    scheme = json.loads((tmp_path / "out" / "qlab_scheme.json").read_text())
    assert scheme["quantization_map"]["blk.0.attn_q.weight"] == "Q8_0"
    reloaded = export.load_exported(tmp_path / "out")
    [original] = built
    assert reloaded.path != original.path and reloaded.file_bytes == original.file_bytes
    ids = smollm.tokenizer("A quantized model, saved and reloaded.", return_tensors="pt")["input_ids"][:, :6]
    logits = {}
    for name, model in (("original", original), ("reloaded", reloaded)):  # prefill 5 tokens, decode a 6th
        out = model(ids[:, :5])
        logits[name] = [out.logits, model(ids[:, 5:], past_key_values=out.past_key_values).logits]
    for mine, theirs in zip(logits["reloaded"], logits["original"], strict=True):
        assert mine.shape == (1, 1, smollm.model.config.vocab_size) and torch.isfinite(mine).all()
        assert torch.equal(mine, theirs)
    assert not torch.equal(*logits["reloaded"])  # two different positions, not one answer repeated


def test_the_dashboard_names_a_folder_under_the_exports_directory_never_a_path(tmp_path, monkeypatch):
    monkeypatch.setenv("QLAB_DB", str(tmp_path / "runs.sqlite"))
    assert export.named_out_dir("minilm-int8") == tmp_path / "exports" / "minilm-int8"
    for bad in ("../escape", "/etc", "a/b", "..", ".", "", "~root", "x" * 101):
        with pytest.raises(QlabError, match="not a folder name"):
            export.named_out_dir(bad)


def test_a_hand_edited_weights_name_cannot_point_outside_the_export(tmp_path):
    export.export_quantized(tiny_bert(), "quanto-int8", tmp_path / "out")
    scheme = tmp_path / "out" / export.SCHEME_FILE
    record = json.loads(scheme.read_text())
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes((tmp_path / "out" / "model.safetensors").read_bytes())
    scheme.write_text(json.dumps({**record, "weights_file": str(outside)}))
    (tmp_path / "out" / "model.safetensors").unlink()
    with pytest.raises(QlabError, match="model.safetensors is missing"):
        export.load_exported(tmp_path / "out")
