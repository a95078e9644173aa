"""The lifecycle of one skill: detect, grow (or reuse) an expert, train it in two phases, mature, record.

``learn_skill(model, tokenizer, examples, name, config)``:

1. Embed the examples (:func:`.library.embed_examples`) and ask the :class:`.novelty.NoveltyDetector`.
   Not novel (and not ``config.force``): the matched skill's expert is fine-tuned at the consolidation
   rate (``fine_tune_existing``), with every other expert and the router frozen, and the skill's
   embedding absorbs the new data. Nothing new is created.
2. Novel: an immature expert nobody owns is claimed (a fresh model), else ``model.add_expert`` adds one
   with the rank of ``config.rank_schedule``. While it is immature the router is dense.
3. Training: only the new expert and the router learn; earlier experts are frozen (their outputs stay
   bit-exact). Seeding phase at ``seed_lr`` (constant), then consolidation at ``consolidate_lr``
   (cosine decay). The router is protected (``config.protection``): replayed examples of earlier skills
   in every batch, with the routing supervision sending them to their experts, and/or the router rows of
   earlier experts frozen. The routing supervision also sends the new data to the new expert.
4. The expert is marked mature (the router returns to sparse top-k) and the skill enters the library with
   its embedding and ``replay_per_skill`` examples for later replay.

Returns a :class:`LearnSkillResult`; the model is changed in place (save it with ``save_pretrained``,
which writes the library too). ``DyLoRAMoEForCausalLM.add_new_skill`` is the same call returning whether an
expert was created.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import DataCollator, Example, tokenize_examples
from ..model import DyLoRAMoEForCausalLM
from . import extension  # noqa: F401  (model.skill_library: the library as a checkpoint attachment)
from .config import ContinualConfig
from .library import SkillLibrary, embedding_and_spread, fill_missing_spreads
from .novelty import NoveltyDecision, NoveltyDetector
from .protection import GuardReport, guard_new_expert, routing_supervision

__all__ = ["LearnSkillResult", "as_examples", "batched_outputs", "learn_skill", "router_entropy_on", "train_expert"]


@dataclass
class LearnSkillResult:
    """What :func:`learn_skill` did: ``created`` a new expert, or matched ``decision.best_skill``."""

    name: str
    created: bool
    expert: int
    rank: int
    decision: NoveltyDecision
    steps: int
    losses: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    guard: GuardReport | None = None

    def summary(self) -> str:
        if self.created:
            guard = f"; {self.guard.line()}" if self.guard is not None else ""
            return (f"skill {self.name!r} is novel ({self.decision.reason}): expert {self.expert} (rank {self.rank}) "
                    f"trained for {self.steps} steps and marked mature{guard}")
        what = f"fine-tuned for {self.steps} steps" if self.steps else "left unchanged"
        return (f"skill {self.name!r} is not novel ({self.decision.reason}): it matches skill "
                f"{self.decision.best_skill!r}, whose expert {self.expert} was {what}")


@contextlib.contextmanager
def _eval_mode(model: Any):
    """Eval mode and no gradients inside the block; the model's training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _collated(tokenizer: Any, examples: Sequence[Example], batch_size: int, max_seq_length: int):
    """Batches of ``examples`` formatted and tokenized as in training (too-long examples dropped)."""
    items, _ = tokenize_examples(list(examples), tokenizer, max_seq_length)
    collate = DataCollator.from_tokenizer(tokenizer)
    for start in range(0, len(items), batch_size):
        yield collate(items[start : start + batch_size])


def batched_outputs(model: Any, tokenizer: Any, examples: Sequence[Example], *, batch_size: int = 8,
                    max_seq_length: int = 512):
    """Yield ``(inputs, output)`` for ``examples`` formatted as in training, in batches, eval mode, no grad."""
    with _eval_mode(model):
        for batch in _collated(tokenizer, examples, batch_size, max_seq_length):
            inputs = {k: batch[k].to(model.device) for k in ("input_ids", "attention_mask", "labels")}
            yield inputs, model(**inputs, supervised_logits_only=True)


