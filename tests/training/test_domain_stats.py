"""The running domain x expert statistics of the domain routing loss (``training/domain_stats.py``)."""

import json
import math

import pytest
import torch

from dylora_moe.domain_routing import pointwise_mutual_information
from dylora_moe.training.domain_stats import RunningDomainRouting


def _mass(values):
    return torch.tensor(values, dtype=torch.float32)


def test_steps_decay_and_the_table_is_the_one_from_before_the_step():
    stats = RunningDomainRouting(num_domains=2, decay=0.5, decisions=1, experts=2)
    assert torch.equal(stats.pmi("cpu"), torch.zeros(1, 2, 2)) and stats.mutual_information() == 0.0
    # step 1: two micro-batches; domain 0 on expert 0, domain 1 on expert 1
    stats.add(_mass([[[3.0, 1.0]]]), torch.tensor([0]))
    stats.add(_mass([[[1.0, 3.0]]]), torch.tensor([1]))
    assert torch.equal(stats.pmi("cpu"), torch.zeros(1, 2, 2))  # unchanged until the step ends
    stats.end_step()
    torch.testing.assert_close(stats.joint, torch.tensor([[[3.0, 1.0], [1.0, 3.0]]], dtype=torch.float64))
    torch.testing.assert_close(stats.pmi("cpu"), pointwise_mutual_information(stats.joint).float())
    assert stats.pmi("cpu")[0, 0, 0] > 0 > stats.pmi("cpu")[0, 0, 1]
    # step 2: the old joint halves, the new sums add
    stats.add(_mass([[[0.0, 2.0], [2.0, 0.0]]]), torch.tensor([0, 1]))
    stats.end_step()
    torch.testing.assert_close(stats.joint, torch.tensor([[[1.5, 2.5], [2.5, 1.5]]], dtype=torch.float64))
    assert stats.steps == 2 and 0 < stats.mutual_information() < math.log(2)


def test_a_discarded_step_leaves_the_joint_and_the_sums_are_reduced_over_processes():
    stats = RunningDomainRouting(num_domains=2, decay=0.9, decisions=2, experts=3)
    stats.add(_mass([[[1.0, 0.0]], [[0.0, 1.0]]]), torch.tensor([1]))  # a pool of 2 in a 3-wide table: padded
    stats.discard_step()
    stats.end_step()
    assert torch.equal(stats.joint, torch.zeros(2, 2, 3, dtype=torch.float64))
    calls = []
    stats.add(_mass([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]]), torch.tensor([1]))
    stats.end_step(reduce=lambda t: calls.append(t.shape) or 2 * t)  # two processes that saw the same
    assert calls == [(2, 2, 3)] and stats.joint[0, 1, 0].item() == 2.0 and stats.joint[1, 1, 1].item() == 2.0


def test_the_state_goes_through_json_exactly_and_a_wrong_shape_is_refused():
    stats = RunningDomainRouting(num_domains=3, decay=0.9, decisions=2, experts=2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        stats.add(torch.rand(2, 4, 2, generator=gen) / 7, torch.tensor([0, 2, 1, 2]))
        stats.end_step()
    again = RunningDomainRouting(num_domains=3, decay=0.9, decisions=2, experts=2)
    again.load_state_dict(json.loads(json.dumps(stats.state_dict())))
    assert torch.equal(again.joint, stats.joint) and again.steps == 3
    assert torch.equal(again.pmi("cpu"), stats.pmi("cpu"))
    other = RunningDomainRouting(num_domains=2, decay=0.9, decisions=2, experts=2)
    with pytest.raises(ValueError, match=r"ckpt/trainer_state.json: domain_routing.joint has shape \(2, 3, 2\)"):
        other.load_state_dict(stats.state_dict(), where="ckpt/trainer_state.json")
    with pytest.raises(ValueError, match="domain_mass must be"):
        stats.add(torch.zeros(3, 4, 2), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="decay"):
        RunningDomainRouting(num_domains=2, decay=0.0, decisions=1, experts=2)
