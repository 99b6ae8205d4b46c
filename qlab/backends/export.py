"""Save a model quantized by a real backend so it can be reloaded, with the scheme that made it.

An export directory holds ``model.safetensors`` (or ``model.gguf`` for llama.cpp), the base model's
``config.json``, its tokenizer files when it has them, and ``qlab_scheme.json``: qlab's version, the backend,
the QuantScheme (and per-layer map) that simulates it, the base model's name and SHA-256, the library's own
quantization map and the weight file's SHA-256. Nothing is pickled, and reloading runs no remote code: the
model is rebuilt from ``config.json`` with transformers' own classes and the tensors are read with safetensors.

- optimum-quanto (the documented path): ``safetensors.torch.save_file(model.state_dict())`` plus
  ``quantization_map(model)``; reload builds the model with empty weights, then ``requantize``.
- torchao: its tensor subclasses are flattened to plain tensors plus JSON metadata by
  ``torchao.prototype.safetensors`` (``flatten_tensor_state_dict``), which rebuilds only an allow-list of its own
  classes (Int8Tensor, Float8Tensor, Int4 layouts...) on load.
- llama.cpp: the quantized GGUF file is already a file; it is copied.

Simulated schemes have no quantized kernels to save: their exact recipe is the per-layer scheme JSON
(``qlab.store.scheme_export``, ``python -m qlab export --scheme-json``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlab.core.errors import QlabError
from qlab.core.files import partial_path, remove_stale_partials
from qlab.models.loading import LoadedModel

EXPORT_FORMAT = "qlab-quantized-model"
SCHEME_FILE = "qlab_scheme.json"
WEIGHTS_FILE = "model.safetensors"
GGUF_FILE = "model.gguf"
# Libraries (PyPI names, as ``Backend.library``) whose quantized models can be written without pickles.
SERIALISABLE = ("optimum-quanto", "torchao", "llama-cpp-python")
# Why the other libraries' models cannot be: shown when one is asked for.
NOT_SERIALISABLE = {
    "torch": "torch.ao's dynamic INT8 modules keep their weights in packed C++ objects that safetensors cannot "
             "hold (only pickles), and fp32/bf16 are the base model itself",
    "onnxruntime": "ONNX Runtime's model lives in its own session; export the ONNX graph with onnxruntime tools",
    "bitsandbytes": "bitsandbytes runs only on CUDA here",
}


@dataclass(frozen=True)
class ExportResult:
    """What ``export_quantized`` wrote: the directory, its files and their sizes."""

    out_dir: Path
    backend: str
    files: tuple[str, ...]
    weights_file: str
    weights_bytes: int
    total_bytes: int
    seconds: float

    def to_record(self) -> dict:
        return {"out_dir": str(self.out_dir), "backend": self.backend, "files": list(self.files),
                "weights_file": self.weights_file, "weights_bytes": self.weights_bytes,
                "total_bytes": self.total_bytes, "seconds": round(self.seconds, 3)}


def exportable() -> list[str]:
    """Slugs of the backends whose quantized models can be exported (available here or not)."""
    from qlab import backends

    return [b.slug for b in backends.all_backends() if b.library in SERIALISABLE]


def _backend(slug: str):
    from qlab import backends

    can = ", ".join(exportable())
    try:
        backend = backends.get_backend(slug)
    except QlabError:
        raise QlabError(f"unknown backend '{slug}'; backends that can export: {can}.") from None
    if backend.library not in SERIALISABLE:
        why = NOT_SERIALISABLE.get(backend.library, f"{backend.library} has no safetensors format")
        raise QlabError(f"{backend.slug} cannot be exported ({why}); backends that can export: {can}.")
    return backend


def exports_root() -> Path:
    """``exports/`` beside the run database (``$QLAB_DB`` or the default): where the dashboard saves."""
    from qlab.core.paths import resolve_path

    return resolve_path().parent / "exports"


def default_out_dir(model_name: str, backend_slug: str) -> Path:
    """``<qlab data dir>/exports/<model>-<backend>``."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
    return exports_root() / f"{safe}-{backend_slug}"


