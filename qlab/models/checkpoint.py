"""What a checkpoint holds before any tensor is read: dtype, parameters, layers and the largest tensor from
config.json and the file headers; the checks against each other and against a device's free memory; which files
an index may point to; and the SHA-256 of the weight files a run records.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from qlab.core.errors import QlabError
from qlab.models.architectures import count_params, from_config

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                                  "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}

# A layer-streamed sweep holds the model, one block's quantized weights and the embedding/head it rounds or
# quantizes beside it: the sweep's goal is at most 1.3x the weights plus the largest layer plus working memory.
SWEEP_MEMORY_FACTOR = 1.3
# Activations, the baseline's next-token log-probs (2048 tokens x a 128k vocabulary in fp16: 0.5 GB) and the
# libraries' own scratch space.
RUNTIME_BYTES = 1_000_000_000
# safetensors header dtype names of the floating dtypes a checkpoint is stored in.
_HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# Numbered blocks in tensor names: Llama/Qwen "model.layers.3.", BERT "encoder.layer.3.", GGUF "blk.3.".
_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|blk)\.(\d+)\.")



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


def check_weight_references(path: Path, name: str) -> None:
    """Refuse a directory whose safetensors index (what transformers reads to find the shards) maps a tensor to
    anything but a safetensors file beside it: a pickle named there (``evil.bin``) would be unpickled, a path
    would reach outside the model. Only names are read here; the shards' headers are checked next. Every weight
    file must be a regular file too (a FIFO or device would hang or flood the header reader)."""
    for file in [*sorted(path.glob("*.safetensors")), *sorted(path.glob("*.gguf"))]:
        if not file.is_file():
            raise QlabError(f"'{name}': {file.name} is not a regular file; replace it with the weights file.")
    for index in sorted(path.glob("*.safetensors.index.json")):
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (OSError, ValueError, AttributeError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise QlabError(f"'{name}': {index.name} is not a safetensors index (no weight_map of file names); "
                            "fix or remove it.")
        for shard in sorted(set(weight_map.values())):
            plain = shard == Path(shard).name and not shard.startswith(".")
            if not (plain and shard.endswith(".safetensors")):
                raise QlabError(f"'{name}': {index.name} maps tensors to '{shard[:80]}', which is not a safetensors "
                                "file beside it; qlab reads weights only from safetensors or GGUF, so remove that "
                                "entry or convert the file.")
            if not (path / shard).is_file():
                raise QlabError(f"'{name}': {index.name} names {shard}, which is missing; download the missing "
                                "shard.")


@dataclass(frozen=True)
class Checkpoint:
    """What a model's weight files hold, read from their headers and config.json only (no tensor is read)."""

    params: int  # values of every stored tensor (tied tensors are stored once)
    dtype: torch.dtype  # the floating dtype holding most values: the model's own precision
    largest_params: int  # values of the largest tensor (an embedding or a head, usually)
    layers: int | None  # numbered blocks in the tensor names; None when the names have none
    config_layers: int | None
    config_params: int | None  # what config.json describes (counted, or a lower bound for other families)

    def bytes_in(self, dtype: torch.dtype) -> int:
        """Size of the weights once loaded in ``dtype``."""
        return self.params * dtype.itemsize


