"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

With ``n`` samples per problem of which ``c`` pass, the probability that at least one of ``k`` samples
drawn without replacement passes is ``1 - C(n-c, k) / C(n, k)``. It is computed here with exact integer
binomials and one correctly rounded division, so it neither overflows nor loses precision for large
``n`` or tiny values (the usual product form ``1 - prod(1 - k / i)`` is equivalent)::

    from dylora_moe.evaluation.passk import mean_pass_at_k, pass_at_k

    pass_at_k(n=10, c=3, k=1)                     # 0.3
    pass_at_k(n=10, c=3, k=8)                     # 1.0  (n - c < k: every draw of 8 holds a pass)
    mean_pass_at_k([(10, 3), (10, 0)], k=1)       # 0.15, the benchmark score
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fractions import Fraction
from math import comb

__all__ = ["mean_pass_at_k", "pass_at_k", "pass_at_k_table"]


def _check(n: int, c: int, k: int) -> None:
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"pass@k: {name} must be an integer, got {value!r}")
    if n < 1:
        raise ValueError(f"pass@k: n must be >= 1 sample, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: the number of passing samples c={c} must be in [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k: k={k} must be in [1, n={n}] (pass@k needs at least k samples per problem)")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples, ``c`` of them passing (``1 <= k <= n``)."""
    _check(n, c, k)
    if n - c < k:  # every subset of k samples contains a passing one
        return 1.0
    total = comb(n, k)
    return float(Fraction(total - comb(n - c, k), total))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """The benchmark score: mean of :func:`pass_at_k` over problems given as ``(n, c)`` pairs."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    if not values:
        raise ValueError("pass@k: no problems")
    return sum(values) / len(values)


def pass_at_k_table(counts: Sequence[tuple[int, int]], ks: Iterable[int]) -> dict[str, float | None]:
    """``{"pass@k": score}`` for every ``k``; ``None`` where some problem has fewer than ``k`` samples."""
    table: dict[str, float | None] = {}
    for k in ks:
        feasible = bool(counts) and all(n >= k for n, _ in counts)
        table[f"pass@{k}"] = mean_pass_at_k(counts, k) if feasible else None
    return table
