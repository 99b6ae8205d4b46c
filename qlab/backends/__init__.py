"""Real quantization backends behind one interface, and their registry.

Simulation (``qlab.analyses.sweep``) tells accuracy exactly; only real kernels tell speed. Each backend wraps one kernel
library (torch.ao, torchao, optimum-quanto, bitsandbytes, ONNX Runtime, llama.cpp) and turns the shared FP32
model into a NEW quantized model, never touching the cached base. Every backend names the qlab scheme that
simulates it (its *twin*), so its measured accuracy can be set beside the simulation's; the two must agree
within ``Backend.tolerance`` (a disagreement is a bug in one of them).

Slugs are stable names (``torch-dynamic-int8``, ``torchao-int4wo``, ``llamacpp-q4_k_m``...) used by the CLI,
the bench JSON and the Speed page. Each library's file registers its backends with ``register`` when this
package is imported; a missing package never breaks the import, it only makes ``available()`` say why.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from qlab.backends.base import (
    BACKENDS,
    DEVICES,
    ActivationQuant,
    Backend,
    Tolerance,
    package_available,
    register,
)
from qlab.core.errors import QlabError

if TYPE_CHECKING:
    from qlab.models.evaluate import Baseline, CancelCheck, Progress

__all__ = ["ActivationQuant", "Backend", "DEVICES", "Tolerance", "all_backends", "backend_names", "base",
           "evaluate_model", "export", "get_backend", "gpu_recipe", "package_available", "parse_backends",
           "register", "speed", "usable"]


def get_backend(slug: str) -> Backend:
    """The backend with this slug (case-insensitive), or a QlabError naming close ones."""
    _load_modules()
    key = slug.strip().lower()
    if key in BACKENDS:
        return BACKENDS[key]
    close = difflib.get_close_matches(key, list(BACKENDS), n=3, cutoff=0.5)
    raise QlabError(f"unknown backend '{slug}'; use one of {', '.join(close or list(BACKENDS))}.")


def backend_names() -> list[str]:
    """Registered backend slugs, in registration order (CPU paths first)."""
    _load_modules()
    return list(BACKENDS)


def all_backends() -> list[Backend]:
    """Every registered backend, in registration order (CPU paths first)."""
    _load_modules()
    return list(BACKENDS.values())


def parse_backends(text: str | Iterable[str]) -> list[Backend]:
    """'fp32, torch-dynamic-int8' -> backends, validated, duplicates dropped, order kept."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    if not names:
        raise QlabError("no backends given; pass a comma-separated list such as fp32,torch-dynamic-int8.")
    return list({b.slug: b for b in (get_backend(n) for n in names)}.values())


def usable(kind: str, device: str = "cpu") -> list[Backend]:
    """Backends that handle this model kind and are available on ``device`` now."""
    return [b for b in all_backends() if kind in b.kinds and b.available(device)[0]]


def evaluate_model(model: Any, baseline: Baseline, progress: Progress | None = None,
                   cancel: CancelCheck | None = None) -> dict[str, float]:
    """Accuracy of a backend's model against the FP32 baseline, on the baseline's own inputs.

    Engines that are not torch modules end to end (llama.cpp) give their log-probs per window through
    ``log_prob_chunks``; the metrics are then computed by the same code as for every other model.
    """
    from qlab.models.evaluate import evaluate, lm_metrics

    if baseline.kind == "causal-lm" and hasattr(model, "log_prob_chunks"):
        chunks = model.log_prob_chunks(baseline.inputs["windows"], progress, cancel)
        return lm_metrics(chunks, baseline)
    return evaluate(model, baseline, progress, cancel)


def _load_modules() -> None:
    # Imported on first use: each module only registers dataclasses, the libraries load in apply().
    from qlab.backends import ao, bnb, llamacpp, native, ort, quanto  # noqa: F401
