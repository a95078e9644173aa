"""The NMI of domain x expert tables and its bootstrap interval over held-out examples."""

import pytest

from dylora_moe.evaluation.nmi import nmi_from_joint, nmi_interval

COUNTS = [[74, 3, 7, 0], [26, 53, 20, 1], [0, 8, 36, 3], [48, 31, 21, 0], [1, 88, 10, 1], [2, 82, 6, 10]]


def test_interval_brackets_the_value_and_is_reproducible():
    value = nmi_from_joint(COUNTS)
    low, high = nmi_interval(COUNTS)
    assert low < value < high and high - low < 0.2
    assert nmi_interval(COUNTS) == (low, high)  # fixed seed
    assert nmi_interval(COUNTS, seed=1) != (low, high)


def test_interval_narrows_with_more_examples_of_the_same_routing():
    low, high = nmi_interval(COUNTS, resamples=500)
    low4, high4 = nmi_interval([[4 * c for c in row] for row in COUNTS], resamples=500)
    assert high4 - low4 < 0.7 * (high - low)
    assert low4 < nmi_from_joint(COUNTS) < high4  # the same proportions: the same value


def test_certain_routing_has_no_spread_and_independent_routing_stays_near_zero():
    assert nmi_interval([[10, 0], [0, 10]], resamples=50) == (1.0, 1.0)  # every resample routes perfectly
    low, high = nmi_interval([[50, 50], [50, 50]], resamples=200)
    assert low == 0.0 and high < 0.05  # sampling alone gives a little information, never much


@pytest.mark.parametrize("counts, match", [([], "every domain"), ([[3, 0], [0, 0]], "every domain"),
                                           ([[3, -1]], "every domain")])
def test_bad_tables_are_refused(counts, match):
    with pytest.raises(ValueError, match=match):
        nmi_interval(counts)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="resamples"):
        nmi_interval(COUNTS, resamples=1)
    with pytest.raises(ValueError, match="level"):
        nmi_interval(COUNTS, level=1.0)
