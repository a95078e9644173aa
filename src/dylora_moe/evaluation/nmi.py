"""Normalised mutual information between two labelings (domains and experts), and how sure a value is.

torch-free (the study's report uses it)::

    normalized_mutual_information(["sql", "sql", "py"], [0, 0, 1])          # 1.0
    nmi_from_joint([[74, 3, 7, 0], [26, 53, 20, 1]])                        # a domain x expert count table
    nmi_interval([[74, 3, 7, 0], [26, 53, 20, 1]])                          # (low, high), 95% bootstrap
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

__all__ = ["entropy", "nmi_from_joint", "nmi_interval", "normalized_mutual_information"]


def entropy(probs: Sequence[float]) -> float:
    """Shannon entropy (nats) of a distribution; zero entries contribute nothing."""
    return -sum(p * math.log(p) for p in probs if p > 0)


def normalized_mutual_information(labels_a: Sequence[Any], labels_b: Sequence[Any]) -> float:
    """NMI of two labelings of the same items, ``I(A;B) / ((H(A) + H(B)) / 2)``, in [0, 1].

    1 when each labeling determines the other (e.g. every domain routed to its own expert), 0 when they
    are independent. When one labeling is constant the information is 0, so NMI is 0, unless both are
    constant (identical one-cluster partitions): then 1, as in scikit-learn.
    """
    if len(labels_a) != len(labels_b):
        raise ValueError(f"NMI: labelings have different lengths ({len(labels_a)} and {len(labels_b)})")
    if not labels_a:
        raise ValueError("NMI: no items")
    rows, cols = sorted(set(labels_a), key=repr), sorted(set(labels_b), key=repr)
    joint = [[0.0] * len(cols) for _ in rows]
    row_of, col_of = {a: i for i, a in enumerate(rows)}, {b: j for j, b in enumerate(cols)}
    for a, b in zip(labels_a, labels_b):
        joint[row_of[a]][col_of[b]] += 1
    return nmi_from_joint(joint)


def nmi_from_joint(joint: Sequence[Sequence[float]]) -> float:
    """NMI of a joint table of non-negative weights ``[A][B]`` (counts or probabilities), as
    :func:`normalized_mutual_information`; e.g. domains x experts weighted by routing decisions."""
    total = float(sum(sum(row) for row in joint))
    if not joint or total <= 0 or any(w < 0 for row in joint for w in row):
        raise ValueError("NMI: the joint table needs non-negative weights with a positive sum")
    p_a = [sum(row) / total for row in joint]
    p_b = [sum(row[j] for row in joint) / total for j in range(len(joint[0]))]
    h_a, h_b = entropy(p_a), entropy(p_b)
    if h_a == 0 and h_b == 0:
        return 1.0
    if h_a == 0 or h_b == 0:
        return 0.0
    mutual = sum(w / total * math.log(w / total / (p_a[i] * p_b[j]))
                 for i, row in enumerate(joint) for j, w in enumerate(row) if w > 0)
    return max(0.0, min(1.0, mutual / ((h_a + h_b) / 2)))


def nmi_interval(counts: Sequence[Sequence[int]], *, resamples: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """The ``level`` percentile bootstrap interval of :func:`nmi_from_joint` of a domain x expert table of example
    counts ``[D][E]``: each resample draws every domain's examples again (as many, with replacement, from that
    domain's own row), so the domains keep their sizes and only which examples were held out varies. Fixed
    ``seed``: the same table gives the same interval."""
    rows = [[int(c) for c in row] for row in counts]
    if not rows or any(c < 0 for row in rows for c in row) or any(sum(row) == 0 for row in rows):
        raise ValueError(f"nmi_interval: every domain needs a row of non-negative counts with a positive sum, got "
                         f"{[list(r) for r in counts]}")
    if resamples < 2 or not 0 < level < 1:
        raise ValueError(f"nmi_interval: resamples >= 2 and level in (0, 1), got {resamples} and {level}")
    rng = random.Random(seed)
    experts = range(len(rows[0]))
    values = []
    for _ in range(resamples):
        joint: list[list[float]] = []
        for row in rows:
            drawn = [0.0] * len(row)
            for e in rng.choices(experts, weights=row, k=sum(row)):
                drawn[e] += 1
            joint.append(drawn)
        values.append(nmi_from_joint(joint))
    values.sort()
    tail = (1 - level) / 2
    return values[int(tail * (resamples - 1))], values[math.ceil((1 - tail) * (resamples - 1))]
