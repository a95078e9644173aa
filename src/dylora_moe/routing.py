"""Routing decisions, the load-balancing loss and routing statistics.

The hybrid rule of the seed: while any expert is immature the router is *dense* (a temperature
softmax over all experts mixes every expert); once all experts are mature it is *sparse* (each
routed unit goes to its top-k experts). In sparse mode the chosen experts are weighted by their
softmax probabilities (Switch Transformer), so the router still receives a gradient from the LM
loss when k=1; ``gate='straight_through'`` gives the chosen experts weights that sum to exactly 1
(1 when k=1) and keeps that gradient.

A routed *unit* is a sequence (sequence routing, tensors ``[B, E]``) or a token of one decoder
layer (token routing, tensors ``[B, T, E]``).

Dynamic top-k: of the ``top_k`` most probable experts a unit keeps those needed for their probability to reach a
threshold ``tau`` (the first always). ``tau`` is fixed (``top_p``) or learned (a router parameter): the keep mask
is then a straight-through estimator, hard in the forward pass and ``sigmoid((tau - before) / THRESHOLD_WIDTH)``
backward (``before``: the probability of the better experts), so the LM loss tells ``tau`` whether the expert at
the margin helps, and ``decision.soft_k`` (the soft count of kept experts) lets a compute penalty pull it down.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

#: width of the soft keep mask of a learned threshold, in probability (see the module docstring)
THRESHOLD_WIDTH = 0.05
#: with a learned threshold, training also computes the dropped slots whose probability before them is within
#: this distance above the threshold (weight 0 in the forward pass), so their gradient tells the threshold whether
#: keeping them would help; further slots' soft mask is below 5% of its peak slope and they are left out
THRESHOLD_BAND = 3 * THRESHOLD_WIDTH


@dataclass
class RoutingDecision:
    """How one set of units is routed.

    probs:   ``[..., E]`` router softmax at the configured temperature (float32).
    indices: ``[..., k]`` chosen experts (sparse and forced modes), ``None`` in dense mode.
    gates:   ``[..., k]`` weight of each chosen expert (sparse/forced), ``None`` in dense mode.
    mode:    'dense', 'sparse' or 'forced'.
    mask:    ``[...]`` bool, the units that count for losses and statistics (not padding).
    computed: ``[..., k]`` bool, the slots a training kernel must compute (None: those of non-zero gate); a learned
             threshold adds the dropped slots near it, whose gate is 0 but whose gradient it needs.
    soft_k:  scalar, the mean over the valid units of the soft count of kept experts (learned threshold only;
             differentiable w.r.t. the threshold: the compute penalty).
    dynamic: whether units may keep fewer than ``k`` experts (dynamic top-k); else every unit uses ``k``.
    """

    probs: torch.Tensor
    indices: torch.Tensor | None
    gates: torch.Tensor | None
    mode: str
    mask: torch.Tensor
    z_loss: torch.Tensor | None = field(default=None, repr=False, compare=False)
    computed: torch.Tensor | None = field(default=None, repr=False, compare=False)
    soft_k: torch.Tensor | None = field(default=None, repr=False, compare=False)
    dynamic: bool = field(default=False, repr=False, compare=False)  # top_p or a learned threshold: k varies
    _chosen: list | None = field(default=None, repr=False, compare=False)
    _groups: dict | None = field(default=None, repr=False, compare=False)
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    def memo(self, key: str, build: Callable[[], Any]) -> Any:
        """``build()``, computed once per decision and kept under ``key`` (index plans every adapted projection
        of a decoder block shares)."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def selected(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices, gates)``, each ``[..., k]``, of a sparse or forced decision (a dense one has none)."""
        if self.indices is None or self.gates is None:
            raise ValueError(f"a {self.mode} routing decision selects no experts")
        return self.indices, self.gates

    def chosen(self) -> list:
        """``indices`` as nested Python lists, read from the device once per decision."""
        if self._chosen is None:
            self._chosen = self.selected()[0].tolist()
        return self._chosen

    def groups(self) -> dict[int, tuple[torch.Tensor | None, torch.Tensor]]:
        """Per-sequence routing: ``{expert: (rows, slots)}``, the batch rows that chose the expert and at which
        of their k places (``rows`` is None when every row did), as index tensors on the decision's device;
        built once per decision (a pinned decision serves a whole generation)."""
        if self._groups is None:
            found: dict[int, tuple[list[int], list[int]]] = {}
            for row, experts in enumerate(self.chosen()):
                for slot, expert in enumerate(experts):
                    found.setdefault(expert, ([], []))[0].append(row)
                    found[expert][1].append(slot)
            device, batch = self.probs.device, self.probs.shape[0]
            self._groups = {
                e: (None if rows == list(range(batch)) else torch.tensor(rows, device=device),
                    torch.tensor(slots, device=device))
                for e, (rows, slots) in sorted(found.items())
            }
        return self._groups

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    def dense_weights(self) -> torch.Tensor:
        """Mixing weight of every expert, ``[..., E]`` (zero for experts not chosen)."""
        if self.mode == "dense":
            return self.probs
        out = torch.zeros_like(self.probs)
        indices, gates = self.selected()
        return out.scatter_add(-1, indices, gates.to(out.dtype))


