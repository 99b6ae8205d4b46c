"""AWQ as the sweep simulates it against AWQ as `qlab export --compressed-tensors` writes it:
`python bench/awq_export_gap.py [--models M,...] [--format int4] [--tokens N] [--json OUT]`.

The sweep's AWQ (``qlab.core.algorithms.awq``) gives every linear its own input scale, kept as an explicit fp16
``1 / s``. No serving layout holds that, so the export (``qlab.backends.export_compressed``) shares one scale among
the linears reading one input and folds it into the op before: the RMSNorm before q/k/v and before gate/up, up's
rows before down, v's rows before o (a grouped-query o_proj, where one v row feeds several o inputs, is rounded to
nearest instead). Both are measured here against round-to-nearest on one baseline, one calibration (the sweep's:
4096 tokens from the end of the text) and one evaluation (``qlab.models.evaluate.evaluate`` on a shadow copy),
at the rounding-methods table's scheme (asymmetric groups of 128, or 64 where 128 does not divide every width).
The export is simulated by ``export_compressed.simulated_model``, the model its checkpoint reloads to (tested
bit for bit against transformers' reload on tiny models). "AWQ per linear, o_proj to nearest" separates the
grouped-query o_proj from the sharing. Per layer kind, the mean relative output error ``tr(dW H dW^T) /
tr(W H W^T)`` on the calibration Hessian shows where the difference comes from. "AWQ shared per input, explicit
scale" shares the scale as the export does but keeps it as an input scale: the cost of sharing alone, measurable on
MiniLM too, whose post-norm BERT layers the export refuses (the norm before q/k/v also feeds the residual).

Writes bench/results/awq_export_gap.json. Accuracy does not depend on the machine's load; the times recorded
are of a shared CPU and are not to be quoted.
"""

import argparse
import json
import platform
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from qlab.analyses import activations  # noqa: E402
from qlab.analyses.calibration import calibration_stats  # noqa: E402
from qlab.backends.export_compressed import (  # noqa: E402
    CompressedPlan,
    _shared_awq,
    quantize_for_export,
    simulated_model,
)
from qlab.cli.common import output_file, write_atomic  # noqa: E402
from qlab.core.algorithms import LayerStats, awq, quantize_weight  # noqa: E402
from qlab.core.errors import QlabError  # noqa: E402
from qlab.core.plan import quantizable_linears  # noqa: E402
from qlab.core.quant import QTensor, QuantScheme, quantize  # noqa: E402
from qlab.models.evaluate import EvalSpec, compute_baseline, evaluate  # noqa: E402
from qlab.models.loading import LoadedModel, load, weights_digest  # noqa: E402

GROUP_SIZES = (128, 64)  # as bench/rounding_methods.py: the first that divides every input width
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "awq_export_gap.json"
TIMES_NOTE = ("2-core CPU shared with other jobs, run at the lowest priority: the seconds are not to be quoted; "
              "the accuracy columns do not depend on the load.")


def group_size_for(loaded: LoadedModel) -> int:
    widths = {module.in_features for _, module in quantizable_linears(loaded.model)}
    return next(g for g in GROUP_SIZES if all(w % g == 0 for w in widths))


