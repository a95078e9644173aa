"""Parameter report: what trains, what is frozen, and proof that all experts share one base.

``parameter_report(model)`` returns a ``ParameterReport``; ``str(report)`` prints the seed's two
blocks, "Verifying trainable parameters" and "Memory Efficiency Verification".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.tensor import DTensor


@dataclass
class ParameterReport:
    total_params: int
    frozen_params: int
    trainable_params: int
    lora_params: int
    router_params: int
    other_trainable_params: int
    base_params: int
    num_experts: int
    expert_ranks: list[int]
    maturity: list[bool]
    params_per_expert: list[int]
    bytes_per_expert: list[int]
    num_target_modules: int
    shared_base: bool
    base_copies: int
    routing_mode: str
    shared_expert_params: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["trainable_percent"] = self.trainable_percent
        return d

    def __str__(self) -> str:
        lines = [
            "--- Verifying trainable parameters ---",
            f"LoRA expert parameters:   {self.lora_params:>14,}",
            f"Router parameters:        {self.router_params:>14,}",
            f"Other trainable:          {self.other_trainable_params:>14,}",
            f"Frozen parameters:        {self.frozen_params:>14,}",
            f"Total parameters:         {self.total_params:>14,}",
            f"Trainable:                {self.trainable_params:>14,} ({self.trainable_percent:.4f}%)",
            "--- Memory Efficiency Verification ---",
            f"Experts: {self.num_experts}  ranks: {self.expert_ranks}  mature: {self.maturity}  "
            f"routing now: {self.routing_mode}",
        ]
        for i, (n, b) in enumerate(zip(self.params_per_expert, self.bytes_per_expert)):
            lines.append(f"  expert {i}: {n:,} params, {b / 2**20:.2f} MiB")
        if self.shared_expert_params:
            lines.append(f"  shared by every expert (one A per module): {self.shared_expert_params:,} params")
        lines.append(
            f"Base model parameters: {self.base_params:,}, held once "
            f"({self.base_copies} copy) for {self.num_target_modules} adapted modules"
        )
        lines.append(
            "All experts share one frozen base model: "
            + ("yes" if self.shared_base else "NO: base weights are duplicated")
        )
        lines.extend(self.notes)
        return "\n".join(lines)


def parameter_report(model: Any) -> ParameterReport:
    """Count parameters of a ``DyLoRAMoEForCausalLM`` and check that the base is shared."""
    expert_ids = {id(p) for p in model.expert_parameters()}
    router_ids = {id(p) for p in model.router_parameters()}
    total = frozen = lora = router = other = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        if id(p) in expert_ids:
            lora += n
        elif id(p) in router_ids:
            router += n
        elif p.requires_grad:
            other += n
        else:
            frozen += n
    trainable = lora + router + other
    per_expert, per_expert_bytes = [], []
    for i in range(model.num_experts):
        params = list(model.expert_parameters(i))
        per_expert.append(sum(p.numel() for p in params))
        per_expert_bytes.append(sum(p.numel() * p.element_size() for p in params))
    # every expert layer wraps exactly one base layer; their weights must be distinct storages,
    # and no base tensor may appear twice (no per-expert copy of the base)
    storages = [_storage(layer.base_layer.weight) for layer in model.expert_layers]
    base_ptrs = [_storage(p) for n, p in model.base_model.named_parameters() if id(p) not in expert_ids]
    shared = len(set(storages)) == len(storages) and len(set(base_ptrs)) == len(base_ptrs)
    return ParameterReport(
        total_params=total,
        frozen_params=frozen,
        trainable_params=trainable,
        lora_params=lora,
        router_params=router,
        other_trainable_params=other,
        base_params=frozen,
        num_experts=model.num_experts,
        expert_ranks=list(model.expert_ranks),
        maturity=list(model.maturity),
        params_per_expert=per_expert,
        bytes_per_expert=per_expert_bytes,
        num_target_modules=len(model.expert_layers),
        shared_base=shared and other == 0,
        base_copies=1,
        routing_mode=model.routing_mode,
        shared_expert_params=lora - sum(per_expert),
    )


def _storage(tensor: torch.Tensor) -> int:
    """Where a tensor's data live: a sharded parameter's (FSDP's DTensor) own shard."""
    return (tensor.to_local() if isinstance(tensor, DTensor) else tensor).data_ptr()
