"""What joint training leaves for continual learning: the training domains as skills of the skill library.

* :func:`grow_experts_for_domains` (``train.allow_expert_growth``), before training: every domain is embedded
  (``embed_examples``) and compared with the domains seen before by the novelty detector; a novel one claims
  the next expert (adding one when the pool is exhausted), a known one shares the expert of the skill it
  matched.
* :func:`domains_as_skills` (``train.register_skills``, the default), after training: every domain becomes a
  skill whose routing is *kept* (the router spread it over the experts; later skills must leave that as it
  is), with its embedding and a replay buffer, so that ``learn-skill`` on the checkpoint protects it.

Either way the result is the model's skill library, saved with its checkpoints::

    library = grow_experts_for_domains(model, tokenizer, {"code_alpaca": examples, ...}, threshold=0.75)
    library = domains_as_skills(model, tokenizer, {"code_alpaca": examples, ...}, {"code_alpaca": share, ...})
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..data import Example
from ..model import DyLoRAMoEForCausalLM
from . import extension  # noqa: F401  (model.skill_library)
from .library import SkillLibrary, embedding_and_spread
from .novelty import NoveltyDetector

__all__ = ["domains_as_skills", "grow_experts_for_domains"]


def grow_experts_for_domains(model: DyLoRAMoEForCausalLM, tokenizer: Any, domains: Mapping[str, Sequence[Example]],
                             *, threshold: float, examples_per_domain: int = 64, max_seq_length: int = 512,
                             log: Callable[[str], None] = print) -> SkillLibrary:
    """Give every novel domain an expert of its own (see the module docstring); all experts end mature."""
    library, detector, claimed = SkillLibrary(), NoveltyDetector(threshold, similarity="raw"), 0
    for domain, examples in domains.items():
        vec, spread = embedding_and_spread(model, tokenizer, examples, limit=examples_per_domain,
                                           max_seq_length=max_seq_length)
        decision = detector.decide(vec, library)
        if decision.novel:
            expert = claimed if claimed < model.num_experts else model.add_expert()
            claimed += 1
            library.add(domain, vec, expert, len(examples), spread=spread)
            log(f"growth: domain {domain!r} is novel ({decision.reason}): expert {expert}")
        else:
            library.update(decision.best_skill, vec, len(examples), spread=spread)
            log(f"growth: domain {domain!r} is not novel ({decision.reason}): shares "
                f"expert {library.get(decision.best_skill).expert}")
    model.set_all_mature()
    model.skill_library = library
    return library


def domains_as_skills(model: DyLoRAMoEForCausalLM, tokenizer: Any, domains: Mapping[str, Sequence[Example]],
                      shares: Mapping[str, Sequence[float]], *, examples_per_domain: int = 64,
                      replay_per_skill: int = 32, max_seq_length: int = 512, seed: int = 0) -> SkillLibrary:
    """The training domains as 'kept' skills (see the module docstring): each with its embedding, the expert of
    its largest held-out share (``shares[domain]``, one value per expert) and ``replay_per_skill`` of its
    examples, drawn with ``seed``."""
    library, rng = SkillLibrary(), random.Random(seed)
    for domain, examples in domains.items():
        examples = list(examples)
        vec, spread = embedding_and_spread(model, tokenizer, examples, limit=examples_per_domain, seed=seed,
                                           max_seq_length=max_seq_length)
        share = list(shares.get(domain, [])) or [1.0]
        replay = rng.sample(examples, min(replay_per_skill, len(examples)))
        library.add(domain, vec, max(range(len(share)), key=share.__getitem__), len(examples), replay=replay,
                    routing="kept", spread=spread)
    model.skill_library = library
    return library