def decide(
    logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str,
    top_k: int,
    temperature: float,
    forced_expert: int | torch.Tensor | None = None,
    gate: str = "straight_through",
    top_p: float | None = None,
    threshold: torch.Tensor | None = None,
) -> RoutingDecision:
    """Turn router logits ``[..., E]`` into a decision.

    ``mode`` is 'dense' or 'sparse' (already resolved from the maturity flags); ``forced_expert``
    overrides both and sends every unit to that expert with weight 1 (a ``[B]`` tensor: each sequence's units
    to its own expert, e.g. the expert of its domain). In sparse mode ``gate`` says how a
    chosen expert is weighted: 'probability' (its probability) or 'straight_through'
    (``p / sum(p_chosen).detach()``: forward, the chosen probabilities renormalised to sum to exactly 1,
    so 1 when k=1 and never k times a single LoRA's update when k>1; backward, the gradient of ``p``
    divided by that sum, so the router still learns from the LM loss). ``top_p`` (dynamic top-k): of the
    ``top_k`` most probable experts, only those needed for their probability to reach ``top_p`` keep a weight
    (always the first; the others' gates are 0, their slots kept so shapes stay static). ``threshold`` (a scalar
    tensor in (0, 1), a learned threshold) takes the place of ``top_p`` with a straight-through keep mask (module
    docstring) and sets ``computed`` and ``soft_k``.
    """
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if forced_expert is not None:
        shape = probs.shape[:-1] + (1,)
        if isinstance(forced_expert, torch.Tensor):
            per_row = forced_expert.to(device=probs.device, dtype=torch.long)
            indices = per_row.view(-1, *[1] * (probs.dim() - 1)).expand(shape).contiguous()
        else:
            indices = torch.full(shape, forced_expert, dtype=torch.long, device=probs.device)
        return RoutingDecision(probs, indices, torch.ones(shape, device=probs.device), "forced", mask)
    if mode == "dense":
        return RoutingDecision(probs, None, None, "dense", mask)
    gates, indices = torch.topk(probs, k=min(top_k, probs.shape[-1]), dim=-1)
    computed = soft_k = None
    # dynamic k: the most probable experts until the threshold; ``before``, the probability of the better experts
    if threshold is not None:
        before = gates.detach().cumsum(-1) - gates.detach()
        gates, computed, soft_k = _learned_threshold(gates, before, threshold.float(), mask)
    elif top_p is not None:
        before = gates.detach().cumsum(-1) - gates.detach()
        gates = gates * (before < top_p).to(gates.dtype)
    if gate == "straight_through":
        gates = gates / gates.detach().sum(-1, keepdim=True)
    elif gate != "probability":
        raise ValueError(f"gate={gate!r} is not 'probability' or 'straight_through'")
    return RoutingDecision(probs, indices, gates, "sparse", mask, computed=computed, soft_k=soft_k,
                           dynamic=threshold is not None or top_p is not None)


def _learned_threshold(gates: torch.Tensor, before: torch.Tensor, threshold: torch.Tensor, mask: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gates, computed, soft_k)`` of a learned threshold: ``gates [..., k]`` times the straight-through keep
    mask (exactly the hard mask ``before < threshold`` forward), the slots to compute ``[..., k]`` and the mean
    soft count of kept experts over the units of ``mask [...]`` (a scalar)."""
    soft = torch.sigmoid((threshold - before) / THRESHOLD_WIDTH)
    soft = torch.cat([torch.ones_like(soft[..., :1]), soft[..., 1:]], dim=-1)  # the first expert is always kept
    hard = (before < threshold.detach()).to(gates.dtype)
    keep = hard + (soft - soft.detach())
    computed = before < threshold.detach() + THRESHOLD_BAND
    m = mask.to(soft.dtype)
    soft_k = (soft.sum(-1) * m).sum() / m.sum().clamp_min(1.0)
    return gates * keep, computed, soft_k


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x [..., E]`` over the units where ``mask [...]`` is true -> ``[E]``."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).reshape(-1, x.shape[-1]).sum(0) / m.sum().clamp_min(1.0)


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss: the mean over the valid units (``mask [...]``) of ``logsumexp(logits [..., E])^2``,
    which keeps router logits small (a scalar, differentiable w.r.t. the router)."""
    z = torch.logsumexp(logits.float(), dim=-1).pow(2)
    m = mask.to(z.dtype)
    return (z * m).sum() / m.sum().clamp_min(1.0)


