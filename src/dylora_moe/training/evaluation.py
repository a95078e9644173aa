"""Held-out evaluation during training: per-domain LM loss and routing statistics.

For every domain, a fixed list of tokenized held-out examples is run in fixed-size batches (model
in eval mode, no gradients) and summarised as a :class:`DomainEval`:

* ``loss``: token-weighted mean cross-entropy over the domain's supervised tokens (each batch's
  ``lm_loss`` times its number of supervised, shifted label tokens, summed, divided by the total);
* ``aux_loss``: the load-balancing loss, mean over examples (batch-size weighted);
* ``expert_share``: share of routed units per expert (``out.expert_share`` weighted by batch size);
* ``router_entropy``: mean router entropy in nats (batch-size weighted);
* ``active_experts``: mean number of experts a routed unit used (k; fractional with dynamic top-k; batch-size
  weighted; None in records written before it was kept).

Under several processes each one takes every ``world``-th batch and the sums are reduced with the
Accelerator. Usage::

    result = evaluate(model, {"mbpp": mbpp_eval, "code_alpaca": alpaca_eval}, collate, batch_size=8,
                      num_experts=4, step=0, epoch=0.0, accelerator=accelerator)
    result.domains["mbpp"].loss, result.loss, result.to_dict()
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..data import IGNORE_INDEX, TokenizedExample


@dataclass
class DomainEval:
    """Evaluation numbers of one domain."""

    loss: float
    tokens: int
    examples: int
    aux_loss: float
    router_entropy: float
    expert_share: list[float]
    active_experts: float | None = None


@dataclass
class EvalResult:
    """One evaluation: the optimizer step it ran after, and one :class:`DomainEval` per domain."""

    step: int
    epoch: float
    domains: dict[str, DomainEval] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        """Token-weighted loss over all domains."""
        tokens = sum(d.tokens for d in self.domains.values())
        return sum(d.loss * d.tokens for d in self.domains.values()) / max(tokens, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "loss": self.loss,
                "domains": {name: asdict(d) for name, d in self.domains.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalResult:
        return cls(int(data["step"]), float(data["epoch"]),
                   {name: DomainEval(**d) for name, d in data["domains"].items()})

    def line(self) -> str:
        """A one-line report, e.g. ``eval @ step 10: code_alpaca 1.2345 | mbpp 0.9876 (overall 1.11)``."""
        parts = " | ".join(f"{name} {d.loss:.4f}" for name, d in self.domains.items())
        return f"eval @ step {self.step}: loss {parts} (overall {self.loss:.4f})"


def _batches(items: Sequence[TokenizedExample], size: int) -> list[Sequence[TokenizedExample]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    eval_sets: Mapping[str, Sequence[TokenizedExample]],
    collate: Callable[[Sequence[TokenizedExample]], dict[str, torch.Tensor]],
    batch_size: int,
    num_experts: int,
    *,
    step: int = 0,
    epoch: float = 0.0,
    accelerator=None,
    route_by_domain: bool = False,
    lockstep: bool = False,
) -> EvalResult:
    """Evaluate ``model`` on each domain's held-out examples; restores the model's train/eval mode.
    ``route_by_domain``: each example goes to the expert of its domain (oracle routing). ``lockstep``: every
    process runs the same number of forwards (a sharded model gathers its layers with all of them), a process
    short of a batch repeating one whose result it drops."""
    was_training = model.training
    model.eval()
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    result = EvalResult(step, epoch)
    try:
        for name, items in eval_sets.items():
            # [loss_sum, tokens, examples, aux_sum, entropy_sum, k_sum, share_sum_0 .. share_sum_{E-1}]
            sums = torch.zeros(6 + num_experts, dtype=torch.float64, device=device)
            chunks = _batches(items, batch_size)
            rounds = -(-len(chunks) // world) if lockstep else len(chunks)
            for index in range(rank, rounds * world if lockstep else len(chunks), world):
                if index >= len(chunks):  # lockstep: this process has no batch left in this round
                    model(**{k: v.to(device) for k, v in collate(chunks[0]).items() if k != "domain_ids"},
                          supervised_logits_only=True)
                    continue
                batch = collate(chunks[index])
                domain_ids = batch.pop("domain_ids", None)
                batch = {k: v.to(device) for k, v in batch.items()}
                forced = domain_ids.to(device) if route_by_domain and domain_ids is not None else None
                out = model(**batch, supervised_logits_only=True, forced_expert=forced)
                n_tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
                rows = batch["input_ids"].shape[0]
                sums[0] += out.lm_loss.double() * n_tokens
                sums[1] += n_tokens
                sums[2] += rows
                sums[3] += out.aux_loss.double() * rows
                sums[4] += out.router_entropy.double() * rows
                sums[5] += out.active_experts.double() * rows
                sums[6:] += out.expert_share.double() * rows
            if accelerator is not None and world > 1:
                sums = accelerator.reduce(sums, reduction="sum")
            values = sums.tolist()
            examples = max(values[2], 1.0)
            result.domains[name] = DomainEval(
                loss=values[0] / max(values[1], 1.0),
                tokens=int(values[1]),
                examples=int(values[2]),
                aux_loss=values[3] / examples,
                router_entropy=values[4] / examples,
                expert_share=[v / examples for v in values[6:]],
                active_experts=values[5] / examples,
            )
    finally:
        model.train(was_training)
    return result
