"""Router networks: map routing features to one logit per expert, and grow with the pool.

A router sees features of shape ``[..., in_features]`` (a pooled prompt embedding for sequence
routing, a hidden state per token for token routing) and returns logits ``[..., num_experts]``.
Features are RMS-normalised first (no parameters), so the router temperature means the same thing
whatever the scale of the base model's hidden states.

``build_router(kind, in_features, num_experts)`` is the factory; new router kinds subclass
``Router`` and register themselves in ``ROUTER_TYPES``.

A token router may also see a *context* (``use_context``): one vector per sequence ``[B, context_features]`` (the
prompt's mean input embedding, ``DyLoRAMoEConfig.router_context='prompt'``), standardised with buffers of its own
and added through a linear term ``context_weight [E, context_features]``, so that ``logits(features [B, T, d],
context [B, c]) = forward(features) + W_c norm(context)`` broadcast over the tokens.

A router may also hold a learned dynamic top-k threshold (``learn_threshold``): one parameter ``threshold_logit``
(shape ``[1]``, so that FSDP can shard it like any other), the threshold being its sigmoid (``routing.decide``'s
``threshold``).

What growing promises (``add_expert``): every existing parameter keeps its bits, so the old experts' logits
are the same function of the input; they are computed by one matmul whose output is one column wider, and
BLAS may then sum in another order (on some CPUs, e.g. AVX-512 with MKL, 3e-8 was seen). So the old logits
agree within ``ROUTER_GROWTH_RTOL`` / ``ROUTER_GROWTH_ATOL``, and every routing decision among the old
experts is unchanged except at a tie within that tolerance. The experts' own outputs keep the stronger
promise (bit for bit, see ``experts.py``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

#: the tolerance within which a router's old logits agree after ``add_expert`` (see the module docstring)
ROUTER_GROWTH_RTOL = 1e-6
ROUTER_GROWTH_ATOL = 1e-6


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Scale ``x`` so that its last dimension has unit root-mean-square."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


class Router(nn.Module, ABC):
    """A gating network: features ``[..., in_features]`` -> logits ``[..., num_experts]``.

    Features are first standardised with the buffers ``feature_mean`` / ``feature_std`` (identity
    until ``set_feature_stats`` is called, e.g. by ``DyLoRAMoEForCausalLM.calibrate_router``), then
    RMS-normalised. Pooled prompt embeddings share a large common component; without centring, every
    input gets nearly the same logits and the router sends everything to one expert.
    """

    feature_mean: torch.Tensor  # buffers [in_features]
    feature_std: torch.Tensor
    threshold_logit: nn.Parameter | None  # [1], the learned dynamic top-k threshold's logit (or None)
    context_weight: nn.Parameter | None  # [E, context_features] with use_context, else None
    context_mean: torch.Tensor | None  # buffers [context_features] with use_context, else None
    context_std: torch.Tensor | None

    def __init__(self, in_features: int, num_experts: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_experts = num_experts
        self.register_buffer("feature_mean", torch.zeros(in_features))
        self.register_buffer("feature_std", torch.ones(in_features))
        self.register_parameter("threshold_logit", None)
        self.register_parameter("context_weight", None)
        self.register_buffer("context_mean", None)
        self.register_buffer("context_std", None)

    def learn_threshold(self, initial: float) -> None:
        """Give the router a learned dynamic top-k threshold starting at ``initial`` (in (0, 1))."""
        if not 0 < initial < 1:
            raise ValueError(f"a learned threshold starts in (0, 1), got {initial}")
        device = self.feature_mean.device
        self.threshold_logit = nn.Parameter(torch.tensor([math.log(initial / (1 - initial))], device=device))

    def threshold(self) -> torch.Tensor | None:
        """The learned threshold (a scalar tensor in (0, 1), differentiable), or None when it has none."""
        return None if self.threshold_logit is None else torch.sigmoid(self.threshold_logit).reshape(())

    def use_context(self, context_features: int) -> None:
        """Give the router a second input, a context vector per sequence ``[B, context_features]``: its weight is
        initialised like a linear router's (so the context sways the choice from the first step), its
        standardisation is the identity until ``set_context_stats``."""
        if self.context_weight is not None:
            raise ValueError("the router already has a context input")
        device = self.feature_mean.device
        weight = torch.randn(self.num_experts, context_features) / math.sqrt(context_features)
        self.context_weight = nn.Parameter(weight.to(device))
        self.context_mean = torch.zeros(context_features, device=device)
        self.context_std = torch.ones(context_features, device=device)

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise future inputs with these per-feature statistics ``[in_features]``."""
        self.feature_mean.copy_(mean.to(self.feature_mean))
        self.feature_std.copy_(std.to(self.feature_std).clamp_min(1e-6))

    def set_context_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Standardise future contexts with these statistics ``[context_features]`` (after ``use_context``)."""
        if self.context_mean is None or self.context_std is None:
            raise ValueError("set_context_stats: the router has no context input (use_context)")
        self.context_mean.copy_(mean.to(self.context_mean))
        self.context_std.copy_(std.to(self.context_std).clamp_min(1e-6))

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        return rms_normalize((features.float() - self.feature_mean) / self.feature_std)

    def logits(self, features: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Router logits ``[B, ..., E]`` from ``features [B, ..., in_features]`` and, for a router with a context
        input, ``context [B, context_features]`` (one vector per sequence, added to every position's logits)."""
        logits = self(features)
        if self.context_weight is None:
            if context is not None:
                raise ValueError("a context was given to a router without a context input (use_context)")
            return logits
        if context is None or context.dim() != 2 or context.shape[0] != features.shape[0]:
            shape = None if context is None else tuple(context.shape)
            raise ValueError(f"this router needs a context [B, {self.context_weight.shape[1]}] for features of shape "
                             f"{tuple(features.shape)}, got {shape}")
        assert self.context_mean is not None and self.context_std is not None
        normed = rms_normalize((context.float() - self.context_mean) / self.context_std)
        extra = nn.functional.linear(normed, self.context_weight)  # [B, E]
        return logits + extra.reshape(extra.shape[0], *([1] * (logits.dim() - 2)), extra.shape[1])

    def _grow_context(self) -> None:
        """``add_expert``'s part for the context input: one more row, initialised like the first ones."""
        if self.context_weight is not None:
            width = self.context_weight.shape[1]
            self.context_weight = _grow_rows(self.context_weight, torch.randn(1, width) / math.sqrt(width))

    @abstractmethod
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Return router logits ``[..., num_experts]`` (float32)."""

    @abstractmethod
    def add_expert(self) -> None:
        """Add one output for a new expert, keeping every existing parameter bit for bit (the old logits then
        agree within ``ROUTER_GROWTH_RTOL`` / ``ROUTER_GROWTH_ATOL``: see the module docstring)."""


def _grow_rows(param: nn.Parameter, new_rows: torch.Tensor) -> nn.Parameter:
    grown = torch.cat([param.data, new_rows.to(param.device, param.dtype)], dim=0)
    return nn.Parameter(grown, requires_grad=param.requires_grad)


class LinearRouter(Router):
    """``logits = W rms_norm(x) + b``; the seed's gate. Weight ``[E, d]``, bias ``[E]``."""

    def __init__(self, in_features: int, num_experts: int, **_: object) -> None:
        super().__init__(in_features, num_experts)
        self.weight = nn.Parameter(torch.empty(num_experts, in_features))
        self.bias = nn.Parameter(torch.zeros(num_experts))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(in_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.standardize(features), self.weight, self.bias)

    def add_expert(self) -> None:
        row = torch.randn(1, self.in_features) / math.sqrt(self.in_features)
        self.weight = _grow_rows(self.weight, row)
        self.bias = _grow_rows(self.bias, torch.zeros(1))
        self._grow_context()
        self.num_experts += 1