def router_entropy_on(model: Any, tokenizer: Any, examples: Sequence[Example], *, batch_size: int = 8,
                      max_seq_length: int = 512) -> float:
    """Mean router entropy (nats) of ``model`` on ``examples``."""
    total, count = 0.0, 0
    for inputs, out in batched_outputs(model, tokenizer, examples, batch_size=batch_size,
                                       max_seq_length=max_seq_length):
        total += float(out.router_entropy) * inputs["input_ids"].shape[0]
        count += inputs["input_ids"].shape[0]
    return total / max(count, 1)


def as_examples(items: Sequence[Example | Mapping[str, Any]], domain: str) -> list[Example]:
    """``Example``s, or plain dicts with ``instruction`` and ``output`` (and optionally ``input``) turned into
    examples of ``domain``; anything else raises a ``TypeError`` naming the item."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Example):
            out.append(item)
            continue
        if not isinstance(item, Mapping):
            raise TypeError(f"skill {domain!r}: example {i} is a {type(item).__name__}, expected an Example or a dict "
                            "with 'instruction' and 'output'")
        missing = [key for key in ("instruction", "output") if not isinstance(item.get(key), str)]
        if missing or not isinstance(item.get("input", ""), str):
            raise TypeError(f"skill {domain!r}: example {i} needs string fields 'instruction' and 'output' (and "
                            f"optionally 'input'); {'missing ' + str(missing) if missing else 'input is not a string'}")
        out.append(Example(domain, item["instruction"], item.get("input", ""), item["output"]))
    return out


def learn_skill(model: Any, tokenizer: Any, examples: Sequence[Example | Mapping[str, Any]], name: str,
                config: ContinualConfig | None = None, progress: bool = True) -> LearnSkillResult:
    """Run the lifecycle of one skill on ``model`` (in place); see the module docstring."""
    config = config or ContinualConfig()
    config.validate()
    started = time.monotonic()
    library = model.skill_library if model.skill_library is not None else SkillLibrary()
    if not name:
        raise ValueError("a skill needs a name")
    if name in library.names:
        raise ValueError(f"skill {name!r} is already in the library (skills: {library.names}); choose a new name")
    examples = as_examples(examples, name)
    if not examples:
        raise ValueError(f"skill {name!r}: no examples")
    if not len(library) and not _router_uncalibrated(model):
        warnings.warn("this model's router was trained, but it has no skill library: nothing protects the routing "
                      "of what it was trained on, and a new expert may take its inputs (docs/continual.md, 'After "
                      "joint training'); checkpoints of joint training register their domains as skills "
                      "(train.register_skills)", UserWarning, stacklevel=2)
    rng = random.Random(config.seed)
    embedding, spread = embedding_and_spread(model, tokenizer, examples, limit=config.embed_examples,
                                             seed=config.seed, max_seq_length=config.max_seq_length)
    entropy = None
    if config.entropy_threshold is not None and len(library):
        entropy = router_entropy_on(model, tokenizer, examples[: config.embed_examples],
                                    max_seq_length=config.max_seq_length)
    detector = NoveltyDetector(config.threshold, config.reduction, config.entropy_threshold, config.similarity)
    if config.similarity == "standardized":
        fill_missing_spreads(model, tokenizer, library, max_seq_length=config.max_seq_length)
    decision = detector.decide(embedding, library, entropy, spread, count=min(len(examples), config.embed_examples))
    if not decision.novel and not config.force:
        skill = library.get(decision.best_skill)
        losses: list[dict[str, float]] = []
        if config.fine_tune_existing and config.consolidate_steps:
            losses = train_expert(model, tokenizer, examples, skill.expert, library, config,
                                  phases=[("consolidate", config.consolidate_steps, config.consolidate_lr)],
                                  fine_tune=True, rng=rng, progress=progress)
        library.update(skill.name, embedding, len(examples), spread=spread)
        model.skill_library = library
        return LearnSkillResult(name, False, skill.expert, model.expert_ranks[skill.expert], decision,
                                len(losses), losses, time.monotonic() - started)
    if config.force and not decision.novel:
        decision.reason += "; a new expert is forced"
    if len(library) and _router_uncalibrated(model):  # the router is about to separate skills for the first time
        mixture = [e for e, _ in library.replay_examples()] + examples[: config.replay_per_skill]
        _calibrate_on(model, tokenizer, mixture, config.max_seq_length)
    owned = {s.expert for s in library.skills}
    free = [i for i in range(model.num_experts) if not model.maturity[i] and i not in owned]
    if free:
        expert = free[0]
    else:
        rank = config.rank_for(len(library))
        expert = model.add_expert(rank, config.alpha_ratio * rank)
    model.set_maturity(expert, False)  # dense routing while the new expert learns
    phases = [("seed", config.seed_steps, config.seed_lr), ("consolidate", config.consolidate_steps,
                                                             config.consolidate_lr)]
    losses = train_expert(model, tokenizer, examples, expert, library, config, phases=phases, rng=rng,
                          progress=progress)
    model.set_maturity(expert, True)
    guard = _guard(model, tokenizer, library, examples, expert, config)
    replay = rng.sample(examples, min(config.replay_per_skill, len(examples)))
    library.add(name, embedding, expert, len(examples), replay=replay, spread=spread)
    model.skill_library = library
    return LearnSkillResult(name, True, expert, model.expert_ranks[expert], decision, len(losses), losses,
                            time.monotonic() - started, guard)


def _guard(model: Any, tokenizer: Any, library: SkillLibrary, examples: Sequence[Example], expert: int,
           config: ContinualConfig) -> GuardReport | None:
    """The router guard of the new ``expert`` (``config.router_guard``) on the library's replay examples."""
    replay = [e for e, _ in library.replay_examples()]
    if not config.router_guard or not replay:
        return None

    def batches(items: Sequence[Example]) -> list[dict[str, torch.Tensor]]:
        return [{k: b[k].to(model.device) for k in ("input_ids", "attention_mask", "labels")}
                for b in _collated(tokenizer, items, config.batch_size, config.max_seq_length)]

    return guard_new_expert(model, batches(replay), batches(examples[: config.embed_examples]), expert,
                            margin=config.router_guard_margin, leak=config.router_guard_leak)


