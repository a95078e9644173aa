"""Dropout on the experts' input, with a cheaper mask on the CPU.

``torch.nn.Dropout`` draws one 32-bit random number per element from the CPU generator (``bernoulli_``):
on the default model's adapted projections that is 3.4 ms per call, 120 calls per training step, about 8% of
the step (``benchmarks/train_step.py``). :func:`expert_dropout` draws one 64-bit number per *four* elements
and compares each 16-bit lane with a threshold, so the drop probability is ``p`` rounded to a multiple of
1/65536 (0.05 becomes 0.0500031; the kept elements are scaled by ``1 / (1 - that)``, so the expectation is
exact). The mask is kept as booleans for the backward pass, as ``nn.Dropout`` keeps it. On other devices
(CUDA's generator is fast) it is ``torch.nn.functional.dropout``. Both draw from the device's default
generator, so ``torch.manual_seed`` makes a run repeatable.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

#: resolution of the CPU mask: the drop probability is rounded to a multiple of 1 / LANES
LANES = 65536


def cpu_keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """``(keep, scale)``: a bool mask of ``shape``, false with probability ``round(p * LANES) / LANES``, and
    ``1 / (1 - that)``."""
    drop = round(p * LANES)
    numel = shape.numel()
    words = torch.randint(-(2**63), 2**63 - 1, ((numel + 3) // 4,), dtype=torch.int64, device=device)
    lanes = words.view(torch.int16)[:numel].view(shape)  # uniform over [-32768, 32767]
    return lanes >= drop - LANES // 2, 1.0 / (1.0 - drop / LANES)


class _MaskedScale(torch.autograd.Function):
    """``x * keep * scale`` with the bool mask saved for the backward pass (not a float copy of it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0).mul_(ctx.scale), None, None


def expert_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout of ``x`` (any shape) with drop probability ``p`` in training, ``x`` itself otherwise."""
    if not training or p <= 0.0:
        return x
    if x.device.type != "cpu":
        return torch.nn.functional.dropout(x, p, training=True)
    if p >= 1.0:
        return torch.zeros_like(x)
    keep, scale = cpu_keep_mask(x.shape, p, x.device)
    return _MaskedScale.apply(x, keep, scale)


class ExpertDropout(nn.Module):
    """:func:`expert_dropout` as a module (no parameters, no state: checkpoints are unchanged)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return expert_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
