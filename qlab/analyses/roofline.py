"""Predicted speed on a target from the hardware catalog: decode is bandwidth bound, prefill compute bound.

    decode tokens/s  = batch * bandwidth / (weight bytes read per step + KV bytes read per step)
    prefill seconds  = FLOPs / peak FLOPS of the dtype the matmuls run in
    FLOPs            = 2 * matmul params * tokens * batch + 2 * layers * tokens^2 * (heads * head_dim) * batch

A step reads every weight matrix once (only the routed experts of an MoE), the output head, and the whole KV
cache of each sequence; embedding rows are looked up, not streamed. A weight format the target has no kernel
for is dequantized to the activation dtype first: the file is smaller, the decode is not faster, and the
prediction says so (``native=False``, the speed of the dense format).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from qlab.analyses import memory
from qlab.core.errors import QlabError
from qlab.core.formats import get_format
from qlab.core.quant import QuantScheme
from qlab.models import architectures
from qlab.models.architectures import Architecture
from qlab.models.hardware import Hardware

FORMULAS = {
    "decode_tokens_per_s": "batch x bandwidth / (weight bytes read per step + KV bytes read per step)",
    "weight_bytes_read": "quantized matrices (routed experts: active share) + dense tensors read per step "
                         "(output head; the embedding table only when tied to it) at the dense dtype",
    "kv_bytes_read": "2 x layers x kv_heads x head_dim x context x batch x bytes per value",
    "prefill_ms": "1000 x (2 x matmul params x tokens x batch + 2 x layers x tokens^2 x heads x head_dim x batch)"
                  " / (TFLOPS of the compute dtype x 1e12)",
}
# The catalog's TFLOPS keys by the dtype a matmul runs in.
_TFLOPS_KEY = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "int8": "int8", "fp8": "fp8", "int4": "int4"}
# Formats that name a kernel family in hardware.native_formats.
_NATIVE_KEY = {"fp8_e4m3": "fp8_e4m3", "fp8_e5m2": "fp8_e5m2", "int8": "int8", "int4": "int4", "nf4": "nf4",
               "fp4_e2m1": "fp4_e2m1", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


@dataclass(frozen=True)
class Prediction:
    """Roofline numbers for one (model, weight format, target)."""

    hardware_id: str
    weight_format: str
    compute_dtype: str
    dense_format: str
    batch: int
    context_tokens: int
    prompt_tokens: int
    bandwidth_bytes_per_s: float
    weight_bytes_read: int
    kv_bytes_read: int
    decode_bound_tokens_per_s: float  # if the format's bytes were all the cost
    decode_tokens_per_s: float  # the prediction: the bound when native, else the dense format's speed
    prefill_flops: float
    prefill_ms: float | None  # None when the catalog has no TFLOPS for the compute dtype
    native: bool
    verdict: str  # "faster" | "smaller, not faster" | "baseline"
    reason: str

    def to_record(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def weight_bytes_read(arch: Architecture, scheme: QuantScheme, dense_format: str) -> int:
    """Bytes of weights one decode step streams (``FORMULAS["weight_bytes_read"]``)."""
    counts = architectures.count_params(arch)
    size = memory.model_weights(arch, scheme)
    # Quantized matrices: an MoE step reads only the routed experts it picks.
    active_share = 1.0
    if counts.routed_experts_total:
        active_share = (counts.quantizable - counts.routed_experts_total + counts.routed_experts_active) \
            / counts.quantizable
    embedding_rows_only = 0 if arch.tie_word_embeddings else counts.embedding
    dense_params = max(0, size.other_params - embedding_rows_only)
    dense_bits = get_format(scheme.format if not scheme.fmt.scaled else dense_format).bits
    return round(size.quantized_bytes * active_share) + dense_params * dense_bits // 8


def kv_bytes_read(arch: Architecture, context_tokens: int, batch: int, kv_format: str) -> int:
    """Bytes of KV cache one decode step reads (``FORMULAS["kv_bytes_read"]``), sliding windows and MLA included."""
    fp16 = memory.kv_cache(arch, context_tokens, batch, "fp16").total_bytes
    return fp16 * get_format(kv_format).bits // 16


def prefill_flops(arch: Architecture, tokens: int, batch: int = 1) -> float:
    """Matmul FLOPs of a prefill of ``tokens`` per sequence (``FORMULAS["prefill_ms"]``'s numerator)."""
    counts = architectures.count_params(arch)
    matmul_params = counts.active_per_token - counts.embedding + (counts.embedding if arch.tie_word_embeddings
                                                                  else 0)
    attention = 2.0 * arch.num_layers * tokens**2 * arch.num_attention_heads * arch.head_dim
    return batch * (2.0 * matmul_params * tokens + attention)


def is_native(hardware: Hardware, weight_format: str) -> bool:
    """Whether the target has kernels that compute from this weight format without a dense copy first."""
    return _NATIVE_KEY.get(weight_format, weight_format) in hardware.native_formats


def predict(arch: Architecture, scheme: QuantScheme, hardware: Hardware, *, compute_dtype: str | None = None,
            dense_format: str | None = None, context_tokens: int = 1024, prompt_tokens: int = 512,
            batch: int = 1, bandwidth_bytes_per_s: float | None = None, kv_format: str | None = None) -> Prediction:
    """Decode tokens/s and prefill time for ``arch`` with weights in ``scheme`` on ``hardware``.

    ``dense_format`` is what unquantized tensors and activations are kept in (fp32 on a CPU, bf16 on a GPU by
    default); ``compute_dtype`` what the matmuls run in (the dense format for weight-only schemes, ``"int8"``
    or ``"fp8"`` when activations are quantized too). ``bandwidth_bytes_per_s`` overrides the catalog (this
    machine's is measured by ``qlab.backends.speed.measure_bandwidth``).
    """
    dense = dense_format or ("bf16" if hardware.kind == "gpu" else "fp32")
    compute = compute_dtype or dense
    bandwidth = bandwidth_bytes_per_s or hardware.bandwidth_bytes_per_s
    if not bandwidth:
        raise QlabError(f"{hardware.name} has no known memory bandwidth; measure it (qlab bench) or pick a "
                        "catalog target.")
    kv = kv_bytes_read(arch, context_tokens, batch, kv_format or dense)
    weights = weight_bytes_read(arch, scheme, dense)
    dense_weights = weight_bytes_read(arch, QuantScheme(dense), dense)
    bound = batch * bandwidth / (weights + kv)
    dense_speed = batch * bandwidth / (dense_weights + kv)
    native = is_native(hardware, scheme.format) and (compute in (dense, "fp32") or is_native(hardware, _compute_format(compute)))
    if not scheme.fmt.scaled and scheme.format == dense:
        verdict, reason = "baseline", f"{dense} is the dense format here"
    elif native:
        verdict, reason = "faster", f"{hardware.name} runs {scheme.format} natively: fewer bytes per token"
    else:
        verdict = "smaller, not faster"
        reason = (f"{hardware.name} has no {scheme.format} kernel ({', '.join(hardware.native_formats)} are "
                  f"native): weights are converted to {dense} before the matmul")
    flops = prefill_flops(arch, prompt_tokens, batch)
    tflops = (hardware.tflops or {}).get(_TFLOPS_KEY.get(compute, compute))
    return Prediction(
        hardware_id=hardware.id, weight_format=scheme.format, compute_dtype=compute, dense_format=dense,
        batch=batch, context_tokens=context_tokens, prompt_tokens=prompt_tokens,
        bandwidth_bytes_per_s=float(bandwidth), weight_bytes_read=weights, kv_bytes_read=kv,
        decode_bound_tokens_per_s=bound, decode_tokens_per_s=bound if native or verdict == "baseline" else
        min(bound, dense_speed), prefill_flops=flops,
        prefill_ms=1000.0 * flops / (tflops * 1e12) if tflops else None, native=native or verdict == "baseline",
        verdict=verdict, reason=reason)


def _compute_format(compute_dtype: str) -> str:
    return {"fp8": "fp8_e4m3"}.get(compute_dtype, compute_dtype)
