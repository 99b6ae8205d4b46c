"""Launch shapes of the int4tq GEMV (``qlab.backends.int4_triton``) on a GPU: `python bench/int4tq_tune.py --json OUT`.

For each weight shape of a catalog model's block (gpt-fast's fused layout) and its output head, times the bare
kernel (no partial-sum reduction after it) for every combination of columns per program, warps and input split
tried, with ``bench/layer_ceiling.py``'s timing (a CUDA graph of calls, each after an L2-evicting write whose own
time is subtracted), and checks its products against the dequantized weight. ``launch_shape``'s rule comes from
these numbers; the row ``launch_shape`` is the rule's own choice, timed the same way. Two variants of the kernel
were timed with it and removed, neither faster (``bench/results/int4tq_variants_h100.json``): each nibble read in
place (one shift a word instead of one a nibble) and Triton's software pipelining of the loop over groups.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layer_ceiling  # noqa: E402
import torch  # noqa: E402

from qlab.backends import int4_triton  # noqa: E402

SHAPES = {"wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336), "wqkv": (6144, 4096),
          "output": (128256, 4096)}  # Llama-3.1-8B, fused layout: (out, in)


def time_kernel(layer: int4_triton.Int4Linear, x: torch.Tensor, block: int, groups: int, warps: int) -> dict:
    def run(x):
        return int4_triton.gemv(x, layer.packed, layer.scales, layer.zeros, block, groups, warps)

    seconds, _ = layer_ceiling._seconds_per_call(run, x, 20, 5)
    median = statistics.median(seconds)
    columns = -(-layer.out_features // block)
    return {"block": block, "warps": warps, "groups": groups,
            "programs": columns * layer.in_features // (64 * groups), "us": round(median * 1e6, 2),
            "read_gbps": round(layer.packed.numel() * 4 * 1.125 / median / 1e9, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    ns = p.parse_args(argv)
    result = {"benchmark": "int4tq_tune", "gpu": torch.cuda.get_device_name(), "shapes": {}}
    started = time.monotonic()
    for name, (out_features, in_features) in SHAPES.items():
        codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, device="cuda")
        scales = torch.rand(out_features, in_features // 64, device="cuda") * 0.01
        zeros = torch.randint(0, 16, (out_features, in_features // 64), device="cuda").float()
        layer = int4_triton.Int4Linear(codes, scales, zeros)
        x = torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16)
        weight = (codes.float() - zeros.bfloat16().float().repeat_interleave(64, 1)) \
            * scales.bfloat16().float().repeat_interleave(64, 1)
        expected = (x.float() @ weight.T)[0]
        rows = []
        for block in (256, 512):
            for warps in (1, 2, 4):
                for target in (264, 1056):
                    shape = int4_triton.launch_shape(out_features, in_features, programs=target, block=block,
                                                     warps=warps)
                    if any((r["block"], r["groups"], r["warps"]) == shape for r in rows):
                        continue
                    rows.append(time_kernel(layer, x, *shape))
        rule = int4_triton.launch_shape(out_features, in_features)
        chosen = time_kernel(layer, x, *rule)
        got = int4_triton.gemv(x, layer.packed, layer.scales, layer.zeros, *rule).sum(0)[0]
        result["shapes"][name] = {
            "out_features": out_features, "in_features": in_features, "launch_shape": chosen,
            "relative_error": float((got - expected).abs().max() / expected.abs().max()),
            "tried": sorted(rows, key=lambda r: r["us"])}
        print(f"{name}: rule {chosen['us']} us, best {min(r['us'] for r in rows)} us "
              f"({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
        Path(ns.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
