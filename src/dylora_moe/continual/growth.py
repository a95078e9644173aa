"""Expert growth for joint training (``train.allow_expert_growth``): one expert per novel training domain.

Each domain is embedded (``embed_examples``) and compared with the domains seen before by the novelty
detector; a novel one claims the next expert (adding one when the pool is exhausted), a known one shares the
expert of the skill it matched. The result is the model's skill library (saved with its checkpoints)::

    library = grow_experts_for_domains(model, tokenizer, {"code_alpaca": examples, ...}, threshold=0.75)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..data import Example
from ..model import DyLoRAMoEForCausalLM
from . import extension  # noqa: F401  (model.skill_library)
from .library import SkillLibrary, embed_examples
from .novelty import NoveltyDetector

__all__ = ["grow_experts_for_domains"]


def grow_experts_for_domains(model: DyLoRAMoEForCausalLM, tokenizer: Any, domains: Mapping[str, Sequence[Example]],
                             *, threshold: float, examples_per_domain: int = 64, max_seq_length: int = 512,
                             log: Callable[[str], None] = print) -> SkillLibrary:
    """Give every novel domain an expert of its own (see the module docstring); all experts end mature."""
    library, detector, claimed = SkillLibrary(), NoveltyDetector(threshold), 0
    for domain, examples in domains.items():
        vec = embed_examples(model, tokenizer, list(examples)[:examples_per_domain], max_seq_length=max_seq_length)
        decision = detector.decide(vec, library)
        if decision.novel:
            expert = claimed if claimed < model.num_experts else model.add_expert()
            claimed += 1
            library.add(domain, vec, expert, len(examples))
            log(f"growth: domain {domain!r} is novel ({decision.reason}): expert {expert}")
        else:
            library.update(decision.best_skill, vec, len(examples))
            log(f"growth: domain {domain!r} is not novel ({decision.reason}): shares "
                f"expert {library.get(decision.best_skill).expert}")
    model.set_all_mature()
    model.skill_library = library
    return library
