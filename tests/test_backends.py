"""Real backends: registry, availability with reasons, and accuracy next to qlab's simulation of the same scheme.

Each available backend quantizes a bundled model; its accuracy must agree with its twin (``Backend.twin_model``:
the same weight scheme, and the same activation rounding where the backend quantizes activations) within the
backend's stated tolerance. The shared base model must come out untouched (weights and training flag).
"""

import importlib.util
import re

import pytest
import torch

from qlab import backends
from qlab.backends import ActivationQuant, Tolerance, base, native, speed
from qlab.core.errors import QlabError
from qlab.models.evaluate import EvalSpec, compute_baseline
from qlab.models.loading import load, quantizable_linears, weights_digest

ISSUE_SLUGS = ("fp32", "bf16", "torch-dynamic-int8", "torchao-int8wo", "torchao-int4wo", "torchao-float8wo",
               "quanto-int8", "quanto-int4", "bnb-nf4", "bnb-int8", "onnxruntime-int8", "llamacpp-q8_0",
               "llamacpp-q4_k_m", "llamacpp-q4_0")


def test_every_issue_slug_is_registered_with_a_real_format():
    from qlab.core.formats import FORMATS

    registered = {b.slug: b for b in backends.all_backends()}
    assert set(ISSUE_SLUGS) <= set(registered)
    for backend in registered.values():
        assert backend.weight_format in FORMATS
        assert backend.devices and set(backend.devices) <= {"cpu", "cuda"}
        assert backend.note and backend.title


def test_lookup_and_parsing():
    assert backends.get_backend(" Torch-Dynamic-INT8 ").slug == "torch-dynamic-int8"
    with pytest.raises(QlabError, match="torchao-int8wo"):
        backends.get_backend("torchao-int8w")
    assert [b.slug for b in backends.parse_backends("fp32, bf16,fp32")] == ["fp32", "bf16"]
    assert backends.backend_names() == [b.slug for b in backends.all_backends()]
    with pytest.raises(ValueError, match="registered twice"):
        backends.register(backends.get_backend("fp32"))
    with pytest.raises(QlabError, match="no backends"):
        backends.parse_backends(" , ")


def test_unavailable_backends_say_why():
    bnb = backends.get_backend("bnb-nf4")
    ok, reason = bnb.available("cpu")
    assert not ok and "CUDA" in reason
    if not torch.cuda.is_available():
        ok, reason = backends.get_backend("torchao-int8wo").available("cuda")
        assert not ok and "no CUDA GPU" in reason
    assert backends.get_backend("fp32").available("tpu")[0] is False


def test_a_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("optimum") else
                        real(name, *a))
    ok, reason = backends.get_backend("quanto-int8").available("cpu")
    assert not ok and "pip install optimum-quanto" in reason


def test_a_missing_parent_package_is_unavailable_not_an_error():
    # importlib imports "optimum" to look for "optimum.quanto": without the parent it raises (seen on a GPU box).
    ok, reason = base.package_available("qlab_no_such_parent.quanto", "no-such-package")
    assert not ok and "pip install no-such-package" in reason


def test_activation_rounding_matches_torch_per_tensor_quantization():
    x = torch.randn(4, 6, 32) * 3
    fake = ActivationQuant(bits=7, granularity="tensor", symmetric=False).fake_quantize(x)
    low, high = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (high - low) / 127
    zero = round(-low / scale)
    reference = torch.quantize_per_tensor(x, scale, zero, torch.quint8)
    # quint8 holds 0..255; the 7-bit range only differs where codes would pass 127, which none do here.
    assert torch.allclose(fake, reference.dequantize(), atol=1e-5)


def test_per_token_and_block_rounding_are_symmetric_per_row():
    x = torch.randn(3, 64)
    per_token = ActivationQuant(8, "token", True).fake_quantize(x)
    scale = x.abs().amax(dim=1, keepdim=True) / 127
    assert torch.allclose(per_token, torch.round(x / scale) * scale, atol=1e-6)
    blocks = ActivationQuant(8, "block32", True).fake_quantize(x)
    b = x.reshape(-1, 32)
    scale = b.abs().amax(dim=1, keepdim=True) / 127
    assert torch.allclose(blocks, (torch.round(b / scale) * scale).reshape(3, 64), atol=1e-6)


def test_tolerance_is_absolute_plus_relative():
    t = Tolerance(kld_abs=1e-3, kld_rel=0.5)
    assert t.agrees({"kld_mean": 0.0155}, {"kld_mean": 0.01})
    assert not t.agrees({"kld_mean": 0.0165}, {"kld_mean": 0.01})
    assert t.agrees({"cosine_mean": 0.95}, {"cosine_mean": 0.96})  # gap 0.01 <= 0.002 + 0.5 x 0.04
    assert not t.agrees({"cosine_mean": 0.99}, {"cosine_mean": 0.999})


@pytest.mark.slow
def test_every_available_backend_agrees_with_its_twin_on_minilm(minilm):
    digest = weights_digest(minilm.model)
    baseline = compute_baseline(minilm, EvalSpec(tokens=256))
    ran = []
    # One backend per library (each with its own twin rule), not all eleven: CI has 2 cores.
    for slug in ("bf16", "torch-dynamic-int8", "torchao-int8dq", "quanto-int4", "onnxruntime-int8"):
        backend = backends.get_backend(slug)
        if not backend.available("cpu")[0]:
            continue
        model = backend.apply(minilm, "cpu")
        metrics = backends.evaluate_model(model, baseline)
        twin = backends.evaluate_model(backend.twin_model(minilm, model), baseline)
        assert backend.tolerance.agrees(metrics, twin), (backend.slug, metrics, twin)
        ran.append(backend.slug)
        del model
    assert {"bf16", "torch-dynamic-int8"} <= set(ran)
    assert weights_digest(minilm.model) == digest
    assert not minilm.model.training  # the ONNX exporter must not switch the shared model's dropout on


