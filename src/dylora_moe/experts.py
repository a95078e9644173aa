"""Batched computation of a routed mixture of LoRA experts.

All experts of one layer are held as stacked tensors ``A [E, R, d_in]`` and ``B [E, d_out, R]``
(``R`` the largest rank; smaller experts are zero-padded, which changes nothing) and a scale
``[E]`` (alpha / r). For a whole batch the selected experts are computed in one batched
computation, never with one base-model pass or a Python loop per expert:

* dense (any expert immature): every expert contributes; ``x @ A_cat^T`` then a per-column
  mixing weight, then ``@ B_cat^T`` (``A_cat = A.reshape(E*R, d_in)``).
* sparse, sequence routing: each sequence gathers only its k experts' A and B and runs two
  ``bmm``; the cost equals one LoRA of rank k*R whatever the pool size, and experts no sequence
  chose get no gradient (and so no optimizer work). Without autograd (evaluation, ``generate``) the
  rows are grouped by expert instead and each chosen expert runs two matmuls over its rows: no copy
  of A and B per sequence (a few hundred small copies per layer per token at a generation batch of
  256), and a row's result depends only on its own experts, so adding experts to the pool leaves the
  outputs of the existing ones bit for bit unchanged.
* sparse, token routing, training: on the CPU the tokens are sorted by expert once per decision and each
  expert runs over its own segment with a hand-written backward (``segmented.py``): the work of k experts per
  token whatever the pool size. Elsewhere, with a small pool (total rank E*R <= ``DENSE_TOKEN_MAX_RANK``)
  the dense kernel runs with the sparse gates (zero for unchosen experts, which then get exactly zero
  gradient): measured faster than sorting tokens for small pools. With a larger pool, tokens are
  sorted by expert into a padded ``[E, C, d_in]`` buffer (``C`` the largest group), two ``bmm``
  run over all experts at once, and the results are scattered back weighted by the gates. Without
  autograd each expert runs with its own matrices (its own rank, no padding): for many tokens
  (prefill, evaluation) the tokens are sorted by expert and each chosen expert runs two matmuls over
  its tokens; for a few (decode steps) every expert runs over all of them with the sparse gates, which
  avoids a device sync per layer. Either way, as for sequence routing, adding experts to the pool (of
  any rank) leaves the outputs of the existing ones bit for bit unchanged
  (``benchmarks/token_kernels.py`` times the kernels).

With asymmetric experts (HydraLoRA, ``shared_a``) every expert's A is one shared tensor; the dense kernels
then compute ``x A^T`` once and mix the B heads.

The delta ``sum_e gate_e * scale_e * B_e A_e x`` is returned; the caller adds the frozen base
layer's output.
"""

from __future__ import annotations

import torch

from .routing import RoutingDecision
from .segmented import TokenSegments, build_segments, segmented_lora, sort_pairs

#: token routing uses the dense kernel with sparse gates up to this total rank E*R (see
#: benchmarks/train_step.py: the sort-and-pad path wins only for larger pools on CPU)
DENSE_TOKEN_MAX_RANK = 256

#: devices where sparse token routing trains with the segmented kernel (segmented.py): measured faster than the
#: stacked kernel on the CPU for any pool (benchmarks/token_kernels.py --training); elsewhere it is not measured.
#: Without autograd the per-expert kernels below serve instead: segmented's token-sized sorted copies of the input
#: and output cost more than they save at prefill (benchmarks/token_kernels.py)
SEGMENTED_TOKEN_DEVICES: tuple[str, ...] = ("cpu",)

#: without autograd, token routing sorts tokens by expert from this many tokens on, and below it runs
#: every expert over all tokens (benchmarks/token_kernels.py: sorting wins for prefill, not for decode)
GROUPED_TOKEN_MIN_TOKENS = 128


