"""``python -m qlab memory``: the VRAM planner headless (weights + scales, KV cache, activations, fit verdict)."""

from __future__ import annotations

import argparse

from qlab.cli.common import add_scheme_arguments, db_option, emit, json_option, scheme_from_args

DEFAULT_MODEL = "llama-3.1-8b"
DEFAULT_HARDWARE = "h100-sxm-80gb"
# Catalog LLM widths are multiples of 128, the group size GPTQ/AWQ checkpoints ship with.
DEFAULT_GROUP_SIZE = 128


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``memory`` subcommand to qlab's parser."""
    from qlab.analyses.memory import KV_DTYPES

    parser = subparsers.add_parser(
        "memory", help="plan memory: weights with scales, KV cache, activations, overhead; fit per target")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="catalog slug or HF id (e.g. llama-3.1-8b, meta-llama/Llama-3.1-8B)")
    parser.add_argument("--config-file", default=None, metavar="PATH",
                        help="plan any Hugging Face config.json instead of a catalog model")
    parser.add_argument("--format", default="int4", help="weight format from the registry (qlab formats)")
    add_scheme_arguments(parser, granularity="group")
    parser.set_defaults(group_size=DEFAULT_GROUP_SIZE)
    parser.add_argument("--context", type=int, default=8192, help="tokens per sequence (prompt + output)")
    parser.add_argument("--batch", type=int, default=1, help="sequences served at once")
    parser.add_argument("--kv-dtype", default="fp16", help=" | ".join(KV_DTYPES))
    parser.add_argument("--hardware", default=DEFAULT_HARDWARE,
                        help="target id, or several comma-separated; 'all' for the whole catalog")
    parser.add_argument("--gpu-overhead-bytes", type=int, default=None,
                        help="runtime overhead per GPU (default 1 GiB: CUDA context + allocator slack)")
    parser.add_argument("--prefill-chunk", type=int, default=None, metavar="TOKENS",
                        help="prefill in chunks of this many tokens (default: the whole prompt at once)")
    parser.add_argument("--eager-attention", action="store_true",
                        help="count materialised attention scores (eager attention, no FlashAttention/SDPA)")
    parser.add_argument("--quantize-lm-head", action="store_true",
                        help="quantize an untied output head with the blocks (default: keep it at 16 bits)")
    db_option(parser, "also store the plan and its verdicts in this run database (default: $QLAB_DB if set)")
    json_option(parser, "print the plan as JSON")
    parser.set_defaults(func=cmd_memory)
    return parser


def build_plan(args: argparse.Namespace):
    """The MemoryPlan the parsed arguments describe (shared by the JSON and the text output)."""
    from qlab.analyses import memory
    from qlab.models import architectures, hardware

    model = (architectures.from_config_file(args.config_file) if args.config_file
             else args.model)
    ids = [h.strip() for h in args.hardware.split(",") if h.strip()]
    if ids == ["all"]:
        ids = [h.id for h in hardware.catalog()]
    defaults = memory.Assumptions()
    assumptions = memory.Assumptions(
        gpu_overhead_bytes=defaults.gpu_overhead_bytes if args.gpu_overhead_bytes is None
        else args.gpu_overhead_bytes,
        prefill_chunk_tokens=args.prefill_chunk, attention_scores_materialised=args.eager_attention,
        quantize_lm_head=args.quantize_lm_head)
    return memory.plan(model, scheme_from_args(args, args.format), args.context, args.batch, args.kv_dtype, ids,
                       assumptions)


def cmd_memory(args: argparse.Namespace) -> None:
    """Print the plan: JSON with ``--json``, otherwise a short table per component and per target."""
    from qlab.analyses.memory import FORMULAS

    plan = build_plan(args)
    record = plan.to_record()
    store_plan(args, plan)
    if args.json is not None:
        emit({**record, "formulas": FORMULAS}, args.json)
        return
    print(f"{plan.model}  {plan.scheme_label}  context {plan.context_tokens:,} x batch {plan.batch}  "
          f"KV {plan.kv.scheme_label}")
    print(f"  params {plan.params:,} (active per token {plan.active_params:,})")
    for label, key in (("weights (codes)", "weights_before_scales_bytes"), ("  of which scales", "scales_bytes"),
                       ("weights total", "weights_bytes"), ("KV cache", "kv_cache_bytes"),
                       ("activations", "activations_bytes"), ("overhead", "overhead_bytes"),
                       ("total", "total_bytes")):
        print(f"  {label:18} {record[key] / 1e9:10.3f} GB")
    print(f"  unquantized tensors at {plan.unquantized_format}; {plan.weights.bits_per_weight:.3f} bits per "
          "quantized weight")
    for fit in plan.targets:
        verdict = "fits" if fit.fits else "does not fit"
        gpus = (f"{fit.gpus_needed} device(s)" if fit.gpus_needed
                else "more GPUs than the TP limit" if fit.kind == "gpu" else "a larger machine")
        print(f"  {fit.hardware_id:22} {verdict:12} headroom {fit.headroom_bytes / 1e9:8.2f} GB  "
              f"max context {fit.max_context:,}  max batch {fit.max_batch}  needs {gpus}")
    for note in plan.notes:
        print(f"  note: {note}")


def store_plan(args: argparse.Namespace, plan) -> None:
    """With ``--db`` (or ``QLAB_DB``), keep the plan as a ``memory`` run, the CLI arguments as its settings."""
    from qlab.store import Recorder, RunMeta, requested_path

    db = requested_path(args.db)
    if db is None:
        return
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "json", "db", "command")}
    with Recorder(db, RunMeta("memory", plan.model, settings, hardware=plan.primary.hardware_id)) as recorder:
        recorder.save(plan)
