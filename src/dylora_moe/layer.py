"""``MoELoRALayer``: a frozen linear layer of the base model plus a pool of routed LoRA experts.

Wraps ``torch.nn.Linear`` or GPT-2 style ``transformers.pytorch_utils.Conv1D`` (weight stored
``[in, out]``). Expert ``e`` has ``A_e [r_e, d_in]`` (Kaiming-uniform init) and ``B_e [d_out, r_e]``
(zero init, so a fresh layer returns exactly the base output) and scale ``alpha_e / r_e``. The
routing decision comes from the model's ``RoutingContext`` for this layer's decoder block::

    y = base(x) + sum_e gate_e * scale_e * B_e A_e dropout(x)  [- R_B R_A x, GOAT's residual]

Options (``DyLoRAMoEConfig``): one A shared by all experts (``shared_a``, HydraLoRA), GOAT's scale
``sqrt(3 d_in / r_e)`` (``scaling='goat'``) and SVD-segment initialisation with a frozen residual
(``expert_init='svd'``). Trainable parameters are declared by name in ``ADAPTER_PARAMETER_NAMES``, saved frozen
tensors in ``ADAPTER_BUFFER_NAMES``.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import SCALINGS
from .context import RoutingContext
from .dropout import ExpertDropout
from .experts import mixture_delta

ADAPTER_PARAMETER_NAMES = ("lora_A", "lora_B")
#: frozen tensors an adapter saves besides its parameters (GOAT's residual, see ``init_from_svd``)
ADAPTER_BUFFER_NAMES = ("lora_residual_A", "lora_residual_B")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


class MoELoRALayer(nn.Module):
    """A frozen base layer with E routed LoRA experts (possibly of different ranks).

    ``shared_a`` (HydraLoRA): ``lora_A`` holds one A shared by every expert, ``lora_B`` one head per expert.
    ``scaling``: 'alpha_r' (``alpha_e / r_e``) or 'goat' (``sqrt(3 d_in / r_e)``). After
    :meth:`init_from_svd` the layer also holds a frozen residual ``lora_residual_B @ lora_residual_A``
    (``[d_out, R] @ [R, d_in]``, the initial adapters, scale included) that is subtracted from its output.
    """

    context: RoutingContext  # a plain attribute, not a submodule: shared with the model and its hooks
    lora_residual_A: torch.Tensor | None
    lora_residual_B: torch.Tensor | None

    def __init__(
        self,
        base_layer: nn.Module,
        context: RoutingContext,
        layer_index: int,
        dropout: float = 0.0,
        *,
        shared_a: bool = False,
        scaling: str = "alpha_r",
    ) -> None:
        super().__init__()
        if scaling not in SCALINGS:
            raise ValueError(f"scaling={scaling!r} is not one of {SCALINGS}")
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_shape(base_layer)
        self.is_conv1d = isinstance(base_layer, Conv1D)
        self.layer_index = layer_index
        self.shared_a, self.scaling = shared_a, scaling
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.ranks: list[int] = []
        self.alphas: list[float] = []
        self.lora_dropout = ExpertDropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("lora_residual_A", None)
        self.register_buffer("lora_residual_B", None)
        # plain attribute (not a submodule): shared with the model and its hooks
        self.__dict__["context"] = context

    @property
    def num_experts(self) -> int:
        return len(self.lora_B)

    def expert_a(self, index: int) -> nn.Parameter:
        """``A [r, d_in]`` of expert ``index`` (the shared one with ``shared_a``)."""
        return self.lora_A[0] if self.shared_a else self.lora_A[index]

    def a_list(self) -> list[torch.Tensor]:
        """Every expert's A, in expert order (one tensor E times with ``shared_a``)."""
        # in index order; ParameterList's own indexing costs two string conversions per element, on every adapted
        # projection of every decoding step
        a_params = cast(list[torch.Tensor], list(self.lora_A._parameters.values()))
        return [a_params[0]] * len(self.lora_B) if self.shared_a else a_params

    def b_list(self) -> list[torch.Tensor]:
        """Every expert's B, in expert order."""
        return cast(list[torch.Tensor], list(self.lora_B._parameters.values()))

    def add_expert(self, rank: int, alpha: float, generator: torch.Generator | None = None) -> None:
        """Append an expert: A Kaiming-uniform, B zero (so outputs do not change). With ``shared_a`` only a B
        head is added (the first expert creates the shared A), and every expert has the shared A's rank."""
        weight = cast(torch.Tensor, self.base_layer.weight)
        if self.shared_a and len(self.lora_A):
            if rank != self.lora_A[0].shape[0]:
                raise ValueError(f"shared_a: every expert has the shared A's rank {self.lora_A[0].shape[0]}, "
                                 f"got rank={rank}")
        else:
            a = torch.empty(rank, self.in_features, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            self.lora_A.append(nn.Parameter(a.to(weight.device)))
        b = torch.zeros(self.out_features, rank, dtype=torch.float32)
        self.lora_B.append(nn.Parameter(b.to(weight.device)))
        self.ranks.append(rank)
        self.alphas.append(float(alpha))

    def scale_of(self, index: int) -> float:
        """The output scale of expert ``index``: ``alpha / r``, or GOAT's ``sqrt(3 d_in / r)``."""
        if self.scaling == "goat":
            return math.sqrt(3.0 * self.in_features / self.ranks[index])
        return self.alphas[index] / self.ranks[index]

    def scales(self) -> torch.Tensor:
        """``[E]`` output scales (built once per expert set and device, not per forward)."""
        key = (tuple(self.ranks), tuple(self.alphas), self.lora_B[0].device)
        cached = self.__dict__.get("_scales")
        if cached is None or cached[0] != key:
            values = [self.scale_of(e) for e in range(self.num_experts)]
            cached = (key, torch.tensor(values, dtype=torch.float32, device=key[2]))
            self.__dict__["_scales"] = cached
        return cached[1]

    @torch.no_grad()
    def init_from_svd(self, rho: float) -> None:
        """GOAT's initialisation: expert e takes ``r_e`` singular triplets starting at ``e * (min(d_in, d_out) //
        E)`` of the frozen weight ``W = U S V^T`` (so the experts cover evenly spaced parts of the spectrum),
        ``A_e = sqrt(S_e / (scale_e rho)) V_e^T``, ``B_e = U_e sqrt(S_e / (scale_e rho))``; the sum of the
        initial ``scale_e B_e A_e`` becomes the frozen residual the layer subtracts."""
        if self.shared_a:
            raise ValueError("init_from_svd gives every expert its own A; it does not go with shared_a")
        weight = cast(torch.Tensor, self.base_layer.weight).detach().float()
        w = weight.t() if self.is_conv1d else weight  # [d_out, d_in]
        u, sing, vh = torch.linalg.svd(w, full_matrices=False)
        segment = sing.numel() // self.num_experts
        res_a, res_b = [], []
        for e, rank in enumerate(self.ranks):
            if rank > segment:
                raise ValueError(f"expert_init='svd': rank {rank} is larger than the {segment} singular values per "
                                 f"expert of a {tuple(w.shape)} weight with {self.num_experts} experts")
            part = slice(e * segment, e * segment + rank)
            root = (sing[part] / (self.scale_of(e) * rho)).sqrt()
            a, b = root[:, None] * vh[part], u[:, part] * root[None, :]
            self.lora_A[e].copy_(a)
            self.lora_B[e].copy_(b)
            res_a.append(a)
            res_b.append(b * self.scale_of(e))
        self.lora_residual_A = torch.cat(res_a).to(self.lora_A[0].device)
        self.lora_residual_B = torch.cat(res_b, dim=1).to(self.lora_A[0].device)

    def residual_weight(self) -> torch.Tensor | None:
        """The frozen residual ``[d_out, d_in]`` subtracted from the output (None without one)."""
        if self.lora_residual_A is None or self.lora_residual_B is None:
            return None
        return self.lora_residual_B @ self.lora_residual_A

    def expert_delta_weight(self, index: int) -> torch.Tensor:
        """Dense weight update of expert ``index`` (residual included) in the base layer's own layout."""
        delta = (self.lora_B[index] @ self.expert_a(index)) * self.scale_of(index)
        residual = self.residual_weight()
        if residual is not None:
            delta = delta - residual
        return delta.t() if self.is_conv1d else delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.context.adapters_disabled or self.context.bare:
            return result
        decision = self.context.decision_for(self.layer_index)
        if decision is None:  # forced to an expert this block does not hold: the block adds nothing
            return result
        b_list = self.b_list()
        x = x.to(b_list[0].dtype)
        dropped = self.lora_dropout(x) if self.training else x  # dropout is the identity outside training
        delta = mixture_delta(dropped, decision, self.a_list(), b_list, self.scales(), shared_a=self.shared_a)
        if self.lora_residual_A is not None and self.lora_residual_B is not None:
            delta = delta - (x @ self.lora_residual_A.t()) @ self.lora_residual_B.t()
        return result + delta.to(result.dtype)

    def extra_repr(self) -> str:
        extra = ", shared_a" if self.shared_a else ""
        return f"in={self.in_features}, out={self.out_features}, ranks={self.ranks}, layer={self.layer_index}{extra}"
