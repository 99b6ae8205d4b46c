"""int4tq's prompt path on a GPU: `python bench/int4tq_prefill.py --json OUT`.

The weight matmuls of a 128-token prompt in Llama-3.1-8B shapes (gpt-fast's fused layout), each timed alone with
CUDA events, summed over the 32 blocks and the head: BF16, int4tq as a prompt runs it (the weight written out in
bf16 by its Triton kernel, then cuBLAS) and as a single row runs it (the GEMV, here once per prompt row), with
each product's error against the dequantized weight.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from int4tq_tune import SHAPES  # noqa: E402  (the weight shapes the launch rule was tuned on)

from qlab.backends import gpu_recipe, int4_triton  # noqa: E402

COUNT = {"wqkv": 32, "w13": 32, "wo": 32, "w2": 32, "output": 1}
PROMPT_ROWS = 128


def median_us(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return round(sorted(times)[len(times) // 2], 1)


def measure(out_features: int, in_features: int) -> dict:
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16)
    layer = int4_triton.Int4Linear(*gpu_recipe.int4_groups(weight, 64))
    x = torch.randn(PROMPT_ROWS, in_features, device="cuda", dtype=torch.bfloat16)
    reference = x.float() @ int4_triton.dequantize(layer.packed, layer.scales, layer.zeros).float()
    with torch.no_grad():
        got = layer(x).float()
        one_row = layer(x[:1]).float()
        row = {"rel_err_prompt": float((got - reference).abs().max() / reference.abs().max()),
               "rel_err_one_row": float((one_row - reference[:1]).abs().max() / reference[:1].abs().max()),
               "bf16_us": median_us(lambda: x @ weight.T),
               "dequantize_then_cublas_us": median_us(lambda: layer(x))}
        saved = int4_triton.DEQUANTIZE_FROM_ROWS
        int4_triton.DEQUANTIZE_FROM_ROWS = 10**9  # every row through the GEMV, as the first version did
        try:
            row["gemv_per_row_us"] = median_us(lambda: layer(x), reps=5)
        finally:
            int4_triton.DEQUANTIZE_FROM_ROWS = saved
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    ns = parser.parse_args()
    result = {"gpu": torch.cuda.get_device_name(), "rows": PROMPT_ROWS, "shapes": {}}
    totals = {"bf16": 0.0, "dequantize_then_cublas": 0.0, "gemv_per_row": 0.0}
    for name, (out_features, in_features) in SHAPES.items():
        row = result["shapes"][name] = measure(out_features, in_features)
        for key in totals:
            totals[key] += row[f"{key}_us"] * COUNT[name] / 1000
        print(name, row, flush=True)
        torch.cuda.empty_cache()
    result["step_ms"] = {key: round(value, 2) for key, value in totals.items()}
    print(result["step_ms"])
    Path(ns.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
