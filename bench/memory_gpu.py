"""Check qlab's memory planner against a real GPU: `python bench/memory_gpu.py [--measure-only | --reestimate IN]`.

For each catalog config (random weights: the layout, not the values, sets the bytes) it builds the model in
bf16 on CUDA, optionally converts its block linears with torchao (int8 and int4 weight-only, fp8 dynamic), and
runs what transformers' ``generate`` runs: one prefill with ``use_cache=True`` and ``logits_to_keep=1`` (its
DynamicCache), then one decode step on that cache. It records the bytes the weights hold, the prefill's
``torch.cuda.max_memory_allocated`` (the peak), what stays allocated after it (weights + the cache, sliding
layers still holding the whole prompt), and what stays after the decode step (sliding layers trimmed to their
window: the steady state). qlab's ``transformers`` runtime plan estimates the same three numbers.

A model too large for one GPU is measured at reduced depth: ``--override num_hidden_layers=4,
first_k_dense_replace=3`` changes the catalog config before both the build and the estimate (DeepSeek-V3: three
dense layers and one MoE layer with all 256 experts, MLA in every layer); each row records its overrides. Every
row also records the bytes of the cache's own tensors after the prefill (what transformers stores per layer), so
the KV estimate is checked apart from the allocator. ``--device cpu`` is a smoke run of the same steps (no
allocator figures).

Measurement and estimate are separate steps, so the committed measurements can be re-estimated by a newer
planner without a GPU: ``--measure-only`` writes measured rows; ``--reestimate IN`` adds qlab's estimates to
them (what ``bench/results/memory_gpu.json`` holds). Goals: weights within 1 %, peak within 3 %.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qlab.analyses import memory, runtimes  # noqa: E402
from qlab.models import architectures  # noqa: E402

# (model, format) in the order they are measured: the first rows are the ones a short lease must not miss.
DENSE = ("llama-3.1-8b", "mistral-7b", "gemma-2-9b", "qwen3-8b", "gemma-3-1b", "phi-3-mini", "qwen2.5-7b")
LARGE = ("gpt-oss-20b", "qwen3-30b-a3b", "mistral-small-24b", "gemma-2-27b", "llama-3.2-3b", "llama-3.2-1b")
QUANTIZED = ("llama-3.1-8b", "gemma-2-9b", "qwen3-8b", "mistral-7b", "gemma-3-1b", "qwen2.5-7b", "phi-3-mini")
PLAN = ([(m, "bf16") for m in DENSE]
        + [(m, f) for m in QUANTIZED[:4] for f in ("int8", "int4", "fp8")]
        + [(m, "bf16") for m in LARGE]
        + [(m, f) for m in QUANTIZED[4:] for f in ("int8", "int4", "fp8")])
# The other two transformers caches, measured on a few models: the static cache (preallocated for prompt and
# output, sliding layers at their window) and the offloaded one (layers copied to the CPU after their update).
CACHES = {"llama-3.1-8b": ("static", "offloaded"), "gemma-3-1b": ("static", "offloaded"), "mistral-7b": ("static",)}
CONTEXTS = (2048, 8192, 32768)
FORMATS = ("bf16", "int8", "int4", "fp8")
GOALS = {"weights": 0.01, "peak": 0.03}
CUBLAS = runtimes.CUBLAS_WORKSPACE_BYTES
# torchao 0.18 stores each format in one layout, and qlab plans it as that layout (qlab.core.layouts).
TORCHAO_LAYOUTS = {"bf16": None, "int8": "torchao-int8-weight-only", "int4": "torchao-int4-tile-packed",
                   "fp8": "torchao-fp8-per-row"}


def default_output() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "memory_gpu.json" if out else Path(__file__).resolve().parent / "results" / "memory_gpu.json"


def config(model: str, overrides: dict | None = None) -> dict | str:
    """The catalog slug, or its config.json with ``overrides`` applied (a reduced-depth variant)."""
    if not overrides:
        return model
    return {**architectures.get(model).config, **overrides}


def parse_overrides(text: str | None) -> dict:
    """``key=value,key=value`` with JSON values (``num_hidden_layers=4``) into a dict."""
    pairs = [item.split("=", 1) for item in (text or "").split(",") if item.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"--override takes key=value pairs separated by commas, got '{text}'")
    return {key.strip(): json.loads(value) for key, value in pairs}


def estimate(model: str, fmt: str, context: int, batch: int, hardware_id: str, runtime: str = "transformers",
             eager: bool = False, workspace_in_base: bool = False, overrides: dict | None = None) -> dict:
    """qlab's figures for one benchmark row (no GPU needed): the runtime's prefill peak and steady decode
    state as torch's allocator sees them (no CUDA context). ``workspace_in_base``: the row's baseline already
    held cuBLAS's workspace (every model after the first in one process), so it is not part of the row."""
    plan = memory.plan(config(model, overrides), memory.weight_spec(TORCHAO_LAYOUTS[fmt] or "bf16"), context, batch,
                       "bf16",
                       hardware_id, memory.Assumptions(runtime=runtime, attention_scores_materialised=eager))
    workspace = runtimes.CUBLAS_WORKSPACE_BYTES if workspace_in_base else 0
    rounding = plan.peak.bytes_of("allocator block rounding")
    return {"qlab_scheme": plan.scheme_label, "estimated_weights_bytes": plan.weights_bytes,
            "estimated_weights_allocated_bytes": plan.weights_bytes + rounding,
            "estimated_kv_peak_bytes": plan.peak.kv_bytes, "estimated_kv_steady_bytes": plan.steady.kv_bytes,
            "estimated_peak_allocated_bytes": plan.peak.allocated_bytes - workspace,
            "estimated_steady_allocated_bytes": plan.steady.allocated_bytes - workspace,
            # What stays allocated between decode steps: weights, the trimmed cache, the workspace.
            "estimated_steady_held_bytes": sum(c.bytes for c in plan.steady.components
                                               if c.kind in ("weights", "kv") and c.on_device) + CUBLAS - workspace,
            "estimated_peak_components": {c.name: c.bytes for c in plan.peak.components if c.in_allocator}}