def balance_loss(decision: RoutingDecision, kind: str) -> torch.Tensor:
    """Load-balancing loss of one decision (a scalar, differentiable w.r.t. the router).

    'seed':   ``sum_e (mean_usage_e - 1/E)^2`` with usage the router probabilities.
    'switch': ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of units whose first choice is e
              and ``P_e`` the mean probability of e (Switch Transformer / Mixtral); 1.0 when uniform.
    """
    num_experts = decision.num_experts
    mean_prob = _masked_mean(decision.probs, decision.mask)
    if kind == "seed":
        return (mean_prob - 1.0 / num_experts).pow(2).sum()
    if kind == "switch":
        first = decision.probs.argmax(dim=-1)
        frac = _masked_mean(torch.nn.functional.one_hot(first, num_experts).float(), decision.mask)
        return num_experts * (frac.detach() * mean_prob).sum()
    raise ValueError(f"balance_loss={kind!r} is not 'seed' or 'switch'")


def expert_share(decision: RoutingDecision) -> torch.Tensor:
    """Share of routed units handled by each expert, ``[E]``, summing to 1 (no gradient).

    Sparse/forced: each unit's selections with a non-zero gate (dynamic top-k leaves some at 0) share it
    equally; dense: mean mixing weight.
    """
    with torch.no_grad():
        if decision.mode == "dense":
            return _masked_mean(decision.probs, decision.mask)
        indices, gates = decision.selected()
        used = (gates != 0).float()
        onehot = (torch.nn.functional.one_hot(indices, decision.num_experts).float() * used.unsqueeze(-1)).sum(-2)
        return _masked_mean(onehot / used.sum(-1, keepdim=True).clamp_min(1.0), decision.mask)


def fixed_k(decision: RoutingDecision) -> int | None:
    """The number of experts every unit of ``decision`` uses (E when dense, 1 when forced, k when sparse), or None
    with dynamic top-k, where it varies per unit. Read from shapes: no device work."""
    if decision.mode == "dense":
        return decision.num_experts
    if decision.dynamic:
        return None
    return decision.selected()[0].shape[-1]


def active_experts(decision: RoutingDecision) -> torch.Tensor:
    """Mean number of experts with a non-zero weight per routed unit (dynamic top-k's k; E when dense), no
    gradient."""
    k = fixed_k(decision)
    if k is not None:
        return torch.tensor(float(k), device=decision.probs.device)
    with torch.no_grad():
        count = (decision.selected()[1] != 0).sum(-1).float()
        mask = decision.mask.to(count.dtype)
        return (count * mask).sum() / mask.sum().clamp_min(1)


def router_entropy(decision: RoutingDecision) -> torch.Tensor:
    """Mean entropy (nats) of the router distribution over the valid units (no gradient)."""
    with torch.no_grad():
        p = decision.probs
        ent = -(p * torch.log(p.clamp_min(1e-12))).sum(-1, keepdim=True)
        return _masked_mean(ent, decision.mask)[0]


def per_sequence_probs(decision: RoutingDecision) -> torch.Tensor:
    """Router probabilities per sequence ``[B, E]`` (averaged over valid tokens for token routing).

    Differentiable: a routing-supervision loss (continual learning) can use them directly."""
    p = decision.probs
    if p.dim() == 2:
        return p
    m = decision.mask.to(p.dtype).unsqueeze(-1)
    return (p * m).sum(1) / m.sum(1).clamp_min(1.0)


def per_sequence_choice_counts(decision: RoutingDecision) -> torch.Tensor:
    """How often each expert was a first choice in each sequence, ``[B, E]`` (no gradient)."""
    with torch.no_grad():
        first = decision.probs.argmax(-1) if decision.indices is None else decision.indices[..., 0]
        onehot = torch.nn.functional.one_hot(first, decision.num_experts).float()
        if onehot.dim() == 2:
            return onehot
        return (onehot * decision.mask.to(onehot.dtype).unsqueeze(-1)).sum(1)
