"""Check qlab's memory planner against a real GPU: `python bench/memory_gpu.py [--dry-run] [--json OUT]`.

For each catalog config (random weights: the layout, not the values, sets the bytes) it builds the model in
bf16 on CUDA, optionally converts its block linears to torchao int8/int4 weight-only (when torchao imports),
runs one prefill per context with ``logits_to_keep=1`` as generate() does, and records
``torch.cuda.max_memory_allocated``. qlab's estimate of the same thing is weights + KV cache + activations
(``MemoryPlan.allocated_bytes``); the runtime overhead is compared separately with the device's used memory,
because the allocator's counters do not see the CUDA context. Goals: weights within 3%, total within 10%.

``--dry-run`` needs no GPU: it writes the estimate rows only (measured fields null).
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

from qlab.analyses import memory  # noqa: E402
from qlab.core.quant import QuantScheme  # noqa: E402
from qlab.models import architectures

MODELS = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b")
CONTEXTS = (512, 2048, 8192)
FORMATS = ("bf16", "int8", "int4")
GOALS = {"weights": 0.03, "total": 0.10}
# qlab's scheme for what each torchao config stores: int8 weight-only keeps one bf16 scale per output row;
# int4 weight-only (tinygemm layout) keeps a bf16 scale and a bf16 zero per group of 128, which qlab would
# store as a 4-bit zero-point, so the estimate is ~0.09 bits per weight under torchao's real storage.
QLAB_SCHEMES = {
    "bf16": QuantScheme("bf16"),
    "int8": QuantScheme("int8", "channel", scale_dtype="bf16"),
    "int4": QuantScheme("int4", "group", 128, symmetric=False, scale_dtype="bf16"),
}
# Activations in bf16, logits of the last position only (logits_to_keep=1), kept in bf16 by transformers.
ASSUMPTIONS = memory.Assumptions(activation_bytes_per_value=2, logits_bytes_per_value=2)


def default_output() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "memory_gpu.json" if out else Path(__file__).resolve().parent / "results" / "memory_gpu.json"


def estimate(model: str, fmt: str, context: int, batch: int, hardware_id: str) -> dict:
    """qlab's figures for one benchmark row (no GPU needed)."""
    plan = memory.plan(model, QLAB_SCHEMES[fmt], context, batch, "bf16", hardware_id, ASSUMPTIONS)
    return {
        "model": model, "format": fmt, "qlab_scheme": plan.scheme_label, "context_tokens": context,
        "batch": batch, "estimated_weights_bytes": plan.weights_bytes,
        "estimated_kv_cache_bytes": plan.kv_cache_bytes,
        "estimated_activations_bytes": plan.activations_bytes,
        "estimated_allocated_bytes": plan.allocated_bytes, "estimated_overhead_bytes": plan.overhead_bytes,
        "estimated_total_bytes": plan.total_bytes,
    }


def _hf_config(model: str):
    import transformers

    config = dict(architectures.get(model).config)
    for key in ("quantization_config", "auto_map", "torch_dtype", "dtype"):
        config.pop(key, None)
    return transformers.AutoConfig.for_model(**config)


