"""2:4 sparsity: two of every four consecutive inputs are zero, the kept values are rounded by the scheme, the
storage is the kept values plus 2 bits of position each (torch's semi-structured layout), and SparseGPT's
Hessian-guided pruning beats magnitude pruning on correlated inputs."""

import dataclasses

import pytest
import torch

from qlab.core.algorithms import LayerStats, needs_calibration, quantize_weight
from qlab.core.algorithms.gptq import gptq_quantize, hessian_from_inputs, reconstruction_error
from qlab.core.algorithms.sparsity import SparseQTensor, sparse_quantize, two_four_mask
from qlab.core.errors import QlabError
from qlab.core.quant import QuantScheme, quantize, unpack_codes
from tests.test_gptq import correlated_inputs, weight

DENSE = [QuantScheme("fp16"), QuantScheme("bf16"), QuantScheme("int4", "group", 32),
         QuantScheme("int4", "group", 32, symmetric=False), QuantScheme("int8", "channel"),
         QuantScheme("fp8_e4m3", "channel")]


def sparse(scheme: QuantScheme, sparsity: str = "2:4", algorithm: str = "rtn") -> QuantScheme:
    return dataclasses.replace(scheme, sparsity=sparsity, algorithm=algorithm)


def test_the_mask_keeps_the_two_largest_of_every_four():
    w = weight(8, 64)
    keep = two_four_mask(w)
    groups, kept = w.abs().reshape(8, 16, 4), keep.reshape(8, 16, 4)
    assert (kept.sum(dim=2) == 2).all()
    assert (groups.masked_fill(~kept, float("inf")).amin(dim=2) >= groups.masked_fill(kept, 0).amax(dim=2)).all()


@pytest.mark.parametrize("scheme", DENSE, ids=lambda s: s.label)
@pytest.mark.parametrize("sparsity,algorithm", [("2:4", "rtn"), ("2:4", "gptq"), ("2:4-sparsegpt", "gptq")])
def test_two_of_every_four_are_zero_and_the_rest_rounded(scheme, sparsity, algorithm):
    w = weight(32, 128)
    chosen = sparse(scheme, sparsity, algorithm)
    stats = LayerStats(hessian_from_inputs(correlated_inputs(512, 128, seed=1)))
    result = quantize_weight(w, chosen, stats if needs_calibration(chosen) else None)
    assert isinstance(result, SparseQTensor) and result.scheme == chosen
    values = result.dequantize()
    assert (result.keep.reshape(32, 32, 4).sum(dim=2) == 2).all()
    assert (values[~result.keep] == 0).all()  # pruned values decode to an exact zero
    assert ((values == 0).reshape(32, 32, 4).sum(dim=2) >= 2).all()
    if not scheme.fmt.scaled:  # a cast only rounds: every kept value stays non-zero
        assert ((values == 0).reshape(32, 32, 4).sum(dim=2) == 2).all()
    if algorithm == "rtn":  # the kept values are rounded exactly as dense RTN rounds the pruned weight
        dense = quantize(w * result.keep, scheme)
        assert torch.equal(values, dense.dequantize())
    packed = result.packed()
    assert sum(t.numel() * t.element_size() for t in packed.values()) == result.nbytes
    positions = unpack_codes(packed["metadata"], 2, 32 * 64).long().reshape(-1, 2)
    rebuilt = torch.zeros(32 * 32, 4, dtype=torch.bool).scatter_(1, positions, True)
    assert torch.equal(rebuilt.reshape(32, 128), result.keep)  # the metadata alone gives the positions back


def test_bits_per_weight_arithmetic():
    shape = (4096, 4096)
    # Kept values: half the weights at the format's bits; metadata: 2 bits per kept value = 1 bit per weight.
    assert sparse(QuantScheme("fp16")).bits_per_weight(shape) == 16 / 2 + 1
    assert sparse(QuantScheme("int8", "channel")).bits_per_weight(shape) == 8 / 2 + 1 + 32 / 4096
    assert sparse(QuantScheme("int4", "group", 128)).bits_per_weight(shape) == 4 / 2 + 1 + 16 / 128
    assert sparse(QuantScheme("int4", "group", 128, symmetric=False)).bits_per_weight(shape) == (
        4 / 2 + 1 + 16 / 128 + 4 / 128)
    assert sparse(QuantScheme("fp8_e4m3", "tensor")).bits_per_weight(shape) == 8 / 2 + 1 + 32 / 4096 ** 2
    parts = sparse(QuantScheme("int4", "group", 128)).storage_bytes(shape)
    assert parts["codes"] == 4096 * 4096 // 4 and parts["metadata"] == 4096 * 4096 // 8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int8])
