"""The metrics of continual instruction tuning, from a stage x skill matrix (pure functions, torch-free).

A run learns skills ``0..T-1`` in order; ``matrix[i][j]`` is skill ``j``'s held-out score after stage ``i``
(a row per stage, skills in the order they are learned), ``before[j]`` its score before any training. For a
*loss* (lower is better) the metrics are relative, so that "-1%" means the same on every skill:

* ``ap`` (average performance): ``mean_j matrix[T-1][j]``, every skill after the last stage;
* ``bwt`` (backward transfer): ``mean_{j<T-1} (matrix[j][j] - matrix[T-1][j]) / matrix[j][j]``; negative
  is forgetting (-0.01: earlier skills' losses rose 1% on average since their own stage);
* ``ft`` (forgetting): ``mean_{j<T-1} (matrix[T-1][j] - best_j) / best_j``, ``best_j`` the lowest loss of
  skill ``j`` from its own stage to the one before last; positive is forgetting;
* ``fwt`` (forward transfer): ``mean_{j>0} (before[j] - matrix[j-1][j]) / before[j]``: how much the
  earlier stages lowered a skill's loss before it was trained (positive helps);
* ``max_forgetting``: the largest relative rise of an earlier skill over any later stage.

For an *accuracy* (higher is better, e.g. exact match) the same names are absolute differences with the
signs of the literature (TRACE, O-LoRA): ``bwt = mean (acc[T-1][j] - acc[j][j])``, ``ft = mean (best_j -
acc[T-1][j])``, ``fwt = mean (acc[j-1][j] - before[j])``::

    continual_metrics([[1.0, 5.0], [1.1, 2.0]], before=[4.0, 6.0])   # ap 1.55, bwt -0.10, fwt 1/6 ...
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["continual_metrics", "forgetting_metrics", "routing_accuracy"]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def continual_metrics(matrix: Sequence[Sequence[float]], before: Sequence[float] | None = None,
                      higher_is_better: bool = False) -> dict[str, float | None]:
    """``ap``, ``bwt``, ``ft``, ``fwt`` and ``max_forgetting`` of ``matrix`` (see the module docstring);
    the ones a single stage (or no ``before``) cannot define are None."""
    rows = [list(r) for r in matrix]
    if not rows or any(len(r) != len(rows[0]) for r in rows) or len(rows) > len(rows[0]):
        raise ValueError(f"need one row per stage with a score per skill (at least as many skills as stages); "
                         f"got rows of lengths {[len(r) for r in rows]}")
    last = len(rows) - 1
    final = rows[last]
    earlier = range(last)
    if higher_is_better:
        bwt = _mean([final[j] - rows[j][j] for j in earlier])
        ft = _mean([max(rows[i][j] for i in range(j, last)) - final[j] for j in earlier])
        fwt = _mean([rows[j - 1][j] - before[j] for j in range(1, last + 1)]) if before is not None else None
        drops = [rows[j][j] - rows[i][j] for j in earlier for i in range(j + 1, last + 1)]
    else:
        bwt = _mean([(rows[j][j] - final[j]) / rows[j][j] for j in earlier])
        ft = _mean([(final[j] - min(rows[i][j] for i in range(j, last))) / min(rows[i][j] for i in range(j, last))
                    for j in earlier])
        fwt = (_mean([(before[j] - rows[j - 1][j]) / before[j] for j in range(1, last + 1)])
               if before is not None else None)
        drops = [(rows[i][j] - rows[j][j]) / rows[j][j] for j in earlier for i in range(j + 1, last + 1)]
    return {"ap": _mean(final[: last + 1]), "bwt": bwt, "ft": ft, "fwt": fwt,
            "max_forgetting": max(drops) if drops else None}


def forgetting_metrics(matrix: Sequence[Sequence[float]]) -> dict[str, float | None]:
    """``max_forgetting``, ``average_forgetting`` (relative loss rises from each skill's own stage to the end)
    and ``backward_transfer`` (absolute: ``mean (loss[j][j] - loss[last][j])``), of a loss matrix."""
    last = len(matrix) - 1
    if last < 1:
        return {"max_forgetting": None, "average_forgetting": None, "backward_transfer": None}
    rises = [(matrix[i][j] - matrix[j][j]) / matrix[j][j] for j in range(last) for i in range(j + 1, last + 1)]
    final = [(matrix[last][j] - matrix[j][j]) / matrix[j][j] for j in range(last)]
    return {"max_forgetting": max(rises), "average_forgetting": sum(final) / len(final),
            "backward_transfer": sum(matrix[j][j] - matrix[last][j] for j in range(last)) / last}


def routing_accuracy(shares: Mapping[str, Sequence[float]], expert_of: Mapping[str, int]) -> dict[str, float]:
    """Per skill, the share of its held-out routed units (``shares[skill]``: one value per expert) that went to
    its own expert (``expert_of[skill]``), and their mean under ``"mean"``."""
    accuracy = {skill: float(shares[skill][expert_of[skill]]) for skill in expert_of if skill in shares}
    if accuracy:
        accuracy["mean"] = sum(accuracy.values()) / len(accuracy)
    return accuracy
