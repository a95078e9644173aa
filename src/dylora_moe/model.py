"""``DyLoRAMoEForCausalLM``: a frozen Hugging Face causal LM carrying a routed pool of LoRA experts.

Every base parameter (lm_head and tied embeddings included) is frozen; only the experts' A/B and
the router train. Routing is computed inside the same forward pass as the LM:

* ``routing='sequence'``: a forward pre-hook on the base model mean-pools the input
  embeddings over the prompt (tokens whose label is -100, or an explicit ``routing_mask``; all
  real tokens when there are no labels), and one router picks the experts of each sequence for
  every layer. Decode steps with a KV cache reuse the prefill's decision, so cached and uncached
  generation route identically.
* ``routing='token'`` (default): a pre-hook on every decoder block routes each token from the hidden
  state entering that block (one router per block); causal, so the KV cache does not change it. With
  ``router_context='prompt'`` each token router also sees the sequence's pooled prompt (as sequence routing
  pools it), pinned at the prefill during generation like a sequence decision.

Usage::

    base = AutoModelForCausalLM.from_pretrained(...)
    model = DyLoRAMoEForCausalLM(base, DyLoRAMoEConfig(num_experts=4), mature=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()          # lm_loss + balance_coef * aux_loss
    out.expert_share, out.router_entropy
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=32)
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeGuard, cast

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel

from .config import DyLoRAMoEConfig, experts_per_block
from .context import RoutingContext
from .cross_entropy import cross_entropy, linear_cross_entropy
from .domain_routing import domain_routing_term
from .experts import update_similarity
from .export import export_expert, merge_expert
from .hub import push_folder, resolve_checkpoint
from .layer import ADAPTER_PARAMETER_NAMES, MoELoRALayer
from .loading import load_base_model
from .outputs import DyLoRAMoECausalLMOutput
from .report import ParameterReport, parameter_report
from .router import Router, build_router
from .routing import (
    RoutingDecision,
    active_experts,
    balance_loss,
    decide,
    expert_share,
    fixed_k,
    per_sequence_choice_counts,
    per_sequence_probs,
    router_entropy,
    router_z_loss,
)
from .serialization import (
    WEIGHTS_FILE,
    check_fingerprint,
    load_adapter_tensors,
    load_attachments,
    read_adapter,
    save_model,
)
from .targets import decoder_blocks_name, find_targets


def _cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    try:  # legacy tuple cache
        return int(cache[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


def _mean_active_experts(decisions: list[RoutingDecision]) -> torch.Tensor:
    """The mean over ``decisions`` of the experts per routed unit; one scalar made on the device when no decision
    is dynamic (decoding makes this per token: no per-layer tensor work)."""
    ks = [fixed_k(d) for d in decisions]
    if all(k is not None for k in ks):
        return torch.tensor(sum(cast(int, k) for k in ks) / len(ks), device=decisions[0].probs.device)
    return torch.stack([active_experts(d) for d in decisions]).mean()


def _detached(d: RoutingDecision) -> RoutingDecision:
    def det(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach()

    return RoutingDecision(d.probs.detach(), det(d.indices), det(d.gates), d.mode, d.mask.detach(), dynamic=d.dynamic)


def sequence_routing(decisions: list[RoutingDecision]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence view of a pass's routing decisions: ``(expert_choice [B], router_probs [B, E])``.

    The choice is the expert most often first over the routed layers (and, with token routing, over the
    sequence's real tokens); the probabilities are the mean router distribution.
    """
    most = max(d.num_experts for d in decisions)  # blocks may hold fewer experts (layer_experts)
    probs = torch.stack([_padded(per_sequence_probs(d), most) for d in decisions]).mean(0)
    choice = torch.stack([_padded(per_sequence_choice_counts(d), most) for d in decisions]).sum(0).argmax(-1)
    return choice, probs


def _padded(values: torch.Tensor, experts: int) -> torch.Tensor:
    """``values [..., E_block]`` with zeros for the experts a block does not hold -> ``[..., experts]``."""
    missing = experts - values.shape[-1]
    return values if missing == 0 else torch.nn.functional.pad(values, (0, missing))


def _input_embedding_weight(model: PreTrainedModel) -> torch.Tensor:
    """The input embedding matrix ``[vocab, hidden]`` of a base model."""
    return cast(torch.Tensor, model.get_input_embeddings().weight)