def inspect_checkpoint(source: ModelSource) -> Checkpoint:
    """Parameters, dtype and layers of a model's files and of its config.json, from headers only."""
    path = Path(source.path)
    files = sorted(path.glob("*.safetensors"))
    config_file = path / "config.json"
    if source.gguf_file:
        converted = converted_dir(source)
        if not (converted / "model.safetensors").is_file():
            return _inspect_gguf(path / source.gguf_file)
        # After the first conversion the FP32 copy's header says the same, without parsing the GGUF (~3 s).
        files, config_file = [converted / "model.safetensors"], converted / "config.json"
    from safetensors import safe_open

    numel_by_dtype: dict[torch.dtype, int] = {}
    params = largest = 0
    blocks: set[int] = set()
    for file in files:
        with unreadable_weights(file), safe_open(file, framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                tensor = handle.get_slice(key)
                count = math.prod(tensor.get_shape())
                params += count
                largest = max(largest, count)
                dtype = _HEADER_DTYPES.get(tensor.get_dtype())
                if dtype is not None:
                    numel_by_dtype[dtype] = numel_by_dtype.get(dtype, 0) + count
                if match := _BLOCK_INDEX.search(key):
                    blocks.add(int(match.group(1)))
    config = _read_config(config_file)
    own = max(numel_by_dtype, key=numel_by_dtype.get) if numel_by_dtype else _config_dtype(config)
    return Checkpoint(params, own, largest, len(blocks) or None, _config_layers(config), _config_params(config))


def _inspect_gguf(file: Path) -> Checkpoint:
    # Parsing a GGUF reads its whole tokenizer vocabulary in Python (~3 s for SmolLM2): only before the first
    # conversion. The conversion dequantizes to FP32, so that is the dtype it loads in.
    from gguf import GGUFReader

    with unreadable_weights(file):
        reader = GGUFReader(file)
        counts = [int(t.n_elements) for t in reader.tensors]
        blocks = {int(m.group(1)) for t in reader.tensors if (m := _BLOCK_INDEX.search(t.name))}
    return Checkpoint(sum(counts), torch.float32, max(counts, default=0), len(blocks) or None, None, None)


def _read_config(config_file: Path) -> dict:
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return {}  # resolve() already refused a broken config of a local model; a GGUF may have none
    return config if isinstance(config, dict) else {}


def _config_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def _config_layers(config: dict) -> int | None:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _config_params(config: dict) -> int | None:
    try:
        return count_params(from_config(config)).total
    except (QlabError, KeyError, TypeError, ValueError, ZeroDivisionError):
        return _config_params_at_least(config)  # a family (or a value) qlab does not count


def _config_params_at_least(config: dict) -> int | None:
    """What any transformer built from ``config`` allocates at least: its embedding (vocabulary x width) and
    per layer the query and output projections (width x width each; keys and values may be narrower under
    grouped-query attention, and the MLP is not counted). Enough to catch a config that claims a 50-million-token
    vocabulary or a width of 10**6 over a small model's files; None without a vocabulary and a width."""
    def number(*keys: str) -> int:
        found = next((config[k] for k in keys if k in config), 0)
        return found if isinstance(found, int) and not isinstance(found, bool) and found > 0 else 0

    vocab, width = number("vocab_size"), number("hidden_size", "n_embd", "d_model")
    if not (vocab and width):
        return None
    return vocab * width + 2 * width * width * number("num_hidden_layers", "n_layer", "num_layers")


def fp32_bytes_estimate(source: ModelSource) -> int:
    """FP32 size of the weights from file headers only (no tensor is read)."""
    return 4 * inspect_checkpoint(source).params


@contextlib.contextmanager
def unreadable_weights(file: Path) -> Iterator[None]:
    """A truncated or corrupt weights file is the user's to replace, not a bug: say which one."""
    try:
        yield
    except QlabError:
        raise
    except Exception as error:  # safetensors and gguf raise their own types (SafetensorError, ValueError...)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise QlabError(f"{file} is not a readable {file.suffix.lstrip('.')} file ({reason}); re-download or "
                        "re-convert it.") from None


def check_checkpoint(checkpoint: Checkpoint, what: str) -> None:
    """Refuse a config.json that describes far more than the files hold: transformers would fill the gap
    with random weights (and allocate them) instead of failing."""
    if checkpoint.layers and checkpoint.config_layers and checkpoint.config_layers > checkpoint.layers:
        raise QlabError(f"{what}: config.json describes {checkpoint.config_layers} layers but the weight files "
                        f"hold only {checkpoint.layers}; the download is incomplete or the config belongs to another "
                        "model: fetch the missing files or the matching config.")
    if checkpoint.config_params and checkpoint.config_params > 1.1 * checkpoint.params:
        raise QlabError(f"{what}: config.json describes {checkpoint.config_params / 1e9:.2f} B parameters but the "
                        f"weight files hold {checkpoint.params / 1e9:.2f} B; the download is incomplete or the config "
                        "belongs to another model: fetch the missing files or the matching config.")


