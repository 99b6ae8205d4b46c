"""``python -m qlab export``: save a model quantized by a real backend (safetensors or GGUF) with its scheme,
or the per-layer scheme JSON of a simulated scheme.

    python -m qlab export --model minilm-l6 --backend quanto-int8 --out exports/minilm-int8
    python -m qlab export --model smollm2-135m --scheme-json --format int4 --out int4-g64.json
    python -m qlab export --model smollm2-135m --compressed-tensors --format int4 --algorithm gptq --out smollm-gptq
    python -m qlab export --list
"""

from __future__ import annotations

import argparse

from qlab.cli.common import (
    add_algorithm_arguments,
    add_scheme_arguments,
    device_options,
    emit,
    json_option,
    load_options,
    progress_bar,
    quiet_option,
    scheme_from_args,
    write_atomic,
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``export`` subcommand to qlab's parser."""
    parser = subparsers.add_parser(
        "export", help="save a really quantized model (safetensors/GGUF + qlab_scheme.json) or a scheme's JSON")
    parser.add_argument("--model", default="minilm-l6", help="bundled slug, local directory or HF id")
    parser.add_argument("--backend", default=None, help="real backend to quantize with (see --list)")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help="directory to create (--backend; default: <qlab data dir>/exports/<model>-<backend>), "
                             "or the JSON file to write (--scheme-json)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    parser.add_argument("--scheme-json", action="store_true",
                        help="simulated scheme: write the per-layer scheme JSON (module -> scheme) instead")
    parser.add_argument("--compressed-tensors", action="store_true",
                        help="simulated scheme (int4/int8; rtn, gptq, gptq-act-order --static-groups, awq): write "
                             "a compressed-tensors checkpoint (pack-quantized) that transformers and vLLM load")
    parser.add_argument("--format", default="int4",
                        help="--scheme-json / --compressed-tensors: weight format from the registry")
    add_scheme_arguments(parser, granularity="group")
    add_algorithm_arguments(parser)
    parser.add_argument("--text-file", default=None,
                        help="--compressed-tensors with gptq/awq: UTF-8 text to calibrate on (its last 4096 tokens; "
                             "default: pydoc topics)")
    quiet_option(parser)
    device_options(parser)
    parser.add_argument("--list", action="store_true", help="list the backends that can export, and whether "
                                                            "each runs here")
    json_option(parser, "print what was written as JSON")
    parser.set_defaults(func=cmd_export, tokens=512)  # EvalSpec's budget: an export evaluates nothing
    return parser


def cmd_export(args: argparse.Namespace) -> None:
    """Export, then print the directory, files and sizes (or JSON)."""
    from qlab.core.errors import QlabError

    if args.list:
        _list(args)
        return
    if args.scheme_json:
        _scheme_json(args)
        return
    if args.compressed_tensors:
        _compressed_tensors(args)
        return
    if not args.backend:
        raise QlabError("give --backend (a real backend, see `python -m qlab export --list`), --scheme-json or "
                        "--compressed-tensors.")
    from qlab.backends import export
    from qlab.models.loading import load

    export._backend(args.backend)  # an unknown or unexportable backend fails before the model loads
    if args.out is not None and not args.out.strip():
        raise QlabError("--out is empty; name the directory to create (or leave --out out for the default).")
    loaded = load(args.model, **load_options(args))
    out = args.out or export.default_out_dir(loaded.name, args.backend)
    result = export.export_quantized(loaded, args.backend, out, force=args.force)
    record = {**result.to_record(), "model": loaded.name, "reload": "qlab.backends.export.load_exported(out_dir)"}
    if args.json is not None:
        emit(record, args.json)
        return
    print(f"{loaded.name} quantized by {result.backend} -> {result.out_dir}")
    print(f"  {result.weights_file}: {result.weights_bytes / 1e6:.1f} MB; files: {', '.join(result.files)}")
    print(f"  reload: python -c \"from qlab.backends.export import load_exported; load_exported('{result.out_dir}')\"")


def _list(args: argparse.Namespace) -> None:
    from qlab import backends
    from qlab.backends import export

    rows = []
    for slug in export.exportable():
        backend = backends.get_backend(slug)
        ok, reason = backend.available("cpu")
        rows.append({"backend": slug, "library": backend.library, "kinds": list(backend.kinds),
                     "available_here": ok, "reason": None if ok else reason})
    if args.json is not None:
        emit(rows, args.json)
        return
    for row in rows:
        print(f"{row['backend']:18} {row['library']:18} {'yes' if row['available_here'] else 'no: ' + row['reason']}")


def _scheme_json(args: argparse.Namespace) -> None:
    import json

    from qlab.core.errors import QlabError
    from qlab.models.loading import load
    from qlab.store import scheme_export

    if not args.out:
        raise QlabError("--scheme-json needs --out FILE.json.")
    loaded = load(args.model, **load_options(args))
    payload = scheme_export(loaded, scheme_from_args(args, args.format))
    write_atomic(args.out, json.dumps(payload, indent=1))
    if args.json is not None:
        emit({"out": args.out, "model": loaded.name, "layers": len(payload["layers"])}, args.json)
        return
    print(f"wrote {args.out}: {len(payload['layers'])} layers of {loaded.name} at {args.format}")


def _compressed_tensors(args: argparse.Namespace) -> None:
    from qlab.backends import export
    from qlab.backends.export_compressed import BACKEND, check_export, check_expressible, export_compressed
    from qlab.cli.common import eval_spec
    from qlab.core.errors import QlabError
    from qlab.models.loading import load

    if args.backend:
        raise QlabError("--compressed-tensors writes qlab's own rounding; drop --backend (or --compressed-tensors).")
    scheme = scheme_from_args(args, args.format)
    check_expressible(scheme)  # before the model loads
    if args.out is not None and not args.out.strip():
        raise QlabError("--out is empty; name the directory to create (or leave --out out for the default).")
    spec = eval_spec(args)
    loaded = load(args.model, **load_options(args))
    out = args.out or export.default_out_dir(loaded.name, f"{BACKEND}-{scheme.label.replace(' ', '-')}")
    check_export(loaded, scheme, out, args.force)  # one line, before the progress bar starts
    with progress_bar(args.quiet, "export") as progress:
        result = export_compressed(loaded, scheme, out, force=args.force, spec=spec, progress=progress)
    record = {**result.to_record(), "model": loaded.name, "scheme": scheme.to_dict(),
              "reload": "transformers.AutoModelForCausalLM.from_pretrained(out_dir)"}
    if args.json is not None:
        emit(record, args.json)
        return
    print(f"{loaded.name} at {scheme.label} -> {result.out_dir} (compressed-tensors, pack-quantized)")
    print(f"  {result.weights_file}: {result.weights_bytes / 1e6:.1f} MB; files: {', '.join(result.files)}")
    print(f"  reload: python -c \"from transformers import AutoModelForCausalLM; "
          f"AutoModelForCausalLM.from_pretrained('{result.out_dir}')\"")
