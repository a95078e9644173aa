"""Continual learning: learn new skills later without forgetting old ones.

* :mod:`.library`: the skill library (one embedding and expert per skill, replay examples), saved with
  the checkpoint; :func:`embed_examples`.
* :mod:`.novelty`: the novelty detector (cosine similarity against the library, optional router
  entropy) and threshold calibration.
* :mod:`.learner`: the lifecycle of one skill (detect, grow or reuse an expert, two-phase training with
  router protection, maturity, library update): :func:`learn_skill`.
* :mod:`.benchmark`: a sequence of skills with the forgetting matrix against a sequential LoRA baseline.
* :mod:`.skills`: skill data (Code Alpaca split by language, instruction files).
"""

from .config import ContinualConfig
from .library import Skill, SkillLibrary, embed_examples
from .novelty import NoveltyDecision, NoveltyDetector, ThresholdSuggestion, calibrate_threshold
from .skills import code_alpaca_language, load_skill_examples

__all__ = [
    "ContinualConfig",
    "NoveltyDecision",
    "NoveltyDetector",
    "Skill",
    "SkillLibrary",
    "ThresholdSuggestion",
    "calibrate_threshold",
    "code_alpaca_language",
    "embed_examples",
    "load_skill_examples",
]
