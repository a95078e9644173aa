"""Per-forward routing context shared by the model, its hooks and its expert layers.

One ``RoutingContext`` object lives on a ``DyLoRAMoEForCausalLM``. Each forward of the base model
starts a new pass (``begin_pass``): hooks then store the routing decisions computed from the
hidden states of that very pass, and expert layers read them. The decisions of a pass are handed
back to the caller in the model output; the context is plumbing, not a place where results are
kept for later reading.

During ``generate`` the context is *pinned*: the sequence-level decision of the first (prefill)
forward is reused by every later step, so routing is identical with and without the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .routing import RoutingDecision


@dataclass
class RoutingContext:
    """Mutable routing state of the forward pass in progress."""

    #: routing decision shared by all layers (sequence routing), ``None`` with token routing.
    sequence: RoutingDecision | None = None
    #: token-routing decisions of the current pass, by decoder-layer index.
    layers: dict[int, RoutingDecision] = field(default_factory=dict)
    #: decoder blocks that hold no adapter for the expert the pass is forced to (a layer-wise allocation)
    skipped: set[int] = field(default_factory=set)
    #: ``[B, T]`` mask of real (non-padding) tokens of the current pass.
    token_mask: torch.Tensor | None = None
    #: explicit per-token mask of the tokens that decide sequence routing (set by ``forward``).
    routing_mask: torch.Tensor | None = None
    #: labels of the current pass, used to find the prompt (labels == -100) for sequence routing.
    labels: torch.Tensor | None = None
    #: expert index that every unit is sent to, or ``[B]`` one per sequence, overriding the router (``None``: the
    #: router decides).
    forced_expert: int | torch.Tensor | None = None
    #: True inside ``generate``: the first sequence decision is pinned for the whole generation.
    generating: bool = False
    pinned: RoutingDecision | None = None
    #: ``[B, hidden]`` the prompt context token routers see (``router_context='prompt'``) in the current pass, and
    #: the one pinned for the generation (the prefill's), as ``pinned`` is for sequence routing
    prompt_context: torch.Tensor | None = None
    pinned_context: torch.Tensor | None = None
    #: True inside ``model.disable_adapters()``: expert layers return the frozen base layer's output.
    adapters_disabled: bool = False
    #: True while the wrapper runs its base model bare (the LM head probe): no routing, no decision, expert layers
    #: return the frozen layer's output, and the routing state above is left as it was.
    bare: bool = False

    def begin_pass(self) -> None:
        self.sequence = None
        self.layers = {}
        self.skipped = set()
        self.token_mask = None
        self.prompt_context = None

    def decision_for(self, layer_index: int) -> RoutingDecision | None:
        """The decision of ``layer_index``'s block, or None when the pass skips the block's experts."""
        if layer_index in self.skipped:
            return None
        decision = self.sequence if self.sequence is not None else self.layers.get(layer_index)
        if decision is None:
            raise RuntimeError(
                f"no routing decision for decoder layer {layer_index}: expert layers must run inside "
                "a DyLoRAMoEForCausalLM forward (call the wrapper, not a detached copy of its base model)"
            )
        return decision

    def decisions(self) -> list[RoutingDecision]:
        """Decisions of the current pass in layer order."""
        if self.sequence is not None:
            return [self.sequence]
        return [self.layers[i] for i in sorted(self.layers)]
