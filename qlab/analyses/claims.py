"""Common headline claims about quantization ("INT8: 4x speed, <2% loss" ...) next to what qlab measures on this machine.

Speed: a micro-benchmark, labelled as such: the forward pass of a stack of MLP blocks with SmolLM2-135M's
widths (576 -> 1536 -> 576), in fp32, bf16, fp16 and torch.ao dynamic int8 (int8 weights; activations
quantized per call at run time), timed on this CPU with torch's current thread count. Accuracy: the sweep's
own rows for the loaded model (perplexity change and top-1 agreement for LMs; cosine and nearest-neighbour
agreement for embedding models).
"""

from __future__ import annotations

import copy
import json
import statistics
import time
import warnings

import torch

from qlab.analyses.explain import presets
from qlab.core.errors import QlabError
from qlab.core.quant import QuantScheme
from qlab.models.loading import ASSETS_DIR

SPEED_VARIANTS: tuple[str, ...] = ("fp32", "bf16", "fp16", "int8 dynamic (torch.ao)")
# The accuracy side of the claims: fp16; int8 per channel; int4 in groups of 32, the block of GGUF's Q4 formats.
CLAIM_SCHEMES: tuple[QuantScheme, ...] = (QuantScheme("fp16"), QuantScheme("int8", "channel"),
                                          QuantScheme("int4", "group", 32))


def _mlp_stack(in_features: int, hidden: int, blocks: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for _ in range(blocks):
        layers += [torch.nn.Linear(in_features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, in_features)]
    return torch.nn.Sequential(*layers).eval()


def _variant(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, torch.dtype]:
    if name == "fp32":
        return model, torch.float32
    if name == "bf16":
        return copy.deepcopy(model).to(torch.bfloat16), torch.bfloat16
    if name == "fp16":
        return copy.deepcopy(model).to(torch.float16), torch.float16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization announces its own deprecation on every call
        quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear},
                                                           dtype=torch.qint8)
    return quantized, torch.float32


def measure_cpu_speed(tokens: tuple[int, ...] = (1, 128), in_features: int = 576, hidden: int = 1536,
                      blocks: int = 4, repeats: int = 15, seed: int = 0) -> list[dict]:
    """Best-of-``repeats`` milliseconds per forward of the MLP stack for each variant and token count, and the
    speed-up over fp32 at the same token count."""
    if not tokens or min(tokens) < 1 or repeats < 3:
        raise QlabError("give at least one token count >= 1 and at least 3 repeats.")
    model = _mlp_stack(in_features, hidden, blocks, seed)
    cases = []
    for name in SPEED_VARIANTS:
        variant, dtype = _variant(model, name)
        for count in tokens:
            x = torch.randn(count, in_features, generator=torch.Generator().manual_seed(seed)).to(dtype)
            cases.append((name, count, variant, x, []))
    with torch.inference_mode():
        for _, _, variant, x, _ in cases:  # warm-up: first calls pack weights and allocate
            variant(x)
            variant(x)
        # Round robin over the cases, so a burst of other work on a shared machine hits every variant alike.
        for _ in range(repeats):
            for _, _, variant, x, timings in cases:
                started = time.perf_counter()
                variant(x)
                timings.append(time.perf_counter() - started)
    # The minimum is the run least disturbed by other work on a shared machine; the median is kept too.
    records = [{"variant": name, "tokens": count, "ms": 1000 * min(timings),
                "median_ms": 1000 * statistics.median(timings), "threads": torch.get_num_threads(),
                "repeats": repeats, "workload": f"{blocks} MLP blocks {in_features}->{hidden}->{in_features}"}
               for name, count, _, _, timings in cases]
    baseline = {r["tokens"]: r["ms"] for r in records if r["variant"] == "fp32"}
    for record in records:
        record["speedup_vs_fp32"] = baseline[record["tokens"]] / record["ms"]
    return records


def _loss(row: dict, reference: dict) -> tuple[str, float | None, str]:
    """The sweep's closest analogue of the common claims' "% loss", with its name and how it was computed."""
    if "ppl" in row and reference.get("ppl"):
        change = 100 * (row["ppl"] / reference["ppl"] - 1)
        return (f"perplexity +{change:.2f}% (top-1 agreement {100 * row['top1_agreement']:.1f}%)", change,
                "perplexity change vs FP32")
    if "retrieval_agreement" in row:
        loss = 100 * (1 - row["retrieval_agreement"])
        return (f"{loss:.1f}% of nearest neighbours changed (cosine {row['cosine_mean']:.4f})", loss,
                "share of texts whose nearest neighbour changed")
    return ("not measured", None, "")


def compare_claims(sweep_records: list[dict] | None, speed_records: list[dict] | None) -> list[dict]:
    """One row per common claim: what it says, and what qlab measured for each part of it here."""
    sweep_records = sweep_records or []
    speed_records = speed_records or []
    by_format = {r["format"]: r for r in sweep_records}
    reference = by_format.get("fp32", {"ppl": sweep_records[0].get("baseline_ppl")} if sweep_records else {})
    speed_variant = {"fp16": ("fp16", "bf16"), "int8": ("int8 dynamic (torch.ao)",), "int4": ()}
    rows = []
    for claim in presets()["performance_claims"]:
        fmt = claim["format"]
        speeds = [f"{r['variant']}: {r['speedup_vs_fp32']:.2f}x at {r['tokens']} token(s)"
                  for r in speed_records if r["variant"] in speed_variant[fmt]]
        loss_text, loss_value, loss_kind = (_loss(by_format[fmt], reference) if fmt in by_format
                                            else ("run the accuracy sweep", None, ""))
        rows.append({
            "claim": claim["claim"], "claimed_speedup": claim["speedup"],
            "measured_speed": "; ".join(speeds) if speeds else (
                "no int4 CPU kernel timed here (see the published figures)" if fmt == "int4"
                else "run the speed benchmark"),
            "claimed_loss": ("minimal" if claim["loss_percent_high"] is None else
                             f"{claim['loss_percent_low']:g}-{claim['loss_percent_high']:g}%"
                             if claim["loss_percent_low"] else f"<{claim['loss_percent_high']:g}%"),
            "measured_loss": loss_text, "measured_loss_percent": loss_value, "loss_measure": loss_kind,
            "scheme": by_format[fmt]["label"] if fmt in by_format else None,
        })
    return rows


def published_speedups() -> list[dict]:
    """Published decode speed-ups (torchao, gpt-fast, ...) from ``assets/speed_references.json``, the Speed
    page's reference list, so the figures live in one place; empty when that file is absent."""
    path = ASSETS_DIR / "speed_references.json"
    if not path.is_file():
        return []
    return list(json.loads(path.read_text(encoding="utf-8")).get("published", []))