def memory_needed(checkpoint: Checkpoint, dtype: torch.dtype) -> int:
    """Bytes a layer-streamed sweep of this checkpoint needs on its device (``SWEEP_MEMORY_FACTOR``)."""
    return int(SWEEP_MEMORY_FACTOR * checkpoint.bytes_in(dtype)) + checkpoint.largest_params * dtype.itemsize \
        + RUNTIME_BYTES


def free_memory(placement: str) -> int:
    """Free bytes where a model would go: RAM for "cpu", that GPU's free memory for "cuda:N", every GPU's plus
    RAM for "auto" (accelerate offloads what the GPUs cannot hold)."""
    ram = psutil.virtual_memory().available
    if placement == "cpu":
        return ram
    if placement == "auto":
        return ram + sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    return torch.cuda.mem_get_info(torch.device(placement))[0]


def check_fits(checkpoint: Checkpoint, dtype: torch.dtype, placement: str, what: str) -> None:
    """Refuse before loading when the model and a sweep beside it would not fit in the device's free memory."""
    needed, free = memory_needed(checkpoint, dtype), free_memory(placement)
    if needed <= free:
        return
    where = {"cpu": "of RAM", "auto": "over every GPU and RAM"}.get(placement, f"on {placement}")
    weights = f"{checkpoint.bytes_in(dtype) / 1e9:.1f} GB of {str(dtype).removeprefix('torch.')} weights"
    raise QlabError(f"{what} needs about {needed / 1e9:.1f} GB {where} ({SWEEP_MEMORY_FACTOR}x its {weights}, its "
                    f"largest layer and {RUNTIME_BYTES / 1e9:.0f} GB of working memory) but only {free / 1e9:.1f} GB "
                    "is free; pick a smaller model or another device, or plan it on the Memory page without loading.")


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


def hub_checkpoint(hub_id: str) -> tuple[Checkpoint, int]:
    """A Hub model's ``Checkpoint`` and the bytes its safetensors files would download, from its config.json
    and the files' headers (HTTP range requests): no weight is downloaded."""
    from huggingface_hub import HfApi, hf_hub_download

    try:
        metadata = HfApi().get_safetensors_metadata(hub_id)
        config = _read_config(Path(hf_hub_download(hub_id, "config.json")))
    except Exception as error:  # the hub client raises many types; all mean the same to the user
        raise QlabError(f"could not read the config and weight headers of '{hub_id}' on the Hugging Face Hub "
                        f"({type(error).__name__}); check the id and your access.") from None
    check_config(config, f"'{hub_id}'")
    tensors = [(name, info) for file in metadata.files_metadata.values() for name, info in file.tensors.items()]
    by_dtype: dict[torch.dtype, int] = {}
    for _, info in tensors:
        if (dtype := _HEADER_DTYPES.get(info.dtype)) is not None:
            by_dtype[dtype] = by_dtype.get(dtype, 0) + info.parameter_count
    blocks = {int(m.group(1)) for name, _ in tensors if (m := _BLOCK_INDEX.search(name))}
    checkpoint = Checkpoint(sum(info.parameter_count for _, info in tensors),
                            max(by_dtype, key=by_dtype.get) if by_dtype else _config_dtype(config),
                            max((info.parameter_count for _, info in tensors), default=0), len(blocks) or None,
                            _config_layers(config), _config_params(config))
    download = sum(max((info.data_offsets[1] for info in file.tensors.values()), default=0)
                   for file in metadata.files_metadata.values())
    return checkpoint, download


def cache_dir() -> Path:
    """Where qlab keeps converted models (``QLAB_CACHE_DIR`` or ~/.cache/qlab)."""
    return Path(os.environ.get("QLAB_CACHE_DIR", Path.home() / ".cache" / "qlab"))


def converted_dir(source: ModelSource) -> Path:
    """Where the FP32 safetensors copy of a GGUF lives; a changed file (size or mtime) gets a new copy."""
    stat = (Path(source.path) / source.gguf_file).stat()
    return cache_dir() / "converted" / f"{source.name}-{stat.st_size}-{int(stat.st_mtime)}"


def check_config(config: dict, where: str) -> None:
    if config.get("auto_map"):
        raise QlabError(f"{where} needs custom code (trust_remote_code), which qlab never runs; "
                        "pick a model whose architecture ships with transformers.")
