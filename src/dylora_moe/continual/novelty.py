"""Novelty detection: is a new skill's data unlike every skill in the library?

``NoveltyDetector.decide(embedding, library)`` compares the new embedding ``[hidden]`` with each skill's; the
data are novel when the maximum (``reduction="max"``, default) or the median (``"median"``) similarity is below
``threshold``. Two similarities: ``"standardized"`` (the default), the distance between the means in units of
the examples' spread, corrected for the sample sizes, whose default threshold 0.8 was calibrated once and
does not depend on the model's hidden-state scale; and ``"raw"``, the seed's cosine of the means (its default
threshold 0.75, the seed's value, flags nothing on SmolLM2: docs/continual.md). Optionally the
router's entropy on the new data is a second criterion: a router that is unsure where to send the data
(mean entropy above ``entropy_threshold`` nats) also makes them novel. ``calibrate_threshold`` suggests a
threshold from held-out splits of known skills::

    detector = NoveltyDetector()                          # standardized, threshold 0.8
    embedding, spread = embedding_and_spread(model, tok, new)
    decision = detector.decide(embedding, library, spread=spread, count=len(new))
    decision.novel, decision.best_skill, decision.max_similarity
    suggestion = calibrate_threshold({"python": held_out_vec, ...}, library)
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .config import DEFAULT_THRESHOLDS
from .library import SkillLibrary

__all__ = ["SIMILARITIES", "NoveltyDecision", "NoveltyDetector", "ThresholdSuggestion", "calibrate_threshold",
           "similarities"]

REDUCTIONS = ("max", "median")
#: 'raw': the seed's cosine of mean states; 'standardized': exp(-z^2), z^2 the mean over hidden dimensions of
#: the squared difference of the means in units of the examples' spread (a per-dimension effect size)
SIMILARITIES = ("raw", "standardized")


def similarities(embedding: torch.Tensor, library: SkillLibrary, *, kind: str = "raw",
                 spread: torch.Tensor | None = None, count: int | None = None) -> list[float]:
    """Similarity of ``embedding`` ``[hidden]`` with every skill of ``library`` (library order).

    ``kind='raw'``: cosine similarity. ``kind='standardized'``: ``exp(-z^2)`` with ``z^2 = mean_d (e_d -
    s_d)^2 / v_d``, ``v`` the mean of the skill's and the new data's per-dimension variances over their
    examples (``library.spreads`` and ``spread``, standard deviations ``[hidden]``): 1 for the same mean, and
    a scale set by how much single examples vary, not by the model's hidden-state geometry, so one threshold
    serves several models (benchmarks/novelty_calibration.py).

    Two means of samples of one distribution differ by chance: ``E[z^2] = 1/n + 1/m`` for ``n`` new examples
    (``count``) and the ``m`` of the skill (``Skill.examples``). That expectation is subtracted (``z^2`` floored
    at 0), so a known skill scores near 1 whether it is asked about with 8 examples or 256; without ``count``
    only the skill's part is subtracted."""
    if kind not in SIMILARITIES:
        raise ValueError(f"similarity kind must be one of {SIMILARITIES}, got {kind!r}")
    if library.embeddings is None or len(library) == 0:
        return []
    vec = embedding.detach().float().cpu().reshape(1, -1)
    if kind == "raw":
        return torch.nn.functional.cosine_similarity(vec, library.embeddings, dim=-1).tolist()
    spreads = library.spreads
    unknown = [True] * len(library) if spreads is None else torch.isnan(spreads).all(-1).tolist()
    if spreads is None or any(unknown):
        missing = [name for name, gone in zip(library.names, unknown) if gone]
        raise ValueError(f"the standardized similarity needs every skill's spread; skills without one (learned "
                         f"before spreads were kept, or from one example): {missing}; use similarity='raw' or "
                         "re-learn them")
    variance = spreads.pow(2)
    if spread is not None and not bool(torch.isnan(spread).any()):  # a single new example has no spread
        variance = (variance + spread.detach().float().cpu().reshape(1, -1).pow(2)) / 2
    z2 = ((vec - library.embeddings).pow(2) / variance.clamp_min(1e-12)).mean(-1)
    chance = torch.tensor([1.0 / s.examples if s.examples > 0 else 0.0 for s in library.skills])
    if count is not None and count > 0:
        chance = chance + 1.0 / count
    return torch.exp(-(z2 - chance).clamp_min(0)).tolist()


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
    threshold: float = DEFAULT_THRESHOLDS["standardized"]
    reduction: str = "max"
    similarity: str = "standardized"


@dataclass
class NoveltyDetector:
    """Similarity novelty test against a :class:`SkillLibrary` (see the module docstring); ``threshold=None``
    takes the similarity's :data:`DEFAULT_THRESHOLDS`."""

    threshold: float | None = None
    reduction: str = "max"
    entropy_threshold: float | None = None
    similarity: str = "standardized"

    def __post_init__(self) -> None:
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.threshold is None:
            self.threshold = DEFAULT_THRESHOLDS[self.similarity]
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold}")
        if self.entropy_threshold is not None and self.entropy_threshold < 0:
            raise ValueError(f"entropy_threshold must be >= 0 nats, got {self.entropy_threshold}")

    def decide(self, embedding: torch.Tensor, library: SkillLibrary, router_entropy: float | None = None,
               spread: torch.Tensor | None = None, count: int | None = None) -> NoveltyDecision:
        """``embedding [hidden]`` of the new data (``spread [hidden]``: its per-dimension standard deviation over
        the ``count`` examples it was pooled from, for the standardized similarity)."""
        sims = similarities(embedding, library, kind=self.similarity, spread=spread, count=count)
        assert self.threshold is not None  # set in __post_init__
        if not sims:
            return NoveltyDecision(True, "the library is empty", threshold=self.threshold, reduction=self.reduction,
                                   router_entropy=router_entropy, similarity=self.similarity)
        by_name = dict(zip(library.names, sims))
        best = max(by_name, key=by_name.get)
        top, median = max(sims), statistics.median(sims)
        score = top if self.reduction == "max" else median
        novel = score < self.threshold
        reason = (f"{self.reduction} {self.similarity} similarity {score:.3f} {'<' if novel else '>='} threshold "
                  f"{self.threshold:g} (closest skill {best!r}: {top:.3f})")
        if not novel and self.entropy_threshold is not None and router_entropy is not None \
                and router_entropy > self.entropy_threshold:
            novel = True
            reason += f"; but router entropy {router_entropy:.3f} > {self.entropy_threshold:g} nats"
        return NoveltyDecision(novel, reason, by_name, top, median, best, router_entropy, self.threshold,
                               self.reduction, self.similarity)


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
