"""``python -m qlab explain ...``: the Formats and Concepts pages headless, each view a subcommand with
``--json``."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from qlab.cli.common import Parser, csv_floats, emit, json_option


def _csv(text: str, kind: type = str) -> list:
    from qlab.core.errors import QlabError

    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise QlabError(f"expected comma-separated {kind.__name__} values, got '{text}'.") from None
    if not values:
        raise QlabError("the list is empty; give comma-separated values.")
    return values


def _output(args: argparse.Namespace, payload, rows: list[dict] | None = None) -> None:
    """JSON with ``--json``; otherwise the rows as a plain table."""
    if args.json is not None:
        emit(payload, args.json)
        return
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_colwidth", 60):
        print(pd.DataFrame(rows if rows is not None else payload).to_string(index=False))


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``explain`` subcommand and its views to qlab's parser."""
    parser = subparsers.add_parser("explain", help="teaching views: bits, number lines, affine mapping, "
                                                   "granularity, calibration, activations, QAT, GPTQ, claims")
    views = parser.add_subparsers(dest="view", required=True, parser_class=Parser)

    bits = views.add_parser("bits", help="a value's sign/exponent/mantissa bits (or code) in every format")
    bits.add_argument("value", type=float)
    bits.add_argument("--formats", default="fp32,fp16,bf16,fp8_e4m3,fp8_e5m2,fp4_e2m1,int8,int4,nf4")
    bits.add_argument("--absmax", type=float, default=1.0, help="largest magnitude of the tensor (integer/NF4 "
                                                                 "scale = absmax / qmax)")
    json_option(bits, "print JSON")
    bits.set_defaults(func=cmd_bits)

    line = views.add_parser("numberline", help="how many values a format represents in a range")
    line.add_argument("--formats", default="fp32,fp16,bf16,fp8_e4m3,fp8_e5m2,fp4_e2m1,int8,int4,nf4")
    line.add_argument("--low", type=float, default=-1.0)
    line.add_argument("--high", type=float, default=1.0)
    line.add_argument("--absmax", type=float, default=1.0)
    json_option(line, "print JSON (counts and the values, sampled above 4000)")
    line.set_defaults(func=cmd_numberline)

    affine = views.add_parser("affine", help="the affine mapping step by step, with storage bytes")
    affine.add_argument("--values", default="-2.45,1.32,0.67,-0.89", help="comma-separated; use --values=-1,2")
    affine.add_argument("--format", default="int8")
    affine.add_argument("--scale", type=float, default=None, help="typed scale (a common worked example: 0.019)")
    affine.add_argument("--zero-point", type=int, default=None)
    affine.add_argument("--asymmetric", action="store_true")
    affine.add_argument("--calibration", default="minmax", help="minmax | percentile | mse")
    affine.add_argument("--percentile", type=float, default=99.9)
    json_option(affine, "print JSON")
    affine.set_defaults(func=cmd_affine)

    calibration = views.add_parser("calibration", help="min-max vs percentile vs MSE with one outlier")
    calibration.add_argument("--outlier", type=float, default=20.0, help="in standard deviations; 0 = none")
    calibration.add_argument("--format", default="int8")
    calibration.add_argument("--percentile", type=float, default=99.9)
    json_option(calibration, "print JSON")
    calibration.set_defaults(func=cmd_calibration)

    granularity = views.add_parser("granularity", help="per-tensor/channel/group/GGUF/NF4 on a real matrix")
    granularity.add_argument("--model", default="minilm-l6")
    granularity.add_argument("--layer", default=None, help="linear layer name (default: a middle one)")
    granularity.add_argument("--bits", type=int, default=4, choices=(3, 4, 8))
    json_option(granularity, "print JSON")
    granularity.set_defaults(func=cmd_granularity)

    acts = views.add_parser("activations", help="static (calibrated) vs dynamic per-token activation scales")
    acts.add_argument("--model", default="smollm2-135m")
    acts.add_argument("--layer", default=None, help="linear whose inputs are used (default: a middle "
                                                    "FFN down-projection)")
    acts.add_argument("--format", default="int8")
    acts.add_argument("--calibration", default="minmax", help="minmax | percentile")
    acts.add_argument("--tokens", type=int, default=256, help="evaluation tokens (start of the text)")
    acts.add_argument("--calibration-tokens", type=int, default=512, help="from the end of the text")
    json_option(acts, "print JSON (summary and per-token rows)")
    acts.set_defaults(func=cmd_activations)

    qat = views.add_parser("qat", help="train a digits classifier; PTQ vs QAT (straight-through) per bit width")
    qat.add_argument("--bits", default="2,3,4")
    qat.add_argument("--seed", type=int, default=0)
    json_option(qat, "print JSON (with the QAT accuracy history)")
    qat.set_defaults(func=cmd_qat)

    gptq = views.add_parser("gptq-layer", help="RTN vs GPTQ on one linear layer: weight and output error")
    gptq.add_argument("--model", default="smollm2-135m")
    gptq.add_argument("--layer", default=None, help="default: the model's fourth quantizable linear")
    gptq.add_argument("--formats", default="int4,int3")
    gptq.add_argument("--group-size", type=int, default=64)
    gptq.add_argument("--tokens", type=int, default=512, help="held-out tokens (start of the text)")
    gptq.add_argument("--calibration-tokens", type=int, default=2048, help="from the end of the text")
    json_option(gptq, "print JSON")
    gptq.set_defaults(func=cmd_gptq_layer)

    speed = views.add_parser("speed", help="fp32 vs bf16 vs fp16 vs torch.ao int8 dynamic: an MLP micro-benchmark "
                                           "on this CPU")
    speed.add_argument("--tokens", default="1,128")
    speed.add_argument("--repeats", type=int, default=15)
    json_option(speed, "print JSON")
    speed.set_defaults(func=cmd_speed)

    claims = views.add_parser("claims", help="the common INT8/INT4/FP16 claims next to a sweep and the "
                                             "micro-benchmark")
    claims.add_argument("--model", default="smollm2-135m")
    claims.add_argument("--tokens", type=int, default=512)
    claims.add_argument("--no-speed", action="store_true", help="skip the speed micro-benchmark")
    json_option(claims, "print JSON")
    claims.set_defaults(func=cmd_claims)
    return parser


