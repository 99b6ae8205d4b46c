"""2:4 sparse against dense linear layers on a GPU, through torch's semi-structured sparse tensors:
`python bench/sparse_gpu.py [--json OUT]`.

Each linear of a Llama-3.1-8B block (q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down 4096x14336) is
pruned 2:4 by qlab's magnitude mask, converted with ``to_sparse_semi_structured`` (cuSPARSELt, and CUTLASS), and
timed against the same pruned weight dense at several token counts (CUDA events: the median of 50 products
after 10 warm-ups), twice: called from Python as a model would call it (``*_ms``), and replayed from a CUDA graph
(``*_graph_ms``, the GPU's own time without the host's per-call work; None where capture fails). Each sparse
product is checked against the dense one, and the stored bytes of torch's layout against
``QuantScheme.storage_bytes``. Needs an NVIDIA GPU of compute capability 8.0 or later.
"""

import argparse
import functools
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured  # noqa: E402

from qlab.core.algorithms.sparsity import two_four_mask  # noqa: E402
from qlab.core.quant import QuantScheme  # noqa: E402

LINEARS = {"q_proj / o_proj": (4096, 4096), "k_proj / v_proj": (1024, 4096), "gate_proj / up_proj": (14336, 4096),
           "down_proj": (4096, 14336)}
TOKENS = (1, 16, 128, 1024, 4096)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
WARMUP, REPEATS = 10, 50


def median_ms(run) -> float:
    for _ in range(WARMUP):
        run()
    times = []
    for _ in range(REPEATS):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return sorted(times)[len(times) // 2]


def graph_ms(run) -> float | None:
    """The median time of ``run`` replayed from a CUDA graph, or None where it cannot be captured."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
    except RuntimeError:
        return None
    return median_ms(graph.replay)


def stored_bytes(sparse: SparseSemiStructuredTensor) -> int:
    return sum(t.numel() * t.element_size() for t in (sparse.packed, sparse.meta) if t is not None)


def measure(backend: str, dtype_name: str) -> list[dict]:
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    dtype = DTYPES[dtype_name]
    rows = []
    generator = torch.Generator(device="cuda").manual_seed(0)
    for name, (out_features, in_features) in LINEARS.items():
        weight = torch.randn(out_features, in_features, device="cuda", dtype=dtype, generator=generator) * 0.02
        pruned = weight * two_four_mask(weight)
        sparse = to_sparse_semi_structured(pruned)
        qlab_bytes = sum(QuantScheme(dtype_name, sparsity="2:4").storage_bytes(pruned.shape).values())
        for tokens in TOKENS:
            x = torch.randn(tokens, in_features, device="cuda", dtype=dtype, generator=generator)
            dense_out = torch.nn.functional.linear(x, pruned)
            sparse_out = torch.nn.functional.linear(x, sparse)
            error = ((sparse_out.float() - dense_out.float()).norm() / dense_out.float().norm()).item()
            dense_run, sparse_run = (functools.partial(torch.nn.functional.linear, x, w) for w in (pruned, sparse))
            dense_ms, sparse_ms = median_ms(dense_run), median_ms(sparse_run)
            dense_graph_ms, sparse_graph_ms = graph_ms(dense_run), graph_ms(sparse_run)
            rows.append({"backend": backend, "dtype": dtype_name, "linear": name, "out_features": out_features,
                         "in_features": in_features, "tokens": tokens, "dense_ms": round(dense_ms, 5),
                         "sparse_ms": round(sparse_ms, 5), "speedup": round(dense_ms / sparse_ms, 3),
                         "dense_graph_ms": dense_graph_ms, "sparse_graph_ms": sparse_graph_ms,
                         "graph_speedup": None if not (dense_graph_ms and sparse_graph_ms) else round(
                             dense_graph_ms / sparse_graph_ms, 3),
                         "relative_error": error, "dense_bytes": pruned.numel() * pruned.element_size(),
                         "torch_sparse_bytes": stored_bytes(sparse), "qlab_storage_bytes": qlab_bytes})
            print(f"{backend:10} {dtype_name} {name:20} {tokens:5} tokens  dense {dense_ms:.4f} ms  "
                  f"sparse {sparse_ms:.4f} ms  x{dense_ms / sparse_ms:.2f}  graph {dense_graph_ms} / "
                  f"{sparse_graph_ms} ms  err {error:.1e}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "sparse_gpu.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        raise SystemExit("2:4 sparse tensor cores need an NVIDIA GPU of compute capability 8.0 or later.")
    result = {"benchmark": "2:4 semi-structured sparse vs dense linear, torch to_sparse_semi_structured",
              "device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "python": platform.python_version(), "warmup": WARMUP, "repeats": REPEATS, "rows": []}
    for backend in ("cusparselt", "cutlass"):
        for dtype_name in DTYPES:
            try:
                result["rows"] += measure(backend, dtype_name)
            except (RuntimeError, NotImplementedError) as error:  # a backend this build or GPU lacks
                result.setdefault("skipped", []).append({"backend": backend, "dtype": dtype_name,
                                                         "reason": str(error).splitlines()[0][:300]})
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
