"""The methods DyLoRA-MoE's continual learning is measured against (study/continual_benchmark.py), on one
footing.

Every method trains with :func:`dylora_moe.continual.learner.train_expert`: the same phases (seeding at
``seed_lr``, then consolidation on a cosine from ``consolidate_lr``), batch size, sequence length, data order
and seed; every
LoRA is a one-expert :class:`~dylora_moe.model.DyLoRAMoEForCausalLM` (the same adapter code as the mixture).

* :func:`run_sequential_lora`: one LoRA of rank ``rank`` fine-tuned on the stages in turn; with
  ``replay=True`` every batch also holds examples of the earlier stages (``replay_per_skill`` kept per skill,
  ``replay_fraction`` of each batch: the buffer DyLoRA-MoE keeps).
* :func:`run_olora`: O-LoRA (Wang et al., 2023), our implementation. Stage ``t`` trains a new rank-``rank``
  LoRA while the earlier ones stay frozen, with the loss ``olora_lambda * sum ||A_t A_s^T||_F^2`` over the
  earlier stages ``s`` and every adapted module keeping its subspace orthogonal to theirs; at inference all
  are summed, with no task identity. The LoRAs are rank blocks of one expert of rank ``rank x T``: block
  ``t``'s gradients are the only ones kept, so the others do not move (AdamW without weight decay).
* :func:`run_multitask_lora` (bound): one LoRA of ``multitask_rank`` on every skill at once, for as many steps
  as all stages together.
* :func:`run_oracle` (bound): one LoRA per skill on that skill alone, each evaluated on its own skill.

Each takes ``evaluate(model) -> {skill: {"loss": ..., "exact_match": ...}}`` and returns a JSON-ready dict.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..common.devices import resolve_device
from ..config import DyLoRAMoEConfig
from ..continual.config import ContinualConfig, ContinualRunConfig
from ..continual.learner import train_expert
from ..continual.library import SkillLibrary
from ..data import Example
from ..loading import load_base_model
from ..model import DyLoRAMoEForCausalLM

__all__ = ["lora_model", "olora_penalty", "run_multitask_lora", "run_olora", "run_oracle", "run_sequential_lora"]

Evaluate = Callable[[Any], dict[str, dict[str, float]]]


def lora_model(run: ContinualRunConfig, rank: int, *, num_experts: int = 1, mature: bool = True
               ) -> tuple[DyLoRAMoEForCausalLM, Any]:
    """A fresh model on ``run.model``: ``num_experts`` experts of ``rank`` with alpha ``alpha_ratio x rank``.
    Sequence routing at temperature 2 with the probability gate: a skill (one request) goes to one expert, as
    docs/continual.md measured."""
    base, tokenizer = load_base_model(run.model, device=resolve_device(run.device))
    cfg = DyLoRAMoEConfig(num_experts=num_experts, r=rank, alpha=run.continual.alpha_ratio * rank,
                          routing="sequence", temperature=2.0, gate="probability", init_seed=run.continual.seed)
    return DyLoRAMoEForCausalLM(base, cfg, mature=mature, base_name_or_path=run.model), tokenizer


def _phases(config: ContinualConfig, times: int = 1) -> list[tuple[str, int, float]]:
    return [("seed", config.seed_steps * times, config.seed_lr),
            ("consolidate", config.consolidate_steps * times, config.consolidate_lr)]


def run_sequential_lora(run: ContinualRunConfig, train: Sequence[list[Example]], names: Sequence[str],
                        evaluate: Evaluate, *, replay: bool = False, progress: bool = True) -> dict[str, Any]:
    """One LoRA trained on ``train[0]``, then ``train[1]``, ...; ``loss[i]``: every skill after stage ``i``."""
    config = run.continual
    model, tokenizer = lora_model(run, run.rank)
    buffer, rng, rows = SkillLibrary(), random.Random(config.seed), []
    for name, examples in zip(names, train):
        train_expert(model, tokenizer, examples, 0, buffer, config, phases=_phases(config), fine_tune=True,
                     replay=replay and len(buffer) > 0, progress=progress)
        rows.append(evaluate(model))
        if replay:  # a replay buffer only: the embedding is not used
            kept = rng.sample(list(examples), min(config.replay_per_skill, len(examples)))
            buffer.add(name, torch.zeros(1), 0, len(examples), replay=kept)
        print(f"[{'replay' if replay else 'sequential'} LoRA] after {name}: "
              f"{ {k: round(v['loss'], 4) for k, v in rows[-1].items()} }", flush=True)
    return {"rows": rows}


def olora_penalty(model: DyLoRAMoEForCausalLM, block: int, rank: int) -> torch.Tensor:
    """``sum over adapted modules and earlier blocks s of ||A_block A_s^T||_F^2`` (expert 0's A split into
    rank-``rank`` blocks); 0 for the first block."""
    total = torch.zeros((), device=model.device)
    if block == 0:
        return total
    for layer in model.expert_layers:
        a = layer.lora_A[0]
        current, earlier = a[block * rank:(block + 1) * rank], a[: block * rank].detach()
        total = total + (current @ earlier.T).pow(2).sum()
    return total


def _keep_only_block(model: DyLoRAMoEForCausalLM, block: int, rank: int) -> list[Any]:
    """Gradient hooks that zero every rank block of expert 0 but ``block`` (rows of A, columns of B)."""
    hooks = []
    for layer in model.expert_layers:
        for param, dim in ((layer.lora_A[0], 0), (layer.lora_B[0], 1)):
            mask = torch.zeros_like(param)
            mask.narrow(dim, block * rank, rank).fill_(1)
            hooks.append(param.register_hook(lambda g, m=mask: g * m))
    return hooks


def run_olora(run: ContinualRunConfig, train: Sequence[list[Example]], names: Sequence[str], evaluate: Evaluate,
              *, progress: bool = True) -> dict[str, Any]:
    """O-LoRA (see the module docstring); also records each stage's final orthogonality loss."""
    config, rank = run.continual, run.rank
    model, tokenizer = lora_model(run, rank * len(train))  # scale alpha/r = alpha_ratio, as each block's own
    rows, penalties = [], []
    for t, (name, examples) in enumerate(zip(names, train)):
        hooks = _keep_only_block(model, t, rank)
        try:
            train_expert(model, tokenizer, examples, 0, SkillLibrary(), config, phases=_phases(config),
                         fine_tune=True, progress=progress,
                         extra_loss=(lambda t=t: run.olora_lambda * olora_penalty(model, t, rank)) if t else None)
        finally:
            for hook in hooks:
                hook.remove()
        with torch.no_grad():
            penalties.append(float(olora_penalty(model, t, rank)))
        rows.append(evaluate(model))
        print(f"[O-LoRA] after {name}: { {k: round(v['loss'], 4) for k, v in rows[-1].items()} }; "
              f"orthogonality {penalties[-1]:.3g}", flush=True)
    return {"rows": rows, "orthogonality": penalties}