def test_storage_matches_torchs_semi_structured_layout(dtype):
    conversions = pytest.importorskip("torch.sparse._semi_structured_conversions")
    w = weight(64, 128)
    keep = two_four_mask(w)
    codes = torch.randint(1, 100, w.shape, generator=torch.Generator().manual_seed(0))  # kept values non-zero
    values, metadata = conversions.sparse_semi_structured_from_dense_cutlass(torch.where(keep, codes, 0).to(dtype))
    scheme = sparse(QuantScheme("int8", "channel") if dtype == torch.int8 else QuantScheme(
        "fp16" if dtype == torch.float16 else "bf16"))
    parts = scheme.storage_bytes(w.shape)
    assert parts["codes"] == values.numel() * values.element_size()
    assert parts["metadata"] == metadata.numel() * metadata.element_size()


@pytest.mark.parametrize("scheme", [QuantScheme("fp16"), QuantScheme("int4", "group", 32),
                                    QuantScheme("int8", "channel"), QuantScheme("fp8_e4m3", "channel")],
                         ids=lambda s: s.label)
def test_sparsegpt_beats_magnitude_pruning_on_held_out_correlated_inputs(scheme):
    calibration, held_out = correlated_inputs(2048, 128, seed=2), correlated_inputs(1024, 128, seed=3)
    w = weight(64, 128)
    stats = LayerStats(hessian_from_inputs(calibration))
    magnitude = reconstruction_error(w, quantize_weight(w, sparse(scheme)).dequantize(), held_out)
    algorithm = "gptq" if scheme.fmt.scaled else "rtn"
    sparsegpt = quantize_weight(w, sparse(scheme, "2:4-sparsegpt", algorithm), stats)
    assert reconstruction_error(w, sparsegpt.dequantize(), held_out) < 0.3 * magnitude
    # GPTQ compensating a fixed magnitude mask sits in between (a plain cast too: it has a mask to compensate)
    compensated = quantize_weight(w, sparse(scheme, "2:4", "gptq"), stats)
    assert torch.equal(compensated.keep, two_four_mask(w))
    error = reconstruction_error(w, compensated.dequantize(), held_out)
    assert reconstruction_error(w, sparsegpt.dequantize(), held_out) < error < magnitude


@pytest.mark.parametrize("scheme", [QuantScheme("int4", "channel"), QuantScheme("int4", "group", 32)])
def test_sparsegpt_with_an_identity_hessian_is_magnitude_pruning_and_rtn(scheme):
    # No correlation: OBS saliency is plain magnitude and no error moves, so SparseGPT must reduce to the
    # magnitude mask and round-to-nearest, bit for bit (symmetric scales: each group's largest value is kept).
    w = weight(48, 128)
    result = gptq_quantize(w, torch.eye(128), sparse(scheme, "2:4-sparsegpt", "gptq"))
    reference = sparse_quantize(w, sparse(scheme))
    assert torch.equal(result.keep, reference.keep)
    assert torch.equal(result.codes, reference.codes) and torch.equal(result.scale, reference.scale)


def test_bad_sparse_schemes():
    with pytest.raises(QlabError, match="groups of 4"):
        quantize_weight(weight(8, 30), sparse(QuantScheme("int8", "channel")))
    with pytest.raises(QlabError, match="groups of 4"):
        sparse(QuantScheme("int8", "channel")).storage_bytes((8, 30))
    with pytest.raises(QlabError, match="SparseGPT"):
        sparse(QuantScheme("int4", "group", 32), "2:4-sparsegpt", "rtn")
    with pytest.raises(QlabError, match="rtn or gptq"):
        sparse(QuantScheme("int4", "group", 32), "2:4", "awq")
    with pytest.raises(QlabError, match="prunes before it rounds"):
        quantize(weight(8, 32), sparse(QuantScheme("int8", "channel")))  # never dense under a sparse label
    with pytest.raises(QlabError, match="calibration inputs"):
        quantize_weight(weight(8, 32), sparse(QuantScheme("fp16"), "2:4-sparsegpt"))
    assert not needs_calibration(sparse(QuantScheme("int4", "group", 32)))
    assert needs_calibration(sparse(QuantScheme("fp16"), "2:4-sparsegpt"))
    assert sparse(QuantScheme("fp16")).label == "fp16 2:4"
    assert sparse(QuantScheme("fp16"), "2:4", "gptq").label == "fp16 gptq 2:4"
    assert needs_calibration(sparse(QuantScheme("fp16"), "2:4", "gptq"))
    assert QuantScheme("fp16", algorithm="gptq") == QuantScheme("fp16")  # nothing to round, nothing to compensate
    assert sparse(QuantScheme("bf16"), "2:4", "awq") == sparse(QuantScheme("bf16"))
    assert sparse(QuantScheme("int4", "group", 32), "2:4-sparsegpt", "gptq").label == "int4 g32 gptq 2:4-sparsegpt"
    scheme = sparse(QuantScheme("int4", "group", 32), "2:4-sparsegpt", "gptq")
    assert QuantScheme.from_dict(scheme.to_dict()) == scheme
