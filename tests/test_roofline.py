"""Roofline predictions against hand-computed numbers (no model is loaded)."""

import pytest

from qlab.analyses import roofline
from qlab.core.errors import QlabError
from qlab.core.quant import QuantScheme
from qlab.models import architectures, hardware

LLAMA_8B = "llama-3.1-8b"


def test_bf16_decode_on_h100_matches_the_hand_computed_bound():
    # Llama-3.1-8B streams, per token: 32 layers x (2 x 4096^2 + 2 x 4096 x 1024 + 3 x 4096 x 14336) weights,
    # the untied 128256 x 4096 head and 32 x 2 x 4096 + 4096 norm weights, 2 bytes each (the embedding table
    # is only looked up); plus the KV cache 2 x 32 x 8 x 128 x 1024 tokens x 2 bytes.
    matrices = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    dense = 128256 * 4096 + 32 * 2 * 4096 + 4096
    weights = 2 * (matrices + dense)
    kv = 2 * 32 * 8 * 128 * 1024 * 2
    assert (weights, kv) == (15_009_849_344, 134_217_728)
    p = roofline.predict(architectures.get(LLAMA_8B), QuantScheme("bf16"), hardware.get("h100-sxm-80gb"),
                         context_tokens=1024)
    assert p.weight_bytes_read == weights and p.kv_bytes_read == kv
    assert p.decode_tokens_per_s == pytest.approx(3.35e12 / (weights + kv))  # 221.2 tok/s
    assert round(p.decode_tokens_per_s, 1) == 221.2
    assert p.verdict == "baseline" and p.native


def test_prefill_time_is_flops_over_the_dtype_tflops():
    arch = architectures.get(LLAMA_8B)
    matmul_params = 8_030_261_248 - 128256 * 4096  # every weight but the looked-up embedding table
    flops = 2 * matmul_params * 512 + 2 * 32 * 512**2 * 32 * 128
    p = roofline.predict(arch, QuantScheme("bf16"), hardware.get("h100-sxm-80gb"), prompt_tokens=512)
    assert p.prefill_flops == pytest.approx(flops)
    assert p.prefill_ms == pytest.approx(1000 * flops / 989e12)


def test_int4_reads_fewer_bytes_and_is_native_on_hopper():
    arch, h100 = architectures.get(LLAMA_8B), hardware.get("h100-sxm-80gb")
    bf16 = roofline.predict(arch, QuantScheme("bf16"), h100)
    int4 = roofline.predict(arch, QuantScheme("int4", "group", 64, symmetric=False), h100)
    assert int4.native and int4.verdict == "faster"
    # 4 bits + an fp16 scale and a 4-bit zero-point per 64 weights, the dense head and norms still bf16.
    matrices = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert int4.weight_bytes_read == matrices * (4 * 64 + 16 + 4) // (8 * 64) + 2 * (128256 * 4096 + 65 * 4096)
    assert int4.decode_tokens_per_s > 2.5 * bf16.decode_tokens_per_s


def test_a_format_without_kernels_is_smaller_not_faster():
    arch, a100 = architectures.get(LLAMA_8B), hardware.get("a100-sxm-80gb")
    fp8 = roofline.predict(arch, QuantScheme("fp8_e4m3", "channel"), a100)
    bf16 = roofline.predict(arch, QuantScheme("bf16"), a100)
    assert not fp8.native and fp8.verdict == "smaller, not faster"
    assert fp8.decode_bound_tokens_per_s > bf16.decode_tokens_per_s  # fewer bytes...
    assert fp8.decode_tokens_per_s == pytest.approx(bf16.decode_tokens_per_s)  # ...but no faster
    assert "no fp8_e4m3 kernel" in fp8.reason


def test_batch_shares_the_weights_but_not_the_kv_cache():
    arch, h100 = architectures.get(LLAMA_8B), hardware.get("h100-sxm-80gb")
    one = roofline.predict(arch, QuantScheme("bf16"), h100, context_tokens=4096, batch=1)
    eight = roofline.predict(arch, QuantScheme("bf16"), h100, context_tokens=4096, batch=8)
    assert eight.kv_bytes_read == 8 * one.kv_bytes_read
    assert eight.decode_tokens_per_s == pytest.approx(8 * 3.35e12 / (one.weight_bytes_read + 8 * one.kv_bytes_read))


def test_this_machine_needs_a_measured_bandwidth():
    arch, here = architectures.get("smollm2-135m"), hardware.detect_this_machine()
    with pytest.raises(QlabError, match="bandwidth"):
        roofline.predict(arch, QuantScheme("fp32"), here)
    p = roofline.predict(arch, QuantScheme("fp32"), here, bandwidth_bytes_per_s=20e9, context_tokens=160)
    # fp32 on a CPU: every weight 4 bytes; the tied embedding is read once, as the output head.
    params = architectures.count_params(arch).total
    kv = 2 * 30 * 3 * 64 * 160 * 4
    assert p.weight_bytes_read == 4 * params and p.kv_bytes_read == kv
    assert p.decode_tokens_per_s == pytest.approx(20e9 / (4 * params + kv))
    assert p.prefill_ms is None  # no TFLOPS are known for a detected CPU
