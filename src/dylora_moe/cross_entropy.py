"""The LM loss without ``F.cross_entropy``'s vocabulary-sized intermediates: on logits, and fused with the head.

``torch.nn.functional.cross_entropy`` builds ``log_softmax(logits)`` (``[N, V]``) in the forward pass and keeps
it, and its backward pass allocates a zero-filled ``[N, V]`` gradient of that and another ``[N, V]`` for the
log-softmax gradient: with the default model's 49,152-token vocabulary that is three 150 MB tensors for a batch
of 768 supervised positions, written and page-faulted every step (together with the head's own ``[N, V]``
output, about 10% of a training step of the default mixture on the CPU: docs/benchmarks.md). Here the forward
pass keeps only each row's log-sum-exp (computed in float32, in row chunks of about ``CHUNK_ELEMENTS``
elements so temporaries stay bounded), and the backward pass writes
``(softmax - one_hot) * weight`` straight into the one ``[N, V]`` gradient the LM head needs. The loss and the
gradient are the same up to float rounding (``tests/test_cross_entropy.py`` checks them against
``F.cross_entropy``, with ignored targets, bf16 logits and both reductions).

:func:`linear_cross_entropy` goes further where the LM head is a frozen linear map: it takes the head's input
rows and weight, computes the logits ``R`` rows at a time into one reused chunk buffer, and, when the input needs
a gradient, the gradient of the input in the same pass (``(softmax - one_hot) @ W``, the head being frozen), so
no ``[N, V]`` tensor exists at all, in the forward pass or the backward one.

Shapes: ``logits [N, V]`` (any float dtype), ``hidden [N, H]``, ``weight [V, H]``, ``bias [V]``, ``targets [N]``
(``ignore_index`` where nothing is predicted); the results are float32 scalars.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

CHUNK_ELEMENTS = 1 << 24  # elements of one float32 row chunk (64 MiB): large enough that the fused head streams
# its weight only a few times (341 rows of a 49,152-token vocabulary; 2M-element chunks made the step 8% slower)


def _chunks(rows: int, width: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


class _SummedCrossEntropy(torch.autograd.Function):
    """``sum over rows with a target of logsumexp(logits[i]) - logits[i, target[i]]``."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        valid = targets != ignore_index
        safe = targets.masked_fill(~valid, 0)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start, stop in _chunks(*logits.shape):
            lse[start:stop] = torch.logsumexp(logits[start:stop].float(), dim=-1)
        picked = logits.gather(1, safe.unsqueeze(1)).squeeze(1).float()
        ctx.save_for_backward(logits, safe, valid, lse)
        return torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, safe, valid, lse = ctx.saved_tensors
        weight = valid.to(torch.float32) * grad.to(torch.float32)  # [N]: 0 where the target is ignored
        out = torch.empty_like(logits)
        for start, stop in _chunks(*logits.shape):
            rows = out[start:stop]
            probs = rows if out.dtype == torch.float32 else torch.empty(rows.shape, dtype=torch.float32,
                                                                        device=rows.device)
            torch.sub(logits[start:stop].float(), lse[start:stop, None], out=probs)
            probs.exp_().mul_(weight[start:stop, None])
            probs.scatter_add_(1, safe[start:stop, None], -weight[start:stop, None])
            if probs is not rows:
                rows.copy_(probs)
        return out, None, None


class _SummedLinearCrossEntropy(torch.autograd.Function):
    """``sum over rows with a target of the cross-entropy of hidden[i] @ weight.T + bias``; frozen weight, bias."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        n, vocab = hidden.shape[0], weight.shape[0]
        valid = targets != ignore_index
        safe = targets.masked_fill(~valid, 0)
        want_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunks = _chunks(n, vocab)
        buffer = hidden.new_empty(chunks[0][1] - chunks[0][0] if chunks else 0, vocab)
        scratch = buffer if buffer.dtype == torch.float32 else torch.empty(buffer.shape, dtype=torch.float32,
                                                                           device=buffer.device)
        for start, stop in chunks:
            logits = buffer[:stop - start]
            if bias is None:
                torch.mm(hidden[start:stop], weight.t(), out=logits)
            else:
                torch.addmm(bias, hidden[start:stop], weight.t(), out=logits)
            rows_valid, rows_target = valid[start:stop], safe[start:stop, None]
            picked = logits.gather(1, rows_target).float()  # [R, 1] the target's logit
            probs = scratch[:stop - start]
            if probs is not logits:
                probs.copy_(logits)
            row_max = probs.amax(dim=-1, keepdim=True)
            probs.sub_(row_max).exp_()
            sums = probs.sum(dim=-1, keepdim=True)
            picked -= row_max
            total += torch.where(rows_valid[:, None], sums.log() - picked, torch.zeros_like(picked)).sum()
            if grad_hidden is not None:
                weights = rows_valid[:, None].to(torch.float32)
                probs.mul_(weights / sums)  # softmax, 0 on rows without a target
                probs.scatter_add_(1, rows_target, -weights)
                if probs is not logits:
                    logits.copy_(probs)
                torch.mm(logits, weight, out=grad_hidden[start:stop])
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else hidden.new_empty(0))
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        (grad_hidden,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        return grad_hidden * grad.to(grad_hidden.dtype), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, reduction: str = "mean", ignore_index: int = -100) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, targets)`` without the ``[N, V]`` logits; weight and bias frozen.

    The same loss as ``F.cross_entropy`` of the head's logits in float32 (up to rounding), and the gradient of
    ``hidden``; ``weight`` and ``bias`` get none (refused when they require one).
    """
    if (hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]
            or targets.shape != hidden.shape[:1]):
        raise ValueError(f"linear_cross_entropy: hidden must be [N, H], weight [V, H] and targets [N]; got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)} and {tuple(targets.shape)}")
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("linear_cross_entropy: the head's weight and bias must be frozen (requires_grad=False); "
                         "a trainable head needs the logits (supervised_logits_only=False)")
    _check_reduction(reduction)
    total: torch.Tensor = _SummedLinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index)
    return total if reduction == "sum" else total / (targets != ignore_index).sum()


def _check_reduction(reduction: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"cross_entropy: reduction must be 'mean' or 'sum', not {reduction!r}")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                  ignore_index: int = -100) -> torch.Tensor:
    """The cross-entropy of ``logits [N, V]`` against ``targets [N]``, as ``F.cross_entropy(logits.float(), ...)``.

    ``reduction``: ``"mean"`` over the rows whose target is not ``ignore_index`` (NaN when there is none, as
    there), or ``"sum"``.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy: logits must be [N, V] and targets [N]; got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    _check_reduction(reduction)
    total: torch.Tensor = _SummedCrossEntropy.apply(logits, targets, ignore_index)
    return total if reduction == "sum" else total / (targets != ignore_index).sum()