def cmd_bits(args: argparse.Namespace) -> None:
    from qlab.analyses.explain import bit_layouts

    rows = [layout.to_record() for layout in bit_layouts(args.value, tuple(_csv(args.formats)), args.absmax)]
    _output(args, rows, [{k: r[k] for k in ("format", "sign", "exponent", "mantissa", "code_bits", "stored",
                                            "error", "flags")} for r in rows])


def cmd_numberline(args: argparse.Namespace) -> None:
    from qlab.analyses.explain import number_line

    lines = [number_line(name, args.low, args.high, args.absmax) for name in _csv(args.formats)]
    rows = [{"format": line.format, "count": line.count, "per_unit": line.count / (args.high - args.low),
             "sampled": line.sampled} for line in lines]
    payload = [{**row, "values": line.values.tolist()} for row, line in zip(rows, lines, strict=True)]
    _output(args, payload, rows)


def cmd_affine(args: argparse.Namespace) -> None:
    from qlab.analyses.explain import affine_mapping

    mapping = affine_mapping(csv_floats(args.values), args.format, not args.asymmetric, args.calibration,
                             args.percentile, args.scale, args.zero_point)
    payload = {"format": args.format, "scale": mapping.scale, "zero_point": mapping.zero_point,
               "qmin": mapping.qmin, "qmax": mapping.qmax, "how": mapping.how, "rows": mapping.rows,
               "storage": mapping.storage}
    if args.json is None:
        print(mapping.how)
    _output(args, payload, mapping.rows)
    if args.json is None:
        print("storage:", ", ".join(f"{k} {v}" for k, v in mapping.storage.items()))