def with_estimates(row: dict, hardware_id: str, workspace_in_base: bool) -> dict:
    """A measured row with qlab's estimate and the relative errors (estimate / measured - 1); the steady state
    is compared with what stays allocated after one decode step (sliding layers trimmed to their window)."""
    row = {**row, **estimate(row["model"], row["format"], row["context_tokens"], row["batch"], hardware_id,
                             row.get("runtime", "transformers"), row.get("attention") == "eager", workspace_in_base,
                             row.get("config_overrides"))}
    row["base_holds_cublas_workspace"] = workspace_in_base
    if row.get("measured_cache_bytes"):
        row["kv_error"] = row["estimated_kv_peak_bytes"] / row["measured_cache_bytes"] - 1
    for key, measured, estimated in (
            ("weights", "measured_weights_bytes", "estimated_weights_allocated_bytes"),
            ("peak", "measured_peak_allocated_bytes", "estimated_peak_allocated_bytes"),
            ("steady", "measured_after_decode_bytes", "estimated_steady_held_bytes")):
        row[f"{key}_error"] = row[estimated] / row[measured] - 1 if row.get(measured) else None
    return row


MEASURED = ("measured_weights_bytes", "measured_stored_weights_bytes", "measured_peak_allocated_bytes",
            "measured_after_prefill_bytes", "measured_decode_peak_bytes", "measured_after_decode_bytes")


def estimated_rows(rows: list[dict], hardware_id: str) -> list[dict]:
    """Estimates for every measured row. cuBLAS's workspace is in the baseline of every model but the first of
    its process, as the row records (``base_holds_cublas_workspace``); rows without that record count as one
    process. Rows that could not be measured keep their error, with every measured field null, so all rows
    share one schema."""
    first = next(((r["model"], r["format"]) for r in rows if r.get("measured_peak_allocated_bytes")), None)
    rows = [{**dict.fromkeys(MEASURED), **r} for r in rows]
    return [with_estimates(r, hardware_id, r.get("base_holds_cublas_workspace",
                                                 (r["model"], r["format"]) != first))
            if r.get("measured_peak_allocated_bytes") or r.get("measured_cache_bytes") else r for r in rows]


# --- measurement (CUDA only) ----------------------------------------------------------------------------


def _hf_config(model: str, overrides: dict | None = None):
    import transformers

    config = {**architectures.get(model).config, **(overrides or {})}
    for key in ("quantization_config", "auto_map", "torch_dtype", "dtype"):
        config.pop(key, None)
    return transformers.AutoConfig.for_model(**config)


def _build(model: str, overrides: dict | None = None, device: str = "cuda"):
    """The catalog architecture with random bf16 weights, created directly on the GPU.

    SDPA where the family supports it, else what transformers falls back to (Gemma-2's soft-capping and
    gpt-oss's sinks are eager-only): the row records which ran.
    """
    import torch
    from transformers import AutoModelForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            try:
                network = AutoModelForCausalLM.from_config(_hf_config(model, overrides), attn_implementation="sdpa")
            except ValueError:
                network = AutoModelForCausalLM.from_config(_hf_config(model, overrides), attn_implementation="eager")
    finally:
        torch.set_default_dtype(previous)
    return network.to(torch.bfloat16).eval().requires_grad_(False)


