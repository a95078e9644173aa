"""The domain routing loss (``moe.domain_mi_coef``): routing that depends on each training example's domain.

Joint training knows the domain of every example; the loss asks for a large mutual information ``I(D; E)`` between
a routed unit's domain and its expert, under the router's probabilities (Mod-Squad's loss between tasks and
experts), without fixing which expert serves which domain. Two estimators (``moe.domain_mi_decay``):

* **micro-batch** (decay 0): ``I(D; E)`` of the micro-batch itself (:func:`domain_mutual_information`). A
  micro-batch of a few sequences rarely holds two of one domain, so this is mostly the information between the
  *example* and the expert: it rewards examples that route differently from each other, domain or not.
* **running** (decay in (0, 1)): the trainer keeps the domain x expert joint ``M [S, D, E]`` of every routing
  decision over the optimizer steps (``training/domain_stats.py``), and the loss is :func:`domain_pmi_gain`,
  ``sum_u sum_e p_u(e) PMI(d_u, e) / N`` with ``PMI`` the pointwise mutual information of the running joint
  (:func:`pointwise_mutual_information`, held fixed). Its gradient is the gradient of the population's ``I(D; E)``
  with respect to the micro-batch's routing (``dI/dp(d, e) = PMI(d, e) - 1``, and the ``-1`` vanishes since each
  unit's probabilities sum to 1): each unit leans towards the experts its *domain* uses more than the others do.

A routed unit is a token of one decoder block (token routing, ``probs [B, T, E]``) or a sequence (``[B, E]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .routing import RoutingDecision

#: the running joint is smoothed by this share of a uniform count before its PMI is taken, so that a (domain,
#: expert) pair never seen gets a large negative PMI, not -inf
PMI_SMOOTHING = 0.01


def domain_indicator(domain_ids: torch.Tensor) -> torch.Tensor:
    """One-hot ``[B, D]`` (float32) of each sequence's domain among the ``D`` domains present in ``domain_ids [B]``
    (their numbering does not matter); built once per forward for every decision's
    :func:`domain_mutual_information`."""
    if domain_ids.dim() != 1:
        raise ValueError(f"domain_ids holds one domain per sequence: got shape {tuple(domain_ids.shape)}")
    _, local = torch.unique(domain_ids, return_inverse=True)
    return torch.nn.functional.one_hot(local).float()


def sequence_mass(decision: RoutingDecision) -> torch.Tensor:
    """``[B, E]`` float32: each sequence's router probability summed over its valid routed units (its tokens with
    token routing, itself with sequence routing); differentiable w.r.t. the router."""
    probs = decision.probs.float()                                  # [B, E] or [B, T, E]
    weights = decision.mask.to(probs.dtype)                         # [B] or [B, T]
    if probs.dim() == 3:
        return (probs * weights.unsqueeze(-1)).sum(1)
    return probs * weights.unsqueeze(-1)


def domain_mutual_information(decision: RoutingDecision, domains: torch.Tensor) -> torch.Tensor:
    """Mutual information (nats) between the domain of a routed unit and its expert, under the router's
    probabilities: ``I(D; E) = sum_{d,e} p(d,e) log(p(d,e) / (p(d) p(e)))`` with ``p(d,e)`` the mean over the
    valid units of ``[domain = d] * probs[e]`` (a scalar, differentiable w.r.t. the router).

    ``domains [B, D]`` each sequence's domain, one-hot (:func:`domain_indicator`; every token of a sequence has its
    domain). Maximising it asks each domain's units to concentrate on few experts while the experts are used evenly
    over the batch. It is at most ``min(H(D), ln E)`` and 0 when routing does not depend on the domain (or the
    batch holds one).
    """
    mass = sequence_mass(decision)
    if domains.dim() != 2 or domains.shape[0] != mass.shape[0]:
        raise ValueError(f"domains holds one one-hot row per sequence: got shape {tuple(domains.shape)} for "
                         f"{mass.shape[0]} sequences")
    return mutual_information(domains.to(mass).t() @ mass)


def mutual_information(joint: torch.Tensor) -> torch.Tensor:
    """``I(D; E)`` (nats) of a non-negative joint count ``[..., D, E]`` (normalised here) -> ``[...]``."""
    joint = joint / joint.sum((-2, -1), keepdim=True).clamp_min(1e-12)
    p_domain, p_expert = joint.sum(-1, keepdim=True), joint.sum(-2, keepdim=True)
    ratio = joint.clamp_min(1e-12) / (p_domain * p_expert).clamp_min(1e-12)
    return (joint * ratio.log()).sum((-2, -1))


def pointwise_mutual_information(joint: torch.Tensor, smoothing: float = PMI_SMOOTHING) -> torch.Tensor:
    """``PMI(d, e) = log(p(d, e) / (p(d) p(e)))`` of a non-negative joint count ``[..., D, E]`` -> ``[..., D, E]``,
    after adding ``smoothing`` x a uniform share of its total to every cell. A domain never seen (a zero row) gets
    PMI 0 with every expert; an all-zero joint gives all zeros."""
    total = joint.sum((-2, -1), keepdim=True)
    cells = joint.shape[-1] * joint.shape[-2]
    smoothed = joint + smoothing * total / cells
    p = smoothed / smoothed.sum((-2, -1), keepdim=True).clamp_min(1e-30)
    pmi = (p.clamp_min(1e-30) / (p.sum(-1, keepdim=True) * p.sum(-2, keepdim=True)).clamp_min(1e-30)).log()
    seen = joint.sum(-1, keepdim=True) > 0                          # [..., D, 1]
    return torch.where(seen, pmi, torch.zeros_like(pmi))


def domain_pmi_gain(decision: RoutingDecision, domain_ids: torch.Tensor, pmi: torch.Tensor) -> torch.Tensor:
    """The running estimator's term for one decision: ``sum_u sum_e p_u(e) PMI(d_u, e) / N`` over the ``N`` valid
    units (a scalar, differentiable w.r.t. the router; its gradient is the population ``I(D; E)``'s, see the module
    docstring). ``domain_ids [B]`` global domain indices (``0 <= id < D``), ``pmi [D, E']`` (``E' >= E``; held
    fixed)."""
    _check_domains(domain_ids, decision.probs.shape[0], pmi.shape[-2])
    return _pmi_gain(sequence_mass(decision), decision.mask, domain_ids, pmi)


def _pmi_gain(mass: torch.Tensor, mask: torch.Tensor, domain_ids: torch.Tensor, pmi: torch.Tensor) -> torch.Tensor:
    """:func:`domain_pmi_gain` from the decision's ``mass [B, E]`` and ``mask`` (inputs already checked)."""
    if pmi.dim() != 2 or pmi.shape[-1] < mass.shape[-1]:
        raise ValueError(f"pmi is [domains, experts] with at least {mass.shape[-1]} experts, got {tuple(pmi.shape)}")
    weights = pmi.to(mass)[domain_ids, :mass.shape[-1]].detach()
    return (mass * weights).sum() / mask.to(mass.dtype).sum().clamp_min(1.0)