class DyLoRAMoEForCausalLM(nn.Module):
    """A causal LM with routed LoRA experts sharing one frozen base model."""

    #: names of the methods and properties features added with :meth:`register_extension`
    _extensions: set[str] = set()

    context: RoutingContext  # a plain attribute, not a submodule: shared with the layers and hooks
    base_model: PreTrainedModel
    routers: nn.ModuleList
    _expert_layers: tuple[MoELoRALayer, ...]

    def __init__(
        self,
        base_model: PreTrainedModel,
        config: DyLoRAMoEConfig | None = None,
        *,
        mature: bool = False,
        base_name_or_path: str | None = None,
        expert_ranks: Sequence[int] | None = None,
        expert_alphas: Sequence[float] | None = None,
    ) -> None:
        """Wrap ``base_model`` (frozen) with ``config.num_experts`` experts of rank ``config.r`` (or the given
        ``expert_ranks`` / ``expert_alphas``, one per expert, as a checkpoint records them)."""
        super().__init__()
        config = dataclasses.replace(config or DyLoRAMoEConfig())  # the model's own copy: it grows with the pool
        config.validate()
        ranks = list(expert_ranks) if expert_ranks is not None else [config.r] * config.num_experts
        alphas = list(expert_alphas) if expert_alphas is not None else [float(config.alpha)] * len(ranks)
        if not len(ranks) == len(alphas) == config.num_experts:
            raise ValueError(f"{len(ranks)} expert ranks and {len(alphas)} alphas for num_experts={config.num_experts}")
        self.moe_config = config
        self.base_model = base_model
        self.base_name_or_path = base_name_or_path or getattr(base_model, "name_or_path", "") or ""
        for p in base_model.parameters():
            p.requires_grad_(False)
        self.__dict__["context"] = RoutingContext()
        #: whether the base model returns its LM head's output as its logits (found on first use)
        self._head_is_logits: bool | None = None
        self.targets = find_targets(base_model, config.target_modules)
        #: data features keep with the model and its checkpoints, by name (serialization.py: attachments)
        self.attachments: dict[str, Any] = {}
        layers = self._wrap_targets(config)
        hidden = _input_embedding_weight(base_model).shape[1]
        block_ids = sorted({t.layer_index for t in self.targets})
        #: experts of each adapted decoder block (MoLA's layer-wise allocation; else num_experts everywhere)
        self.block_experts = dict(zip(block_ids, experts_per_block(config, len(block_ids))))
        self.router_slots = {-1: 0} if config.routing == "sequence" else {i: s for s, i in enumerate(block_ids)}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            self.routers = nn.ModuleList(
                build_router(config.router_type, hidden,
                             config.num_experts if block < 0 else self.block_experts[block], config.router_hidden)
                for block in self.router_slots
            ).to(_input_embedding_weight(base_model).device)
            if config.threshold_learned:
                for router in self._router_list():
                    router.learn_threshold(cast(float, config.top_p))
            for expert, (rank, alpha) in enumerate(zip(ranks, alphas)):
                for layer in layers:
                    if expert < self.block_experts[layer.layer_index]:
                        layer.add_expert(rank, alpha)
            if config.expert_init == "svd":
                for layer in layers:
                    layer.init_from_svd(config.svd_rho)
            if config.router_context == "prompt":  # drawn last: the experts start as they do without it
                for router in self._router_list():
                    router.use_context(hidden)
        self.expert_ranks, self.expert_alphas = ranks, [float(a) for a in alphas]
        self.maturity = [bool(mature)] * config.num_experts
        self._hooks = [base_model.register_forward_pre_hook(self._before_base_forward, with_kwargs=True)]
        if config.routing == "token":
            blocks = self._decoder_blocks()
            for idx, slot in self.router_slots.items():
                self._hooks.append(
                    blocks[idx].register_forward_pre_hook(self._block_hook(idx, slot), with_kwargs=True)
                )

    def _wrap_targets(self, config: DyLoRAMoEConfig) -> list[MoELoRALayer]:
        """Replace every target linear layer of the base model by a :class:`MoELoRALayer` around it."""
        layers = []
        for target in self.targets:
            parent_name, _, child = target.name.rpartition(".")
            parent = self.base_model.get_submodule(parent_name)
            layer = MoELoRALayer(getattr(parent, child), self.context, target.layer_index, config.dropout,
                                 shared_a=config.shared_a, scaling=config.scaling)
            setattr(parent, child, layer)
            layers.append(layer)
        self.__dict__["_expert_layers"] = tuple(layers)
        return layers

    @classmethod
    def register_extension(cls, name: str, value: Any) -> None:
        """Add a method or property a feature provides (continual learning adds ``add_new_skill`` and
        ``skill_library``); the core itself never imports a feature. A name the class already has is refused."""
        if name in cls.__dict__ and name not in cls._extensions:
            raise ValueError(f"DyLoRAMoEForCausalLM already has {name!r}: an extension cannot replace it")
        setattr(cls, name, value)
        cls._extensions.add(name)

    # ------------------------------------------------------------------ structure
    def _router_list(self) -> list[Router]:
        return [cast(Router, router) for router in self.routers]

    def _decoder_blocks(self) -> nn.ModuleList:
        return cast(nn.ModuleList, self.base_model.get_submodule(decoder_blocks_name(self.base_model)))

    @property
    def config(self) -> Any:
        """The base model's transformers config (Hugging Face convention)."""
        return self.base_model.config

    @property
    def expert_layers(self) -> tuple[MoELoRALayer, ...]:
        return self._expert_layers

    @property
    def num_experts(self) -> int:
        return len(self.maturity)

    @property
    def device(self) -> torch.device:
        return _input_embedding_weight(self.base_model).device

    @property
    def routing_mode(self) -> str:
        """'dense' while any expert is immature, 'sparse' once all are (unless overridden)."""
        if self.moe_config.routing_mode != "auto":
            return self.moe_config.routing_mode
        return "sparse" if all(self.maturity) else "dense"

    def expert_parameters(self, index: int | None = None) -> Iterator[nn.Parameter]:
        """LoRA parameters (by declared name) of all experts, or expert ``index``'s own (with ``shared_a`` its B
        heads: the shared A belongs to every expert, so only ``index=None`` yields it)."""
        for layer in self._expert_layers:
            for name in ADAPTER_PARAMETER_NAMES:
                plist = getattr(layer, name)
                if index is None:
                    yield from plist
                elif index < layer.num_experts and not (layer.shared_a and name == "lora_A"):
                    yield plist[index]

    def router_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.routers.parameters()

    def threshold_parameters(self) -> list[nn.Parameter]:
        """The routers' learned dynamic top-k thresholds (``threshold_logit``; empty unless ``threshold_learned``),
        a subset of ``router_parameters`` that the trainer gives its own learning rate."""
        return [r.threshold_logit for r in self._router_list() if r.threshold_logit is not None]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in [*self.expert_parameters(), *self.router_parameters()] if p.requires_grad]

    def similarity_loss(self) -> torch.Tensor:
        """The expert similarity loss: the mean squared cosine similarity between the updates ``B_e A_e`` of
        every pair of experts, averaged over the adapted modules (0 with a single expert)."""
        if self.num_experts < 2:
            return torch.zeros((), device=self.device)
        per_layer = []
        for layer in self._expert_layers:
            if layer.num_experts < 2:  # a block with one expert (layer_experts) has no pair
                continue
            off = ~torch.eye(layer.num_experts, dtype=torch.bool, device=self.device)
            per_layer.append(update_similarity(layer.a_list(), list(layer.lora_B))[off].pow(2).mean())
        return torch.stack(per_layer).mean() if per_layer else torch.zeros((), device=self.device)

    # ------------------------------------------------------------------ growth and maturity
    def add_expert(self, rank: int | None = None, alpha: float | None = None) -> int:
        """Grow the pool by one immature expert (and one router output); return its index.

        Existing experts and router rows keep their values: outside autograd (evaluation, ``generate``) the
        old experts' outputs are unchanged bit for bit, and the routers' old logits agree within
        ``router.ROUTER_GROWTH_RTOL`` (see ``router.py``). The optimizer must be rebuilt to include the new
        parameters.
        """
        cfg = self.moe_config
        if cfg.layer_experts is not None:
            raise ValueError(f"add_expert: a pool with layer_experts={cfg.layer_experts!r} (a layer-wise allocation) "
                             "does not grow")
        rank = cfg.r if rank is None else rank
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"add_expert: rank={rank!r} must be an integer > 0")
        alpha = rank * cfg.alpha / cfg.r if alpha is None else float(alpha)
        if not alpha > 0:
            raise ValueError(f"add_expert: alpha={alpha!r} must be > 0")
        if cfg.shared_a and rank != cfg.r:
            raise ValueError(f"add_expert: rank={rank} with shared_a=True: every expert has the shared A's rank "
                             f"{cfg.r}")
        index = self.num_experts
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed + 7919 * (index + 1))
            for layer in self._expert_layers:
                layer.add_expert(rank, alpha)
            for router in self._router_list():
                router.add_expert()
        self.block_experts = {block: held + 1 for block, held in self.block_experts.items()}
        self.expert_ranks.append(rank)
        self.expert_alphas.append(alpha)
        self.maturity.append(False)
        self.moe_config = dataclasses.replace(cfg, num_experts=self.num_experts)
        return index

    def set_maturity(self, index: int, mature: bool = True) -> None:
        if not 0 <= index < self.num_experts:
            raise IndexError(f"expert index {index} out of range for {self.num_experts} experts")
        self.maturity[index] = bool(mature)

    def set_all_mature(self, mature: bool = True) -> None:
        self.maturity = [bool(mature)] * self.num_experts

    @contextlib.contextmanager
    def force_expert(self, index: int | None) -> Iterator[DyLoRAMoEForCausalLM]:
        """Within the block every unit goes to expert ``index`` with weight 1 (router bypassed)."""
        if index is not None and not 0 <= index < self.num_experts:
            raise IndexError(f"expert index {index} out of range for {self.num_experts} experts")
        previous, self.context.forced_expert = self.context.forced_expert, index
        try:
            yield self
        finally:
            self.context.forced_expert = previous

    @contextlib.contextmanager
    def bare(self) -> Iterator[DyLoRAMoEForCausalLM]:
        """Within the block the base model (or its transformer body, called directly) runs bare: no routing, no
        decision, every expert layer returns its frozen layer's output, and the wrapper's routing state is left as
        it was (e.g. embedding examples with the frozen model, whatever the passes before them routed)."""
        previous, self.context.bare = self.context.bare, True
        try:
            yield self
        finally:
            self.context.bare = previous

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[DyLoRAMoEForCausalLM]:
        """Within the block the wrapped model computes exactly the frozen base model (no expert deltas)."""
        previous, self.context.adapters_disabled = self.context.adapters_disabled, True
        try:
            yield self
        finally:
            self.context.adapters_disabled = previous

    # ------------------------------------------------------------------ routing hooks
    def _decide(self, logits: torch.Tensor, mask: torch.Tensor, router: Router) -> RoutingDecision:
        cfg = self.moe_config
        decision = decide(
            logits,
            mask,
            mode=self.routing_mode,
            top_k=min(cfg.top_k, logits.shape[-1]),
            temperature=cfg.temperature,
            forced_expert=self.context.forced_expert,
            gate=cfg.gate,
            top_p=cfg.top_p,
            threshold=router.threshold(),
        )
        if cfg.z_loss_coef > 0:
            decision.z_loss = router_z_loss(logits, mask)
        return decision

    def _before_base_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ctx = self.context
        if ctx.bare:
            return None
        ctx.begin_pass()
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = input_ids if input_ids is not None else embeds
        if ref is None:
            return None
        batch, seq = ref.shape[0], ref.shape[1]
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -seq:].bool()
        else:
            token_mask = torch.ones(batch, seq, dtype=torch.bool, device=ref.device)
        ctx.token_mask = token_mask
        cfg = self.moe_config
        if cfg.routing != "sequence" and cfg.router_context == "none":
            return None
        continuing = _cache_length(kwargs.get("cache", kwargs.get("past_key_values"))) > 0
        reuse = ctx.generating or continuing  # a decode step: the prefill's prompt decides
        labels = kwargs.get("labels")
        labels = ctx.labels if labels is None else labels
        pinned_context = ctx.pinned_context
        if cfg.routing != "sequence":  # token routers that see the prompt: its context, pinned like a decision
            if reuse and pinned_context is not None and pinned_context.shape[0] == batch:
                ctx.prompt_context = pinned_context
            else:
                ctx.prompt_context = ctx.pinned_context = self._sequence_features(
                    input_ids, embeds, token_mask, labels, ctx.routing_mask)
            return None
        pinned = ctx.pinned
        if reuse and pinned is not None and pinned.probs.shape[0] == batch:
            ctx.sequence = pinned
            return None
        features = self._sequence_features(input_ids, embeds, token_mask, labels, ctx.routing_mask)
        router = cast(Router, self.routers[0])
        logits = router(features)
        ctx.sequence = self._decide(logits, torch.ones(batch, dtype=torch.bool, device=logits.device), router)
        ctx.pinned = _detached(ctx.sequence)
        return None

    def _sequence_features(self, input_ids: torch.Tensor | None, embeds: torch.Tensor | None,
                           token_mask: torch.Tensor, labels: torch.Tensor | None = None,
                           routing_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean input embedding over the routing tokens of each sequence, ``[B, hidden]`` (float32).

        Routing tokens: ``routing_mask`` if given, else the prompt (``labels == -100``) when labels are
        given and a row has a prompt, else every real token.
        """
        if embeds is None:
            embeds = self.base_model.get_input_embeddings()(input_ids)
        if routing_mask is not None:
            rmask = routing_mask.to(token_mask.device).bool() & token_mask
        else:
            rmask = token_mask
            if labels is not None and labels.shape == token_mask.shape:
                prompt = token_mask & (labels == -100)
                rmask = torch.where(prompt.any(1, keepdim=True), prompt, token_mask)
        weights = rmask.unsqueeze(-1).to(torch.float32)
        return (embeds.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    @torch.no_grad()
    def calibrate_router(self, batches: Iterable[dict[str, torch.Tensor]]) -> int:
        """Set every router's feature standardisation from representative batches; return units seen.

        ``batches`` yields dicts with ``input_ids`` and ``attention_mask`` (and optionally ``labels``,
        ``routing_mask``), e.g. a few training batches. Sequence routing needs only the embeddings;
        token routing runs the base model to collect each block's input hidden states. Call before
        training (joint training does); the statistics are saved with the checkpoint.
        """
        collected: dict[int, list[torch.Tensor]] = {slot: [] for slot in self.router_slots.values()}
        contexts: list[torch.Tensor] = []  # the prompt contexts of token routers that see one
        hooks = []
        # only the blocks' inputs matter: skip the LM head's logits over the vocabulary where the model can
        # (transformers' logits_to_keep); decided once, so no forward runs twice or feeds the hooks twice
        keeps = "logits_to_keep" in inspect.signature(self.base_model.forward).parameters
        extra = {"logits_to_keep": 1} if keeps else {}
        if self.moe_config.routing == "token":
            blocks = self._decoder_blocks()
            for idx, slot in self.router_slots.items():
                def grab(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], slot: int = slot) -> None:
                    hidden = args[0] if args else kwargs["hidden_states"]
                    mask = self.context.token_mask
                    keep = mask.reshape(-1) if mask is not None and mask.shape == hidden.shape[:2] else None
                    flat = hidden.reshape(-1, hidden.shape[-1]).float()
                    collected[slot].append(flat if keep is None else flat[keep])

                hooks.append(blocks[idx].register_forward_pre_hook(grab, with_kwargs=True))
        try:
            for batch in batches:
                ids = batch["input_ids"].to(self.device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else mask.to(self.device)
                sequence = self.moe_config.routing == "sequence"
                if sequence or self.moe_config.router_context != "none":  # the pooled prompt is a router input
                    labels, rmask = batch.get("labels"), batch.get("routing_mask")
                    pooled = self._sequence_features(ids, None, mask.bool(), None if labels is None else labels.to(
                        self.device), None if rmask is None else rmask.to(self.device))
                    (collected[0] if sequence else contexts).append(pooled)
                if not sequence:
                    self.base_model(input_ids=ids, attention_mask=mask, **extra)
        finally:
            for h in hooks:
                h.remove()
            self.context.prompt_context = None  # no later pass may see the calibration's prompts
        seen = 0
        for slot, feats in collected.items():
            if not feats:
                continue
            allf = torch.cat(feats)
            seen = max(seen, allf.shape[0])
            if allf.shape[0] > 1:
                self._router_list()[slot].set_feature_stats(allf.mean(0), allf.std(0))
        if self.moe_config.router_context != "none" and sum(c.shape[0] for c in contexts) > 1:
            pooled = torch.cat(contexts)
            for router in self._router_list():
                router.set_context_stats(pooled.mean(0), pooled.std(0))
        return seen

    def _block_hook(self, layer_index: int, slot: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            ctx = self.context
            if ctx.bare:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = ctx.token_mask
            if mask is None or mask.shape != hidden.shape[:2]:
                mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            forced, held = ctx.forced_expert, self.block_experts[layer_index]
            if isinstance(forced, int) and forced >= held:  # the forced expert has no adapter in this block
                ctx.skipped.add(layer_index)
                return None
            if isinstance(forced, torch.Tensor) and int(forced.max()) >= held:
                raise ValueError(f"forced_expert: decoder block {layer_index} holds {held} experts (layer_experts), "
                                 f"cannot route a sequence to expert {int(forced.max())}")
            router = cast(Router, self.routers[slot])
            context = ctx.prompt_context
            if router.context_weight is not None and (context is None or context.shape[0] != hidden.shape[0]):
                raise RuntimeError(f"decoder block {layer_index}: its router sees the prompt (router_context), but "
                                   "this pass has none: call the DyLoRAMoEForCausalLM wrapper, not its base model's "
                                   "body (or run the body inside model.bare() for the frozen model's states)")
            ctx.layers[layer_index] = self._decide(router.logits(hidden, context), mask, router)
            return None

        return hook

    # ------------------------------------------------------------------ forward / generate
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        *,
        routing_mask: torch.Tensor | None = None,
        forced_expert: int | torch.Tensor | None = None,
        supervised_logits_only: bool | None = None,
        domain_ids: torch.Tensor | None = None,
        domain_pmi: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> DyLoRAMoECausalLMOutput:
        """Run the LM; ``input_ids [B, T]``, ``attention_mask [B, T]``, ``labels [B, T]`` (-100 ignored).

        ``routing_mask [B, T]`` chooses the tokens that decide sequence routing (default: the prompt,
        i.e. labels == -100). ``forced_expert`` sends everything to one expert with weight 1, or (a ``[B]``
        tensor) each sequence to its own expert.

        ``supervised_logits_only`` (with ``labels``): the LM head runs only at the ``N`` positions whose next
        token is supervised, so the ``[B, T, vocab]`` logits (and their gradient) are never built; the loss is
        the same cross-entropy (the mean, or the sum over ``num_items_in_batch`` when that is passed, as
        transformers computes it), and ``logits`` is ``None``. ``None`` (the default) turns it on in a training
        step (labels given, training mode, gradients on, no ``logits_to_keep``), where only the loss is used;
        pass ``False`` for the full logits. Training and evaluation pass ``True``.

        ``domain_ids [B]`` (training): the domain of each sequence, for the domain routing loss
        (``domain_mi_coef``); ignored when that is 0. ``domain_pmi [S, D, E]`` (with ``domain_mi_decay > 0``, from
        the trainer's running statistics): the pointwise mutual information of domain and expert of each of the
        ``S`` routed decisions, which the loss then follows (``domain_routing.py``); None: the micro-batch's own.
        """
        if supervised_logits_only is None:
            supervised_logits_only = (labels is not None and self.training and torch.is_grad_enabled()
                                      and "logits_to_keep" not in kwargs)
        ctx = self.context
        previous_forced = ctx.forced_expert
        if forced_expert is not None:
            ctx.forced_expert = self._checked_forced(forced_expert, input_ids)
        ctx.routing_mask, ctx.labels = routing_mask, labels
        head = self.base_model.get_output_embeddings() if supervised_logits_only and labels is not None else None
        try:
            if head is None or labels is None:
                out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
                lm_loss = out.get("loss")
            else:
                out, lm_loss = self._supervised_forward(head, input_ids, attention_mask, labels, kwargs)
            decisions = ctx.decisions()
        finally:
            ctx.routing_mask = ctx.labels = ctx.prompt_context = None  # no later pass may see this one's prompt
            ctx.forced_expert = previous_forced
        return self._output(out, lm_loss, decisions, keep_logits=head is None, domain_ids=domain_ids,
                            domain_pmi=domain_pmi)

    def _supervised_forward(self, head: nn.Module, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                            labels: torch.Tensor, kwargs: dict[str, Any]) -> tuple[Any, torch.Tensor]:
        """The base forward with the LM head applied to the supervised positions only; ``(out, lm_loss)``.

        A pre-hook on the head replaces its input ``[B, T, H]`` by the ``[N, H]`` rows whose next label is
        not -100 (row-major, as ``targets``); the loss is their mean cross-entropy in float32, as transformers
        computes it over the full logits. Where the head is a frozen ``nn.Linear`` whose output the model returns
        as it is (:meth:`_head_returns_logits`), the hook computes that loss fused with the head
        (``cross_entropy.linear_cross_entropy``: no ``[N, vocab]`` tensor at all) and hands the head no rows;
        otherwise the head computes the ``[N, vocab]`` logits and ``cross_entropy.cross_entropy`` takes them. Both
        give the same loss and gradients up to float rounding.
        """
        following = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # [B, T]: the label to predict
        keep = following != -100
        kwargs = dict(kwargs)
        items = kwargs.pop("num_items_in_batch", None)
        reduction = "mean" if items is None else "sum"
        fuse = self._head_returns_logits(head)
        selected: list[torch.Tensor | None] = []  # the fused loss, or None where the head computes logits

        def select(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            hidden = args[0]
            if hidden.shape[:2] != keep.shape:  # not the full sequence (logits_to_keep): leave it as it is
                return None
            rows = hidden[keep]
            if fuse and _frozen_linear(module, rows):
                selected.append(linear_cross_entropy(rows, module.weight, module.bias, following[keep], reduction))
                return (rows[:0], *args[1:])
            selected.append(None)
            return (rows, *args[1:])

        handle = head.register_forward_pre_hook(select)
        try:
            out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            handle.remove()
        logits = out.logits
        if selected and selected[0] is not None:
            total = selected[0]
        elif not selected:
            if logits.shape[:2] != labels.shape:
                raise ValueError(f"supervised_logits_only: the LM head of {type(self.base_model).__name__} returned "
                                 f"logits of shape {tuple(logits.shape)} for labels of shape {tuple(labels.shape)}")
            # the head never saw the [B, T, H] hidden states: the usual shifted loss over the logits it returned
            total = cross_entropy(logits.flatten(0, 1), following.flatten(), reduction)
        else:
            total = cross_entropy(logits, following[keep], reduction)
        if items is None:
            return out, total
        return out, total / (items.to(total.device) if isinstance(items, torch.Tensor) else items)

    def _head_returns_logits(self, head: nn.Module) -> bool:
        """Whether the base model returns its LM head's output as ``logits`` unchanged (no soft-capping or
        scaling after the head), so that the loss may be computed fused with the head.

        Found once per model by a forward of one token through the bare base model in eval mode, without
        gradients (no routing, no expert, no dropout; the routing state, the modules' modes and the random number
        generators left as they were, so a run's numbers do not depend on when it was asked).
        """
        if self._head_is_logits is None:
            seen: list[Any] = []
            handle = head.register_forward_hook(lambda module, args, output: seen.append(output))
            device = next(head.parameters()).device
            modes = {module: module.training for module in self.base_model.modules()}
            self.base_model.eval()
            try:
                with self.bare(), torch.no_grad(), torch.random.fork_rng(
                        devices=[device] if device.type == "cuda" else []):
                    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
                    out = self.base_model(input_ids=ids, use_cache=False)
            finally:
                handle.remove()
                for module, training in modes.items():
                    module.training = training
            self._head_is_logits = len(seen) == 1 and out.logits is seen[0]
        return self._head_is_logits

    def _output(self, out: Any, lm_loss: torch.Tensor | None, decisions: list[RoutingDecision],
                keep_logits: bool = True, domain_ids: torch.Tensor | None = None,
                domain_pmi: torch.Tensor | None = None) -> DyLoRAMoECausalLMOutput:
        cfg = self.moe_config
        aux = torch.stack([balance_loss(d, cfg.balance_loss) for d in decisions]).mean()
        share = torch.stack([_padded(expert_share(d), self.num_experts) for d in decisions]).mean(0)
        entropy = torch.stack([router_entropy(d) for d in decisions]).mean()
        choice, probs = sequence_routing(decisions)
        z_losses = [d.z_loss for d in decisions if d.z_loss is not None]
        z_loss = torch.stack(z_losses).mean() if z_losses else None
        ortho = self.similarity_loss() if cfg.ortho_coef > 0 else None
        soft_ks = [d.soft_k for d in decisions if d.soft_k is not None]
        dynamic_k = torch.stack(soft_ks).mean() if soft_ks else None
        routed = [d for d in decisions if d.mode != "forced"]
        domain_mi = domain_mass = None
        if cfg.domain_mi_coef > 0 and domain_ids is not None and routed:
            domain_mi, domain_mass = domain_routing_term(routed, domain_ids, domain_pmi)
        loss = None
        if lm_loss is not None:
            loss = lm_loss + cfg.balance_coef * aux.to(lm_loss.dtype)
            if z_loss is not None:
                loss = loss + cfg.z_loss_coef * z_loss.to(lm_loss.dtype)
            if ortho is not None:
                loss = loss + cfg.ortho_coef * ortho.to(lm_loss.dtype)
            if dynamic_k is not None and cfg.dynamic_k_coef > 0:
                loss = loss + cfg.dynamic_k_coef * dynamic_k.to(lm_loss.dtype)
            if domain_mi is not None:
                loss = loss - cfg.domain_mi_coef * domain_mi.to(lm_loss.dtype)
        known = {f.name for f in dataclasses.fields(DyLoRAMoECausalLMOutput)}
        fields = {k: v for k, v in out.items() if k in known and k != "loss" and (keep_logits or k != "logits")}
        return DyLoRAMoECausalLMOutput(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=aux,
            expert_share=share,
            router_entropy=entropy,
            router_probs=probs,
            decision_probs=tuple(d.probs for d in decisions),
            expert_choice=choice,
            routing_mode=decisions[0].mode,
            z_loss=z_loss,
            ortho_loss=ortho,
            active_experts=_mean_active_experts(decisions),
            dynamic_k_loss=dynamic_k,
            domain_mi=domain_mi,
            domain_mass=domain_mass,
            **fields,
        )

    def _checked_forced(self, forced: int | torch.Tensor, input_ids: torch.Tensor | None) -> int | torch.Tensor:
        """``forced_expert`` after checking it names experts of the pool (and, as a tensor, one per sequence)."""
        values = forced.tolist() if isinstance(forced, torch.Tensor) else [forced]
        if not all(0 <= int(v) < self.num_experts for v in values):
            raise IndexError(f"forced_expert={forced} out of range for {self.num_experts} experts")
        if isinstance(forced, torch.Tensor) and (forced.dim() != 1 or (
                input_ids is not None and forced.shape[0] != input_ids.shape[0])):
            raise ValueError(f"forced_expert as a tensor holds one expert per sequence, got shape "
                             f"{tuple(forced.shape)} for {None if input_ids is None else input_ids.shape[0]} sequences")
        return forced

    @torch.no_grad()
    def generate(self, *args: Any, forced_expert: int | torch.Tensor | None = None,
                 on_prompt_routing: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
                 **kwargs: Any) -> Any:
        """``transformers`` generation (KV cache, batching, padding) with routing pinned to the prompt.

        ``on_prompt_routing(expert_choice [B], router_probs [B, E])`` is called once, after the prefill
        forward, with the prompts' routing as that forward decided it (the positions and padding generation
        uses; token routing: majority expert and mean distribution over each prompt's real tokens), so
        recording it costs no second pass over the prompts.
        """
        ctx = self.context
        saved = (ctx.generating, ctx.forced_expert)
        ctx.generating, ctx.pinned, ctx.pinned_context = True, None, None
        if forced_expert is not None:
            ctx.forced_expert = self._checked_forced(forced_expert, kwargs.get("input_ids"))
        handle: torch.utils.hooks.RemovableHandle | None = None
        if on_prompt_routing is not None:
            report = on_prompt_routing

            def after_prefill(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                if handle is not None:
                    handle.remove()
                report(*sequence_routing(ctx.decisions()))

            handle = self.base_model.register_forward_hook(after_prefill)
        try:
            return cast(GenerationMixin, self.base_model).generate(*args, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
            ctx.generating, ctx.forced_expert = saved
            ctx.pinned = ctx.pinned_context = ctx.prompt_context = None

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """Checkpoint the base model's blocks; non-reentrant so gradients reach experts and router."""
        ckpt_kwargs = kwargs.pop("gradient_checkpointing_kwargs", None) or {"use_reentrant": False}
        if hasattr(self.base_model, "activation_checkpointing_enable"):
            self.base_model.activation_checkpointing_enable(ckpt_kwargs, **kwargs)
        else:  # transformers < 5
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs, **kwargs)

    activation_checkpointing_enable = gradient_checkpointing_enable

    # ------------------------------------------------------------------ persistence / export
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the experts, the router, the config, the base model's fingerprint and the attachments."""
        return save_model(self, directory)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload DyLoRA-MoE adapter") -> str:
        """Save the adapter and upload it to the Hub model repository ``repo_id`` (see ``hub.py``); returns the
        commit's URL. ``from_pretrained(repo_id)`` loads it back."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "adapter")
            return push_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)

    @classmethod
    def from_pretrained(cls, directory: str | Path, base_model: PreTrainedModel | None = None, *,
                        dtype: Any = None, device: Any = None) -> DyLoRAMoEForCausalLM:
        """Rebuild a model from a checkpoint folder (or a Hub id), on ``base_model`` (default: the fingerprinted
        base model, loaded with ``load_base_model``); refuses another base model or a newer format. The model comes
        back in eval mode (dropout off), as transformers' ``from_pretrained`` does: call ``.train()`` to train on."""
        directory = resolve_checkpoint(directory)  # a Hub id is downloaded (or taken from the cache)
        meta, config, tensors = read_adapter(directory)
        fingerprint = meta["base_model"]
        if base_model is None:
            base_model, _ = load_base_model(fingerprint["name_or_path"], dtype=dtype, device=device)
        check_fingerprint(fingerprint, base_model, str(directory))
        model = cls(base_model, config, base_name_or_path=fingerprint["name_or_path"],
                    expert_ranks=meta["expert_ranks"], expert_alphas=meta["expert_alphas"])
        model.maturity = [bool(m) for m in meta["maturity"]]
        load_adapter_tensors(model, tensors, directory / WEIGHTS_FILE)
        model.attachments = load_attachments(directory, meta)
        for attachment in model.attachments.values():
            if hasattr(attachment, "check_against"):
                attachment.check_against(model, str(directory))
        return model.eval()

    def export_expert(self, index: int, directory: str | Path) -> Path:
        """Expert ``index`` as a standard PEFT LoRA adapter folder (see ``export.py``)."""
        return export_expert(self, index, directory)

    def merge_expert(self, index: int) -> PreTrainedModel:
        """A plain transformers model with expert ``index`` merged into its weights."""
        return merge_expert(self, index)

    def parameter_report(self) -> ParameterReport:
        """What trains and what is shared (see ``report.py``)."""
        return parameter_report(self)


def _frozen_linear(module: nn.Module, rows: torch.Tensor) -> TypeGuard[nn.Linear]:
    """Whether ``module`` is a plain frozen ``nn.Linear`` over ``rows [N, H]`` whose weight is an ordinary
    tensor here (not a shard or a quantized or subclassed one), so that its output can be computed from it."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (type(module) is nn.Linear and type(weight) is nn.Parameter and weight.dim() == 2
            and weight.shape[1] == rows.shape[-1] and weight.dtype == rows.dtype and not weight.requires_grad
            and (bias is None or (type(bias) is nn.Parameter and not bias.requires_grad)))
