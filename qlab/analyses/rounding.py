"""The rounding-methods table (RTN, GPTQ, GPTQ act-order, AWQ, HQQ) that ``bench/rounding_methods.py`` measured
on both bundled models, read back as rows a pandas DataFrame takes as they are."""

from __future__ import annotations

import json
from pathlib import Path

from qlab.core.errors import QlabError

RESULTS_FILE = Path(__file__).resolve().parents[2] / "bench" / "results" / "rounding_methods_cpu.json"
METHOD_NAMES: dict[str, str] = {"rtn": "RTN", "gptq": "GPTQ", "gptq-act-order": "GPTQ act-order", "awq": "AWQ",
                                "hqq": "HQQ"}
SPARSITY_NAMES: dict[str, str] = {"2:4": "2:4 (magnitude)", "2:4-sparsegpt": "2:4 (SparseGPT)"}
# Per row: the scheme, then the metrics; a metric the model kind does not have (perplexity for an embedding
# model, cosine for a language model) is None.
# rounding_seconds leaves out collecting the calibration inputs, done once per model (calibration_seconds) and
# shared by every calibrated method, so the methods' times compare.
COLUMNS: tuple[str, ...] = ("model", "method", "format", "group_size", "bits_per_weight", "ppl", "baseline_ppl",
                            "kld_mean", "top1_agreement", "cosine_mean", "retrieval_agreement",
                            "rounding_seconds", "calibration_seconds")


def _method(row: dict) -> str:
    name = METHOD_NAMES.get(row["algorithm"], row["algorithm"])
    if row.get("static_groups"):
        name += " (static groups)"
    sparsity = row.get("sparsity", "none")
    return name if sparsity == "none" else f"{name} + {SPARSITY_NAMES.get(sparsity, sparsity)}"


def rounding_methods(path: str | Path | None = None) -> list[dict]:
    """One record per (model, scheme, method) in ``COLUMNS`` order; empty when the results file is absent (an
    installed package without the benchmark's results)."""
    path = Path(path) if path is not None else RESULTS_FILE
    if not path.is_file():
        return []
    try:
        models = json.loads(path.read_text(encoding="utf-8"))["models"]
        return [{"model": model["model"], "method": _method(row),
                 **{c: row.get(c) for c in COLUMNS[2:-1]}, "calibration_seconds": model.get("calibration_seconds")}
                for model in models for row in model["rows"]]
    except (ValueError, KeyError, TypeError) as error:
        raise QlabError(f"{path} is not a rounding-methods result ({type(error).__name__}: {error}); "
                        "run python bench/rounding_methods.py again to rewrite it.") from None
