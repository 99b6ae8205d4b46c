"""Per-layer ceiling of each GPU weight format: `python bench/layer_ceiling.py [--formats F,...] [--json OUT]`.

A decode step's weight matmuls are one-row products (batch-1 GEMV). This program times each distinct weight
shape of one transformer block (q/k/v and gate/up as one linear each, gpt-fast's layout, or separate with
``--layout separate``) and the output head, alone, in each format, through the same recipe
(``qlab.backends.gpu_recipe.quantize``) and inductor settings that the end-to-end benchmark (``gpu_speed.py``)
uses. Summed over the model's layers, that is the fastest a step's weight matmuls can be with that kernel:
when an end-to-end goal is missed, this says whether the kernel or the rest of the step is short of it.

Each product is compiled on its own and timed from a CUDA graph of calls, so the host's launch cost is
excluded, and every call is preceded by a write of 256 MB that evicts the weights from the L2 cache, whose time
alone is measured in the same way and subtracted: in a model the next layer's weights are never in L2, and the
smaller ones (4096 x 4096 in int4: 9 MB) would fit in the H100/H200's 50 MB. The JSON is rewritten after each
format, so a cut-off run keeps what it measured.

On a lent GPU (torchao and gemlite from the carried wheels, installed with ``--target`` on PYTHONPATH):
    python bench/layer_ceiling.py --formats bf16,int8gl,float8gl,int4wo,int4gl,int8wo,float8wo --json $OUT/layer_ceiling.json
Dry run on a CPU (tiny shapes, no graphs, no compiles):
    python bench/layer_ceiling.py --dry-run --device cpu --dtype fp32 --eager --formats bf16,int8wo --json /tmp/c.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import gpu_speed  # noqa: E402  (same config loading and dry-run shapes as the end-to-end benchmark)
import torch  # noqa: E402
from torch import nn  # noqa: E402

from qlab.backends import gpu_recipe  # noqa: E402

L2_FLUSH_BYTES = 256 << 20


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-config", default="llama-3.1-8b", help="catalog config name or a config.json path")
    p.add_argument("--formats", default="bf16,int8gl,float8gl,int4wo,int4gl,int8wo,float8wo")
    p.add_argument("--layout", choices=("fused", "separate"), default="fused")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--calls", type=int, default=20, help="calls per timed graph replay")
    p.add_argument("--repetitions", type=int, default=7, help="timed replays per shape (the median is kept)")
    p.add_argument("--eager", action="store_true", help="no torch.compile (a quick CPU check of the code paths)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes (checks the code paths, e.g. on a CPU)")
    p.add_argument("--json", help="output file (rewritten after each format)")
    return p


def one_block_model(ns: argparse.Namespace) -> tuple[gpu_recipe.Args, int]:
    """The end-to-end benchmark's model cut to one block (its linears and the head are what is timed), and the
    number of blocks of the real config, which the step's sum multiplies by."""
    argv = ["--model-config", ns.model_config, "--device", ns.device, "--dtype", ns.dtype]
    args = gpu_speed.args_from(gpu_speed.parser().parse_args(argv + (["--dry-run"] if ns.dry_run else [])))
    layers = args.config["num_hidden_layers"]
    return gpu_recipe.Args(**{**args.__dict__, "config": {**args.config, "num_hidden_layers": 1},
                              "fuse_projections": ns.layout == "fused"}), layers