def _build(model: str):
    """The catalog architecture with random bf16 weights, created directly on the GPU."""
    import torch
    from transformers import AutoModelForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            network = AutoModelForCausalLM.from_config(_hf_config(model), attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(previous)
    return network.to(torch.bfloat16).eval().requires_grad_(False)


def _torchao_quantize(network, fmt: str) -> None:
    """Weight-only torchao on every block linear; lm_head stays bf16, as qlab's plan assumes by default."""
    import torch
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig() if fmt == "int8" else Int4WeightOnlyConfig(group_size=128)
    quantize_(network, config,
              filter_fn=lambda module, name: isinstance(module, torch.nn.Linear) and "lm_head" not in name)


def _prefill(network, vocab: int, context: int, batch: int) -> None:
    import torch

    ids = torch.randint(0, vocab, (batch, context), device="cuda")
    with torch.inference_mode():
        try:
            out = network(input_ids=ids, use_cache=True, logits_to_keep=1)
        except TypeError:  # transformers before 4.50 names it num_logits_to_keep
            out = network(input_ids=ids, use_cache=True, num_logits_to_keep=1)
    torch.cuda.synchronize()
    del out, ids


def _free() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def measure(models: list[str], formats: list[str], contexts: list[int], batch: int, hardware_id: str) -> list[dict]:
    """Build, quantize and prefill on CUDA; one row per (model, format, context)."""
    import torch

    rows = []
    for model in models:
        vocab = architectures.get(model).vocab_size
        for fmt in formats:
            _free()
            base = torch.cuda.memory_allocated()
            error = None
            network = None
            try:
                network = _build(model)
                param_bytes = sum(p.numel() * p.element_size() for p in network.parameters())
                if fmt != "bf16":
                    _torchao_quantize(network, fmt)
                    _free()
            except Exception as exc:  # torchao missing or a layout this GPU/torch lacks: record, go on
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            weights = torch.cuda.memory_allocated() - base
            for context in contexts:
                row = estimate(model, fmt, context, batch, hardware_id)
                row.update(error=error, param_bytes=None, measured_weights_bytes=None,
                           measured_peak_allocated_bytes=None, measured_peak_reserved_bytes=None,
                           measured_device_used_bytes=None, weights_error=None, total_error=None)
                if error is None:
                    torch.cuda.reset_peak_memory_stats()
                    started = time.perf_counter()
                    try:
                        _prefill(network, vocab, context, batch)
                    except torch.cuda.OutOfMemoryError as exc:
                        row["error"] = f"OutOfMemoryError: {str(exc).splitlines()[0][:200]}"
                    free_bytes, total_bytes = torch.cuda.mem_get_info()
                    peak = torch.cuda.max_memory_allocated() - base
                    row.update(param_bytes=param_bytes if fmt == "bf16" else None,
                               measured_weights_bytes=weights, measured_peak_allocated_bytes=peak,
                               measured_peak_reserved_bytes=torch.cuda.max_memory_reserved(),
                               measured_device_used_bytes=total_bytes - free_bytes,
                               prefill_s=round(time.perf_counter() - started, 3),
                               weights_error=row["estimated_weights_bytes"] / weights - 1,
                               total_error=row["estimated_allocated_bytes"] / peak - 1)
                    _free()
                rows.append(row)
            del network
            _free()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--formats", default=",".join(FORMATS), help="bf16 always; int8/int4 need torchao")
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--hardware", default="h100-sxm-80gb", help="catalog id for the overhead/fit figures")
    parser.add_argument("--dry-run", action="store_true", help="estimates only, no GPU (prints unless --json)")
    parser.add_argument("--json", default=None, metavar="OUT",
                        help="output file (default $OUT/memory_gpu.json or bench/results/memory_gpu.json)")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    unknown = sorted(set(formats) - set(QLAB_SCHEMES))
    if unknown:
        parser.error(f"unknown formats {unknown}; use {', '.join(QLAB_SCHEMES)}")
    payload = {"benchmark": "memory_gpu", "goals": GOALS, "assumptions": vars(ASSUMPTIONS),
               "python": platform.python_version()}
    if args.dry_run:
        payload["rows"] = [estimate(m, f, c, args.batch, args.hardware)
                           for m in models for f in formats for c in contexts]
        text = json.dumps(payload, indent=2)
        if args.json is None:
            print(text)
        else:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text)
        return 0
    import torch
    import transformers

    if not torch.cuda.is_available():
        parser.error("no CUDA device; use --dry-run for the estimates alone")
    try:
        import torchao

        torchao_version = torchao.__version__
    except ImportError:
        torchao_version = None
        payload["skipped"] = [f"{f}: torchao is not importable" for f in formats if f != "bf16"]
        formats = [f for f in formats if f == "bf16"]
    payload.update(device=torch.cuda.get_device_name(0), device_memory_bytes=torch.cuda.mem_get_info()[1],
                   torch=torch.__version__, transformers=transformers.__version__, torchao=torchao_version)
    payload["rows"] = measure(models, formats, contexts, args.batch, args.hardware)
    output = Path(args.json) if args.json else default_output()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(payload, indent=2))
    for row in payload["rows"]:
        if row["error"]:
            print(f"{row['model']:14} {row['format']:5} {row['context_tokens']:6}  {row['error']}")
        else:
            print(f"{row['model']:14} {row['format']:5} {row['context_tokens']:6}  weights "
                  f"{row['weights_error']:+.2%}  total {row['total_error']:+.2%}")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
