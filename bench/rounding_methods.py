"""The rounding methods the sources name, on the bundled models: `python bench/rounding_methods.py [--models M,...]
[--formats int4,int3] [--algorithms rtn,gptq,...] [--sparsity none,2:4,2:4-sparsegpt] [--group-size N]
[--device cpu|cuda] [--tokens N] [--note TEXT] [--json OUT] [--replace] [--allow-short-calibration]`.

RTN, GPTQ, GPTQ with act-order, AWQ and HQQ at int4 and int3 in asymmetric groups of 128 (64 where 128 does not
divide every layer's input width, as SmolLM2-135M's 576), each a whole-model weight-only simulation measured by
the sweep (KLD, perplexity and top-1 agreement for a causal LM; cosine and retrieval agreement for an embedding
model) with its time to quantize. Calibrated methods share one calibration pass per model and call (4096 tokens
from the end of the evaluation text, apart from the tokens evaluated); its time is given once per model, not
charged to the first method that triggered it. Writes bench/results/rounding_methods_cpu.json by default.

``--sparsity`` crosses the methods with 2:4 semi-structured sparsity (``2:4`` prunes by magnitude, ``2:4-sparsegpt``
by SparseGPT with GPTQ's Hessians); a row's bits per weight then include the 2-bit position of each kept value
(its ``metadata_bytes``). Integer formats are asymmetric, others symmetric; a combination qlab does not implement
(SparseGPT with RTN on a scaled format) is left out and named in the model's ``left_out``.

Each row is written (atomically) as soon as it is measured, merged into the rows already in the file by model
and scheme label, so a stopped run keeps what it finished and the methods can be run one call at a time
(``--algorithms gptq``, then ``--algorithms hqq``); ``--replace`` starts the file afresh. Rows of a file measured
with other settings (tokens, device, machine, algorithm parameters) are not mixed in: the call is refused.
A text too short to calibrate the widest layer (a Hessian of rank below its width) is refused before any work,
unless ``--allow-short-calibration`` (a timing-only run) records that the calibrated rows' accuracy does not hold.

A random-initialised checkpoint (bench/random_checkpoint.py) gives the time to quantize a model of real size: its
accuracy columns say nothing (random weights), its times do not depend on the values.
"""

import argparse
import json
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from qlab.analyses import activations  # noqa: E402
from qlab.analyses.sensitivity import check_calibration  # noqa: E402
from qlab.analyses.sweep import parse_formats, run_sweep  # noqa: E402
from qlab.cli.common import output_file, write_atomic  # noqa: E402
from qlab.core.algorithms import awq, gptq, hqq  # noqa: E402
from qlab.core.errors import QlabError  # noqa: E402
from qlab.core.formats import get_format  # noqa: E402
from qlab.core.plan import quantizable_linears  # noqa: E402
from qlab.core.quant import SPARSITIES, QuantScheme  # noqa: E402
from qlab.models.evaluate import EvalSpec  # noqa: E402
from qlab.models.hardware import detect_this_machine  # noqa: E402
from qlab.models.loading import load, weights_digest  # noqa: E402

ALGORITHMS = ("rtn", "gptq", "gptq-act-order", "awq", "hqq")
FORMATS = ("int4", "int3")
GROUP_SIZES = (128, 64)  # the first that divides every quantized layer's input width
BASELINE_NOTES = {"smollm2-135m": "SmolLM2-135M's bundled baseline is a dequantized Q4_1 GGUF, not a true "
                                  "full-precision model: every method is measured against a 4-bit model already."}
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "rounding_methods_cpu.json"
# Settings a row's numbers depend on: rows measured under others are not merged into one file.
SETTINGS = ("eval_tokens", "calibration_tokens", "gptq_damp_percent", "awq_grid_points", "hqq_steps", "machine",
            "torch", "device", "gpu")


def group_size_for(loaded) -> int:
    widths = {module.in_features for _, module in quantizable_linears(loaded.model)}
    return next(g for g in GROUP_SIZES if all(w % g == 0 for w in widths))


def schemes_for(formats: Sequence[str], algorithms: Sequence[str], sparsities: Sequence[str], group_size: int
                ) -> tuple[list[QuantScheme], list[str]]:
    """Every format x method x sparsity qlab implements (duplicates, as a plain cast under every method, once),
    and one line per combination it refuses, with its reason."""
    schemes, left_out = {}, []
    for fmt in formats:
        for algorithm in algorithms:
            for sparsity in sparsities:
                try:
                    scheme = QuantScheme(fmt, "group", group_size, symmetric=get_format(fmt).kind != "integer",
                                         algorithm=algorithm, sparsity=sparsity)
                except QlabError as error:
                    left_out.append(f"{fmt} {algorithm} {sparsity}: {error}")
                    continue
                schemes.setdefault(scheme, None)
    return list(schemes), left_out


