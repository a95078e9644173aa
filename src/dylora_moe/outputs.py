"""Output dataclass of ``DyLoRAMoEForCausalLM.forward``.

Everything a forward produces is returned here (nothing is stashed on the model):

* ``loss``        = ``lm_loss + balance_coef * aux_loss + z_loss_coef * z_loss + ortho_coef * ortho_loss
  + dynamic_k_coef * dynamic_k_loss - domain_mi_coef * domain_mi`` (when labels are given; a loss whose
  coefficient is 0 is left out)
* ``lm_loss``     the causal-LM cross-entropy
* ``aux_loss``    the load-balancing loss (mean over the routing decisions of the pass)
* ``z_loss``      the router z-loss (mean over the decisions), None unless ``z_loss_coef > 0``
* ``ortho_loss``  the expert similarity loss (mean over the adapted modules), None unless ``ortho_coef > 0``
* ``dynamic_k_loss`` the learned thresholds' compute penalty: the mean soft count of experts kept per routed
  unit (differentiable w.r.t. the thresholds only), None unless ``threshold_learned``
* ``domain_mi``   the domain routing loss's term, mean over the routed decisions (differentiable w.r.t. the
  routers; the loss maximises it): the mutual information (nats) between the sequences' domains and the router's
  choice in the micro-batch, or, given ``domain_pmi``, each unit's probabilities weighted by its domain's pointwise
  mutual information with each expert (``domain_routing.py``); None unless ``domain_mi_coef > 0`` and
  ``domain_ids`` were passed
* ``domain_mass`` ``[S, B, E]`` with ``domain_mi``: each routed decision's router probability per sequence, summed
  over its valid units (detached; what the trainer's running domain x expert statistics add up)
* ``active_experts`` scalar, the mean number of experts with a non-zero weight per routed unit (k; dynamic top-k
  makes it fractional; E when dense)
* ``expert_share`` ``[E]`` share of routed units per expert (sums to 1)
* ``router_entropy`` scalar, mean router entropy in nats
* ``router_probs`` ``[B, E]`` router probabilities per sequence (token routing: averaged)
* ``decision_probs`` the router probabilities of each routing decision of the pass, in layer order: ``[B, T, E_l]``
  (token routing) or ``[B, E_l]`` (sequence routing); differentiable (routing supervision per token)
* ``expert_choice`` ``[B]`` the expert each sequence was (mostly) sent to
* ``routing_mode``  'dense', 'sparse' or 'forced'
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast


@dataclass
class DyLoRAMoECausalLMOutput(CausalLMOutputWithPast):
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    expert_share: torch.Tensor | None = None
    router_entropy: torch.Tensor | None = None
    router_probs: torch.Tensor | None = None
    decision_probs: tuple[torch.Tensor, ...] | None = None
    expert_choice: torch.Tensor | None = None
    routing_mode: str | None = None
    z_loss: torch.Tensor | None = None
    ortho_loss: torch.Tensor | None = None
    dynamic_k_loss: torch.Tensor | None = None
    domain_mi: torch.Tensor | None = None
    domain_mass: torch.Tensor | None = None
    active_experts: torch.Tensor | None = None
