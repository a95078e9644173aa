"""Continual learning: learn new skills later without forgetting old ones.

* :mod:`.library`: the skill library (one embedding and expert per skill, replay examples), saved with
  the checkpoint; :func:`embed_examples`.
* :mod:`.novelty`: the novelty detector (standardized or raw similarity against the library, optional
  router entropy) and threshold calibration.
* :mod:`.learner`: the lifecycle of one skill (detect, grow or reuse an expert, two-phase training with
  router protection, maturity, library update): :func:`learn_skill`.
* :mod:`.metrics`: AP, BWT, FT, FWT and routing accuracy of a skill x stage matrix; the benchmark that
  measures them is :mod:`dylora_moe.study.continual_benchmark`.
* :mod:`.skills`: skill data (Code Alpaca split by language, instruction files).

The torch-using names are imported on first use (:mod:`dylora_moe.lazy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports
from .config import ContinualConfig

_LAZY = {"Skill": ".library", "SkillLibrary": ".library", "embed_examples": ".library",
         "NoveltyDecision": ".novelty", "NoveltyDetector": ".novelty", "ThresholdSuggestion": ".novelty",
         "calibrate_threshold": ".novelty", "code_alpaca_language": ".skills", "load_skill_examples": ".skills"}

if TYPE_CHECKING:
    from .library import Skill, SkillLibrary, embed_examples
    from .novelty import NoveltyDecision, NoveltyDetector, ThresholdSuggestion, calibrate_threshold
    from .skills import code_alpaca_language, load_skill_examples

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

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
