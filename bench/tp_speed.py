"""Decode speed under transformers' tensor parallelism (``tp_plan="auto"``, NCCL), beside the planner's
tensor-parallel memory and the roofline of N GPUs.

    torchrun --nproc-per-node 2 bench/tp_speed.py --config llama-3.1-70b --out bench/results/tp_speed.json
    python bench/tp_speed.py --config llama-3.1-70b --gpus 2 --dry-run      # the plan and predictions only

Rank 0 writes a random-initialised bf16 checkpoint of ``assets/model_configs/<config>.json`` once
(``bench/random_checkpoint.py``: one shard of RAM at a time; speed does not depend on weight values), then every
rank loads it with ``tp_plan="auto"`` in bf16, or quantized weight-only by torchao (int4 in groups of 128, fp8 per
channel), and times ``generate`` at each batch: decode tokens/s = batch x (new tokens - 1) / (time of N new
tokens - time of 1 new token), so the prefill is left out. A variant that fails (a quantized layout the TP plan
cannot shard) is recorded with its error, not dropped. NVLink multicast (NVLS) stays off: NCCL_NVLS_ENABLE=0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Weight variant -> (qlab format for the prediction, torchao config class for transformers' TorchAoConfig).
WEIGHTS = {"bf16": ("bf16", None), "fp8": ("fp8_e4m3", "Float8WeightOnlyConfig"),
           "int4": ("int4", "Int4WeightOnlyConfig")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--gpus`` defaults to torchrun's WORLD_SIZE."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="llama-3.1-70b", help="a catalog model under assets/model_configs")
    p.add_argument("--hardware", default="h200-sxm-141gb", help="catalog GPU id for the predictions")
    p.add_argument("--gpus", type=int, default=int(os.environ.get("WORLD_SIZE", "0")) or None,
                   help="tensor-parallel degree (default: torchrun's WORLD_SIZE)")
    p.add_argument("--weights", default="bf16,int4,fp8", help=f"comma-separated: {', '.join(WEIGHTS)}")
    p.add_argument("--batches", default="1,16", help="comma-separated decode batches")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--checkpoint", default=None, help="where the random checkpoint goes (default /tmp/tp-<config>)")
    p.add_argument("--out", default=None, help="JSON result file (rank 0 writes it)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the predictions; run nothing")
    ns = p.parse_args(argv)
    ns.weights = [w.strip() for w in ns.weights.split(",") if w.strip()]
    unknown = [w for w in ns.weights if w not in WEIGHTS]
    if unknown:
        p.error(f"unknown weights {', '.join(unknown)}; use {', '.join(WEIGHTS)}")
    try:
        ns.batches = [int(b) for b in ns.batches.split(",")]
    except ValueError:
        p.error(f"--batches must be whole numbers separated by commas, got '{ns.batches}'")
    if not ns.gpus or ns.gpus < 1:
        p.error("--gpus is needed outside torchrun (under torchrun it is WORLD_SIZE)")
    if ns.prompt_tokens < 1 or ns.new_tokens < 2:
        p.error("--prompt-tokens must be >= 1 and --new-tokens >= 2 (one token is the prefill)")
    ns.checkpoint = Path(ns.checkpoint or f"/tmp/tp-{ns.config}")
    return ns


def predictions(ns: argparse.Namespace) -> list[dict]:
    """The planner's per-GPU memory and the N-GPU roofline for each weight variant and batch."""
    from qlab.analyses import placement

    rows = placement.tensor_parallel(ns.config, ns.hardware, ns.gpus, [WEIGHTS[w][0] for w in ns.weights],
                                     ns.prompt_tokens + ns.new_tokens, ns.batches)
    variants = {WEIGHTS[w][0]: w for w in ns.weights}
    return [{"weights": variants[row["format"]], **row} for row in rows]


def plan(ns: argparse.Namespace) -> dict:
    """What a run does, without doing it: the command, the environment, the measurements and the predictions."""
    return {"command": f"torchrun --nproc-per-node {ns.gpus} bench/tp_speed.py --config {ns.config} "
                       f"--weights {','.join(ns.weights)} --batches {','.join(map(str, ns.batches))}",
            "env": {"NCCL_NVLS_ENABLE": "0"}, "checkpoint": str(ns.checkpoint), "gpus": ns.gpus,
            "measurements": [{"weights": w, "batch": b, "prompt_tokens": ns.prompt_tokens,
                              "new_tokens": ns.new_tokens} for w in ns.weights for b in ns.batches],
            "predictions": predictions(ns), "measured": False}


def _quantization_config(variant: str):
    name = WEIGHTS[variant][1]
    if name is None:
        return None
    import torchao.quantization
    from transformers import TorchAoConfig

    config_class = getattr(torchao.quantization, name)
    return TorchAoConfig(config_class(group_size=128) if variant == "int4" else config_class())


def _decode_tokens_per_s(model, batch: int, ns: argparse.Namespace, device) -> float:
    import torch
    import torch.distributed as dist

    # Every rank must feed the same tokens: a generator with one seed, on the CPU.
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, ns.prompt_tokens), generator=generator).to(device)

    def timed(new_tokens: int) -> float:
        dist.barrier()
        torch.cuda.synchronize()
        started = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - started

    timed(4)  # warm-up: kernels, NCCL communicators
    return batch * (ns.new_tokens - 1) / (timed(ns.new_tokens) - timed(1))


def run(ns: argparse.Namespace) -> dict:
    """Measure every (weights, batch) on this torchrun group; rank 0 gets the rows."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, DistributedConfig

    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = torch.device(f"cuda:{local_rank}")
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    if rank == 0 and not (ns.checkpoint / "config.json").exists():
        from bench.random_checkpoint import build

        build(ns.config, ns.checkpoint, device=str(device))
    dist.barrier()
    rows = []
    for variant in ns.weights:
        row = {"weights": variant, "gpus": ns.gpus}
        try:
            model = AutoModelForCausalLM.from_pretrained(
                ns.checkpoint, dtype=torch.bfloat16, distributed_config=DistributedConfig(tp_plan="auto"),
                quantization_config=_quantization_config(variant))
            row["allocated_bytes_per_gpu"] = torch.cuda.memory_allocated(device)
            for batch in ns.batches:
                torch.cuda.reset_peak_memory_stats(device)
                rows.append({**row, "batch": batch,
                             "decode_tokens_per_s": round(_decode_tokens_per_s(model, batch, ns, device), 2),
                             "peak_allocated_bytes_per_gpu": torch.cuda.max_memory_allocated(device)})
            del model
            torch.cuda.empty_cache()
        except Exception as error:  # a variant that cannot run is a result too; keep its reason
            rows.append({**row, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"})
    result = {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
              "world_size": dist.get_world_size(), "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
              "rows": rows, "measured": True}
    dist.destroy_process_group()
    return result if rank == 0 else {}


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    record = plan(ns)
    if ns.dry_run:
        print(json.dumps(record, indent=1))
        return 0
    os.environ["NCCL_NVLS_ENABLE"] = "0"  # before NCCL starts: multicast objects are not available on lent GPUs
    result = run(ns)
    if result:
        record.update(result, measured=True)
        text = json.dumps(record, indent=1)
        Path(ns.out).write_text(text) if ns.out else print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