def cmd_calibration(args: argparse.Namespace) -> None:
    from qlab.analyses.explain import outlier_calibration

    rows = outlier_calibration(args.outlier, args.format, args.percentile)
    _output(args, rows)


def _model_and_layer(name: str, layer: str | None, pick: Callable[[list[str]], str]):
    from qlab.core.errors import QlabError
    from qlab.models.loading import load, quantizable_linears

    loaded = load(name)
    names = [n for n, _ in quantizable_linears(loaded.model)]
    layer = layer or pick(names)
    if layer not in names:
        raise QlabError(f"'{layer}' is not a quantizable linear of {loaded.name}; e.g. {names[0]}.")
    return loaded, layer


def cmd_granularity(args: argparse.Namespace) -> None:
    from qlab.analyses.explain import granularity_comparison

    loaded, layer = _model_and_layer(args.model, args.layer, lambda names: names[len(names) // 2])
    rows = granularity_comparison(loaded.model.get_submodule(layer).weight, args.bits)
    _output(args, {"model": loaded.name, "layer": layer, "rows": rows}, rows)


def cmd_activations(args: argparse.Namespace) -> None:
    from qlab.analyses import activations
    from qlab.models.evaluate import EvalSpec, default_text

    loaded, layer = _model_and_layer(args.model, args.layer, activations.default_layer)
    calibration = activations.capture_inputs(loaded, layer, activations.calibration_data(
        loaded, EvalSpec(max(16, args.tokens)), args.calibration_tokens))
    evaluation = activations.capture_inputs(loaded, layer, activations.text_batches(
        loaded, default_text(), args.tokens))
    result = activations.static_vs_dynamic(calibration, evaluation, args.format, args.calibration)
    payload = {"model": loaded.name, "layer": layer, "static_scale": result.static_scale, **result.summary,
               "per_token": result.per_token}
    _output(args, payload, [{"layer": layer, "static_scale": result.static_scale, **result.summary}])


def cmd_qat(args: argparse.Namespace) -> None:
    from qlab.analyses.qat import ptq_vs_qat

    results = ptq_vs_qat(tuple(_csv(args.bits, int)), args.seed)
    _output(args, [{**r.to_record(), "history": r.history} for r in results], [r.to_record() for r in results])


def cmd_gptq_layer(args: argparse.Namespace) -> None:
    from qlab.analyses.calibration import layer_comparison
    from qlab.core.quant import QuantScheme
    from qlab.models.evaluate import EvalSpec

    loaded, layer = _model_and_layer(args.model, args.layer, lambda names: names[min(len(names) - 1, 3)])
    schemes = [QuantScheme(f, "group", args.group_size) for f in _csv(args.formats)]
    rows = layer_comparison(loaded, layer, schemes, EvalSpec(max(16, args.tokens)), args.calibration_tokens)
    _output(args, {"model": loaded.name, "layer": layer, "rows": rows}, rows)


def cmd_speed(args: argparse.Namespace) -> None:
    from qlab.analyses.claims import measure_cpu_speed

    _output(args, measure_cpu_speed(tuple(_csv(args.tokens, int)), repeats=args.repeats))


def cmd_claims(args: argparse.Namespace) -> None:
    from qlab.analyses.claims import CLAIM_SCHEMES, compare_claims, measure_cpu_speed
    from qlab.analyses.sweep import run_sweep
    from qlab.models.evaluate import EvalSpec
    from qlab.models.loading import load

    loaded = load(args.model)
    sweep = [row.to_record() for row in run_sweep(loaded, list(CLAIM_SCHEMES), EvalSpec(args.tokens))]
    speed = None if args.no_speed else measure_cpu_speed()
    rows = compare_claims(sweep, speed)
    _output(args, {"model": loaded.name, "claims": rows, "sweep": sweep, "speed": speed},
            [{k: r[k] for k in ("claim", "measured_speed", "claimed_loss", "measured_loss")} for r in rows])
