"""``python -m qlab quantize``: quantize a few numbers and show codes, scale and zero-point."""

from __future__ import annotations

import argparse

from qlab.cli.common import add_scheme_arguments, csv_floats, emit, json_option, scheme_from_args


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``quantize`` subcommand to qlab's parser."""
    parser = subparsers.add_parser("quantize", help="quantize a few numbers and show codes, scale, zero-point")
    parser.add_argument("--values", required=True, help="comma-separated floats, e.g. --values=-2.45,1.32")
    parser.add_argument("--format", default="int8")
    parser.add_argument("--scale", type=float, default=None, help="explicit scale (overrides calibration)")
    parser.add_argument("--zero-point", type=int, default=None, help="explicit zero-point (asymmetric)")
    add_scheme_arguments(parser, granularity="tensor")
    json_option(parser, "print JSON")
    parser.set_defaults(func=cmd_quantize)
    return parser


def cmd_quantize(args: argparse.Namespace) -> None:
    """Quantize ``--values`` and print the codes, dequantized values, scale and sizes (or JSON)."""
    import torch

    from qlab.core.quant import quantize

    values = torch.tensor(csv_floats(args.values), dtype=torch.float32)
    scheme = scheme_from_args(args, args.format)
    qtensor = quantize(values, scheme, scale=args.scale, zero_point=args.zero_point)
    payload = {
        "format": scheme.format,
        "scheme": scheme.label,
        "values": values.tolist(),
        "codes": qtensor.codes.to(torch.float32).tolist() if scheme.fmt.kind == "float"
        else qtensor.codes.to(torch.int64).tolist(),
        "dequantized": qtensor.dequantize().tolist(),
        "scale": None if qtensor.scale is None else _scalar_or_list(qtensor.scale.to(torch.float64)),
        "zero_point": 0 if qtensor.zero_point is None else _scalar_or_list(qtensor.zero_point.to(torch.int64)),
        "nbytes": qtensor.nbytes,
        "fp32_bytes": 4 * values.numel(),
        "bits_per_weight": qtensor.bits_per_weight,
    }
    if args.json is not None:
        emit(payload, args.json)
        return
    for key in ("format", "codes", "dequantized", "scale", "zero_point", "nbytes"):
        print(f"{key:12} {payload[key]}")


def _scalar_or_list(tensor):
    values = tensor.reshape(-1).tolist()
    return values[0] if len(values) == 1 else values