@pytest.mark.slow
def test_lm_backends_agree_with_their_twins_on_smollm(smollm):
    digest = weights_digest(smollm.model)
    baseline = compute_baseline(smollm, EvalSpec(tokens=64))
    # llama.cpp when installed (its twin is the file's own tensors); torch.ao's INT8 otherwise. One of them: the
    # slow tests share a 60-second budget on 2 cores, and MiniLM covers the other libraries.
    slug = "llamacpp-q4_0" if backends.get_backend("llamacpp-q4_0").available("cpu")[0] else "torch-dynamic-int8"
    backend = backends.get_backend(slug)
    model = backend.apply(smollm, "cpu")
    metrics = backends.evaluate_model(model, baseline)
    twin = backends.evaluate_model(backend.twin_model(smollm, model), baseline)
    assert backend.tolerance.agrees(metrics, twin), (slug, metrics, twin)
    del model
    assert weights_digest(smollm.model) == digest


@pytest.mark.slow
def test_gguf_written_back_matches_the_bundled_file(smollm, tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from qlab.backends.llamacpp import write_gguf

    path = tmp_path / "model.f32.gguf"
    write_gguf(smollm, path)
    original = {t.name: t for t in gguf.GGUFReader(f"{smollm.source.path}/{smollm.source.gguf_file}").tensors}
    written = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert list(written) == list(original)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.3.ffn_down.weight", "output_norm.weight"):
        expected = gguf.quants.dequantize(original[name].data, original[name].tensor_type)
        got = np.asarray(written[name].data)
        assert written[name].tensor_type == gguf.GGMLQuantizationType.F32
        # The loaded model is the bundled Q4_1 file dequantized, so writing it back (with llama.cpp's rotary
        # row order for Q and K restored) reproduces the file's values.
        np.testing.assert_allclose(got.reshape(expected.shape), expected, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("ftype, block_format", [("MOSTLY_Q8_0", "q8_0"), ("MOSTLY_Q4_0", "q4_0")])
def test_llama_cpp_quantizer_writes_the_bytes_qlab_simulates(smollm, tmp_path, ftype, block_format):
    """llama.cpp's own quantizer (``llama_model_quantize``) and qlab's block-format simulation agree to the byte
    on a tensor llama.cpp stores unpermuted: the simulation shown beside llama.cpp's result is that result."""
    if not backends.get_backend("llamacpp-q8_0").available("cpu")[0]:
        pytest.skip("llama-cpp-python is not installed (requirements-llamacpp.txt)")
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from qlab.backends.llamacpp import quantize_gguf, write_gguf
    from qlab.core import block_formats

    source, target = tmp_path / "model.f32.gguf", tmp_path / f"model.{block_format}.gguf"
    write_gguf(smollm, source)
    quantize_gguf(source, target, ftype, threads=2)
    tensors = {t.name: t for t in gguf.GGUFReader(target).tensors}
    stored = tensors["blk.2.ffn_down.weight"]
    assert stored.tensor_type == getattr(gguf.GGMLQuantizationType, block_format.upper())
    weight = smollm.model.model.layers[2].mlp.down_proj.weight.detach()
    simulated = block_formats.quantize(weight, block_format).to_gguf_bytes()
    np.testing.assert_array_equal(np.asarray(stored.data).reshape(-1).view(np.uint8), simulated.numpy().reshape(-1))


def _linear_input_dtype(model: torch.nn.Module) -> torch.dtype:
    name, _ = quantizable_linears(model)[0]
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype))
    with torch.no_grad():
        model(torch.arange(8).unsqueeze(0))
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("loaded_dtype", [torch.bfloat16, torch.float32])
def test_fp32_and_bf16_rows_compute_in_their_own_dtype_whatever_the_model_was_loaded_in(bf16_llama_dir, loaded_dtype):
    loaded = load(str(bf16_llama_dir), dtype=loaded_dtype)
    assert loaded.dtype == loaded_dtype
    digest = weights_digest(loaded.model)
    base = {id(p) for p in loaded.model.parameters()}
    for slug, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = backends.get_backend(slug).apply(loaded, "cpu")
        assert {p.dtype for p in model.parameters()} == {dtype}, slug
        assert _linear_input_dtype(model) == dtype, slug
        # The model as loaded is shared, not copied; a converted copy shares nothing with the base.
        shared = {id(p) for p in model.parameters()} & base
        assert shared == (base if dtype == loaded_dtype else set()), slug
    assert weights_digest(loaded.model) == digest
    assert {p.dtype for p in loaded.model.parameters()} == {loaded_dtype}


def test_a_reference_copy_that_does_not_fit_is_said_in_one_line(bf16_llama_dir, monkeypatch):
    loaded = load(str(bf16_llama_dir))
    monkeypatch.setattr(native, "free_memory", lambda placement: 100_000)
    spec = speed.SpeedSpec(prompt_tokens=8, new_tokens=4, repetitions=1, warmup=0)
    rows = list(speed.run_bench(loaded, [backends.get_backend("fp32"), backends.get_backend("bf16")], spec, "cpu",
                                accuracy_tokens=None))
    error = rows[0]["error"]
    assert re.fullmatch(r"QlabError: timing \S+ in FP32 needs a 0\.000\d+ GB copy of its BF16 weights but only "
                        r"0\.0001 GB is free on cpu, so it is not timed; free memory or pick a smaller model\.", error)
    assert rows[0]["decode_tokens_per_s"] is None
    assert rows[1]["error"] is None  # BF16 is the model as loaded: nothing to copy, so it is timed
