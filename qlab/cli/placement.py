"""``python -m qlab placement``: accelerate's placement of a model over N GPUs with the planner's budgets, and the
planner's tensor-parallel figures beside the N-GPU roofline. Computed on the meta device: nothing is measured."""

from __future__ import annotations

import argparse

from qlab.cli.common import emit, json_option

DEFAULT_MODEL = "llama-3.1-70b"
DEFAULT_HARDWARE = "h200-sxm-141gb"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``placement`` subcommand to qlab's parser."""
    parser = subparsers.add_parser(
        "placement", help="place a model over N GPUs (accelerate, meta device) with the memory planner's budgets")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="catalog slug or HF id (e.g. llama-3.1-70b)")
    parser.add_argument("--hardware", default=DEFAULT_HARDWARE, help="GPU id from the hardware catalog")
    parser.add_argument("--gpus", type=int, default=2, help="how many such GPUs")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                        help="the dtype the model loads in (quantized formats are applied after loading)")
    parser.add_argument("--context", type=int, default=2048, help="tokens per evaluated sequence")
    parser.add_argument("--batch", type=int, default=1, help="sequences evaluated at once")
    parser.add_argument("--tp-formats", default="bf16,fp8_e4m3,int4",
                        help="weight formats for the tensor-parallel figures (comma-separated)")
    parser.add_argument("--tp-batches", type=int, nargs="+", default=[1, 16],
                        help="decode batches for the tensor-parallel figures")
    json_option(parser, "print the placement as JSON")
    parser.set_defaults(func=cmd_placement)
    return parser


def cmd_placement(args: argparse.Namespace) -> None:
    """Print the placement, each GPU's estimate and the tensor-parallel figures (JSON with ``--json``)."""
    from qlab.analyses import placement

    result = placement.place(args.model, args.hardware, args.gpus, args.dtype, args.context, args.batch)
    formats = [f.strip() for f in args.tp_formats.split(",") if f.strip()]
    tp = placement.tensor_parallel(args.model, args.hardware, args.gpus, formats, args.context,
                                   args.tp_batches)
    record = {**result.to_record(), "tensor_parallel": tp,
              "kv_bytes_per_token": placement.kv_bytes_per_token(args.model), "formulas": placement.FORMULAS}
    if args.json is not None:
        emit(record, args.json)
        return
    print(f"{result.model} in {result.dtype} on {result.gpus} x {result.hardware_id}  context {result.context_tokens:,}"
          f" x batch {result.batch}  (computed on the meta device, not measured)")
    for gpu in result.per_gpu:
        print(f"  GPU {gpu.gpu}: {gpu.decoder_layers:3} layers ({gpu.first_layer} .. {gpu.last_layer})  "
              f"weights {gpu.weights_bytes / 1e9:7.2f} GB (budget {gpu.max_memory_bytes / 1e9:7.2f})  "
              f"KV {gpu.kv_bytes / 1e9:5.2f}  estimate {gpu.total_bytes / 1e9:7.2f} of {gpu.memory_bytes / 1e9:.0f} GB")
    print(f"  tensor parallel over {result.gpus} GPUs (planner per GPU; roofline with {result.gpus} x bandwidth):")
    for row in tp:
        print(f"    {row['scheme']:16} batch {row['batch']:3}  {row['per_gpu_bytes'] / 1e9:7.2f} GB per GPU  "
              f"{'fits' if row['fits'] else 'does not fit':12}  roofline {row['roofline_decode_tokens_per_s']:9.1f} "
              "tok/s")