def _torchao_quantize(network, fmt: str) -> None:
    """torchao on every block linear; lm_head stays bf16, as qlab's plan assumes by default."""
    import torch
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Int4WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
        quantize_,
    )

    config = {"int8": lambda: Int8WeightOnlyConfig(),
              # The default int4 layout needs the mslk kernel package; the tinygemm tile layout ships with torch.
              "int4": lambda: Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"),
              "fp8": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())}[fmt]()
    quantize_(network, config,
              filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and "lm_head" not in name)


def _stored_bytes(network) -> int:
    """Bytes of the distinct storages behind parameters and buffers (torchao tensors: their inner tensors):
    the layout itself, without the caching allocator's block rounding."""
    seen, total = set(), 0

    def add(tensor) -> None:
        nonlocal total
        if hasattr(tensor, "__tensor_flatten__"):
            for name in tensor.__tensor_flatten__()[0]:
                add(getattr(tensor, name))
            return
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()

    for tensor in [*network.parameters(), *network.buffers()]:
        add(tensor)
    return total


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _allocated(device: str, peak: bool = False) -> int:
    """torch.cuda's (peak) allocated bytes; 0 on the CPU, where a smoke run measures no allocator."""
    import torch

    if device != "cuda":
        return 0
    return torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()


def _cache_bytes(cache) -> int | None:
    """Bytes of the tensors a DynamicCache holds (every layer's keys and values), as transformers stores them."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    return sum(t.nbytes for layer in layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
               if t is not None)


def _cache(network, kind: str, context: int):
    """None lets the model make its DynamicCache, as generate() does; the others are made up front."""
    from transformers import DynamicCache, StaticCache

    if kind == "static":
        return StaticCache(config=network.config, max_cache_len=context + 1)
    if kind == "offloaded":
        return DynamicCache(config=network.config, offloading=True)
    return None


def _step(network, ids, cache=None):
    import torch

    with torch.inference_mode():
        out = network(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return out


def _measure_contexts(network, model: str, fmt: str, contexts: list[int], batch: int, base: int,
                      weights: int, stored: int, overrides: dict, device: str) -> list[dict]:
    import torch

    cuda = device == "cuda"
    vocab = network.config.vocab_size
    attention = network.config._attn_implementation
    kinds = ("dynamic", *CACHES.get(model, ())) if fmt == "bf16" and not overrides else ("dynamic",)
    rows = []
    for context, kind in ((c, k) for c in contexts for k in kinds):
        row = {"model": model, "format": fmt, "context_tokens": context, "batch": batch, "error": None,
               "runtime": "transformers" if kind == "dynamic" else f"transformers-{kind}",
               "attention": attention, "measured_weights_bytes": weights if cuda else None,
               "measured_stored_weights_bytes": stored}
        if overrides:
            row["config_overrides"] = overrides
        if hasattr(network.config, "_experts_implementation"):
            row["experts_implementation"] = network.config._experts_implementation
        _free()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            ids = torch.randint(0, vocab, (batch, context), device=device)
            out = _step(network, ids, _cache(network, kind, context))
            if cuda:
                row["measured_peak_allocated_bytes"] = _allocated(device, peak=True) - base
                row["measured_after_prefill_bytes"] = _allocated(device) - base
            row["prefill_s"] = round(time.perf_counter() - started, 3)
            cache, last = out.past_key_values, out.logits[:, -1:].argmax(-1)
            row["measured_cache_bytes"] = _cache_bytes(cache) if kind == "dynamic" else None
            del out, ids
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            out = _step(network, last, cache)
            del out, last
            if cuda:
                row["measured_decode_peak_bytes"] = _allocated(device, peak=True) - base
                row["measured_after_decode_bytes"] = _allocated(device) - base
            del cache
        except torch.cuda.OutOfMemoryError as exc:
            row["error"] = f"OutOfMemoryError: {str(exc).splitlines()[0][:160]}"
        except Exception as exc:  # a cache kind this transformers lacks: record it, keep the other rows
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        if cuda:
            row["measured_peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        rows.append(row)
    return rows


def measure(plan: list[tuple[str, str]], contexts: list[int], batch: int, budget_s: float, sink,
            overrides: dict | None = None, device: str = "cuda") -> list[dict]:
    """Build (with ``overrides`` on the catalog config), quantize, prefill and decode, one row per (model,
    format, context), within a time budget."""
    rows, started, warm = [], time.perf_counter(), False
    for model, fmt in plan:
        arch = architectures.get(model)
        usable = [c for c in contexts if not arch.max_context_tokens or c <= arch.max_context_tokens]
        if time.perf_counter() - started > budget_s:
            rows += [{"model": model, "format": fmt, "context_tokens": c, "batch": batch,
                      "error": "not measured: the time budget ran out"} for c in usable]
            continue
        _free()
        done = len(rows)
        base = _allocated(device)
        network, error = None, None
        try:
            network = _build(model, overrides, device)
            if fmt != "bf16":
                _torchao_quantize(network, fmt)
                _free()
        except Exception as exc:  # a torchao layout this GPU/torch lacks, or OOM: record it and go on
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if error is None:
            weights = _allocated(device) - base
            rows += _measure_contexts(network, model, fmt, usable, batch, base, weights, _stored_bytes(network),
                                      overrides or {}, device)
            # The first forward of a process allocates cuBLAS's workspace, which later baselines hold.
            for row in rows[done:]:
                row["base_holds_cublas_workspace"] = warm
            warm = True
        else:
            rows += [{"model": model, "format": fmt, "context_tokens": c, "batch": batch, "error": error}
                     for c in usable]
        del network
        _free()
        sink(rows)
        for row in rows[done:]:
            result = row.get("error") or (f"peak {row['measured_peak_allocated_bytes'] / 1e9:.3f} GB"
                                          if row.get("measured_peak_allocated_bytes") else
                                          f"cache {row.get('measured_cache_bytes')} B")
            print(f"{model:18} {fmt:5} {row['context_tokens']:6} {row.get('runtime', '')} {result}", flush=True)
    return rows


def report(rows: list[dict]) -> None:
    """One line per estimated row: the relative error of each compared figure."""
    for row in rows:
        errors = [f"{key} {row[f'{key}_error']:+.2%}" for key in ("weights", "peak", "steady", "kv")
                  if row.get(f"{key}_error") is not None]
        if errors:
            print(f"{row['model']:18} {row['format']:5} {row['context_tokens']:6} {row.get('runtime', ''):22} "
                  + "  ".join(errors), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated catalog slugs (default: the built-in plan)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="bf16, int8, int4, fp8 (torchao)")
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no new model after this many seconds")
    parser.add_argument("--hardware", default="h200-sxm-141gb", help="catalog id for the fit figures")
    parser.add_argument("--measure-only", action="store_true", help="GPU rows without qlab's estimates")
    parser.add_argument("--reestimate", default=None, metavar="IN",
                        help="add the current planner's estimates to measured rows (no GPU)")
    parser.add_argument("--json", default=None, metavar="OUT",
                        help="output file (default $OUT/memory_gpu.json or bench/results/memory_gpu.json)")
    parser.add_argument("--override", default=None, metavar="KEY=VALUE,...",
                        help="change the catalog config before building and estimating (a reduced-depth model)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: a smoke run of the same steps, the cache's bytes only (no allocator figures)")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.override)
    except ValueError as exc:
        parser.error(str(exc))
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        parser.error(f"unknown formats {unknown}; use {', '.join(FORMATS)}")
    output = Path(args.json) if args.json else default_output()

    def write(payload: dict) -> None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(payload, indent=1) + "\n")

    if args.reestimate:
        payload = json.loads(Path(args.reestimate).read_text())
        payload.update(goals=GOALS, runtime="transformers", estimated_by="qlab.analyses.memory.plan (runtime "
                       "transformers), recomputed from the stored measurements by --reestimate")
        payload["rows"] = estimated_rows(payload["rows"], args.hardware)
        write(payload)
        report(payload["rows"])
        return 0
    import torch
    import transformers

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device; use --reestimate on measured rows instead (or --device cpu for a smoke run)")
    try:
        import torchao

        torchao_version = torchao.__version__
    except ImportError:
        torchao_version = None
    plan = PLAN if args.models is None else [(m.strip(), f) for m in args.models.split(",") if m.strip()
                                             for f in formats]
    plan = [(m, f) for m, f in plan if f in formats and (f == "bf16" or torchao_version)]
    cuda = args.device == "cuda"
    free_bytes, total_bytes = torch.cuda.mem_get_info() if cuda else (None, None)
    payload = {"benchmark": "memory_gpu", "goals": GOALS, "python": platform.python_version(),
               "device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke run)",
               "device_memory_bytes": total_bytes,
               # What the CUDA context and libraries take before any tensor: outside max_memory_allocated.
               "context_bytes": total_bytes - free_bytes - torch.cuda.memory_reserved() if cuda else None,
               "config_overrides": overrides or None,
               "torch": torch.__version__, "transformers": transformers.__version__, "torchao": torchao_version,
               "allocator_config": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
               "rows": []}

    def sink(rows: list[dict]) -> None:
        payload["rows"] = rows
        write(payload)

    rows = measure(plan, [int(c) for c in args.contexts.split(",") if c.strip()], args.batch, args.budget_s, sink,
                   overrides, args.device)
    if not args.measure_only:
        rows = estimated_rows(rows, args.hardware)
        sink(rows)
        report(rows)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