def stack_experts(
    a_list: list[torch.Tensor], b_list: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-expert ``A_e [r_e, d_in]``, ``B_e [d_out, r_e]`` into ``A [E, R, d_in]``, ``B [E, d_out, R]``."""
    rmax = max(a.shape[0] for a in a_list)
    if all(a.shape[0] == rmax for a in a_list):
        return torch.stack(list(a_list)), torch.stack(list(b_list))
    pad = torch.nn.functional.pad
    a = torch.stack([pad(t, (0, 0, 0, rmax - t.shape[0])) for t in a_list])
    b = torch.stack([pad(t, (0, rmax - t.shape[1])) for t in b_list])
    return a, b


def _dense(x: torch.Tensor, weights: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x ``[B, T, d_in]``, weights ``[B, 1|T, E]`` (already times scale) -> ``[B, T, d_out]``."""
    num_experts, rank, d_in = a.shape
    a_cat = a.reshape(num_experts * rank, d_in)
    b_cat = b.permute(1, 0, 2).reshape(b.shape[1], num_experts * rank)
    h = x @ a_cat.t()
    h = h * weights.repeat_interleave(rank, dim=-1).to(h.dtype)
    return h @ b_cat.t()


def _dense_shared(x: torch.Tensor, weights: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The dense kernel with one A shared by every expert (HydraLoRA): x ``[B, T, d_in]``, weights ``[B, 1|T, E]``
    (times scale), a ``[R, d_in]``, b ``[E, d_out, R]`` -> ``[B, T, d_out]``. ``x A^T`` is computed once."""
    num_experts, d_out, rank = b.shape
    h = x @ a.t()  # [B, T, R]
    h = (h.unsqueeze(-2) * weights.unsqueeze(-1).to(h.dtype)).flatten(-2)  # [B, T, E*R], expert-major
    return h @ b.permute(1, 0, 2).reshape(d_out, num_experts * rank).t()


def update_similarity(a_list: list[torch.Tensor], b_list: list[torch.Tensor]) -> torch.Tensor:
    """Cosine similarity ``[E, E]`` between the experts' weight updates ``B_e A_e`` (as flattened ``[d_out, d_in]``
    matrices), computed from rank-sized products only: ``<B_i A_i, B_j A_j> = sum((B_i^T B_j) * (A_i A_j^T))``.
    An expert whose update is zero (a fresh B) has similarity 0 with every other, and a finite gradient."""
    a, b = stack_experts(a_list, b_list)  # [E, R, d_in], [E, d_out, R]
    bb = torch.einsum("eor,fos->efrs", b, b)
    aa = torch.einsum("erd,fsd->efrs", a, a)
    gram = (bb * aa).sum((-2, -1))  # [E, E]
    # clamped before the square root: at a fresh B the norm is 0, where sqrt's gradient is infinite (NaN training)
    norm = gram.diagonal().clamp_min(1e-24).sqrt()
    return gram / (norm[:, None] * norm[None, :]).clamp_min(1e-12)


def _sparse_per_sequence(
    x: torch.Tensor,
    chosen: list[list[int]],
    gates: torch.Tensor,
    a_list: list[torch.Tensor],
    b_list: list[torch.Tensor],
) -> torch.Tensor:
    """x ``[B, T, d_in]``, ``chosen`` the k expert ids of each sequence, gates ``[B, k]`` (times scale).

    Only the chosen experts' matrices are gathered, so the cost does not grow with the pool size
    and unchosen experts get no gradient at all. Returns ``[B, T, d_out]``.
    """
    batch, k = gates.shape
    flat = [e for row in chosen for e in row]
    a_sel, b_sel = stack_experts([a_list[e] for e in flat], [b_list[e] for e in flat])  # [B*k, R, d_in]
    rank, d_in = a_sel.shape[1], a_sel.shape[2]
    a_sel = a_sel.reshape(batch, k * rank, d_in)
    b_sel = b_sel.reshape(batch, k, -1, rank).permute(0, 2, 1, 3).reshape(batch, -1, k * rank)  # [B, d_out, kR]
    h = torch.bmm(x, a_sel.transpose(1, 2))  # [B, T, kR]
    h = h * gates.repeat_interleave(rank, dim=-1).unsqueeze(1).to(h.dtype)
    return torch.bmm(h, b_sel.transpose(1, 2))


def _grouped_per_sequence(
    x: torch.Tensor,
    groups: dict[int, tuple[torch.Tensor | None, torch.Tensor]],
    gates: torch.Tensor,
    a_list: list[torch.Tensor],
    b_list: list[torch.Tensor],
) -> torch.Tensor:
    """Inference path of sequence routing: x ``[B, T, d_in]``, ``groups`` from ``RoutingDecision.groups``
    (``{expert: (rows or None for all, slots)}``), gates ``[B, k]`` (times scale) -> ``[B, T, d_out]``."""
    batch = x.shape[0]
    out: torch.Tensor | None = None
    for expert, (rows, slots) in groups.items():
        if rows is None:  # every row chose this expert
            xe, gate = x, gates[torch.arange(batch, device=gates.device), slots]
        else:
            xe, gate = x.index_select(0, rows), gates[rows, slots]
        y = ((xe @ a_list[expert].t()) * gate.view(-1, 1, 1).to(x.dtype)) @ b_list[expert].t()
        if rows is not None:
            y = x.new_zeros(batch, x.shape[1], y.shape[-1]).index_add(0, rows, y)
        out = y if out is None else out + y
    if out is None:  # an empty batch
        return x.new_zeros(*x.shape[:-1], b_list[0].shape[0])
    return out


def _sparse_per_token(
    x: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor, a: torch.Tensor, b: torch.Tensor
) -> torch.Tensor:
    """x ``[N, d_in]``, indices/gates ``[N, k]`` (gates already times scale) -> ``[N, d_out]``."""
    n, k = indices.shape
    num_experts = a.shape[0]
    flat_expert = indices.reshape(-1)
    flat_token = torch.arange(n, device=x.device).repeat_interleave(k)
    order = torch.argsort(flat_expert, stable=True)
    expert = flat_expert[order]
    token = flat_token[order]
    gate = gates.reshape(-1)[order]
    counts = torch.bincount(expert, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(n * k, device=x.device) - starts[expert]
    capacity = int(counts.max())
    buf = x.new_zeros(num_experts, capacity, x.shape[-1])
    buf = buf.index_put((expert, slot), x[token])
    y = torch.bmm(torch.bmm(buf, a.transpose(1, 2)), b.transpose(1, 2))  # [E, C, d_out]
    contrib = y[expert, slot] * gate.unsqueeze(-1).to(y.dtype)
    return y.new_zeros(n, y.shape[-1]).index_add(0, token, contrib)


def _per_expert_all_tokens(
    x: torch.Tensor, weights: torch.Tensor, a_list: list[torch.Tensor], b_list: list[torch.Tensor]
) -> torch.Tensor:
    """Inference path of token routing for few tokens: x ``[N, d_in]``, weights ``[N, E]`` (zero for unchosen
    experts, already times scale) -> ``[N, d_out]``. Experts are summed in index order; one that no token
    chose adds exact zeros."""
    weights = weights.to(x.dtype)
    out = ((x @ a_list[0].t()) * weights[:, :1]) @ b_list[0].t()
    for expert in range(1, len(a_list)):  # addmm: the sum and the product in one call (decoding is call-bound)
        out = torch.addmm(out, (x @ a_list[expert].t()) * weights[:, expert:expert + 1], b_list[expert].t())
    return out


def _grouped_per_token(
    x: torch.Tensor,
    indices: torch.Tensor,
    gates: torch.Tensor,
    a_list: list[torch.Tensor],
    b_list: list[torch.Tensor],
) -> torch.Tensor:
    """Inference path of token routing: x ``[N, d_in]``, indices/gates ``[N, k]`` (gates already times
    scale) -> ``[N, d_out]``. A token's result depends only on its own experts' matrices. With k > 1, pairs of
    gate 0 (the slots dynamic top-k left unused) sort after every expert's segment and are not computed."""
    n, k = indices.shape
    order, counts = sort_pairs(indices.reshape(-1), len(a_list), gates.reshape(-1) != 0 if k > 1 else None)
    token = order // k
    gate = gates.reshape(-1)[order]
    out = x.new_zeros(n, b_list[0].shape[0])
    start = 0
    for expert, count in enumerate(counts):
        if count:
            rows = token[start:start + count]
            g = gate[start:start + count].unsqueeze(-1).to(x.dtype)
            out.index_add_(0, rows, ((x.index_select(0, rows) @ a_list[expert].t()) * g) @ b_list[expert].t())
        start += count
    return out


def experts_in_graph(decision: RoutingDecision, num_experts: int) -> set[int]:
    """The experts whose A and B enter the autograd graph of a training forward of :func:`mixture_delta`
    (gradients on): every expert with dense or token routing (their matrices are stacked), only the chosen ones
    with sparse or forced sequence routing. The others end the backward with ``grad = None``."""
    if decision.mode == "dense" or decision.probs.dim() == 3:
        return set(range(num_experts))
    return {e for row in decision.chosen() for e in row}


def mixture_delta(
    x: torch.Tensor,
    decision: RoutingDecision,
    a_list: list[torch.Tensor],
    b_list: list[torch.Tensor],
    scale: torch.Tensor,
    shared_a: bool = False,
) -> torch.Tensor:
    """The experts' contribution for input ``x [B, T, d_in]`` -> ``[B, T, d_out]``.

    ``a_list[e]`` is ``A_e [r_e, d_in]``, ``b_list[e]`` is ``B_e [d_out, r_e]``, ``scale [E]``.
    ``decision`` has probabilities ``[B, E]`` (sequence routing) or ``[B, T, E]`` (token routing).
    ``shared_a``: every ``a_list[e]`` is the same tensor (HydraLoRA); the dense kernels then compute ``x A^T``
    once instead of once per expert (the other kernels select rows per expert and need nothing special).
    """
    if x.dim() != 3:
        raise ValueError(f"expert layers expect inputs [batch, seq, features], got shape {tuple(x.shape)}")
    per_sequence = decision.probs.dim() == 2
    if decision.mode == "dense":
        w = decision.probs * scale
        w = w.unsqueeze(1) if per_sequence else w
        if shared_a:
            return _dense_shared(x, w, a_list[0], torch.stack(list(b_list)))
        a, b = stack_experts(a_list, b_list)
        return _dense(x, w, a, b)
    indices, gates = decision.selected()
    if per_sequence:
        gates = gates * scale[indices]
        if torch.is_grad_enabled() and a_list[0].requires_grad:
            return _sparse_per_sequence(x, decision.chosen(), gates, a_list, b_list)
        return _grouped_per_sequence(x, decision.groups(), gates, a_list, b_list)
    batch, seq, _ = x.shape
    inference = not (torch.is_grad_enabled() and a_list[0].requires_grad)
    if not inference and x.device.type in SEGMENTED_TOKEN_DEVICES:
        k = indices.shape[-1]  # with k > 1, slots of gate 0 (dynamic top-k) are left out: computed at no cost

        def segments() -> TokenSegments:  # once per decision; with k > 1 only the slots to compute
            if k == 1:
                return build_segments(indices.reshape(-1, 1), len(a_list))
            active = decision.computed if decision.computed is not None else gates != 0  # a learned threshold's band
            return build_segments(indices.reshape(-1, k), len(a_list), active=active.reshape(-1, k))

        seg = decision.memo("segments", segments)
        gamma = seg.sort((gates * scale[indices]).reshape(-1))
        return segmented_lora(x.reshape(batch * seq, -1), gamma, seg, a_list, b_list).reshape(batch, seq, -1)
    if inference and batch * seq == 1 and indices.shape[-1] == 1 and x.device.type == "cpu":
        # one token (a decoding step at batch 1): straight to its expert; reading its index is a device sync, once
        # per block, so not on accelerators (there the unrolled kernel below needs none)
        expert = decision.memo("lone_expert", lambda: int(indices.reshape(())))
        gate = (gates * scale[indices]).reshape(1, 1, 1).to(x.dtype)
        return ((x @ a_list[expert].t()) * gate) @ b_list[expert].t()
    if inference and batch * seq < GROUPED_TOKEN_MIN_TOKENS:
        weights = (decision.memo("dense_weights", decision.dense_weights) * scale).reshape(batch * seq, -1)
        return _per_expert_all_tokens(x.reshape(batch * seq, -1), weights, a_list, b_list).reshape(batch, seq, -1)
    if not inference:
        a, b = stack_experts(a_list, b_list)
        if a.shape[0] * a.shape[1] <= DENSE_TOKEN_MAX_RANK:
            if shared_a:
                return _dense_shared(x, decision.dense_weights() * scale, a_list[0], b)
            return _dense(x, decision.dense_weights() * scale, a, b)
    k = indices.shape[-1]
    gates = (gates * scale[indices]).reshape(-1, k)
    flat = (x.reshape(batch * seq, -1), indices.reshape(-1, k), gates)
    out = _grouped_per_token(*flat, a_list, b_list) if inference else _sparse_per_token(*flat, a, b)
    return out.reshape(batch, seq, -1)
