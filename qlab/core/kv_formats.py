"""KV-cache formats as the runtimes store them: bytes per cached head vector, scales included.

A cache holds, per layer and per token, one key and one value vector of ``width`` values per KV head (MLA: one
latent per token). Each format is one row: the bytes of such a vector, from the runtime's own size formula, and
which runtimes offer it. ``tests/test_kv_formats.py`` checks each against its library.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qlab.core.errors import QlabError
from qlab.core.layouts import ggml_row_bytes
from qlab.core.registry import Registry


@dataclass(frozen=True)
class KVFormat:
    """One KV-cache storage format.

    Args:
        name: registry key, the runtime's own spelling where it has one (``q8_0``, ``fp8``).
        vector_bytes: (values of one head vector, KIVI group size) -> stored bytes, scales included.
        runtimes: the runtimes (``qlab.analyses.runtimes``) that can store it.
        code_bits: bits of one stored value before scales (what the scales add to).
        per_layer_bytes: fixed bytes per layer and cache (K or V) whatever the length, e.g. a per-tensor scale.
        source: where the formula comes from.
        description: one line for people.
    """

    name: str
    code_bits: int
    vector_bytes: Callable[[int, int], int]
    runtimes: tuple[str, ...]
    source: str
    description: str
    per_layer_bytes: int = 0

    def bytes_per_vector(self, width: int, group_size: int = 32) -> int:
        """Stored bytes of one cached head vector of ``width`` values."""
        return self.vector_bytes(width, group_size)


def _kivi(bits: int) -> Callable[[int, int], int]:
    def vector(width: int, group: int) -> int:
        if width % group:
            raise QlabError(f"KV group size {group} does not divide the head width {width}; set a KV group size "
                            "that divides it.")
        groups = width // group
        # An fp16 scale and a zero-point at the cache's bits per group of a head vector (KIVI, quanto's cache).
        return -(-width * bits // 8) + 2 * groups + -(-groups * bits // 8)

    return vector


def _ggml(type_name: str) -> Callable[[int, int], int]:
    return lambda width, _group: ggml_row_bytes(type_name, width)


def _per_token_head(width: int, _group: int) -> int:
    # vLLM AttentionSpec.page_size_bytes: 1 byte a value plus one float32 scale per token and head (K and V each).
    return width + 4


def _nvfp4_kv(width: int, _group: int) -> int:
    if width % 16:
        raise QlabError(f"NVFP4 KV stores blocks of 16 values; a head width of {width} is not a multiple.")
    # vLLM nvfp4_kv_cache_full_dim: head_size // 2 bytes of E2M1 codes + head_size // 16 FP8 block scales.
    return width // 2 + width // 16


_KV_FORMATS: Registry[KVFormat] = Registry("KV-cache dtype", choose="use one of")
KV_FORMATS = _KV_FORMATS.entries
register = _KV_FORMATS.register
get_kv_format = _KV_FORMATS.get


def kv_format_names(runtime: str | None = None) -> list[str]:
    """Registered KV formats, or those one runtime offers."""
    return [n for n, f in KV_FORMATS.items() if runtime is None or runtime in f.runtimes]


_ALL = ("transformers", "transformers-static", "transformers-offloaded", "vllm", "llama.cpp")
_HF = ("transformers", "transformers-static", "transformers-offloaded")
register(KVFormat("fp16", 16, lambda w, _g: 2 * w, _ALL, "IEEE half, 2 bytes a value", "16-bit cache (fp16)"), "f16")
register(KVFormat("bf16", 16, lambda w, _g: 2 * w, _ALL, "bfloat16, 2 bytes a value", "16-bit cache (bf16)"), "auto")
register(KVFormat("fp8", 8, lambda w, _g: w, ("vllm",),
                  "vllm/v1/kv_cache_interface.py AttentionSpec.real_page_size_bytes with a 1-byte dtype; "
                  "k_scale and v_scale are float32 scalars per attention layer",
                  "FP8 E4M3 cache, one float32 scale per layer for K and one for V", per_layer_bytes=4),
         "fp8_e4m3")
register(KVFormat("fp8_per_token_head", 8, _per_token_head, ("vllm",),
                  "vllm/v1/kv_cache_interface.py AttentionSpec.page_size_bytes (KVQuantMode.FP8_PER_TOKEN_HEAD)",
                  "FP8 cache with a float32 scale per token and head"))
register(KVFormat("int8_per_token_head", 8, _per_token_head, ("vllm",),
                  "vllm/v1/kv_cache_interface.py AttentionSpec.page_size_bytes (KVQuantMode.INT8_PER_TOKEN_HEAD)",
                  "int8 cache with a float32 scale per token and head"))
register(KVFormat("nvfp4", 4, _nvfp4_kv, ("vllm",),
                  "vllm/v1/kv_cache_interface.py FullAttentionSpec.real_page_size_bytes (KVQuantMode.NVFP4)",
                  "NVFP4 cache: E2M1 codes and an FP8 scale per 16 values"))
register(KVFormat("int8", 8, _kivi(8), _HF, "KIVI (Liu et al. 2024) asymmetric groups; transformers' QuantizedCache",
                  "int8 cache, an fp16 scale and an 8-bit zero-point per group of a head vector"))
register(KVFormat("int4", 4, _kivi(4), _HF, "KIVI (Liu et al. 2024) asymmetric groups; transformers' QuantizedCache",
                  "int4 cache, an fp16 scale and a 4-bit zero-point per group of a head vector"))
for _type in ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"):
    register(KVFormat(_type, 8 if _type == "q8_0" else 5 if _type.startswith("q5") else 4, _ggml(_type), ("llama.cpp",),
                      "llama.cpp src/llama-kv-cache.cpp: ggml_row_size(type_k, n_embd_k_gqa) per cell; block "
                      "sizes from gguf-py GGML_QUANT_SIZES",
                      f"llama.cpp --cache-type {_type}: ggml blocks of 32 values with their own scales"))