def relative_error(weight: torch.Tensor, effective: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(dW H dW^T) / tr(W H W^T)``: the layer's output error on the calibration inputs, relative."""
    w = weight.detach().to(torch.float32)
    return awq.output_error(w, effective, hessian) / max(awq.output_error(torch.zeros_like(w), w, hessian), 1e-30)


def kind_of(name: str) -> str:
    """A linear's name with its block number left out: ``model.layers.*.self_attn.q_proj``."""
    return re.sub(r"\.\d+\.", ".*.", name)


def errors_by_kind(weights: Mapping[str, torch.Tensor], effective: Mapping[str, torch.Tensor],
                   stats: Mapping[str, LayerStats]) -> dict[str, float]:
    errors: dict[str, list[float]] = {}
    for name, value in effective.items():
        errors.setdefault(kind_of(name), []).append(relative_error(weights[name], value, stats[name].hessian))
    return {kind: round(sum(values) / len(values), 6) for kind, values in errors.items()}


def exported_effective(loaded: LoadedModel, plan: CompressedPlan, per_linear: Mapping[str, QTensor]
                       ) -> dict[str, torch.Tensor]:
    """What each exported linear computes from its original input: its codes' weight times the ``1 / s`` folded
    into the norm before it (q/k/v, gate/up), divided by the ``1 / s`` of down folded into up's rows. down's
    own search is the sweep's (one linear), so its ``1 / s`` is the sweep's."""
    model = loaded.model
    norms = {}
    for key, gain in plan.replaced.items():
        norms[key.removesuffix(".weight")] = gain / model.get_submodule(key.removesuffix(".weight")).weight.float()
    effective = {}
    for name, qtensor in plan.qtensors.items():
        value = qtensor.dequantize()
        block, _, leaf = name.rpartition(".")
        layer = block.rpartition(".")[0]
        norm = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
                "gate_proj": "post_attention_layernorm", "up_proj": "post_attention_layernorm"}.get(leaf)
        if norm is not None:
            value = value * norms[f"{layer}.{norm}"][None, :]
        if leaf == "up_proj":
            value = value / per_linear[f"{layer}.mlp.down_proj"].input_scale.float()[:, None]
        if leaf == "down_proj":
            value = value * per_linear[name].input_scale.float()[None, :]
        if _folded_into_v(plan, block):
            o_proj = per_linear[f"{block}.o_proj"].input_scale.float()
            if leaf == "o_proj":
                value = value * o_proj[None, :]
            if leaf == "v_proj":
                value = value / o_proj[:, None]
        effective[name] = value
    return effective


def shared_awq(weights: Mapping[str, torch.Tensor], stats: Mapping[str, LayerStats], scheme: QuantScheme
               ) -> dict[str, QTensor]:
    """AWQ with one scale for the linears fed the very same input (calibration gives them one statistics
    object), searched on their stacked rows as the export does, but kept as an explicit input scale: the
    sharing without the folding."""
    groups: dict[int, list[str]] = {}
    for name in weights:
        groups.setdefault(id(stats[name]), []).append(name)
    out = {}
    for names in groups.values():
        parts, inverse = _shared_awq([weights[n].detach().to(torch.float32) for n in names], stats[names[0]], scheme)
        out.update({n: awq.InputScaledQTensor(q.codes, q.scale, q.zero_point, q.scheme, q.shape, inverse)
                    for n, q in zip(names, parts, strict=True)})
    return out


def _folded_into_v(plan: CompressedPlan, block: str) -> bool:
    """Whether the export folded o_proj's scale into v's rows (one v row per o input: no grouped-query heads)."""
    v_proj, o_proj = plan.qtensors.get(f"{block}.v_proj"), plan.qtensors.get(f"{block}.o_proj")
    return v_proj is not None and o_proj is not None and v_proj.shape[0] == o_proj.shape[1]


def _timed(work: Callable[[], object]) -> tuple[object, float]:
    started = time.perf_counter()
    value = work()
    return value, round(time.perf_counter() - started, 1)


