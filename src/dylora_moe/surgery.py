"""Expert-pool surgery: remove experts, merge similar ones, measure how alike they are (pure functions on a model).

* :func:`remove_experts` deletes experts from every adapted module and their rows from every router, so the
  router's remaining logits (and every remaining expert's output) are what they were; traffic of a removed
  expert goes to the next most likely one.
* :func:`merge_experts` folds a group into its first expert. The merged update is a combination of the
  group's dense updates ``Delta W_e = scale_e B_e A_e``: ``"average"`` (weighted by ``weights``, e.g. each
  expert's load) or ``"ties"`` (TIES-Merging: each update trimmed to its ``density`` largest entries, a sign
  elected per entry from the sum, the mean of the entries that agree with it), brought back to the group's
  largest rank by a truncated SVD. The merged router row is the weighted mean of the group's rows, its bias the
  log-sum-exp of theirs (so it keeps roughly the group's summed probability); the others are removed.
* :func:`update_similarity_matrix` ``[E, E]``: cosine similarity of the experts' dense updates, over all modules.

A pool with a layer-wise allocation (``layer_experts``) is refused, and so is leaving no expert::

    remove_experts(model, [3])
    kept = merge_experts(model, [0, 2], method="ties", weights=[0.6, 0.4])
    similarity = update_similarity_matrix(model)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["MERGE_METHODS", "merge_experts", "remove_experts", "ties_merge", "update_similarity_matrix"]

MERGE_METHODS = ("average", "ties")


def _check(model: Any, indices: Sequence[int], what: str) -> list[int]:
    if model.moe_config.layer_experts is not None:
        raise ValueError(f"{what}: a pool with a layer-wise allocation (layer_experts) cannot change size")
    picked = sorted(set(int(i) for i in indices))
    bad = [i for i in picked if not 0 <= i < model.num_experts]
    if bad or not picked:
        raise ValueError(f"{what}: expert indices {list(indices)} must be in 0..{model.num_experts - 1}")
    return picked


def _keep_rows(param: nn.Parameter, keep: list[int]) -> nn.Parameter:
    return nn.Parameter(param.data[keep].clone(), requires_grad=param.requires_grad)


@torch.no_grad()
def remove_experts(model: Any, indices: Sequence[int]) -> list[int]:
    """Remove experts ``indices`` (see the module docstring); returns the old indices of the experts kept, in
    their new order."""
    gone = _check(model, indices, "remove_experts")
    keep = [e for e in range(model.num_experts) if e not in gone]
    if not keep:
        raise ValueError("remove_experts: the last expert cannot be removed (a model needs at least one)")
    for layer in model.expert_layers:
        layer.lora_B = nn.ParameterList([layer.lora_B[e] for e in keep])
        if not layer.shared_a:
            layer.lora_A = nn.ParameterList([layer.lora_A[e] for e in keep])
        layer.ranks = [layer.ranks[e] for e in keep]
        layer.alphas = [layer.alphas[e] for e in keep]
    for router in model.routers:
        router.weight = _keep_rows(router.weight, keep)
        router.bias = _keep_rows(router.bias, keep)
        if router.context_weight is not None:
            router.context_weight = _keep_rows(router.context_weight, keep)
        router.num_experts = len(keep)
    model.block_experts = {block: len(keep) for block in model.block_experts}
    model.expert_ranks = [model.expert_ranks[e] for e in keep]
    model.expert_alphas = [model.expert_alphas[e] for e in keep]
    model.maturity = [model.maturity[e] for e in keep]
    model.moe_config = dataclasses.replace(model.moe_config, num_experts=len(keep), top_k=min(model.moe_config.top_k,
                                                                                                 len(keep)))
    return keep


def ties_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES-Merging of same-shaped updates: trim each to its ``density`` share of largest magnitudes, elect each
    entry's sign from the weighted sum of the trimmed updates, and average (weighted) the entries that agree."""
    if not 0 < density <= 1:
        raise ValueError(f"density={density}: must be in (0, 1]")
    trimmed = []
    for delta in deltas:
        k = max(1, round(density * delta.numel()))
        cut = delta.abs().flatten().kthvalue(delta.numel() - k + 1).values
        trimmed.append(torch.where(delta.abs() >= cut, delta, torch.zeros_like(delta)))
    w = torch.tensor(list(weights), dtype=trimmed[0].dtype, device=trimmed[0].device).view(-1, *[1] * trimmed[0].dim())
    stack = torch.stack(trimmed)
    sign = torch.sign((w * stack).sum(0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    total = (w * stack * agree).sum(0)
    count = (w * agree).sum(0)
    return torch.where(count > 0, total / count.clamp_min(1e-12), torch.zeros_like(total))


@torch.no_grad()
def merge_experts(model: Any, group: Sequence[int], *, method: str = "average", weights: Sequence[float] | None = None,
                  density: float = 0.5) -> int:
    """Fold the experts of ``group`` into its first (see the module docstring); returns the merged expert's new
    index."""
    members = _check(model, group, "merge_experts")
    if len(members) < 2:
        raise ValueError(f"merge_experts: a group needs two experts or more, got {list(group)}")
    if method not in MERGE_METHODS:
        raise ValueError(f"merge_experts: method={method!r} is not one of {MERGE_METHODS}")
    if model.moe_config.shared_a:
        raise ValueError("merge_experts: experts with a shared A (HydraLoRA) cannot be merged into one A; remove "
                         "the redundant heads instead")
    raw = [1.0] * len(members) if weights is None else [float(w) for w in weights]
    if len(raw) != len(members) or any(w < 0 for w in raw) or sum(raw) <= 0:
        raise ValueError(f"merge_experts: weights {list(weights or [])} must be one value >= 0 per member, not all 0")
    share = [w / sum(raw) for w in raw]
    target, rank = members[0], max(model.expert_ranks[e] for e in members)
    for layer in model.expert_layers:
        deltas = [layer.lora_B[e].float() @ layer.lora_A[e].float() * layer.scale_of(e) for e in members]
        merged = (sum(s * d for s, d in zip(share, deltas)) if method == "average"
                  else ties_merge(deltas, share, density))
        _set_low_rank(layer, target, merged, rank)
    for router in model.routers:
        w = torch.tensor(share, device=router.weight.device).view(-1, 1)
        router.weight.data[target] = (w * router.weight.data[members]).sum(0)
        router.bias.data[target] = torch.logsumexp(router.bias.data[members], dim=0)
        if router.context_weight is not None:
            router.context_weight.data[target] = (w * router.context_weight.data[members]).sum(0)
    model.expert_ranks[target] = rank
    kept = remove_experts(model, members[1:])
    return kept.index(target)


def _set_low_rank(layer: Any, index: int, delta: torch.Tensor, rank: int) -> None:
    """Expert ``index`` of ``layer`` becomes the best rank-``rank`` update equal to ``delta`` (truncated SVD),
    at its own scale."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    rank = min(rank, s.numel())
    layer.ranks[index] = rank
    scale = layer.scale_of(index)
    root = s[:rank].sqrt()
    a, b = root[:, None] * vh[:rank], u[:, :rank] * root[None, :] / scale
    layer.lora_A[index] = nn.Parameter(a.to(layer.lora_A[index]), requires_grad=layer.lora_A[index].requires_grad)
    layer.lora_B[index] = nn.Parameter(b.to(layer.lora_B[index]), requires_grad=layer.lora_B[index].requires_grad)


@torch.no_grad()
def update_similarity_matrix(model: Any) -> torch.Tensor:
    """``[E, E]`` cosine similarity of the experts' dense updates ``scale_e B_e A_e``, concatenated over every
    adapted module (a measure of how much two experts do the same thing)."""
    flat = []
    for e in range(model.num_experts):
        parts = [(layer.lora_B[e].float() @ layer.expert_a(e).float() * layer.scale_of(e)).flatten()
                 for layer in model.expert_layers]
        flat.append(torch.cat(parts))
    stack = torch.nn.functional.normalize(torch.stack(flat), dim=1)
    return stack @ stack.T
