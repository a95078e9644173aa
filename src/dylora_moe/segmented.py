"""The training kernel of sparse token routing: tokens sorted by expert, each expert's rows in one segment.

With top-k token routing each token needs only its k experts, ``k * r`` ranks of work; running the pool as
one stacked rank ``E * r`` matmul pair (the dense kernel with sparse gates) does ``E / k`` times that, and on
the CPU these matmuls are compute-bound (about 150 GFLOP/s on 2 cores), so its cost grows with the pool. Here
the ``(token, slot)`` pairs are sorted by expert once per routing decision (:func:`build_segments`, shared by
every adapted projection of a decoder block), the inputs are gathered in that order, and each expert runs its
two matmuls over its own contiguous segment. The backward pass is written out (:class:`SegmentedLoRA`) so that
it runs the same few matmuls into preallocated buffers: no zero-filled ``[N, d]`` tensor per expert (slicing's
autograd would make one), no padding to the largest group (the sort-and-pad kernel's cost). An expert no token
chose gets an exact zero gradient, as with the stacked kernel.

Shapes: ``x [N, d_in]`` tokens, ``gamma [M]`` the weight of each sorted pair (gate times scale; ``M = N * k``
unless pairs with a zero gate are left out),
``A_e [r_e, d_in]``, ``B_e [d_out, r_e]``; the result is ``[N, d_out]``.
``benchmarks/token_kernels.py --training`` times it against the stacked kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TokenSegments:
    """The sorted order of the ``M`` computed (token, slot) pairs of one routing decision (``N * k`` unless some
    are left out).

    token:   ``[M]`` the token of each pair, in expert order (stable: token order within an expert).
    order:   ``[M]`` the position of each sorted pair in the flattened ``[N, k]`` indices.
    inverse: ``[N]`` with k = 1 and every pair computed, the sorted position of each token (else None).
    counts:  pairs per expert, read from the device once per decision.
    All three tensors are None when k = 1 and one expert has every token (forced routing): the sorted order is
    then the token order, and nothing is gathered.
    """

    token: torch.Tensor | None
    order: torch.Tensor | None
    inverse: torch.Tensor | None
    counts: tuple[int, ...]

    @property
    def identity(self) -> bool:
        return self.token is None

    def sort(self, values: torch.Tensor) -> torch.Tensor:
        """``values [N * k]`` (flattened ``[N, k]`` order) in the sorted pair order."""
        return values if self.order is None else values[self.order]

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Token rows ``[N, d]`` -> pair rows ``[M, d]`` in sorted order."""
        return rows if self.token is None else rows.index_select(0, self.token)

    def bounds(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of each expert's segment."""
        out, start = [], 0
        for count in self.counts:
            out.append((start, start + count))
            start += count
        return out


def sort_pairs(experts: torch.Tensor, num_experts: int, active: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``(order, counts)`` of (token, slot) pairs whose experts are ``experts [M]``: the pairs' positions in expert
    order (stable) and the pairs per expert. The pairs ``active [M]`` leaves out sort after every expert and are cut
    off, so they are neither counted nor gathered."""
    if active is not None:
        experts = torch.where(active.reshape(-1), experts, num_experts)
    counts = tuple(torch.bincount(experts, minlength=num_experts + 1).tolist()[:num_experts])
    order = torch.argsort(experts, stable=True)
    return (order if active is None else order[:sum(counts)]), counts


def build_segments(indices: torch.Tensor, num_experts: int, active: torch.Tensor | None = None) -> TokenSegments:
    """The segments of ``indices [N, k]`` (each token's chosen experts) over a pool of ``num_experts``.

    ``active [N, k]`` (optional): the pairs to compute; the others (a zero gate, e.g. the slots dynamic top-k
    leaves unused) are left out of every segment, so they cost nothing and add exactly what their zero gate
    would: nothing to the output, a zero gradient to everything.
    """
    n, k = indices.shape
    flat = indices.reshape(-1)
    if active is not None and not bool(active.all()):
        order, counts = sort_pairs(flat, num_experts, active)
        return TokenSegments(order // k if k > 1 else order, order, None, counts)
    counts = tuple(torch.bincount(flat, minlength=num_experts).tolist())
    if k == 1 and max(counts, default=0) == n:
        return TokenSegments(None, None, None, counts)
    order = torch.argsort(flat, stable=True)
    token = order // k if k > 1 else order
    inverse = None
    if k == 1:
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n, device=order.device)
    return TokenSegments(token, order, inverse, counts)


def _unsort(rows: torch.Tensor, seg: TokenSegments, n: int) -> torch.Tensor:
    """Sorted pair rows ``[M, d]`` back to tokens ``[N, d]`` (a gather for k = 1, a sum over slots else)."""
    if seg.token is None:
        return rows
    if seg.inverse is not None:
        return rows.index_select(0, seg.inverse)
    return rows.new_zeros(n, rows.shape[1]).index_add_(0, seg.token, rows)


def _forward(x: torch.Tensor, gamma: torch.Tensor, seg: TokenSegments, a_list: tuple[torch.Tensor, ...] | list[
        torch.Tensor], b_list: tuple[torch.Tensor, ...] | list[torch.Tensor]
             ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``(ys [M, d_out], xs [M, d_in], hs)``: the sorted pairs' outputs, inputs and rank-sized activations."""
    xs = seg.gather(x)  # [M, d_in]
    ys = x.new_empty(xs.shape[0], b_list[0].shape[0])
    hs = []
    g = gamma.to(x.dtype).unsqueeze(-1)
    for e, (start, stop) in enumerate(seg.bounds()):
        h = xs[start:stop] @ a_list[e].t()  # [c, r_e]
        hs.append(h)
        if stop > start:
            torch.mm(h * g[start:stop], b_list[e].t(), out=ys[start:stop])
    return ys, xs, hs


class SegmentedLoRA(torch.autograd.Function):
    """``y[t] = sum over t's pairs j of gamma_j * B_e A_e x[t]``, forward and backward by expert segment."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gamma: torch.Tensor, seg: TokenSegments, num_experts: int,
                *weights: torch.Tensor) -> torch.Tensor:
        ys, xs, hs = _forward(x, gamma, seg, weights[:num_experts], weights[num_experts:])
        ctx.seg, ctx.num_experts, ctx.n = seg, num_experts, x.shape[0]
        ctx.save_for_backward(xs, gamma, *hs, *weights)
        return _unsort(ys, seg, x.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        seg, num = ctx.seg, ctx.num_experts
        xs, gamma, *rest = ctx.saved_tensors
        hs, a_list, b_list = rest[:num], rest[num:2 * num], rest[2 * num:]
        need_x, need_gamma = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gs = seg.gather(grad)  # [M, d_out]
        g = gamma.to(xs.dtype).unsqueeze(-1)
        grad_xs = torch.empty_like(xs) if need_x else None
        grad_gamma = torch.empty_like(gamma) if need_gamma else None
        grads_a, grads_b = [], []
        for e, (start, stop) in enumerate(seg.bounds()):
            if stop == start:
                grads_a.append(torch.zeros_like(a_list[e]))
                grads_b.append(torch.zeros_like(b_list[e]))
                continue
            ge, he, we = gs[start:stop], hs[e], g[start:stop]
            u = ge @ b_list[e]  # [c, r_e]: B^T dy
            if grad_gamma is not None:
                grad_gamma[start:stop] = (u * he).sum(-1).to(grad_gamma.dtype)
            grads_b.append(ge.t() @ (he * we))
            gu = u * we
            grads_a.append(gu.t() @ xs[start:stop])
            if grad_xs is not None:
                torch.mm(gu, a_list[e], out=grad_xs[start:stop])
        grad_x = _unsort(grad_xs, seg, ctx.n) if grad_xs is not None else None
        return (grad_x, grad_gamma, None, None, *grads_a, *grads_b)


def segmented_lora(x: torch.Tensor, gamma: torch.Tensor, seg: TokenSegments, a_list: list[torch.Tensor],
                   b_list: list[torch.Tensor]) -> torch.Tensor:
    """``x [N, d_in]``, ``gamma [M]`` (in ``seg``'s sorted order), per-expert ``A_e``, ``B_e`` -> ``[N, d_out]``.

    Without autograd the same forward runs without saving anything (``benchmarks/token_kernels.py`` times it; the
    model's evaluation and decoding use ``experts.py``'s per-expert kernels instead), and when every token went to
    one expert with k = 1 that expert runs over ``x`` as it is. A token's result depends only on its own expert's
    matrices, so adding experts to the pool leaves it unchanged.
    """
    if torch.is_grad_enabled() and (x.requires_grad or gamma.requires_grad or a_list[0].requires_grad):
        out = SegmentedLoRA.apply(x, gamma, seg, len(a_list), *a_list, *b_list)
        return out  # type: ignore[no-any-return]
    if seg.identity:  # one expert, k = 1: the sorted order is the token order
        e = max(range(len(seg.counts)), key=seg.counts.__getitem__)
        return ((x @ a_list[e].t()) * gamma.to(x.dtype).unsqueeze(-1)) @ b_list[e].t()
    ys, _, _ = _forward(x, gamma, seg, a_list, b_list)
    return _unsort(ys, seg, x.shape[0])