def run_multitask_lora(run: ContinualRunConfig, train: Sequence[list[Example]], evaluate: Evaluate, *,
                       progress: bool = True) -> dict[str, Any]:
    """One LoRA on the union of every stage's examples, ``len(train)`` times a stage's steps."""
    config = run.continual
    rank = run.multitask_rank or run.rank * len(train)
    model, tokenizer = lora_model(run, rank)
    union = [e for examples in train for e in examples]
    random.Random(config.seed).shuffle(union)
    train_expert(model, tokenizer, union, 0, SkillLibrary(), config, phases=_phases(config, len(train)),
                 fine_tune=True, progress=progress)
    final = evaluate(model)
    print(f"[multi-task LoRA r={rank}] { {k: round(v['loss'], 4) for k, v in final.items()} }", flush=True)
    return {"final": final, "rank": rank}


def run_oracle(run: ContinualRunConfig, train: Sequence[list[Example]], names: Sequence[str],
               evaluate_one: Callable[[Any, str], dict[str, float]], *, progress: bool = True) -> dict[str, Any]:
    """One LoRA per skill, trained on it alone and evaluated on it alone (``evaluate_one(model, skill)``)."""
    config, final = run.continual, {}
    for name, examples in zip(names, train):
        model, tokenizer = lora_model(run, run.rank)
        train_expert(model, tokenizer, examples, 0, SkillLibrary(), config, phases=_phases(config),
                     fine_tune=True, progress=progress)
        final[name] = evaluate_one(model, name)
        print(f"[oracle LoRA] {name}: {final[name]}", flush=True)
        del model
    return {"final": final}