def _check_domains(domain_ids: torch.Tensor, batch: int, num_domains: int | None = None) -> None:
    """``domain_ids`` is ``[batch]``, of indices below ``num_domains`` when that is given (reading them then costs
    one device sync)."""
    if domain_ids.dim() != 1 or domain_ids.shape[0] != batch:
        raise ValueError(f"domain_ids holds one domain per sequence: got shape {tuple(domain_ids.shape)} for "
                         f"{batch} sequences")
    if num_domains is None:
        return
    if domain_ids.numel() and not 0 <= int(domain_ids.min()) <= int(domain_ids.max()) < num_domains:
        raise ValueError(f"domain_ids {sorted(set(domain_ids.tolist()))} out of range for the {num_domains} "
                         "domains of domain_pmi")


def domain_routing_term(routed: Sequence[RoutingDecision], domain_ids: torch.Tensor,
                        pmi: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The domain routing loss's value over a forward's routed decisions and the mass the running statistics need.

    ``pmi`` None: the micro-batch estimator (mean :func:`domain_mutual_information` over the decisions); else
    ``pmi [S, D, E_max]`` (one table per decision, in order; held fixed) and the mean :func:`domain_pmi_gain`.
    Returns ``(value, mass)``: ``mass [S, B, E_max]`` each decision's :func:`sequence_mass`, detached and
    zero-padded to the largest pool (layer-wise pools differ)."""
    domain_ids = domain_ids.to(routed[0].probs.device)
    masses = [sequence_mass(d) for d in routed]
    width = max(m.shape[-1] for m in masses)
    padded = torch.stack([torch.nn.functional.pad(m.detach(), (0, width - m.shape[-1])) for m in masses])
    if pmi is None:
        _check_domains(domain_ids, masses[0].shape[0])
        domains = domain_indicator(domain_ids)                      # [B, D], once for every decision
        value = torch.stack([mutual_information(domains.t() @ m) for m in masses]).mean()
    else:
        if pmi.dim() != 3 or pmi.shape[0] != len(routed):
            raise ValueError(f"domain_pmi holds one [domains, experts] table per routing decision ({len(routed)}), "
                             f"got shape {tuple(pmi.shape)}")
        _check_domains(domain_ids, masses[0].shape[0], pmi.shape[1])
        pmi = pmi.to(masses[0].device)
        value = torch.stack([_pmi_gain(m, d.mask, domain_ids, pmi[i])
                             for i, (m, d) in enumerate(zip(masses, routed, strict=True))]).mean()
    return value, padded