def _router_uncalibrated(model: Any) -> bool:
    """True while every router still has the identity feature standardisation (never calibrated)."""
    return all(bool((r.feature_mean == 0).all() and (r.feature_std == 1).all()) for r in model.routers)


def _calibrate_on(model: Any, tokenizer: Any, examples: Sequence[Example], max_seq_length: int) -> None:
    """Set the router's feature standardisation from a mixture of skills (the replay buffer and the new data),
    once, when the router first has to tell skills apart: without it, pooled embeddings of all inputs share
    one large component and look alike to the router. Later skills keep these statistics."""
    with _eval_mode(model):
        model.calibrate_router(_collated(tokenizer, examples, 8, max_seq_length))


def _router_row_mask(param: torch.nn.Parameter, expert: int, num_experts: int) -> torch.Tensor | None:
    """A gradient mask keeping only ``expert``'s output row of a router parameter (None: not per-expert)."""
    if param.dim() >= 1 and param.shape[0] == num_experts:
        mask = torch.zeros_like(param)
        mask[expert] = 1
        return mask
    return None


def train_expert(model: Any, tokenizer: Any, examples: Sequence[Example], expert: int, library: SkillLibrary,
                 config: ContinualConfig, *, phases: Sequence[tuple[str, int, float]], fine_tune: bool = False,
                 rng: random.Random | None = None, progress: bool = True, replay: bool | None = None,
                 extra_loss: Callable[[], torch.Tensor] | None = None) -> list[dict[str, float]]:
    """Train expert ``expert`` (and the router, protected) on ``examples``; returns one log row per step.

    ``phases`` are ``(name, steps, peak_lr)``: ``"seed"`` holds its rate, any other phase decays it on a cosine.
    ``fine_tune=True``: the data go to ``expert`` directly (forced), and the router stays frozen. ``replay``:
    mix the library's replay examples into every batch (None: as ``config.protection`` says, never when
    fine-tuning). ``extra_loss()`` is added to every step's loss (a baseline's regulariser). Every parameter's
    ``requires_grad`` is restored afterwards.
    """
    rng = rng or random.Random(config.seed)
    torch.manual_seed(config.seed)
    new_items, stats = tokenize_examples(list(examples), tokenizer, config.max_seq_length)
    if not new_items:
        raise ValueError(f"no example fits max_seq_length={config.max_seq_length} "
                         f"({stats.total.dropped} dropped as too long)")
    replay_on = (config.protection in ("replay", "both") and not fine_tune) if replay is None else replay
    batches = _SkillBatches(new_items, _replay_items(library, tokenizer, config) if replay_on else [], expert,
                            config, rng, DataCollator.from_tokenizer(tokenizer))
    saved_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    # a library with domains of joint training (routing 'kept') freezes the old router rows whatever the protection
    freeze_rows = config.protection in ("freeze_rows", "both") or library.has_kept_routing
    hooks = _select_trainable(model, expert, train_router=not fine_tune, freeze_rows=freeze_rows)
    optimizer, trainable = _optimizer(model, expert, config, phases)
    log: list[dict[str, float]] = []
    bar = tqdm(total=sum(steps for _, steps, _ in phases), desc=f"expert {expert}", disable=not progress,
               leave=False)
    was_training = model.training
    model.train()
    try:
        for phase, steps, peak in phases:
            for k in range(steps):
                lr = peak if phase == "seed" else peak * 0.5 * (1 + math.cos(math.pi * k / max(steps, 1)))
                for group in optimizer.param_groups:
                    if group["phase_lr"]:
                        group["lr"] = lr
                inputs, targets = batches.next(model.device)
                lm_loss, route = _skill_step(model, optimizer, trainable, inputs, targets, config,
                                             forced=expert if fine_tune else None, expert=expert,
                                             extra_loss=extra_loss)
                log.append({"phase": phase, "lr": lr, "lm_loss": lm_loss, "route_loss": route})
                bar.update(1)
                bar.set_postfix(phase=phase, loss=f"{lm_loss:.4f}")
    finally:
        bar.close()
        for hook in hooks:
            hook.remove()
        for n, p in model.named_parameters():
            p.requires_grad_(saved_flags[n])
        model.train(was_training)
    return log


