"""llama.cpp through llama-cpp-python (an optional extra: ``requirements-llamacpp.txt``, compiled on install).

The loaded model is written back to an F32 GGUF whose metadata (tokenizer, rope, chat template) is copied from
the bundled file with the ``gguf`` package's reader and writer; llama.cpp's own quantizer
(``llama_model_quantize``) then makes Q8_0 / Q5_K_M / Q4_K_M / Q4_0, which llama.cpp runs with its CPU kernels.
The twin here is exact: the quantized file's tensors dequantized by the ``gguf`` package's reference code and run
in torch, so any gap between the two is llama.cpp's own arithmetic (it quantizes activations to 8 bits too).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from qlab.backends.base import ActivationQuant, Backend, Tolerance, package_available, register
from qlab.core.errors import QlabError
from qlab.core.quant import QuantScheme
from qlab.models.loading import LoadedModel

# Written by GGUFWriter itself, or no longer true once the tensors change type.
_SKIP_FIELDS = ("general.architecture", "general.file_type", "general.quantization_version")
EVAL_CONTEXT_TOKENS = 512
SPEED_CONTEXT_TOKENS = 4096


def _available(device: str) -> tuple[bool, str]:
    ok, reason = package_available("llama_cpp", "llama-cpp-python")
    if not ok:
        return False, ("llama-cpp-python is not installed; it compiles llama.cpp (about 14 min on 2 cores): "
                       "`pip install -r requirements-llamacpp.txt -c requirements.txt`.")
    return package_available("gguf", "gguf")


def _permute_for_gguf(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary layout for Q/K rows (convert_hf_to_gguf ``permute``), which transformers undoes on load."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf(loaded: LoadedModel, path: Path) -> None:
    """Write ``loaded``'s FP32 weights as a GGUF with the metadata and tensor order of its bundled GGUF file."""
    import gguf

    if not loaded.source.gguf_file:
        raise QlabError(f"llama.cpp backends need a model loaded from a GGUF file (the bundled smollm2-135m); "
                        f"'{loaded.name}' was not.")
    reader = gguf.GGUFReader(Path(loaded.source.path) / loaded.source.gguf_file)
    arch_name = reader.fields["general.architecture"].contents()
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None or arch_name != "llama":
        raise QlabError(f"writing a GGUF for architecture '{arch_name}' is not supported; only llama-style "
                        "models (like the bundled SmolLM2).")
    config = loaded.model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    state = {k: v for k, v in loaded.model.state_dict().items()}
    by_gguf = {names.get_name(k, try_suffixes=(".weight", ".bias")): k for k in state}
    writer = gguf.GGUFWriter(str(path), arch_name)
    for field in reader.fields.values():
        if field.name in _SKIP_FIELDS or field.name.startswith("GGUF."):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        if tensor.name not in by_gguf:
            raise QlabError(f"the loaded model has no tensor for GGUF '{tensor.name}'; the file and model differ.")
        data = state[by_gguf[tensor.name]].detach().to(torch.float32).numpy()
        if tensor.name.endswith("attn_q.weight"):
            data = _permute_for_gguf(data, config.num_attention_heads)
        elif tensor.name.endswith("attn_k.weight"):
            data = _permute_for_gguf(data, config.num_key_value_heads)
        writer.add_tensor(tensor.name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize_gguf(source: Path, target: Path, ftype_name: str, threads: int) -> None:
    """llama.cpp's quantizer (``llama_model_quantize``) with one of its file types, e.g. ``MOSTLY_Q4_K_M``."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{ftype_name}")
    with _quiet_native():
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        raise QlabError(f"llama.cpp could not quantize to {ftype_name} (status {status}).")


@contextlib.contextmanager
def _quiet_native() -> Iterator[None]:
    """Silence llama.cpp's C-level logging on stderr (file descriptor 2), which Python redirection misses."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _without_amx_repacking() -> Iterator[None]:
    """Load with llama.cpp's extra (repacking) buffer types off on CPUs with AMX.

    A native build on an AMX CPU routes Q4_0/Q4_1/Q8_0 matmuls through ``ggml_backend_amx_mul_mat``, which
    crashed the process (SIGSEGV) on this project's AMX machines inside ``llama_decode``; the plain CPU kernels
    give the same results. ``Llama`` offers no argument for it, so its default-parameter factory is wrapped for
    the duration of the load only.
    """
    from qlab.models.hardware import cpu_flags

    if "amx_tile" not in cpu_flags():
        yield
        return
    import llama_cpp.llama as llama_module

    factory = llama_module.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = factory()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        yield
    finally:
        llama_module.llama_cpp.llama_model_default_params = factory


class LlamaCppModel(torch.nn.Module):
    """A llama.cpp model behind the Hugging Face causal-LM call used by ``qlab.backends.speed`` (batch 1).

    ``model(ids)`` resets the KV cache and evaluates ``ids``; ``model(ids, past_key_values=out.past_key_values)``
    appends. ``log_prob_chunks`` gives next-token log-probs per evaluation window for ``qlab.models.evaluate``.
    """

    def __init__(self, path: Path, directory: Path, threads: int, config) -> None:
        super().__init__()
        self.path, self.threads, self.config = path, threads, config
        self.file_bytes = path.stat().st_size
        self._finalizer = weakref.finalize(self, shutil.rmtree, directory, True)
        self._speed = self._llama(logits_all=False, context=SPEED_CONTEXT_TOKENS)
        self._eval = None
        # Callers place token ids on the input embedding's device; llama.cpp takes them from the CPU.
        self._embedding_stub = torch.nn.Embedding(1, 1)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self._embedding_stub

    def _llama(self, logits_all: bool, context: int):
        from llama_cpp import Llama

        with _quiet_native(), _without_amx_repacking():
            return Llama(str(self.path), n_ctx=context, n_batch=min(context, 512), n_threads=self.threads,
                         n_threads_batch=self.threads, logits_all=logits_all, verbose=False)

    def tensor_types(self) -> dict[str, str]:
        """GGUF tensor name -> the llama.cpp type it was stored as (K-quants fall back where rows do not fit)."""
        import gguf

        return {t.name: t.tensor_type.name for t in gguf.GGUFReader(self.path).tensors}

    def forward(self, input_ids: torch.Tensor, past_key_values=None, use_cache: bool = True, **_):
        if input_ids.shape[0] != 1:
            raise QlabError("llama-cpp-python runs one sequence at a time; measure llama.cpp at batch 1.")
        llm = self._speed
        if past_key_values is None:
            llm.reset()
        llm.eval(input_ids[0].tolist())
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        return SimpleNamespace(logits=torch.from_numpy(logits.copy())[None, None, :], past_key_values=llm.n_tokens)

    def log_prob_chunks(self, windows: torch.Tensor, progress=None, cancel=None) -> Iterator[tuple[int, torch.Tensor]]:
        from qlab.models.evaluate import _check_cancel

        if self._eval is None:
            self._eval = self._llama(logits_all=True, context=max(EVAL_CONTEXT_TOKENS, windows.shape[1]))
        llm = self._eval
        for index, window in enumerate(windows):
            _check_cancel(cancel)
            llm.reset()
            llm.eval(window.tolist())
            logits = torch.from_numpy(np.array(llm.scores[: window.numel()], dtype=np.float32))
            yield index * windows.shape[1], torch.log_softmax(logits, dim=-1)
            if progress:
                progress((index + 1) / len(windows), f"window {index + 1}/{len(windows)}")

    def reference_model(self, loaded: LoadedModel) -> torch.nn.Module:
        """qlab's simulation of this exact file: its tensors dequantized by the gguf package, run in torch."""
        import gguf

        from qlab.backends.native import shadow

        config = loaded.model.config
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
        model = shadow(loaded.model)
        params = dict(model.named_parameters())
        by_gguf = {names.get_name(k, try_suffixes=(".weight", ".bias")): k for k in params}
        for tensor in gguf.GGUFReader(self.path).tensors:
            hf_name = by_gguf.get(tensor.name)
            if hf_name is None:
                continue
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(params[hf_name].shape)
            if tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = config.num_attention_heads if "attn_q" in tensor.name else config.num_key_value_heads
                values = _unpermute(values, heads)
            module_name, _, leaf = hf_name.rpartition(".")
            setattr(model.get_submodule(module_name), leaf,
                    torch.nn.Parameter(torch.from_numpy(np.array(values, dtype=np.float32)),
                                       requires_grad=False))
        if getattr(config, "tie_word_embeddings", False):
            model.get_output_embeddings().weight = model.get_input_embeddings().weight
        return model


def _unpermute(weight: np.ndarray, n_head: int) -> np.ndarray:
    return (weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _builder(ftype_name: str) -> Callable[[LoadedModel, str], LlamaCppModel]:
    def apply(loaded: LoadedModel, device: str) -> LlamaCppModel:
        directory = Path(tempfile.mkdtemp(prefix="qlab-gguf-"))
        try:
            f32 = directory / "model.f32.gguf"
            write_gguf(loaded, f32)
            threads = torch.get_num_threads()
            target = directory / f"model.{ftype_name.lower()}.gguf"
            quantize_gguf(f32, target, ftype_name, threads)
            f32.unlink()
            return LlamaCppModel(target, directory, threads, loaded.model.config)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    return apply


def _register(ftype_name: str, weight_format: str, twin: QuantScheme, title: str, note: str) -> None:
    slug = "llamacpp-" + ftype_name.removeprefix("MOSTLY_").lower()
    register(Backend(
        slug=slug, library="llama-cpp-python", title=title, weight_format=weight_format, compute_dtype="int8",
        devices=("cpu",), kinds=("causal-lm",), twin=lambda model, s=twin: s, note=note,
        _apply=_builder(ftype_name), _available=_available, quantizes_activations=True,
        activations=ActivationQuant(bits=8, granularity="block32", symmetric=True),
        tolerance=Tolerance(kld_abs=0.01, kld_rel=1.0,
                            why="llama.cpp quantizes activations to 8-bit blocks for its dot products")))


_register("MOSTLY_Q8_0", "int8", QuantScheme("int8", "group", 32),
          "llama.cpp Q8_0 (blocks of 32, FP16 scale)", "8.5 bits per weight; AVX2/AVX-512/NEON dot products.")
_register("MOSTLY_Q4_0", "int4", QuantScheme("int4", "group", 32),
          "llama.cpp Q4_0 (blocks of 32, FP16 scale)", "4.5 bits per weight; the classic fast CPU format.")
_register("MOSTLY_Q4_K_M", "int4", QuantScheme("int4", "group", 32, symmetric=False),
          "llama.cpp Q4_K_M (K-quant mixture, ~4.85 bits)",
          "Super-blocks of 256 with 6-bit sub-scales; rows not divisible by 256 fall back to Q5_0/Q8_0.")
_register("MOSTLY_Q5_K_M", "int4", QuantScheme("int4", "group", 32, symmetric=False),
          "llama.cpp Q5_K_M (K-quant mixture, ~5.69 bits)",
          "Super-blocks of 256; rows not divisible by 256 fall back to a 32-block format.")
