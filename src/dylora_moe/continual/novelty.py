"""Novelty detection: is a new skill's data unlike every skill in the library?

``NoveltyDetector.decide(embedding, library)`` compares the new embedding ``[hidden]`` with each skill's by
cosine similarity; the data are novel when the maximum (``reduction="max"``, default) or the median
(``"median"``) similarity is below ``threshold`` (0.75 by default, the seed's value). Optionally the
router's entropy on the new data is a second criterion: a router that is unsure where to send the data
(mean entropy above ``entropy_threshold`` nats) also makes them novel. ``calibrate_threshold`` suggests a
threshold from held-out splits of known skills::

    detector = NoveltyDetector(threshold=0.75)
    decision = detector.decide(embed_examples(model, tok, new), library)
    decision.novel, decision.best_skill, decision.max_similarity
    suggestion = calibrate_threshold({"python": held_out_vec, ...}, library)
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .library import SkillLibrary

__all__ = ["NoveltyDecision", "NoveltyDetector", "ThresholdSuggestion", "calibrate_threshold", "similarities"]

REDUCTIONS = ("max", "median")


def similarities(embedding: torch.Tensor, library: SkillLibrary) -> list[float]:
    """Cosine similarity of ``embedding`` ``[hidden]`` with every skill of ``library`` (library order)."""
    if library.embeddings is None or len(library) == 0:
        return []
    vec = embedding.detach().float().cpu().reshape(1, -1)
    return torch.nn.functional.cosine_similarity(vec, library.embeddings, dim=-1).tolist()


@dataclass
class NoveltyDecision:
    """Why a skill is or is not novel. ``best_skill`` is the most similar known skill (None if none)."""

    novel: bool
    reason: str
    similarities: dict[str, float] = field(default_factory=dict)
    max_similarity: float | None = None
    median_similarity: float | None = None
    best_skill: str | None = None
    router_entropy: float | None = None
    threshold: float = 0.75
    reduction: str = "max"


@dataclass
class NoveltyDetector:
    """Cosine-similarity novelty test against a :class:`SkillLibrary` (see the module docstring)."""

    threshold: float = 0.75
    reduction: str = "max"
    entropy_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold}")
        if self.entropy_threshold is not None and self.entropy_threshold < 0:
            raise ValueError(f"entropy_threshold must be >= 0 nats, got {self.entropy_threshold}")

    def decide(self, embedding: torch.Tensor, library: SkillLibrary,
               router_entropy: float | None = None) -> NoveltyDecision:
        sims = similarities(embedding, library)
        if not sims:
            return NoveltyDecision(True, "the library is empty", threshold=self.threshold, reduction=self.reduction,
                                   router_entropy=router_entropy)
        by_name = dict(zip(library.names, sims))
        best = max(by_name, key=by_name.get)
        top, median = max(sims), statistics.median(sims)
        score = top if self.reduction == "max" else median
        novel = score < self.threshold
        reason = (f"{self.reduction} similarity {score:.3f} {'<' if novel else '>='} threshold {self.threshold:g} "
                  f"(closest skill {best!r}: {top:.3f})")
        if not novel and self.entropy_threshold is not None and router_entropy is not None \
                and router_entropy > self.entropy_threshold:
            novel = True
            reason += f"; but router entropy {router_entropy:.3f} > {self.entropy_threshold:g} nats"
        return NoveltyDecision(novel, reason, by_name, top, median, best, router_entropy, self.threshold,
                               self.reduction)


@dataclass
class ThresholdSuggestion:
    """``threshold``: midway between the least similar held-out split of a known skill (to its own skill)
    and the most similar other skill; ``separable`` is False when those ranges overlap."""

    threshold: float
    min_same: float
    max_other: float
    separable: bool
    same: dict[str, float]
    other: dict[str, float]


def calibrate_threshold(held_out: Mapping[str, torch.Tensor], library: SkillLibrary) -> ThresholdSuggestion:
    """Suggest a threshold from embeddings of held-out splits of known skills (name -> ``[hidden]``).

    Each held-out split should look known (similar to its own skill) while every other skill should look
    novel to it, so the threshold goes midway between the lowest own-skill similarity and the highest
    similarity to another skill. Needs at least two skills.
    """
    if len(library) < 2:
        raise ValueError("calibrating a threshold needs a library of at least two skills")
    same, other = {}, {}
    for name, vec in held_out.items():
        if name not in library.names:
            raise KeyError(f"held-out split {name!r} is not a skill of the library (skills: {library.names})")
        sims = dict(zip(library.names, similarities(vec, library)))
        same[name] = sims.pop(name)
        best_other = max(sims, key=sims.get)
        other[f"{name}->{best_other}"] = sims[best_other]
    if not same:
        raise ValueError("no held-out splits given")
    lo, hi = min(same.values()), max(other.values())
    return ThresholdSuggestion((lo + hi) / 2, lo, hi, lo > hi, same, other)