def measure(model: str, fmt: str, tokens: int) -> dict:
    """RTN, the sweep's AWQ, the sweep's AWQ with o_proj to nearest, and the exported AWQ on one model."""
    loaded = load(model)
    before = weights_digest(loaded.model)
    group_size = group_size_for(loaded)
    spec = EvalSpec(tokens)
    rtn = QuantScheme(fmt, "group", group_size, symmetric=False)
    awq_scheme = QuantScheme(fmt, "group", group_size, symmetric=False, algorithm="awq")
    print(f"{loaded.name}: baseline and calibration", flush=True)
    baseline = compute_baseline(loaded, spec)
    (stats, calibration), calibration_seconds = _timed(lambda: calibration_stats(loaded, spec))
    names = [name for name, _ in quantizable_linears(loaded.model)]
    weights = {name: loaded.model.get_submodule(name).weight for name in names}
    rounded, rtn_seconds = _timed(lambda: {n: quantize(weights[n], rtn) for n in names})
    print(f"{loaded.name}: AWQ per linear (the sweep's)", flush=True)
    per_linear, awq_seconds = _timed(lambda: {n: quantize_weight(weights[n], awq_scheme, stats[n]) for n in names})
    entry = {"model": loaded.name, "scheme": awq_scheme.label, "group_size": group_size,
             "calibration": calibration, "calibration_seconds": calibration_seconds, "rows": []}

    def row(method: str, qtensors: Mapping[str, QTensor], seconds: float | None, replaced=None) -> None:
        plan = CompressedPlan(qtensors, replaced or {})
        metrics, eval_seconds = _timed(lambda: evaluate(simulated_model(loaded, plan), baseline))
        entry["rows"].append({"method": method, **metrics, "rounding_seconds": seconds,
                              "eval_seconds": eval_seconds, "eval_tokens": baseline.tokens})
        print(f"{loaded.name:14} {method:36} {json.dumps({k: round(v, 4) for k, v in metrics.items()})}", flush=True)

    row("RTN", rounded, rtn_seconds)
    row("AWQ per linear (sweep)", per_linear, awq_seconds)
    entry["relative_output_error"] = {"RTN": errors_by_kind(weights, {n: q.dequantize() for n, q in rounded.items()},
                                                           stats),
                                      "AWQ per linear (sweep)": errors_by_kind(
                                          weights, {n: q.dequantize() for n, q in per_linear.items()}, stats)}
    print(f"{loaded.name}: AWQ shared by the linears of one input, not folded", flush=True)
    shared, shared_seconds = _timed(lambda: shared_awq(weights, stats, awq_scheme))
    row("AWQ shared per input, explicit scale", shared, shared_seconds)
    entry["relative_output_error"]["AWQ shared per input, explicit scale"] = errors_by_kind(
        weights, {n: q.dequantize() for n, q in shared.items()}, stats)
    print(f"{loaded.name}: AWQ shared and folded (the export's)", flush=True)
    try:
        exported, export_seconds = _timed(lambda: quantize_for_export(loaded, awq_scheme, stats))
    except QlabError as error:
        entry["export"] = f"refused: {error}"
    else:
        entry["export"] = ("simulated as export_compressed.simulated_model, the model the checkpoint reloads to; "
                           f"{len(exported.qtensors)} linears, folded: {len(exported.replaced)} norm gains")
        grouped = [n for n in exported.qtensors if n.endswith("o_proj")
                   and weights[n.replace("o_proj", "v_proj")].shape[0] != weights[n].shape[1]]
        if grouped:
            row("AWQ per linear, o_proj to nearest", {**per_linear, **{n: rounded[n] for n in grouped}}, None)
        row("AWQ shared and folded (export)", exported.qtensors, export_seconds, exported.replaced)
        entry["relative_output_error"]["AWQ shared and folded (export)"] = errors_by_kind(
            weights, exported_effective(loaded, exported, per_linear), stats)
        entry["grouped_query_o_proj_to_nearest"] = len(grouped)
    entry["base_weights_unchanged"] = weights_digest(loaded.model) == before
    return entry


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,minilm-l6")
    parser.add_argument("--format", default="int4")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    args = parser.parse_args(argv)
    try:
        path = Path(output_file(args.json))
        EvalSpec(args.tokens)
        result = {"benchmark": "AWQ per linear (the sweep's simulation) vs AWQ shared and folded (the "
                               "compressed-tensors export), whole model, weight-only",
                  "eval_tokens": args.tokens, "calibration_tokens": activations.CALIBRATION_TOKENS,
                  "awq_grid_points": awq.GRID_POINTS, "python": platform.python_version(),
                  "torch": torch.__version__, "threads": torch.get_num_threads(), "times_note": TIMES_NOTE,
                  "models": []}
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            result["models"].append(measure(model, args.format, args.tokens))
            write_atomic(path, json.dumps(result, indent=1, default=float))
    except QlabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
