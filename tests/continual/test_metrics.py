"""AP, BWT, FT, FWT and routing accuracy (dylora_moe.continual.metrics)."""

from __future__ import annotations

import pytest

from dylora_moe.continual.metrics import continual_metrics, forgetting_metrics, routing_accuracy


def test_loss_metrics_are_relative_and_signed_as_documented():
    # rows: after stage 0, 1, 2; columns: skills 0, 1, 2 in the order learned
    loss = [[1.0, 5.0, 6.0],
            [1.1, 2.0, 5.5],
            [1.2, 1.8, 3.0]]
    m = continual_metrics(loss, before=[4.0, 6.0, 8.0])
    assert m["ap"] == pytest.approx((1.2 + 1.8 + 3.0) / 3)
    # skill 0 rose 20% since its stage, skill 1 fell 10%: BWT = mean(-0.2, +0.1)
    assert m["bwt"] == pytest.approx((-0.2 + 0.1) / 2)
    # forgetting from the best earlier value: skill 0 best 1.0 -> 1.2 (+20%), skill 1 best 2.0 -> 1.8 (-10%)
    assert m["ft"] == pytest.approx((0.2 - 0.1) / 2)
    # forward transfer: skill 1 before its stage 5.0 against 6.0 untrained, skill 2 5.5 against 8.0
    assert m["fwt"] == pytest.approx(((6.0 - 5.0) / 6.0 + (8.0 - 5.5) / 8.0) / 2)
    assert m["max_forgetting"] == pytest.approx(0.2)
    assert continual_metrics([[1.0, 2.0]])["bwt"] is None and continual_metrics([[1.0, 2.0]])["fwt"] is None


def test_accuracy_metrics_use_the_literature_signs():
    acc = [[0.5, 0.0],
           [0.3, 0.6]]
    m = continual_metrics(acc, before=[0.1, 0.2], higher_is_better=True)
    assert m["ap"] == pytest.approx(0.45)
    assert m["bwt"] == pytest.approx(-0.2) and m["ft"] == pytest.approx(0.2)
    assert m["fwt"] == pytest.approx(0.0 - 0.2)


def test_bad_matrices_are_refused():
    with pytest.raises(ValueError, match="one row per stage"):
        continual_metrics([[1.0, 2.0], [1.0]])
    with pytest.raises(ValueError, match="one row per stage"):
        continual_metrics([[1.0], [1.0]])


def test_forgetting_metrics():
    m = [[1.0, 5.0, 5.0], [1.1, 2.0, 5.0], [1.05, 2.1, 3.0]]
    f = forgetting_metrics(m)
    assert f["max_forgetting"] == pytest.approx(0.10)  # skill 0 rose 10% after stage 1
    assert f["average_forgetting"] == pytest.approx((0.05 + 0.05) / 2)
    assert f["backward_transfer"] == pytest.approx(((1.0 - 1.05) + (2.0 - 2.1)) / 2)
    assert forgetting_metrics([[1.0]])["max_forgetting"] is None


def test_routing_accuracy_is_the_share_sent_to_each_skills_expert():
    shares = {"sql": [0.1, 0.9, 0.0], "py": [0.7, 0.2, 0.1], "other": [0.0, 0.0, 1.0]}
    acc = routing_accuracy(shares, {"sql": 1, "py": 2})
    assert acc == pytest.approx({"sql": 0.9, "py": 0.1, "mean": 0.5})
    assert routing_accuracy({}, {"sql": 1}) == {}
