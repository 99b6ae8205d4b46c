"""GPU decode speed per format and code path: `python bench/gpu_speed.py [--install-wheels] [--json OUT]`.

Builds a random-initialised model from ``assets/model_configs/llama-3.1-8b.json`` and measures BF16 (eager HF
``generate`` and a compiled static-cache loop), torchao INT8/INT4/FP8 weight-only (compiled loop, and HF
``generate`` for INT8/INT4 to show the eager trap) and bitsandbytes NF4, batch 1. Each step runs in its own
subprocess with a time limit; the JSON (a list of rows) is rewritten after each step, so a cut-off run keeps
what it measured. On a device without network, ``--install-wheels`` installs the torchao and bitsandbytes
wheels carried in ``bench/wheels`` (``pip install --no-deps``) when they do not import.

Dry run on a CPU (a 2-layer, 256-wide config, a few tokens; checks every code path):
    python bench/gpu_speed.py --dry-run --device cpu --dtype fp32 --json /tmp/gpu_speed_dry.json
On the lent H100 (compiles take about 2-2.5 minutes each, so three compiled steps fit one 10-minute call), then
the rest, then one file (``--profile-steps 10`` adds the top kernels and host ops of ten decode steps to each row):
    python bench/gpu_speed.py --install-wheels --profile-steps 10 \
        --steps int8wo:compiled-loop,int4wo:compiled-loop,bf16:compiled-loop --json $OUT/gpu_speed.json
    python bench/gpu_speed.py --install-wheels --steps float8wo:compiled-loop,nf4:eager-loop,int8wo:hf-generate \
        --json $OUT/gpu_speed_2.json
    python bench/gpu_speed.py --merge first.json second.json --json bench/results/gpu_speed.json
Variants of the recipe are recorded as their own path: ``--keep-subclasses`` (torchao weights compiled as tensor
subclasses: host-bound), ``--skip-guards`` (``compiled-loop:skip-guards``), a compile mode other than
reduce-overhead (``compiled-loop:max-autotune``; on torch 2.11 its int8 compile did not finish in 240 s), e.g.
    python bench/gpu_speed.py --install-wheels --compile-mode max-autotune \
        --steps bf16:compiled-loop,int8wo:compiled-loop,int4wo:compiled-loop --json $OUT/gpu_speed_autotune.json
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qlab import gpu_bench  # noqa: E402

OWN_OPTIONS = {"--json", "--budget-s", "--step-timeout-s", "--install-wheels", "--wheels", "--formats", "--paths",
               "--steps"}
FLAGS = {"--install-wheels"}


def step_arguments(argv: list[str]) -> list[str]:
    """The command line minus the orchestrator's own options: what each step's subprocess gets."""
    kept, skip_next = [], False
    for token in argv:
        if skip_next:
            skip_next = False
            continue
        key = token.split("=", 1)[0]
        if key in OWN_OPTIONS:
            skip_next = "=" not in token and key not in FLAGS
            continue
        kept.append(token)
    return kept


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = gpu_bench.parser().parse_args(argv)
    if ns.step:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
        fmt, path = ns.step.split(":")
        row = gpu_bench.run_step(gpu_bench.args_from(ns), fmt, path)
        Path(ns.row_out).write_text(json.dumps(row, indent=2))
        return 0
    if ns.merge:
        rows = gpu_bench.merge(ns.merge, ns.json)
    else:
        rows = gpu_bench.orchestrate(ns, step_arguments(argv))
    for row in rows:
        rate = row.get("decode_tokens_per_s")
        shown = f"{rate:.1f} tok/s" if rate else row.get("error")
        print(f"{row.get('format_slug', '?'):9} {row.get('path', '?'):14} {shown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
