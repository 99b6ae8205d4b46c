"""GPTQ (Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): round a linear layer's weights one input column at a time and push each column's rounding
error onto the columns not yet rounded, weighted by the inverse Hessian of the layer's reconstruction loss
``||X W^T - X Q^T||^2`` (H = 2 X^T X / n from calibration inputs X).

Follows the reference implementation (IST-DASLab/gptq, ``GPTQ.fasterquant``): dead inputs zeroed, damping of
a fraction of the mean diagonal (see DAMP_PERCENT), the upper Cholesky factor of H^-1, lazy batch updates over
blocks of columns, and group-wise scales computed as the algorithm reaches each group, from the already
error-compensated weights. Scales, zero-points and rounding are ``qlab.core.quant``'s own (``compute_scale`` /
``encode``), so a GPTQ tensor is an ordinary ``QTensor`` with the scheme's exact storage cost.

Act-order (``algorithm="gptq-act-order"``, the reference's ``actorder`` / AutoGPTQ's ``desc_act``) rounds the
inputs in order of decreasing Hessian diagonal, so the inputs that carry the most energy are rounded first,
while many columns remain to absorb their error. Its groups are then formed in that order: each input's group
is stored as an int32 ``g_idx`` (``GroupIndexedQTensor``). With ``static_groups`` every group's scale is
computed from the original weights before reordering, so groups stay consecutive and no index is stored.

With a 2:4 sparsity the same loop prunes as it goes (``qlab.core.algorithms.sparsity``): SparseGPT (Frantar &
Alistarh, 2023, ``SparseGPT.fasterprune`` with ``prunen=2, prunem=4``) picks each group of four's pruned pair
by ``w^2 / [H^-1]_jj^2`` and compensates the pruning like a rounding error; a magnitude mask is fixed first.

Unlike the reference, all Hessians come from the FP32 model's inputs (not layer by layer from the already
quantized prefix).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from qlab.core.algorithms.sparsity import KEPT, PATTERN, SparseQTensor, check_prunable, two_four_mask
from qlab.core.errors import QlabError
from qlab.core.quant import QTensor, QuantScheme, compute_scale, encoder
from qlab.core.threads import one_thread

# The reference's default is 1% of the mean diagonal with 128 x 2048 calibration tokens. With the few thousand
# tokens a CPU sweep affords, 10% regularises H enough that GPTQ also wins on held-out tokens (measured on
# SmolLM2 layers: held-out error / RTN 0.71 at 10% vs 0.77 at 1% with 4096 tokens, 0.91 vs 1.15 on down_proj).
DAMP_PERCENT = 0.1
BLOCK_SIZE = 128
MAX_DAMPING_RETRIES = 6


def hessian_from_inputs(inputs: torch.Tensor) -> torch.Tensor:
    """H = 2 X^T X / n for inputs X of shape (tokens, features), in float32 (accumulated in float64)."""
    x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)
    return (2 * x.T @ x / max(1, x.shape[0])).to(torch.float32)


def _inverse_cholesky(hessian: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1, with more damping while H is numerically singular."""
    damp = damp_percent * torch.diagonal(hessian).mean()
    identity = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for _ in range(MAX_DAMPING_RETRIES):
        factor, info = torch.linalg.cholesky_ex(hessian + damp * identity)
        if info.item() == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info.item() == 0:
                return upper
        damp = damp * 10
    raise QlabError("the calibration Hessian is too ill-conditioned for GPTQ even with heavy damping; "
                    "calibrate on more tokens or use rtn.")


@dataclasses.dataclass(frozen=True)
class GroupIndexedQTensor(QTensor):
    """A QTensor whose groups are not consecutive inputs: input ``c`` of every row uses group ``group_index[c]``
    of that row (GPTQ with act-order; ``scale`` is still one per row and group, row-major)."""

    group_index: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        values = self.scheme.fmt.decode(self.codes).reshape(self.shape[0], -1)
        index = self.group_index.long()
        if self.zero_point is not None:
            values = values - self.zero_point.to(torch.float32).reshape(self.shape[0], -1)[:, index]
        values = values * self.scale.to(torch.float32).reshape(self.shape[0], -1)[:, index]
        return values.reshape(self.shape).to(dtype)

    def packed(self) -> dict[str, torch.Tensor]:
        return {**super().packed(), "group_index": self.group_index.to(torch.int32)}

    def input_groups(self) -> torch.Tensor:
        return self.group_index.long()


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme,
                  damp_percent: float = DAMP_PERCENT, block_size: int = BLOCK_SIZE) -> QTensor:
    """Quantize a 2-D weight (out x in) with GPTQ under ``scheme`` (format, granularity, calibration; act-order
    and static groups when the scheme's algorithm is ``gptq-act-order``; 2:4 pruning, by magnitude or by
    SparseGPT, when it has a sparsity)."""
    with one_thread():
        return _gptq(weight, hessian, scheme, damp_percent, block_size)


