"""INT4 weights (groups of 64, asymmetric) whose batch-1 matmul is plain PyTorch arithmetic, so that
``torch.compile`` writes it: the unpacking, the zero-point and scale, and the multiply + reduction become one
Triton kernel, into which inductor also fuses what surrounds the matmul (the RMSNorm before it, SiLU x up before
the down projection), as it does for BF16.

Why: torchao's tinygemm kernel (``_weight_int4pack_mm``) is opaque to inductor. On a lent H200 it read its 4.22 GB
a decode step at 1.40 TB/s and left 0.67 ms of small kernels around it (norms, SiLU) that BF16's compiled step fuses
away, so int4 stopped at about 1.5x BF16 end to end.

Layout: eight 4-bit codes per int32 word. Word ``j`` of a row holds the codes of inputs ``j + i * K/8`` in its
nibble ``i``, so the eight nibbles of one word meet eight slices of the input vector, each read contiguously; a
word's nibbles never need to be interleaved. A group of ``group`` inputs lies inside one slice, so each nibble has
its own (scale, zero-point) per group. A code becomes a float without an int->float conversion instruction (those
run at a quarter of the FMA rate): OR-ing it into the mantissa of 2**23 gives 2**23 + code exactly.

Codes, scales (fp16) and zero-points are qlab's own int4 asymmetric round-to-nearest (``QuantScheme("int4",
"group", 64, symmetric=False)``), so a weight dequantizes to exactly what the sweep evaluates.
"""

from __future__ import annotations

import torch
from torch import nn

from qlab.core.errors import QlabError
from qlab.core.quant import QuantScheme, quantize

NIBBLES = 8  # codes per int32 word
_MANTISSA_ONE = 0x4B000000  # the bits of the float32 2**23: OR-ing a code below 2**23 into them adds it exactly
_TWO_POW_23 = 8388608.0


class PackedInt4Linear(nn.Module):
    """A bias-free linear layer holding INT4 codes eight to an int32 word (see the module's docstring)."""

    def __init__(self, words: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, words.shape[0]
        self.group = words.shape[-1]
        self.padding = NIBBLES * words.shape[1] * self.group - in_features  # inputs added to fill the last slices
        # Buffers, not parameters: integer codes cannot require grad, and the model's bytes count them either way.
        self.register_buffer("words", words)  # (out, K / (8 * group), group) int32
        self.register_buffer("scales", scales)  # (8, out, K / (8 * group), 1) fp16
        self.register_buffer("zeros", zeros)  # (8, out, K / (8 * group), 1) fp16, the zero-point as a code 0..15

    @classmethod
    def from_linear(cls, linear: nn.Linear, group: int = 64) -> PackedInt4Linear:
        if linear.bias is not None:
            raise QlabError("packed INT4 takes bias-free linear layers only.")
        out_features, in_features = linear.weight.shape
        if in_features % group:
            raise QlabError(f"packed INT4 needs the input width to be a multiple of its group of {group}; "
                            f"a {out_features} x {in_features} weight is not.")
        scheme = QuantScheme("int4", "group", group, symmetric=False)
        qtensor = quantize(linear.weight.detach(), scheme)
        qmin = scheme.fmt.qmin
        # Widths that eight slices of whole groups do not fill (896, 11008) get groups of zero scale after the
        # last input, which dequantize to 0 and meet zeros padded onto the input.
        slices = -(-in_features // (NIBBLES * group))
        padded_groups = NIBBLES * slices - in_features // group
        codes = qtensor.codes.reshape(out_features, -1) - qmin  # int8 0..15: an output head's stays 0.5 GB
        codes = nn.functional.pad(codes, (0, padded_groups * group)).reshape(out_features, NIBBLES, -1)
        # One nibble at a time in int64, so only one word-sized temporary exists beside the codes, not eight.
        words = torch.zeros(codes[:, 0].shape, dtype=torch.int64, device=codes.device)
        for i in range(NIBBLES):
            words |= codes[:, i].to(torch.int64) << (4 * i)
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # into int32's range

        def per_nibble(values: torch.Tensor) -> torch.Tensor:
            # (out * K / group,) in input order -> (8, out, slices, 1): nibble i covers groups i*slices .. +slices
            grid = nn.functional.pad(values.reshape(out_features, -1).to(torch.float32), (0, padded_groups))
            grid = grid.reshape(out_features, NIBBLES, slices).permute(1, 0, 2)
            return grid.to(torch.float16).contiguous().unsqueeze(-1)

        zeros = qtensor.zero_point.to(torch.float32) - qmin
        return cls(words.reshape(out_features, slices, group), per_nibble(qtensor.scale), per_nibble(zeros),
                   in_features)

    def _nibble(self, i: int) -> torch.Tensor:
        """Nibble ``i`` of every word, dequantized to float32: exactly ``(code - zero_point) * scale``."""
        code = ((self.words >> (4 * i)) & 15) | _MANTISSA_ONE
        return (code.view(torch.float32) - _TWO_POW_23 - self.zeros[i]) * self.scales[i]

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight as qlab's int4 scheme dequantizes it."""
        nibbles = torch.stack([self._nibble(i) for i in range(NIBBLES)], dim=1)  # (out, 8, slices, group)
        return nibbles.reshape(self.out_features, -1)[:, :self.in_features].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows != 1:  # a prompt: dequantize once and run one matmul, not a product per row and weight
            return nn.functional.linear(x, self.dequantized(x.dtype))
        # One row (a decode step): the sum over every input of x * weight, written so that inductor makes it one
        # reduction over each word, reading each word once for its eight nibbles.
        pieces = nn.functional.pad(x.reshape(-1), (0, self.padding)) if self.padding else x.reshape(-1)
        pieces = pieces.reshape(NIBBLES, 1, -1, self.group).to(torch.float32)
        total = pieces[0] * self._nibble(0)
        for i in range(1, NIBBLES):
            total = total + pieces[i] * self._nibble(i)
        return total.sum(dim=(-2, -1)).to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}"


def pack_model(model: nn.Module, skip: tuple[str, ...] = (), group: int = 64) -> int:
    """Replace every bias-free ``nn.Linear`` not named in ``skip`` by its packed INT4 form; how many were."""
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and module.bias is None and name not in skip]
    for name in names:
        model.set_submodule(name, PackedInt4Linear.from_linear(model.get_submodule(name), group))
    return len(names)