def short_calibration_note(loaded, schemes: Sequence[QuantScheme], spec: EvalSpec, allowed: bool) -> str | None:
    """None when the text calibrates every layer; else the sensitivity analysis's refusal, raised, or (when
    ``allowed``) returned as the note stored with the model's rows."""
    try:
        check_calibration(loaded, schemes, spec)
    except QlabError as error:
        if not allowed:
            raise QlabError(f"{str(error).removesuffix('.')}; or, to time the methods only, pass "
                            "--allow-short-calibration.") from None
        return f"{error} Measured anyway (--allow-short-calibration): the calibrated rows' times hold, their " \
               "accuracy does not."
    return None


def measure(model: str, tokens: int, formats: Sequence[str] = FORMATS, device: str = "cpu",
            algorithms: Sequence[str] = ALGORITHMS, allow_short_calibration: bool = False,
            sparsities: Sequence[str] = ("none",), group_size: int | None = None) -> Iterator[tuple[dict, dict]]:
    """Every method at every format (and sparsity) on one model, as one sweep (calibration collected once): yields
    the model's fields (as they stand so far) and each row as soon as it is measured."""
    loaded = load(model, device=device)
    before = weights_digest(loaded.model)
    chosen = group_size
    group_size = group_size or group_size_for(loaded)
    spec = EvalSpec(tokens)
    schemes, left_out = schemes_for(formats, algorithms, sparsities, group_size)
    if not schemes:
        raise QlabError(f"qlab implements none of the combinations asked for on {loaded.name}: "
                        f"{'; '.join(left_out)}")
    for line in left_out:
        print(f"{loaded.name}: left out {line}", flush=True)
    note = short_calibration_note(loaded, schemes, spec, allow_short_calibration)
    if note:
        print(f"{loaded.name}: {note}", flush=True)
    entry = {
        "model": loaded.name, "group_size": group_size,
        "group_size_note": (f"groups of {group_size} (--group-size)" if chosen else "groups of 128"
                            if group_size == 128 else
                            f"groups of {group_size}: 128 does not divide every input width of {loaded.name}"),
        "baseline_note": BASELINE_NOTES.get(loaded.name), "calibration_seconds": None, "seconds": None,
        "base_weights_unchanged": None,
    }
    if note:
        entry["calibration_note"] = note
    if left_out:
        entry["left_out"] = left_out
    started = time.perf_counter()
    charged = False
    for count, result in enumerate(run_sweep(loaded, schemes, spec), 1):
        row = result.to_record()
        row["metadata_bytes"] = result.size.metadata_bytes  # 2:4 positions, inside quantized_bytes
        row["rounding_seconds"] = row["quantize_seconds"]
        if "calibration_seconds" in row and not charged:  # this row's time includes the one calibration pass
            row["rounding_seconds"] = round(row["quantize_seconds"] - row["calibration_seconds"], 3)
            entry["calibration_seconds"] = row["calibration_seconds"]
            charged = True
        entry["seconds"] = round(time.perf_counter() - started, 1)
        if count == len(schemes):  # hashed once at the end: 8-10 s for an 8B model's 16 GB
            entry["base_weights_unchanged"] = weights_digest(loaded.model) == before
        yield entry, row


def read_previous(path: Path, settings: dict, replace: bool) -> dict | None:
    """The result already in ``path`` to merge into; None when there is none (or ``replace``). A file that is not
    a rounding-methods result, or was measured under other ``SETTINGS``, is refused before any work."""
    if replace or not path.exists():
        return None
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
        readable = all(isinstance(m["rows"], list) and "model" in m for m in previous["models"])
    except (OSError, ValueError, KeyError, TypeError):
        readable = False
    if not readable:
        raise QlabError(f"{path} is not a rounding-methods result; pass --replace to overwrite it or name "
                        "another --json.")
    differ = [f"{k} {previous.get(k)!r} (now {settings[k]!r})" for k in SETTINGS
              if k in previous and previous[k] != settings[k]]
    if differ:
        raise QlabError(f"{path} holds rows measured with other settings ({', '.join(differ)}); pass --replace to "
                        "start it afresh or name another --json.")
    return previous


def _row_order(row: dict) -> tuple[int, int, str, int, int]:
    def position(values: Sequence[str], value: str) -> int:
        return values.index(value) if value in values else len(values)

    return (-get_format(row["format"]).bits, position(FORMATS, row["format"]), row["format"],
            position(ALGORITHMS, row.get("algorithm")), position(SPARSITIES, row.get("sparsity", "none")))