def _replay_items(library: SkillLibrary, tokenizer: Any, config: ContinualConfig) -> list[tuple[Any, int]]:
    """The library's replay examples, tokenized, each with its routing target (the expert of its skill, or
    ``KEEP_ROUTING``)."""
    pairs = library.replay_examples() if library.skills else []
    if not pairs:
        return []
    target = {example.domain: goal for example, goal in pairs}
    tokenized, _ = tokenize_examples([e for e, _ in pairs], tokenizer, config.max_seq_length, domains=library.names)
    return [(item, target[item.domain]) for item in tokenized]


class _SkillBatches:
    """Batches of a skill's training: ``batch_size x (1 - replay_fraction)`` new examples (cycled through seeded
    permutations) and the rest drawn from the replay examples, each with the expert it should be routed to."""

    def __init__(self, new_items: list[Any], replay_items: list[tuple[Any, int]], expert: int,
                 config: ContinualConfig, rng: random.Random, collate: DataCollator) -> None:
        self.new_items, self.replay_items, self.expert = new_items, replay_items, expert
        self.rng, self.collate = rng, collate
        self.n_replay = round(config.batch_size * config.replay_fraction) if replay_items else 0
        self.n_new = config.batch_size - self.n_replay
        self.order: list[int] = []

    def next(self, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``(inputs, targets [B])``: model inputs on ``device`` and each example's expert."""
        picked = []
        for _ in range(self.n_new):
            if not self.order:
                self.order = list(range(len(self.new_items)))
                self.rng.shuffle(self.order)
            picked.append((self.new_items[self.order.pop()], self.expert))
        picked += [self.replay_items[self.rng.randrange(len(self.replay_items))] for _ in range(self.n_replay)]
        batch = self.collate([item for item, _ in picked])
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        return inputs, torch.tensor([t for _, t in picked], device=device)


def _select_trainable(model: Any, expert: int, *, train_router: bool, freeze_rows: bool) -> list[Any]:
    """Make only expert ``expert`` (and, when ``train_router``, the router: with ``freeze_rows`` only its row)
    trainable; returns the gradient hooks that mask the other rows (to remove afterwards)."""
    hooks = []
    for p in model.expert_parameters():
        p.requires_grad_(False)
    for p in model.expert_parameters(expert):
        p.requires_grad_(True)
    for p in model.router_parameters():
        p.requires_grad_(train_router)
        if train_router and freeze_rows:
            mask = _router_row_mask(p, expert, model.num_experts)
            if mask is None:
                p.requires_grad_(False)  # shared router layers (MLP hidden) stay as they are
            else:
                hooks.append(p.register_hook(lambda g, m=mask: g * m))
    return hooks


def _optimizer(model: Any, expert: int, config: ContinualConfig,
               phases: Sequence[tuple[str, int, float]]) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    """AdamW over the trainable parameters: the expert at the phase's rate, the router at ``router_lr``."""
    expert_params = [p for p in model.expert_parameters(expert) if p.requires_grad]
    router_params = [p for p in model.router_parameters() if p.requires_grad]
    groups = [{"params": expert_params, "lr": phases[0][2] if phases else 0.0, "phase_lr": True}]
    if router_params:
        groups.append({"params": router_params, "lr": config.router_lr, "phase_lr": False})
    return torch.optim.AdamW(groups, weight_decay=0.0), expert_params + router_params


def _skill_step(model: Any, optimizer: torch.optim.Optimizer, trainable: list[torch.nn.Parameter],
                inputs: dict[str, torch.Tensor], targets: torch.Tensor, config: ContinualConfig,
                forced: int | None, expert: int,
                extra_loss: Callable[[], torch.Tensor] | None = None) -> tuple[float, float]:
    """One optimizer step on the LM loss plus (router trained) the routing loss towards ``targets`` (plus
    ``extra_loss()``); returns ``(lm_loss, route_loss)``."""
    out = model(**inputs, forced_expert=forced, supervised_logits_only=True)
    loss = out.lm_loss if extra_loss is None else out.lm_loss + extra_loss()
    route = torch.zeros((), device=model.device)
    if forced is None and config.router_loss_coef > 0:
        route = routing_supervision(out.router_probs, targets, expert, out.decision_probs or (),
                                    inputs.get("attention_mask"))
        loss = loss + config.router_loss_coef * route
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    return float(out.lm_loss.detach()), float(route.detach())


def add_new_skill(model: DyLoRAMoEForCausalLM, examples: Sequence[Example | Mapping[str, Any]], tokenizer: Any,
                  name: str, config: ContinualConfig | None = None, progress: bool = True) -> bool:
    """The seed's API, ``model.add_new_skill(examples, tokenizer, name)``: learn skill ``name``; True if a new
    expert was created, False if the data matched a known skill (see :func:`learn_skill`)."""
    return learn_skill(model, tokenizer, examples, name, config, progress=progress).created


DyLoRAMoEForCausalLM.register_extension("add_new_skill", add_new_skill)
