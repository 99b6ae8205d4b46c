"""The streamed sweep's per-layer quantizer: the old route, torch's fused route and the compiled kernels, in one run.

    python bench/quantizer.py [--device cpu|cuda] [--dtype bf16] [--shapes 2048x8192,8192x2048] [--layers 2]
                              [--formats bf16,fp16,int8,int4,nf4,fp8_e4m3] [--group-size 64] [--repeats 3]
                              [--chunk-elements N] [--threads N] [--json OUT]

Per scheme (round to nearest, ``--group-size`` groups, as ``python -m qlab bench sweep`` builds them), on
random weights of the given shapes in ``--dtype``:
- ``before_s``: ``quantize_weight(w, scheme).dequantize(dtype)`` per weight, what the streamed sweep ran
  until the fused route (codes kept, float32 passes, a device sync per check);
- ``after_s``: ``dequantized_weights`` of the same weights, what it runs now (one sync for all of them; on a CPU
  ranges, scales and rounding of integer, table and float formats in ``qlab.core.cpu_kernels``' compiled
  passes, on a GPU ranges, scales and rounding in ``qlab.core.gpu_kernels``' one Triton launch per weight);
- ``rounding_kernel_only_s`` (GPU): torch's scales, then the Triton rounding pass (the route before the fused
  kernel), and ``fused_speedup`` = that / after; ``after_gb_per_s``: weights read and written per second;
- ``torch_fused_s``: the same without the compiled kernels (torch's chunked passes);
- ``speedup``: before / after, ``compiled_speedup``: torch_fused / after (the three alternate within each repeat,
  so drifting load hits them alike), and ``identical``: whether all three give the same bits.
Seconds are the median of ``--repeats``; on a shared machine read the ratios, not the seconds. On a busy CPU,
``--threads 1`` measures the work itself: with two threads every op ends in a barrier that a loaded machine
stretches, and the fused route runs more (smaller) ops than the old one.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from qlab.core import cpu_kernels, gpu_kernels, quant  # noqa: E402
from qlab.core.algorithms import dequantized_weights, quantize_weight  # noqa: E402
from qlab.core.quant import SCALE_DTYPES, QuantScheme  # noqa: E402
from qlab.models.hardware import detect_this_machine  # noqa: E402

DTYPES = {**SCALE_DTYPES, "fp32": torch.float32}


def _timed(device: torch.device, function) -> tuple[object, float]:
    """The result and wall seconds of ``function()``, the device drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - started


def _same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return all(torch.equal(x.view(view[x.element_size()]), y.view(view[y.element_size()])) for x, y in zip(a, b))


def measure(scheme: QuantScheme, weights: list[torch.Tensor], dtype: torch.dtype, repeats: int) -> dict:
    """Median seconds of the old route, torch's fused route and today's over ``weights``, and whether they agree."""
    device = weights[0].device
    before, fused, after, unfused, identical = [], [], [], [], True
    layers = [(w, scheme, None) for w in weights]
    for _ in range(repeats):
        old, seconds = _timed(device, lambda: [quantize_weight(w, scheme).dequantize(dtype) for w in weights])
        before.append(seconds)
        compiled_from = cpu_kernels.MIN_VALUES, gpu_kernels.MIN_VALUES
        cpu_kernels.MIN_VALUES = gpu_kernels.MIN_VALUES = float("inf")
        try:
            torch_route, seconds = _timed(device, lambda: dequantized_weights(layers, dtype))
        finally:
            cpu_kernels.MIN_VALUES, gpu_kernels.MIN_VALUES = compiled_from
        fused.append(seconds)
        new, seconds = _timed(device, lambda: dequantized_weights(layers, dtype))
        after.append(seconds)
        identical &= _same_bits(old, new) and _same_bits(old, torch_route)
        if device.type == "cuda":  # the GPU kernel that rounds with torch's scales, as before the fused one
            widest, gpu_kernels.MAX_FUSED_WIDTH = gpu_kernels.MAX_FUSED_WIDTH, 0
            try:
                rounded, seconds = _timed(device, lambda: dequantized_weights(layers, dtype))
            finally:
                gpu_kernels.MAX_FUSED_WIDTH = widest
            unfused.append(seconds)
            identical &= _same_bits(old, rounded)
            del rounded
        del old, torch_route, new  # each repeat starts with no materialised weights held
    before_s, fused_s, after_s = (statistics.median(times) for times in (before, fused, after))
    moved = sum(w.numel() * (w.element_size() + torch.finfo(dtype).bits // 8) for w in weights)
    row = {"label": scheme.label, "before_s": round(before_s, 4), "torch_fused_s": round(fused_s, 4),
           "after_s": round(after_s, 4), "speedup": round(before_s / after_s, 3),
           "compiled_speedup": round(fused_s / after_s, 3), "identical": identical,
           "after_gb_per_s": round(moved / after_s / 1e9, 1)}
    if unfused:  # ``after_s`` is then the fused kernel (scales and rounding in one launch per weight)
        row["rounding_kernel_only_s"] = round(statistics.median(unfused), 4)
        row["fused_speedup"] = round(row["rounding_kernel_only_s"] / after_s, 3)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--shapes", default="2048x8192,8192x2048", help="out x in, comma-separated")
    parser.add_argument("--layers", type=int, default=2, help="weights of each shape")
    parser.add_argument("--formats", default="bf16,fp16,int8,int4,nf4,fp8_e4m3")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-elements", type=int, default=None,
                        help="values the fused route rounds at once on this device (default: qlab's)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write the result here as well")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.chunk_elements:
        quant.FAKE_QUANTIZE_CHUNK_ELEMENTS[device.type] = args.chunk_elements
    generator = torch.Generator(device=device).manual_seed(0)
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
    weights = [(torch.randn(shape, generator=generator, device=device) * 0.02).to(dtype)
               for shape in shapes for _ in range(args.layers)]
    rows = [measure(QuantScheme(name, "group", args.group_size), weights, dtype, args.repeats)
            for name in args.formats.split(",")]
    host = detect_this_machine().host
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
              or platform.machine(), "cpu_model": host.cpu_model, "cpu_flags": sorted(host.cpu_flags),
              "threads": torch.get_num_threads(), "dtype": args.dtype,
              "shapes": args.shapes, "layers_per_shape": args.layers, "repeats": args.repeats,
              "chunk_elements": quant.FAKE_QUANTIZE_CHUNK_ELEMENTS.get(device.type),
              "weights_elements": sum(w.numel() for w in weights), "rows": rows}
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