def merge(result: dict, entry: dict, row: dict, seconds_before: float) -> None:
    """Put ``row`` into ``result`` under its model, replacing an earlier row of the same scheme label; the model's
    fields take this call's values where it measured them, and its seconds add to the earlier calls'."""
    models = result["models"]
    kept = next((m for m in models if m["model"] == entry["model"]), None)
    if kept is None:
        kept = {**entry, "rows": []}
        models.append(kept)
    rows = [r for r in kept["rows"] if r.get("label") != row["label"]] + [row]
    unchanged = kept.get("base_weights_unchanged") is not False and entry["base_weights_unchanged"]
    kept.update({k: v for k, v in entry.items() if v is not None or k not in kept})
    kept.update(seconds=round(seconds_before + entry["seconds"], 1), base_weights_unchanged=unchanged,
                rows=sorted(rows, key=_row_order))
    result["seconds"] = round(sum(m.get("seconds") or 0 for m in models), 1)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,minilm-l6")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS),
                        help=f"comma-separated, of {', '.join(ALGORITHMS)}; one per call keeps each call short")
    parser.add_argument("--sparsity", default="none",
                        help=f"comma-separated, of {', '.join(SPARSITIES)}: crossed with every format and method")
    parser.add_argument("--group-size", type=int, default=None,
                        help=f"values per scale (default: the first of {', '.join(map(str, GROUP_SIZES))} that "
                             "divides every layer's input width)")
    parser.add_argument("--device", default="cpu", help="cpu or a GPU such as cuda:0")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--note", default=None, help="recorded with the result, e.g. that the machine was shared")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    parser.add_argument("--replace", action="store_true",
                        help="start --json afresh instead of keeping the rows this call does not measure again")
    parser.add_argument("--allow-short-calibration", action="store_true",
                        help="time calibrated methods on a text shorter than the widest layer's inputs (the rows' "
                             "accuracy then does not hold: for a random checkpoint's times)")
    args = parser.parse_args(argv)
    try:
        run(args)
    except QlabError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def run(args: argparse.Namespace) -> None:
    models, algorithms, sparsities = _names(args.models), _names(args.algorithms), _names(args.sparsity)
    formats = parse_formats(args.formats)
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown or not algorithms or not models:
        raise QlabError(f"--algorithms takes {', '.join(ALGORITHMS)} and --models at least one model; got "
                        f"'{args.algorithms}' and '{args.models}'.")
    if not sparsities or not set(sparsities) <= set(SPARSITIES):
        raise QlabError(f"--sparsity takes {', '.join(SPARSITIES)}; got '{args.sparsity}'.")
    if args.group_size is not None and args.group_size < 1:
        raise QlabError(f"--group-size must be a positive number of values; got {args.group_size}.")
    EvalSpec(args.tokens)  # a bad budget is refused before any model loads
    settings = {
        "eval_tokens": args.tokens, "calibration_tokens": activations.CALIBRATION_TOKENS,
        "gptq_damp_percent": gptq.DAMP_PERCENT, "awq_grid_points": awq.GRID_POINTS, "hqq_steps": hqq.STEPS,
        "machine": detect_this_machine().name, "python": platform.python_version(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }
    path = Path(output_file(args.json))
    previous = read_previous(path, settings, args.replace)
    result = {"benchmark": "rounding methods (RTN, GPTQ, GPTQ act-order, AWQ, HQQ), whole model, weight-only "
                           "simulation" + (", with 2:4 sparsity" if sparsities != ["none"] else ""), **settings, "note": args.note, "models": []}
    if previous is not None:
        result.update(models=previous["models"], note=args.note or previous.get("note"))
    started = time.perf_counter()
    for model in models:
        earlier = None  # this model's seconds from earlier calls, once its name as loaded is known
        print(f"{model}: {', '.join(formats)} x {', '.join(algorithms)} x sparsity {', '.join(sparsities)} at "
              f"{args.tokens} tokens", flush=True)
        for entry, row in measure(model, args.tokens, formats, args.device, algorithms,
                                  args.allow_short_calibration, sparsities, args.group_size):
            if earlier is None:
                earlier = next((m.get("seconds") or 0 for m in result["models"] if m["model"] == entry["model"]), 0)
            merge(result, entry, row, earlier)
            write_atomic(path, json.dumps(result, indent=1, default=float))
            quality = (f"ppl {row['ppl']:8.2f}  KLD {row['kld_mean']:.4f}  top-1 {row['top1_agreement']:.3f}"
                       if "ppl" in row else f"cosine {row['cosine_mean']:.4f}")
            print(f"{entry['model']:14} {row['label']:30} {row['bits_per_weight']:.3f} bpw  {quality}  rounding "
                  f"{row['rounding_seconds']:.1f} s  (row {row['seconds']:.1f} s, {time.perf_counter() - started:.0f} s "
                  f"in all; saved to {path})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
