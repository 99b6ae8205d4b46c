"""Headless multi-GPU proof: a random-initialised catalog model, spread by accelerate over every visible GPU.

    python bench/multi_gpu_sweep.py --config llama-3.2-1b --tokenizer .mgpu/tokenizer --out $OUT

1. builds ``assets/model_configs/<config>.json`` with random weights (speed and placement do not depend on the
   values; the GPU machine has no network, so no checkpoint) and saves it as safetensors plus a tokenizer
   (any local tokenizer whose ids fit the vocabulary, e.g. the bundled SmolLM2 one);
2. loads it the way the CLI does (``qlab.models.loading.load(dir, device_map="auto")``) and records where accelerate
   put each module (``hf_device_map``) and each GPU's allocated memory;
3. runs the documented command, ``python -m qlab sweep --model DIR --device-map auto ... --db --json``;
4. writes ``multi_gpu_sweep.json``: the device map summary, the command, its exit status and rows, and whether
   every metric is finite.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build(config_name: str, tokenizer: Path, directory: Path) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = json.loads((REPO / "assets" / "model_configs" / f"{config_name}.json").read_text())
    fields = {k: v for k, v in fields.items() if not k.startswith("_")}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    for file in tokenizer.iterdir():
        shutil.copy(file, directory / file.name)
    return {"config": config_name, "parameters": sum(p.numel() for p in model.parameters()),
            "saved_dtype": "bf16", "build_seconds": round(time.perf_counter() - started, 1)}


def placement(directory: Path) -> dict:
    from qlab.models.loading import load

    loaded = load(str(directory), device_map="auto")
    device_map = getattr(loaded.model, "hf_device_map", {})
    per_device = Counter(str(v) for v in device_map.values())
    layers = {}
    for name, where in device_map.items():
        if ".layers." in name or name.endswith(".layers"):
            layers.setdefault(str(where), []).append(name.rsplit(".", 1)[-1])
    summary = {
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "hf_device_map": {k: str(v) for k, v in device_map.items()},
        "modules_per_device": dict(per_device),
        "decoder_layers_per_device": {k: f"{v[0]}..{v[-1]} ({len(v)})" for k, v in layers.items()},
        "allocated_bytes_per_gpu": [torch.cuda.memory_allocated(i) for i in range(torch.cuda.device_count())],
        "parameter_devices": sorted({str(p.device) for p in loaded.model.parameters()}),
    }
    summary["spans_two_gpus"] = sum(1 for d in summary["parameter_devices"] if d.startswith("cuda")) >= 2
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="llama-3.2-1b")
    p.add_argument("--tokenizer", default=str(REPO / ".mgpu" / "tokenizer"))
    p.add_argument("--out", required=True)
    p.add_argument("--formats", default="bf16,int8,int4")
    p.add_argument("--tokens", type=int, default=512)
    ns = p.parse_args()
    out = Path(ns.out)
    directory = Path("/tmp") / f"random-{ns.config}"
    report: dict = {"torch": torch.__version__}
    report["model"] = build(ns.config, Path(ns.tokenizer), directory)
    print("built", report["model"], flush=True)
    report["placement"] = placement(directory)
    print("placement", {k: v for k, v in report["placement"].items() if k != "hf_device_map"}, flush=True)
    torch.cuda.empty_cache()
    command = [sys.executable, "-m", "qlab", "sweep", "--model", str(directory), "--device-map", "auto",
               "--formats", ns.formats, "--tokens", str(ns.tokens), "--db", str(out / "runs.sqlite"),
               "--json", str(out / "sweep.json"), "--quiet"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    report["sweep"] = {"command": " ".join(["python", *command[1:]]).replace(str(out), "$OUT"),
                       "exit_status": done.returncode, "seconds": round(time.perf_counter() - started, 1),
                       "stderr_tail": done.stderr.strip().splitlines()[-8:]}
    rows = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").is_file() else []
    report["sweep"]["rows"] = rows
    metrics = [v for row in rows for k, v in row.items() if k in ("ppl", "kld_mean", "kld_p99", "top1_agreement")]
    report["sweep"]["all_metrics_finite"] = bool(metrics) and all(
        isinstance(v, (int, float)) and math.isfinite(v) for v in metrics)
    (out / "multi_gpu_sweep.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report["sweep"].items() if k != "rows"}, indent=1))
    for row in rows:
        print({k: row.get(k) for k in ("label", "ppl", "kld_mean", "top1_agreement", "seconds")})
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
