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
    from qlab.analyses.runtimes import GGUF_FILE_TYPES, runtime_names
    from qlab.core.layouts import layout_names

    parser = subparsers.add_parser(
        "memory", help="plan memory: weights with scales, KV cache, activations, overhead; fit per target")
    parser.add_argument("--runtime", default="transformers", choices=runtime_names(),
                        help="whose allocation to model: transformers generate (dynamic, static or offloaded "
                             "cache; measured on a GPU), vLLM paged KV or llama.cpp (their formulas)")
    parser.add_argument("--weights", default=None, metavar="LAYOUT",
                        help="weights as a library stores them instead of --format: "
                             + ", ".join([*layout_names(), *GGUF_FILE_TYPES]))
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
    parser.add_argument("--prompt-tokens", type=int, default=None, metavar="TOKENS",
                        help="tokens prefilled at once (default: the whole context, the worst case)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="vLLM: the share of GPU memory it reserves at start-up")
    parser.add_argument("--block-size", type=int, default=16, help="vLLM: tokens per KV page")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192,
                        help="vLLM: tokens of its profile run (the prefill chunk)")
    parser.add_argument("--ubatch", type=int, default=512, help="llama.cpp: -ub, tokens per compute ubatch")
    parser.add_argument("--no-flash-attention", action="store_true",
                        help="llama.cpp: -fa off (the compute buffer then holds the f32 KQ matrix)")
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
        runtime=args.runtime,
        gpu_overhead_bytes=defaults.gpu_overhead_bytes if args.gpu_overhead_bytes is None
        else args.gpu_overhead_bytes,
        prefill_chunk_tokens=args.prefill_chunk, attention_scores_materialised=args.eager_attention,
        quantize_lm_head=args.quantize_lm_head, prompt_tokens=args.prompt_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization, vllm_block_size=args.block_size,
        max_num_batched_tokens=args.max_num_batched_tokens, llamacpp_ubatch=args.ubatch,
        llamacpp_flash_attention=not args.no_flash_attention)
    weights = memory.weight_spec(args.weights) if args.weights else scheme_from_args(args, args.format)
    return memory.plan(model, weights, args.context, args.batch, args.kv_dtype, ids, assumptions)


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
          f"KV {plan.kv.scheme_label}  runtime {plan.runtime}")
    print(f"  params {plan.params:,} (active per token {plan.active_params:,})")
    print(f"  weights {record['weights_bytes'] / 1e9:.3f} GB, of which scales {record['scales_bytes'] / 1e9:.3f} GB")
    for state in (plan.peak, plan.steady):
        print(f"  {state.label}: {state.device_bytes / 1e9:.3f} GB on the device"
              + (f", {state.host_bytes / 1e9:.3f} GB in host memory" if state.host_bytes else ""))
        for component in state.components:
            where = "" if component.on_device else " (host)"
            print(f"    {component.name + where:30} {component.bytes / 1e9:10.3f} GB  {component.formula}")
    print(f"  unquantized tensors at {plan.unquantized_format}; {plan.weights.bits_per_weight:.3f} bits per "
          "quantized weight")
    for fit in plan.targets:
        verdict = "fits" if fit.fits else "does not fit"
        gpus = (f"{fit.gpus_needed} device(s)" if fit.gpus_needed
                else "more GPUs than the TP limit" if fit.kind == "gpu" else "a larger machine")
        print(f"  {fit.hardware_id:22} {verdict:12} peak {fit.total_bytes / 1e9:8.2f} GB of "
              f"{fit.budget_bytes / 1e9:.2f}  headroom {fit.headroom_bytes / 1e9:8.2f} GB  "
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
