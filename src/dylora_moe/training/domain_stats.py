"""Running domain x expert statistics of the domain routing loss's running estimator (``moe.domain_mi_decay``).

The trainer keeps, for each of the model's ``S`` routing decisions per forward, the joint ``M [S, D, E]`` of the
training examples' domains and the router's probability mass (``out.domain_mass``, summed over each sequence's
routed units), over the optimizer steps: ``M <- decay * M + (this step's sums, every process together)``. The
forwards of a step use the pointwise mutual information of ``M`` as it stood before the step
(``domain_routing.pointwise_mutual_information``), so every process and micro-batch of a step sees the same table
and the result does not depend on how the step's batch is split. The joint is saved in ``trainer_state.json``
(exact float64 values), so a resumed run continues with the same statistics.

Usage (the trainer does this)::

    stats = RunningDomainRouting(num_domains=6, decay=0.9, decisions=30, experts=4)
    out = model(..., domain_ids=ids, domain_pmi=stats.pmi(device))     # every micro-batch of the step
    stats.add(out.domain_mass, ids)
    stats.end_step(reduce=lambda t: accelerator.reduce(t, "sum"))       # once per optimizer step
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..domain_routing import mutual_information, pointwise_mutual_information


class RunningDomainRouting:
    """The running joint ``[decisions, num_domains, experts]`` (float64, CPU) and this step's sums."""

    def __init__(self, num_domains: int, decay: float, decisions: int, experts: int) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        if min(num_domains, decisions, experts) < 1:
            raise ValueError(f"need at least one domain, decision and expert, got {num_domains}, {decisions}, "
                             f"{experts}")
        self.decay = decay
        self.joint = torch.zeros(decisions, num_domains, experts, dtype=torch.float64)
        self.steps = 0
        self._pending: torch.Tensor | None = None   # this step's sums, on the device of the masses
        self._pmi: torch.Tensor | None = None       # the table of this step, on the device it was asked for

    def pmi(self, device: torch.device | str) -> torch.Tensor:
        """``[S, D, E]`` float32 pointwise mutual information of the joint before this step (zeros before any)."""
        if self._pmi is None or self._pmi.device != torch.device(device):
            self._pmi = pointwise_mutual_information(self.joint).float().to(device)
        return self._pmi

    def add(self, mass: torch.Tensor, domain_ids: torch.Tensor) -> None:
        """Add one micro-batch: ``mass [S, B, E']`` (``E' <= E``; ``out.domain_mass``), ``domain_ids [B]``."""
        decisions, domains, experts = self.joint.shape
        if mass.dim() != 3 or mass.shape[0] != decisions or mass.shape[2] > experts:
            raise ValueError(f"domain_mass must be [{decisions}, batch, <= {experts}], got {tuple(mass.shape)}")
        onehot = torch.nn.functional.one_hot(domain_ids.to(mass.device).long(), domains).to(mass.dtype)  # [B, D]
        sums = torch.einsum("bd,sbe->sde", onehot, mass.detach())
        sums = torch.nn.functional.pad(sums, (0, experts - sums.shape[-1]))
        self._pending = sums if self._pending is None else self._pending + sums

    def end_step(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Fold this step's sums into the joint (``reduce`` sums them over processes; every process calls it)."""
        pending = self._pending if self._pending is not None else torch.zeros_like(self.joint, dtype=torch.float32)
        if reduce is not None:
            pending = reduce(pending)
        self.joint = self.decay * self.joint + pending.detach().double().cpu()
        self.steps += 1
        self._pending = self._pmi = None

    def discard_step(self) -> None:
        """Forget this step's sums (a step skipped for a non-finite loss)."""
        self._pending = None

    def mutual_information(self) -> float:
        """``I(D; E)`` (nats) of the running joint, mean over the decisions (0 before any step)."""
        if not self.joint.sum() > 0:
            return 0.0
        return float(mutual_information(self.joint).mean())

    def state_dict(self) -> dict[str, Any]:
        """JSON-ready: the decay, the steps folded in and the joint (float64 values, exact through JSON)."""
        return {"decay": self.decay, "steps": self.steps, "joint": self.joint.tolist()}

    def load_state_dict(self, state: dict[str, Any], where: str = "trainer state") -> None:
        joint = torch.tensor(state["joint"], dtype=torch.float64)
        if joint.shape != self.joint.shape:
            raise ValueError(f"{where}: domain_routing.joint has shape {tuple(joint.shape)}, this run's statistics "
                             f"{tuple(self.joint.shape)} (decisions, domains, experts): another model or data")
        self.joint, self.steps = joint, int(state["steps"])
        self._pending = self._pmi = None