def _gptq(weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme, damp_percent: float,
          block_size: int) -> QTensor:
    fmt = scheme.fmt
    if weight.dim() != 2:
        raise QlabError(f"GPTQ quantizes 2-D linear weights; got a tensor of shape {tuple(weight.shape)}.")
    rows, columns = weight.shape
    if hessian.shape != (columns, columns):
        raise QlabError(f"the Hessian is {tuple(hessian.shape)} but the weight has {columns} inputs; "
                        "collect it from this layer's inputs.")
    sparse = scheme.sparsity != "none"
    if not fmt.scaled and not sparse:
        raise QlabError(f"{fmt.name} is a plain cast with nothing to round; GPTQ applies to scaled formats.")
    group_size = scheme.group_size if scheme.granularity == "group" and fmt.scaled else None
    if group_size is not None and columns % group_size:
        raise QlabError(f"group size {group_size} does not divide the {columns} inputs of this layer.")
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(torch.float32).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1  # an input that is always zero: any weight is exact; keep H invertible
    w[:, dead] = 0
    # 2:4 by magnitude: the mask is fixed before any column moves, and scales see only the kept weights.
    # SparseGPT chooses each group of four inside the loop, from the weights as they are by then.
    fixed_mask = scheme.sparsity == "2:4"
    keep_t = torch.ones(columns, rows, dtype=torch.bool, device=w.device)
    if sparse:
        check_prunable(weight.shape)
        if fixed_mask:
            keep_t = two_four_mask(w).T.contiguous()
    kept = w * keep_t.T if fixed_mask else w

    # Scales of one group (or of every row) come from qlab.core.quant with the scheme's own calibration and scale
    # dtype: each row of the slice is one block.
    rtn_scheme = dataclasses.replace(scheme, algorithm="rtn", static_groups=False, sparsity="none")
    row_scheme = dataclasses.replace(rtn_scheme, granularity="channel")
    row_scale = row_zero = scale = zero = None
    if fmt.scaled and scheme.granularity == "tensor":
        scale, zero = compute_scale(kept, rtn_scheme)
        row_scale, row_zero = scale.expand(rows), None if zero is None else zero.expand(rows)
    elif fmt.scaled and scheme.granularity == "channel":
        row_scale, row_zero = compute_scale(kept, row_scheme)
    static = group_size is not None and scheme.static_groups
    if static:
        # Every group's scale from the original weights, before any column moves or absorbs an error.
        static_scale, static_zero = compute_scale(w, rtn_scheme)
        static_scale = static_scale.reshape(rows, -1)
        static_zero = None if static_zero is None else static_zero.reshape(rows, -1)
    order = torch.arange(columns, device=w.device)
    if scheme.algorithm == "gptq-act-order":
        order = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w, h = w[:, order], h[order][:, order]
    h_inv = _inverse_cholesky(h, damp_percent)
    # Each column's group, read once: an element read per column waits for a GPU.
    groups_in_order = [column // group_size for column in order.tolist()] if static else None
    static_rounding: dict[int, Callable] = {}
    rounding = None if row_scale is None else _column_rounding(row_scale, row_zero, fmt)

    # Blocks hold whole groups (and whole groups of four when pruning), so a group's scale and a group of
    # four's mask are computed from weights that already carry every update.
    step = block_size if group_size is None or static else group_size * max(1, block_size // group_size)
    if sparse:
        step = math.lcm(step, PATTERN)
    # Work on W^T (inputs x outputs): a column of W is then a contiguous row, and the rank-1 update of the
    # rest of the block runs ~60x faster than on W's strided column slices.
    w_t = w.T.contiguous()
    codes_t = torch.empty(columns, rows, dtype=fmt.code_dtype, device=w.device)
    group_scales: list[torch.Tensor] = []
    group_zeros: list[torch.Tensor] = []
    # GPTQ is sequential over input columns by construction (each column's rounding changes the next ones),
    # so this loop cannot be vectorised; everything inside it is a vector or matrix operation over rows.
    for start in range(0, columns, step):
        stop = min(start + step, columns)
        block = w_t[start:stop].clone()
        errors = torch.empty_like(block)
        h_block = h_inv[start:stop, start:stop]
        for i in range(stop - start):
            if sparse and not fixed_mask and i % PATTERN == 0:
                # SparseGPT: prune the two of four whose removal costs least, w^2 / [H^-1]_jj^2 (OBS).
                saliency = block[i: i + PATTERN] ** 2 / torch.diagonal(h_block)[i: i + PATTERN, None] ** 2
                keep_t[start + i: start + i + PATTERN].scatter_(
                    0, saliency.topk(PATTERN - KEPT, dim=0, largest=False).indices, False)
            if static:
                group = groups_in_order[start + i]
                if group not in static_rounding:
                    static_rounding[group] = _column_rounding(
                        static_scale[:, group], None if static_zero is None else static_zero[:, group], fmt)
                rounding = static_rounding[group]
            elif group_size is not None and i % group_size == 0:
                group = block[i: i + group_size]
                if fixed_mask:
                    group = group * keep_t[start + i: start + i + group_size]
                row_scale, row_zero = compute_scale(group.T, row_scheme)
                group_scales.append(row_scale)
                if row_zero is not None:
                    group_zeros.append(row_zero)
                rounding = _column_rounding(row_scale, row_zero, fmt)
            column = block[i]
            target = column * keep_t[start + i] if sparse else column
            if rounding is None:  # a plain cast (fp16/bf16) pruned by SparseGPT: the cast is the rounding
                code = fmt.round(target)
                quantized = fmt.decode(code)
            else:
                code, quantized = rounding(target)
            codes_t[start + i] = code
            error = (column - quantized) / h_block[i, i]
            block[i:].addr_(h_block[i, i:], error, alpha=-1)
            errors[i] = error
        # The lazy batch update: columns after this block receive the whole block's errors in one matmul.
        w_t[stop:].addmm_(h_inv[start:stop, stop:].T, errors, alpha=-1)
    in_place = torch.empty_like(codes_t)
    in_place[order] = codes_t  # back to the layer's input order
    codes = in_place.T.contiguous()
    if static:
        return QTensor(codes, static_scale.reshape(-1), None if static_zero is None else static_zero.reshape(-1),
                       scheme, weight.shape)
    if group_size is not None:
        scale = torch.stack(group_scales, dim=1).reshape(-1)
        zero = torch.stack(group_zeros, dim=1).reshape(-1) if group_zeros else None
        if scheme.algorithm == "gptq-act-order":
            position = torch.empty(columns, dtype=torch.int64, device=order.device)
            position[order] = torch.arange(columns, device=order.device)
            return GroupIndexedQTensor(codes, scale, zero, scheme, weight.shape,
                                       (position // group_size).to(torch.int32))
    elif scheme.granularity == "channel":
        scale, zero = row_scale, row_zero
    if sparse:
        return SparseQTensor(codes, scale, zero, scheme, weight.shape, keep_t.T.contiguous())
    return QTensor(codes, scale, zero, scheme, weight.shape)


def _column_rounding(row_scale: torch.Tensor, row_zero: torch.Tensor | None, fmt
                     ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Each column's codes and their float32 values under one scale (and zero point) per row: what
    ``QTensor.dequantize`` gives, with the conversions made once for every column of the group."""
    codes = encoder(row_scale, row_zero, fmt)
    zero = None if row_zero is None else row_zero.to(torch.float32)
    scale = row_scale.to(torch.float32)

    def round_column(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = codes(target[:, None])[:, 0]
        values = fmt.decode(code)
        if zero is not None:
            values = values - zero
        return code, values * scale

    return round_column


def reconstruction_error(weight: torch.Tensor, dequantized: torch.Tensor, inputs: torch.Tensor) -> float:
    """Relative output error of a linear layer on inputs X: ||X (W - Q)^T||^2 / ||X W^T||^2."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    reference = x @ weight.float().T
    return (((x @ dequantized.float().T) - reference) ** 2).sum().item() / (reference**2).sum().clamp(
        min=1e-30).item()