def named_out_dir(name: str) -> Path:
    """A folder *name* typed in the dashboard, placed under ``exports_root()``: someone at the browser never
    chooses a path on the server (the CLI's ``--out`` is for the person at the shell)."""
    name = name.strip()
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", name):
        raise QlabError(f"'{name[:40]}' is not a folder name; use letters, digits, '-', '_' and '.' (no slashes), "
                        f"it is created under {exports_root()}.")
    return exports_root() / name


def _prepare(out_dir: Path, force: bool) -> Path:
    """A fresh sibling directory to write into (renamed over ``out_dir`` at the end, so a failed or killed
    export never leaves half a model behind). ``force`` replaces only an earlier qlab export: a mistyped
    ``--out ~ --force`` must never delete a home directory."""
    if out_dir == out_dir.parent:
        raise QlabError(f"{out_dir} is a filesystem root; choose a directory for the export with --out.")
    if out_dir.exists() and not out_dir.is_dir():
        raise QlabError(f"{out_dir} exists and is not a directory; choose another --out.")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise QlabError(f"{out_dir} is not empty; choose an empty or new directory, or pass --force to "
                            "replace an earlier export.")
        if not _is_export(out_dir):
            raise QlabError(f"{out_dir} is not empty and holds no qlab export (its own weight file, checked "
                            "against qlab_scheme.json, and no folders); --force only replaces an earlier export, "
                            "so choose an empty or new directory.")
    partial = partial_path(out_dir, hidden=True)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(out_dir, hidden=True)  # what a killed export left
        if out_dir.exists():  # (a kill between _publish's two renames leaves the earlier export aside: kept)
            remove_stale_partials(_aside(out_dir), hidden=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    except OSError as error:
        raise QlabError(f"cannot write to {out_dir.parent} ({error.strerror}); choose a writable --out.") from None
    return partial


def check_out_dir(out_dir: Path, force: bool) -> None:
    """Raise the one-line error ``_prepare`` would, before long work starts, leaving nothing behind."""
    _prepare(out_dir, force).rmdir()


def _is_export(directory: Path) -> bool:
    """Whether ``directory`` is what ``export_quantized`` wrote: a readable scheme whose weight file is there
    and matches its SHA-256, and nothing but plain files (a look-alike ``qlab_scheme.json`` dropped into a
    user's folder of models or projects is not enough for ``--force`` to delete it)."""
    try:
        record = read_scheme(directory)
        weights = directory / (GGUF_FILE if record["library"] == "llama-cpp-python" else WEIGHTS_FILE)
        entries = list(directory.iterdir())
        return all(stat.S_ISREG(entry.lstat().st_mode) for entry in entries) and weights.is_file() \
            and file_sha256(weights) == record.get("weights_sha256")
    except (QlabError, OSError):
        return False


def _aside(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".replaced")


def _publish(partial: Path, out_dir: Path) -> None:
    """Rename the finished export into place; an earlier one is moved aside first and only then deleted, so a
    failure never leaves half of either."""
    old = partial_path(_aside(out_dir), hidden=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    try:
        os.replace(partial, out_dir)
    except OSError:
        if old.exists():
            os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    from qlab.backends.quanto import _OutsideInferenceMode

    return model.model if isinstance(model, _OutsideInferenceMode) else model


def without_aliases(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The state dict with tied tensors kept once (safetensors refuses shared storage), and alias -> kept name."""
    kept: dict[str, Any] = {}
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        if type(tensor) is torch.Tensor:  # quantized subclasses are never tied
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
            if key in seen:
                aliases[name] = seen[key]
                continue
            seen[key] = name
            tensor = tensor.contiguous()
        kept[name] = tensor
    return kept, aliases


def _write_quanto(model: torch.nn.Module, directory: Path) -> dict:
    from optimum.quanto import quantization_map
    from safetensors.torch import save_file

    inner = _unwrapped(model)
    tensors, aliases = without_aliases(inner.state_dict())
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    return {"quantization_map": quantization_map(inner), "tied": aliases}


def _write_torchao(model: torch.nn.Module, directory: Path) -> dict:
    from safetensors.torch import save_file
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    state, aliases = without_aliases(model.state_dict())
    quantized = {name: type(t).__name__ for name, t in state.items() if type(t) is not torch.Tensor}
    try:
        tensors, metadata = flatten_tensor_state_dict(state)
    except ValueError as error:  # a tensor subclass outside torchao's safetensors allow-list
        raise QlabError(f"torchao cannot write this model to safetensors ({error}); export another backend.") from None
    save_file({k: v.contiguous() for k, v in tensors.items()}, directory / WEIGHTS_FILE,
              metadata={"format": "pt", **metadata})
    return {"quantization_map": quantized, "tied": aliases}


def _write_gguf(model: Any, directory: Path) -> dict:
    shutil.copyfile(model.path, directory / GGUF_FILE)
    return {"quantization_map": model.tensor_types(), "tied": {}}


WRITERS = {"optimum-quanto": _write_quanto, "torchao": _write_torchao, "llama-cpp-python": _write_gguf}
# qlab's own schemes written in the layout serving engines read (qlab.backends.export_compressed).
COMPRESSED_TENSORS = "compressed-tensors"


def export_quantized(loaded: LoadedModel, backend_slug: str, out_dir: str | os.PathLike,
                     force: bool = False) -> ExportResult:
    """Quantize ``loaded`` with a real backend (on the CPU) and save it to ``out_dir`` for ``load_exported``.

    ``out_dir`` must be new or empty unless ``force``; the shared ``loaded`` model is not changed.
    """
    from qlab import __version__
    from qlab.core.plan import layer_scheme_map, unquantized_format, weights_dtype
    from qlab.models.loading import model_sha256

    started = time.perf_counter()
    backend = _backend(backend_slug)
    out_dir = Path(out_dir).expanduser().resolve()
    with staged(out_dir, force) as partial:
        model = backend.apply(loaded, "cpu")
        written = WRITERS[backend.library](model, partial)
        loaded.model.config.to_json_file(partial / "config.json")
        if hasattr(loaded.tokenizer, "save_pretrained"):
            loaded.tokenizer.save_pretrained(partial)
        weights = GGUF_FILE if backend.library == "llama-cpp-python" else WEIGHTS_FILE
        plan = backend.twin(loaded.model)
        record = {
            "format": EXPORT_FORMAT, "qlab": __version__, "backend": backend.slug, "library": backend.library,
            "library_version": package_version(backend.library), "torch": torch.__version__,
            "model": loaded.name, "model_kind": loaded.kind, "model_sha256": model_sha256(loaded),
            "scheme": plan.to_dict() if hasattr(plan, "to_dict") else None,
            "layers": layer_scheme_map(loaded.model, plan), "unquantized_format": unquantized_format(plan, weights_dtype(loaded.model)),
            "weights_file": weights, "weights_sha256": file_sha256(partial / weights), **written,
        }
        (partial / SCHEME_FILE).write_text(json.dumps(record, indent=1))
        files = tuple(sorted(p.name for p in partial.iterdir()))
        total = sum(p.stat().st_size for p in partial.iterdir())
        weights_bytes = (partial / weights).stat().st_size
    return ExportResult(out_dir, backend.slug, files, weights, weights_bytes, total, time.perf_counter() - started)


@contextmanager
def staged(out_dir: Path, force: bool) -> Iterator[Path]:
    """A fresh hidden directory to write an export into, renamed over ``out_dir`` when the block ends without
    an error and deleted when it raises; ``out_dir`` is checked first (see ``_prepare``)."""
    partial = _prepare(out_dir, force)
    try:
        yield partial
        _publish(partial, out_dir)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise QlabError(f"cannot write the export to {out_dir} ({error.strerror or error}); choose a writable "
                        "--out with free space.") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def read_scheme(out_dir: str | os.PathLike) -> dict:
    """The ``qlab_scheme.json`` of an export directory (QlabError if it is not one)."""
    path = Path(out_dir).expanduser() / SCHEME_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise QlabError(f"{path.parent} is not a qlab export (no readable {SCHEME_FILE}); export it with "
                        "`python -m qlab export`.") from None
    if record.get("format") != EXPORT_FORMAT or record.get("library") not in (*WRITERS, COMPRESSED_TENSORS):
        raise QlabError(f"{path} is not a qlab quantized-model export; export it with `python -m qlab export`.")
    return record


def load_exported(out_dir: str | os.PathLike, verify: bool = True) -> torch.nn.Module:
    """Rebuild an exported quantized model on the CPU: transformers' class from ``config.json`` with empty
    weights, then the library's own reload path. ``verify`` checks the weight file's SHA-256 first."""
    directory = Path(out_dir).expanduser()
    record = read_scheme(directory)
    # Derived from the library, never taken from the JSON: a hand-edited name must not point outside the export.
    weights = directory / (GGUF_FILE if record["library"] == "llama-cpp-python" else WEIGHTS_FILE)
    if not weights.is_file():
        raise QlabError(f"{weights} is missing; export the model again.")
    if verify and file_sha256(weights) != record["weights_sha256"]:
        raise QlabError(f"{weights} does not match the SHA-256 in {SCHEME_FILE}; it was changed or truncated, "
                        "export the model again.")
    if record["library"] == COMPRESSED_TENSORS:  # transformers reads the layout itself, as a serving user would
        from transformers import AutoModel, AutoModelForCausalLM, CompressedTensorsConfig

        model_class = AutoModelForCausalLM if record["model_kind"] == "causal-lm" else AutoModel
        # transformers 5.23's compressed route sizes an asymmetric zero-point unpacked and refuses the packed one
        # (llm-compressor issue 1618); dequantizing at load reads it.
        dequantize = not (record.get("scheme") or {}).get("symmetric", True)
        config = CompressedTensorsConfig(dequantize=True) if dequantize else None
        return model_class.from_pretrained(directory, trust_remote_code=False, quantization_config=config
                                           ).eval().requires_grad_(False)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
    if record["library"] == "llama-cpp-python":
        import tempfile

        from qlab.backends.llamacpp import LlamaCppModel

        # LlamaCppModel deletes its scratch directory when collected: give it an empty one, not the export.
        return LlamaCppModel(weights, Path(tempfile.mkdtemp(prefix="qlab-gguf-")), torch.get_num_threads(), config)
    model = _empty_model(config, record["model_kind"])
    if record["library"] == "optimum-quanto":
        from optimum.quanto import requantize
        from safetensors.torch import load_file

        from qlab.backends.quanto import _OutsideInferenceMode

        requantize(model, load_file(weights), record["quantization_map"], device=torch.device("cpu"))
        _check_tied(model, record["tied"])
        return _OutsideInferenceMode(model.eval().requires_grad_(False))
    from safetensors import safe_open
    from safetensors.torch import load_file
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    with safe_open(weights, framework="pt") as handle:
        metadata = handle.metadata()
    state, leftover = unflatten_tensor_state_dict(load_file(weights), metadata)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if leftover or unexpected or set(missing) - set(record["tied"]):
        raise QlabError(f"{weights} does not fit the model in config.json ({len(missing)} missing, "
                        f"{len(unexpected) + len(leftover)} unexpected tensors); export the model again.")
    _check_tied(model, record["tied"])
    return model.eval().requires_grad_(False)


def _empty_model(config, kind: str) -> torch.nn.Module:
    """transformers' own class for ``config``, parameters on the meta device (no RAM, no random init); buffers
    stay real, because non-persistent ones (rotary frequencies, position ids) are not in the weight file."""
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    model_class = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    with init_empty_weights(include_buffers=False):
        return model_class.from_config(config, trust_remote_code=False)


def _check_tied(model: torch.nn.Module, tied: dict[str, str]) -> None:
    """Re-tie the tensors that were saved once (the rebuild replaced the tied parameter), and make sure
    nothing is left on the meta device."""
    if tied:
        model.tie_weights()
    state = model.state_dict()
    for alias, kept in tied.items():
        if state[alias].data_ptr() != state[kept].data_ptr():
            raise QlabError(f"'{alias}' could not be tied to '{kept}' on reload; export the model again.")
    empty = [name for name, t in state.items() if getattr(t, "is_meta", False)]
    if empty:
        raise QlabError(f"{len(empty)} tensor(s) were not in the export (e.g. '{empty[0]}'); export the model again.")
