"""2:4 semi-structured sparsity: in every four consecutive inputs of a row, two weights are zero.

NVIDIA's sparse tensor cores (Ampere and later) skip the zeros, so a 2:4 weight stores only the two kept
values of each group of four plus their positions: 2 bits per kept value, the metadata of torch's
semi-structured layout (``to_sparse_semi_structured``, CUTLASS and cuSPARSELt alike for fp16, bf16 and int8).
The kept values can themselves be quantized (int4, int8, fp8...) with their scales as usual.

Two ways to choose what to prune: ``"2:4"`` keeps the two largest magnitudes (no calibration), then rounds
the rest to nearest (or with GPTQ from a Hessian, which then also compensates the pruning); ``"2:4-sparsegpt"``
is SparseGPT (Frantar & Alistarh, 2023): inside GPTQ's column loop, each group of four is pruned where the
OBS saliency ``w^2 / [H^-1]_jj^2`` is smallest, and the error of pruning and of rounding is pushed onto the
columns not yet processed (``qlab.core.algorithms.gptq``).
"""

from __future__ import annotations

import dataclasses

import torch

from qlab.core.errors import QlabError
from qlab.core.quant import QTensor, QuantScheme, pack_codes, quantize

PATTERN = 4  # consecutive inputs per group
KEPT = 2  # kept per group


def check_prunable(shape: tuple[int, ...] | torch.Size) -> None:
    """Fail with one line when a weight's inputs do not split into groups of four."""
    if len(shape) != 2 or shape[1] % PATTERN:
        raise QlabError(f"2:4 sparsity prunes groups of 4 consecutive inputs of a 2-D weight; a tensor of shape "
                        f"{tuple(shape)} does not split into them, so leave it dense.")


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """Boolean mask keeping the two largest magnitudes of every four consecutive inputs of each row."""
    check_prunable(weight.shape)
    groups = weight.detach().abs().reshape(weight.shape[0], -1, PATTERN)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(KEPT, dim=2).indices, True)
    return keep.reshape(weight.shape)


@dataclasses.dataclass(frozen=True)
class SparseQTensor(QTensor):
    """A 2:4 sparse QTensor: ``codes`` keep the dense shape (pruned positions hold the code of zero) and ``keep``
    marks the two stored values of every four, which ``packed`` writes as values plus 2-bit positions."""

    keep: torch.Tensor

    def packed(self) -> dict[str, torch.Tensor]:
        stored = QTensor.packed(dataclasses.replace(self, codes=self.codes[self.keep]))
        positions = self.keep.reshape(-1, PATTERN).nonzero()[:, 1].to(torch.uint8)  # row-major: 2 per group
        return {**stored, "metadata": pack_codes(positions, 2)}


def sparse_quantize(weight: torch.Tensor, scheme: QuantScheme) -> SparseQTensor:
    """Magnitude 2:4 pruning, then the kept values rounded to nearest (or cast, for fp16/bf16/fp32)."""
    if scheme.sparsity != "2:4" or scheme.algorithm != "rtn":
        raise QlabError(f"{scheme.label} prunes with calibration inputs; quantize it through "
                        "qlab.core.algorithms.quantize_weight with the layer's statistics.")
    keep = two_four_mask(weight)
    dense = quantize(weight.detach().to(torch.float32) * keep, dataclasses.replace(scheme, sparsity="none"))
    return SparseQTensor(dense.codes, dense.scale, dense.zero_point, scheme, dense.shape, keep)
