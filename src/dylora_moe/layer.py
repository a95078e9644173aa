"""``MoELoRALayer``: a frozen linear layer of the base model plus a pool of routed LoRA experts.

Wraps ``torch.nn.Linear`` or GPT-2 style ``transformers.pytorch_utils.Conv1D`` (weight stored
``[in, out]``). Expert ``e`` has ``A_e [r_e, d_in]`` (Kaiming-uniform init) and ``B_e [d_out, r_e]``
(zero init, so a fresh layer returns exactly the base output) and scale ``alpha_e / r_e``. The
routing decision comes from the model's ``RoutingContext`` for this layer's decoder block::

    y = base(x) + sum_e gate_e * (alpha_e / r_e) * B_e A_e dropout(x)

Trainable parameters are declared by name in ``ADAPTER_PARAMETER_NAMES``.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .context import RoutingContext
from .experts import mixture_delta

ADAPTER_PARAMETER_NAMES = ("lora_A", "lora_B")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


class MoELoRALayer(nn.Module):
    """A frozen base layer with E routed LoRA experts (possibly of different ranks)."""

    context: RoutingContext  # a plain attribute, not a submodule: shared with the model and its hooks

    def __init__(
        self,
        base_layer: nn.Module,
        context: RoutingContext,
        layer_index: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        self.is_conv1d = isinstance(base_layer, Conv1D)
        self.layer_index = layer_index
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.ranks: list[int] = []
        self.alphas: list[float] = []
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # plain attribute (not a submodule): shared with the model and its hooks
        self.__dict__["context"] = context

    @property
    def num_experts(self) -> int:
        return len(self.lora_A)

    def add_expert(self, rank: int, alpha: float, generator: torch.Generator | None = None) -> None:
        """Append an expert: A Kaiming-uniform, B zero (so outputs do not change)."""
        weight = cast(torch.Tensor, self.base_layer.weight)
        a = torch.empty(rank, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        b = torch.zeros(self.out_features, rank, dtype=torch.float32)
        self.lora_A.append(nn.Parameter(a.to(weight.device)))
        self.lora_B.append(nn.Parameter(b.to(weight.device)))
        self.ranks.append(rank)
        self.alphas.append(float(alpha))

    def scales(self) -> torch.Tensor:
        """``[E]`` alpha_e / r_e (built once per expert set and device, not per forward)."""
        key = (tuple(self.ranks), tuple(self.alphas), self.lora_A[0].device)
        cached = self.__dict__.get("_scales")
        if cached is None or cached[0] != key:
            values = [a / r for a, r in zip(self.alphas, self.ranks)]
            cached = (key, torch.tensor(values, dtype=torch.float32, device=key[2]))
            self.__dict__["_scales"] = cached
        return cached[1]

    def expert_delta_weight(self, index: int) -> torch.Tensor:
        """Dense weight update of expert ``index`` in the base layer's own layout."""
        delta = (self.lora_B[index] @ self.lora_A[index]) * (self.alphas[index] / self.ranks[index])
        return delta.t() if self.is_conv1d else delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.context.adapters_disabled:
            return result
        decision = self.context.decision_for(self.layer_index)
        x = self.lora_dropout(x.to(self.lora_A[0].dtype))
        delta = mixture_delta(x, decision, list(self.lora_A), list(self.lora_B), self.scales())
        return result + delta.to(result.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, ranks={self.ranks}, layer={self.layer_index}"
