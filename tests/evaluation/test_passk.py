"""The unbiased pass@k estimator: closed forms, edge cases, numerical stability."""

from __future__ import annotations

import math

import pytest

from dylora_moe.evaluation.passk import mean_pass_at_k, pass_at_k, pass_at_k_table


@pytest.mark.parametrize("n,c", [(1, 0), (1, 1), (10, 3), (20, 7), (200, 199)])
def test_pass_at_1_is_the_pass_rate(n, c):
    assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=0, rel=1e-15)


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 2, 1 - 3 / 10),               # 1 - C(3,2)/C(5,2)
    (10, 3, 5, 1 - 21 / 252),            # 1 - C(7,5)/C(10,5)
    (4, 1, 3, 1 - 1 / 4),                # 1 - C(3,3)/C(4,3)
    (6, 0, 3, 0.0),
    (6, 6, 3, 1.0),
])
def test_closed_forms(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-15, abs=1e-15)


@pytest.mark.parametrize("n,c,k", [(10, 3, 8), (10, 3, 10), (5, 1, 5), (2, 1, 2)])
def test_k_greater_than_n_minus_c_is_certain(n, c, k):
    assert pass_at_k(n, c, k) == 1.0


def test_matches_the_product_form_and_stays_exact_for_large_n():
    for n, c, k in [(200, 5, 100), (200, 13, 10), (1000, 1, 1), (10_000, 1, 10)]:
        product = 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
        assert pass_at_k(n, c, k) == pytest.approx(product, rel=1e-9)
    assert pass_at_k(10_000, 1, 10) == 10 / 10_000  # correctly rounded, no cancellation
    assert 0.0 < pass_at_k(100_000, 1, 1) < 1e-4


def test_monotone_in_k_and_c():
    values = [pass_at_k(20, 3, k) for k in range(1, 19)]
    assert values == sorted(values) and values[-1] == 1.0
    assert [pass_at_k(20, c, 5) for c in range(21)] == sorted(pass_at_k(20, c, 5) for c in range(21))


@pytest.mark.parametrize("n,c,k", [(5, 2, 6), (5, 6, 1), (5, -1, 1), (0, 0, 1), (5, 2, 0), (5, True, 1), (5.0, 2, 1)])
def test_invalid_arguments(n, c, k):
    with pytest.raises((ValueError, TypeError)):
        pass_at_k(n, c, k)


def test_mean_and_table():
    counts = [(10, 3), (10, 0), (10, 10)]
    assert mean_pass_at_k(counts, 1) == pytest.approx((0.3 + 0 + 1) / 3)
    table = pass_at_k_table(counts, [1, 10, 11])
    assert table["pass@1"] == pytest.approx(1.3 / 3)
    assert table["pass@10"] == pytest.approx(2 / 3)
    assert table["pass@11"] is None  # not enough samples for k = 11
    with pytest.raises(ValueError):
        mean_pass_at_k([], 1)