class MLPRouter(Router):
    """A two-layer router ``W2 gelu(W1 rms_norm(x))``; only ``W2`` grows with the pool."""

    def __init__(self, in_features: int, num_experts: int, hidden: int = 256, **_: object) -> None:
        super().__init__(in_features, num_experts)
        self.hidden = nn.Linear(in_features, hidden)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.bias = nn.Parameter(torch.zeros(num_experts))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(hidden))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.hidden(self.standardize(features)))
        return nn.functional.linear(h, self.weight, self.bias)

    def add_expert(self) -> None:
        row = torch.randn(1, self.weight.shape[1]) / math.sqrt(self.weight.shape[1])
        self.weight = _grow_rows(self.weight, row)
        self.bias = _grow_rows(self.bias, torch.zeros(1))
        self._grow_context()
        self.num_experts += 1


#: router classes by name; each takes ``(in_features, num_experts, hidden=...)`` (``hidden``: MLP width)
ROUTER_TYPES: dict[str, Callable[..., Router]] = {"linear": LinearRouter, "mlp": MLPRouter}


def build_router(kind: str, in_features: int, num_experts: int, hidden: int = 256) -> Router:
    """Create a router of the registered ``kind`` ('linear' or 'mlp')."""
    if kind not in ROUTER_TYPES:
        raise ValueError(f"router_type={kind!r} is not one of {sorted(ROUTER_TYPES)}")
    return ROUTER_TYPES[kind](in_features, num_experts, hidden=hidden)
