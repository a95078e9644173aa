"""How the router keeps the routing of earlier skills while a new expert learns, and after.

* :func:`routing_supervision`: the routing loss of a training batch that mixes the new skill's examples with
  replayed ones. A replayed example of an 'own' skill is sent to its skill's expert; one of a 'kept' skill (a
  domain of joint training, spread over the experts as the router learned) must see none of its routed units
  go to the new expert, which is a loss per unit, not per sequence: under token routing a sequence can be
  mostly elsewhere and still hand a quarter of its tokens to the new expert.
* :func:`guard_new_expert`: after training, the new expert's router bias is lowered, router by router, until
  no routed unit of the replayed examples picks it, with a margin (``ContinualConfig.router_guard_margin``,
  in log-probability): a guarantee on the replay buffer, which a loss alone does not give. Its inputs that
  are unlike every earlier skill still go to it; :class:`GuardReport` says how many did before and after.

Usage (inside :func:`.learner.learn_skill`)::

    loss = routing_supervision(out.router_probs, targets, expert, out.decision_probs, attention_mask)
    report = guard_new_expert(model, replay_batches, new_batches, expert, margin=1.0)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .library import KEEP_ROUTING

__all__ = ["GuardReport", "guard_new_expert", "routing_supervision"]


def routing_supervision(router_probs: torch.Tensor, targets: torch.Tensor, expert: int,
                        decision_probs: Sequence[torch.Tensor] = (),
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The routing loss of a batch, mean over its sequences.

    ``router_probs [B, E]`` are the per-sequence probabilities, ``targets [B]`` each sequence's expert: the loss
    is ``-log p[target]`` (most of the sequence goes to its expert). A target of :data:`~.library.KEEP_ROUTING`
    marks a sequence whose routing must stay as it was: the expert being trained, ``expert``, must stay off
    every one of its routed units, so its loss is ``-log(1 - p[expert])`` per unit of each routing decision in
    ``decision_probs`` (``[B, T, E_l]`` per token, masked by ``attention_mask [B, T]``, or ``[B, E_l]``),
    averaged (without them, of the per-sequence ``router_probs``).
    """
    probs = router_probs.float().clamp(1e-9, 1 - 1e-6)
    keep = targets == KEEP_ROUTING
    own = -probs.gather(1, targets.clamp_min(0)[:, None]).squeeze(1).log()
    if not bool(keep.any()):
        return own.mean()
    away = [_away_loss(p, expert, attention_mask) for p in decision_probs if p.shape[-1] > expert]
    off = torch.stack(away).mean(0) if away else -(1 - probs[:, expert]).log()
    return torch.where(keep, off, own).mean()


def _away_loss(probs: torch.Tensor, expert: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B]``: mean over a sequence's routed units of ``-log(1 - p[expert])`` (``probs [B, T, E]`` or ``[B, E]``)."""
    away = -(1 - probs[..., expert].float().clamp(0, 1 - 1e-6)).log()
    if away.dim() == 1:
        return away
    mask = torch.ones_like(away) if attention_mask is None else attention_mask.to(away.dtype)
    return (away * mask).sum(1) / mask.sum(1).clamp_min(1.0)


@dataclass
class GuardReport:
    """What :func:`guard_new_expert` did: the bias shift of each router (0: none needed) and the share of routed
    units that picked the new expert, on the replayed examples and on the new skill's, before and after."""

    shifts: list[float] = field(default_factory=list)
    replay_share_before: float = 0.0
    replay_share_after: float = 0.0
    new_share_before: float = 0.0
    new_share_after: float = 0.0

    def line(self) -> str:
        return (f"router guard: bias lowered by up to {max(self.shifts, default=0.0):.3f} in "
                f"{sum(s > 0 for s in self.shifts)}/{len(self.shifts)} routers; units sent to the new expert: "
                f"replay {self.replay_share_before:.1%} -> {self.replay_share_after:.1%}, "
                f"new skill {self.new_share_before:.1%} -> {self.new_share_after:.1%}")


def _margins(model: Any, batches: Iterable[dict[str, torch.Tensor]], expert: int) -> list[torch.Tensor]:
    """Per routing decision: ``log p[expert]`` less the k-th largest ``log p`` of the other experts (k: top-k)
    over every routed unit of ``batches``; positive where ``expert`` is among the units' chosen ones."""
    found: list[list[torch.Tensor]] = []
    top_k = model.moe_config.top_k
    for batch in batches:
        out = model(**batch, supervised_logits_only="labels" in batch)
        mask = batch["attention_mask"].bool()
        for index, probs in enumerate(out.decision_probs):
            if index == len(found):
                found.append([])
            if probs.shape[-1] <= expert:
                continue
            logp = probs.float().clamp_min(1e-30).log()
            others = torch.cat([logp[..., :expert], logp[..., expert + 1:]], dim=-1)
            others = others.topk(min(top_k, others.shape[-1]), dim=-1).values[..., -1]
            margin = logp[..., expert] - others
            found[index].append(margin[mask] if margin.dim() == 2 else margin)
    return [torch.cat(m) if m else torch.empty(0) for m in found]


def _share(margins: Sequence[torch.Tensor]) -> float:
    """Share of routed units (over every decision) that picked the expert: a positive margin."""
    return sum(int((m > 0).sum()) for m in margins) / max(sum(m.numel() for m in margins), 1)


@torch.no_grad()
def guard_new_expert(model: Any, replay_batches: Sequence[dict[str, torch.Tensor]],
                     new_batches: Sequence[dict[str, torch.Tensor]], expert: int, *, margin: float,
                     leak: float = 0.0, rounds: int = 4) -> GuardReport:
    """Lower the router bias of ``expert`` so that at most a share ``leak`` of the routed units of
    ``replay_batches`` picks it: each router's bias drops by ``temperature x (q + margin)`` when positive, ``q``
    the ``1 - leak`` quantile of the units' margins (``leak=0``: the largest). Lowering one block's router
    changes the hidden states the next ones see, so this repeats (at most ``rounds`` times) until no router
    needs more. The shares in the report are measured, before and after (see the module docstring).

    Run with the expert mature (the routing of use); the model is left in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        temperature = model.moe_config.temperature
        replay = _margins(model, replay_batches, expert)
        report = GuardReport([0.0] * len(replay), _share(replay), 0.0,
                             _share(_margins(model, new_batches, expert)), 0.0)
        for _ in range(rounds):
            more = [max(0.0, temperature * (float(torch.quantile(m, 1.0 - leak)) + margin)) if m.numel() else 0.0
                    for m in replay]
            if max(more, default=0.0) <= 1e-6:
                break
            for index, (router, shift) in enumerate(zip(model.routers, more)):  # one router per decision
                router.bias[expert] -= shift
                report.shifts[index] += shift
            replay = _margins(model, replay_batches, expert)
        report.replay_share_after = _share(replay)
        report.new_share_after = _share(_margins(model, new_batches, expert))
        return report
    finally:
        model.train(was_training)