def _seconds_per_call(fn, x: torch.Tensor, calls: int, repetitions: int) -> tuple[list[float], str]:
    """Seconds per call, one value per repetition, and how they were timed. On a GPU: from a CUDA graph of
    ``calls`` calls, each after the L2-evicting write, whose own time is subtracted; where a kernel cannot be
    captured in a graph, from the same calls launched one by one (launch cost included)."""
    if x.device.type != "cuda":
        fn(x)
        times = []
        for _ in range(repetitions):
            start = time.perf_counter()
            for _ in range(calls):
                fn(x)
            times.append((time.perf_counter() - start) / calls)
        return times, "host clock, no L2 eviction"
    scratch = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=x.device)

    def flush() -> None:
        scratch.fill_(1)

    def flush_and_call() -> None:
        scratch.fill_(1)
        fn(x)

    def runner(body, graphed: bool):
        for _ in range(3):  # compiles, autotunes and allocates before anything is captured or timed
            body()
        torch.cuda.synchronize()
        if not graphed:
            return lambda: [body() for _ in range(calls)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # CUDA graph capture asks for a warm-up off the default stream
            body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                body()
        return graph.replay

    def seconds(run) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / calls

    try:
        flushes, both, how = runner(flush, True), runner(flush_and_call, True), "CUDA graph, L2 evicted"
    except RuntimeError:  # e.g. a kernel that synchronises with the host, which a graph cannot capture
        torch.cuda.synchronize()
        flushes, both, how = runner(flush, False), runner(flush_and_call, False), "launched, L2 evicted"
    return [seconds(both) - seconds(flushes) for _ in range(repetitions)], how


def measure_format(ns: argparse.Namespace, fmt: str) -> dict:
    """Every shape of one block and the head in format ``fmt``: seconds per one-row product and bytes read."""
    args, layers = one_block_model(ns)
    model = gpu_recipe.build_compact(args)
    names = {f"layers.0.{name}": name for name, module in model.layers[0].named_children()
             if isinstance(module, nn.Linear)} | {"output": "output"}
    in_features = {name: model.get_submodule(name).in_features for name in names}
    out_features = {name: model.get_submodule(name).out_features for name in names}
    gpu_recipe.quantize(model, fmt, skip=())
    if not ns.eager:
        gpu_recipe._inductor_settings()
    shapes = {}
    for name, short in names.items():
        module = model.get_submodule(name)
        x = torch.randn(1, 1, in_features[name], device=args.device, dtype=args.dtype)
        weight_bytes = sum(gpu_recipe.tensor_bytes(t) for t in (*module.parameters(), *module.buffers()))
        with torch.no_grad():
            if ns.eager:
                fn = module
            else:
                torch._dynamo.reset()  # each shape compiles afresh, tuned for itself
                fn = torch.compile(module, dynamic=False)
            seconds, timed_as = _seconds_per_call(fn, x, ns.calls, ns.repetitions)
        median = statistics.median(seconds)
        shapes[short] = {"out_features": out_features[name], "in_features": in_features[name],
                         "weight_bytes": weight_bytes, "us_per_call": round(median * 1e6, 2),
                         "us_min": round(min(seconds) * 1e6, 2), "us_max": round(max(seconds) * 1e6, 2),
                         "read_gbps": round(weight_bytes / median / 1e9, 1) if median > 0 else None,
                         "timed_as": timed_as}

    def per_step(key: str) -> float:  # every block's shapes once per layer, the head once
        return layers * sum(row[key] for name, row in shapes.items() if name != "output") + shapes["output"][key]

    step, step_bytes = per_step("us_per_call"), per_step("weight_bytes")
    gpu_format = gpu_recipe.FORMATS[fmt]
    return {"format_slug": fmt, "format": gpu_format.scheme.format, "kernel": gpu_format.kernel,
            "layout": ns.layout, "layers": layers, "shapes": shapes, "step_matmul_ms": round(step / 1000, 4),
            "step_weight_bytes": step_bytes, "step_read_gbps": round(step_bytes / (step * 1e-6) / 1e9, 1)}


def ratios(rows: list[dict]) -> None:
    """Each format's matmul time against BF16's of the same run, per shape and per step: its ceiling."""
    base = next((row for row in rows if row.get("format_slug") == "bf16" and "shapes" in row), None)
    if base is None:
        return
    for row in rows:
        if "shapes" not in row:
            continue
        row["step_matmul_speedup_over_bf16"] = round(base["step_matmul_ms"] / row["step_matmul_ms"], 3)
        for name, shape in row["shapes"].items():
            shape["speedup_over_bf16"] = round(base["shapes"][name]["us_per_call"] / shape["us_per_call"], 3)


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    on_gpu = ns.device.startswith("cuda")
    result = {"benchmark": "layer_ceiling", "model_config": ns.model_config, "device": ns.device,
              "gpu": torch.cuda.get_device_name() if on_gpu else None, "torch": torch.__version__,
              "copy_gbps": gpu_recipe.copy_bandwidth_gbps("cuda") if on_gpu else None, "rows": []}
    for fmt in ns.formats.split(","):
        try:
            row = measure_format(ns, fmt)
        except Exception as error:  # a missing library or a kernel that refuses a shape must not lose the others
            row = {"format_slug": fmt, "error": f"{type(error).__name__}: {error}"[:300]}
        result["rows"].append(row)
        ratios(result["rows"])
        if "shapes" in row:
            print(f"{fmt:9} {row['step_matmul_ms']:.3f} ms a step, {row['step_read_gbps']} GB/s, "
                  f"{row.get('step_matmul_speedup_over_bf16', '?')}x bf16", file=sys.stderr, flush=True)
        else:
            print(f"{fmt:9} {row['error']}", file=sys.stderr, flush=True)
        if ns.json:
            Path(ns.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
