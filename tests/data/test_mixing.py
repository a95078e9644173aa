"""Tests for dylora_moe.data.mixing: proportions, cycling, determinism, exact resume, validation."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from torch.utils.data import DataLoader

from dylora_moe.data import InterleavedSampler, normalize_weights

SIZES = {"big": 1000, "small": 10}


def domain_of(index: int) -> str:
    return "big" if index < 1000 else "small"


def test_equal_weights_give_50_50_and_cycle_the_small_domain():
    sampler = InterleavedSampler(SIZES, seed=0)
    assert len(sampler) == 1010
    indices = list(sampler)
    # a DataLoader takes it as its sampler (it is torch-free, so not a torch Sampler subclass)
    fresh = InterleavedSampler(SIZES, seed=0)
    assert [int(i) for i in DataLoader(range(1010), sampler=fresh, batch_size=None)] == indices
    counts = Counter(domain_of(i) for i in indices)
    assert counts == {"big": 505, "small": 505}
    small = [i - 1000 for i in indices if i >= 1000]
    # the small domain is cycled through whole permutations: 50 complete cycles, then 5 more draws
    for cycle in range(50):
        assert sorted(small[cycle * 10 : (cycle + 1) * 10]) == list(range(10))
    big = [i for i in indices if i < 1000]
    assert len(set(big)) == 505  # no repeats before the big domain is exhausted
    # the interleaving is random, not blocked: both domains appear in every window of 100 draws
    assert all(len({domain_of(i) for i in indices[k : k + 100]}) == 2 for k in range(0, 1000, 100))


def test_weighted_proportions_over_many_draws():
    sampler = InterleavedSampler(
        {"a": 50, "b": 300, "c": 7}, weights={"a": 3, "b": 1, "c": 0}, seed=5, num_samples=1001
    )
    assert sampler.weights == {"a": 0.75, "b": 0.25, "c": 0.0}
    assert sampler.quotas.tolist() == [751, 250, 0]  # largest-remainder rounding of 750.75 / 250.25
    draws = sampler.take(0, 20 * 1001)
    ids = np.searchsorted([50, 350, 357], draws, side="right")
    freq = np.bincount(ids, minlength=3) / len(draws)
    assert math.isclose(freq[0], 0.75, abs_tol=1e-3) and math.isclose(freq[1], 0.25, abs_tol=1e-3)
    assert freq[2] == 0
    # every example of the over-sampled domain "a" is used equally often (whole cycles)
    per_example = np.bincount(draws[ids == 0], minlength=50)
    assert per_example.max() - per_example.min() <= 1


def test_large_domain_is_covered_across_epochs():
    sampler = InterleavedSampler(SIZES, seed=3)
    seen = set()
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen |= {i for i in sampler if i < 1000}
    assert seen == set(range(1000))  # 505 + 495 draws continue one permutation of "big"


def test_same_seed_same_stream_other_seed_other_stream():
    a = list(InterleavedSampler(SIZES, seed=11))
    assert a == list(InterleavedSampler(SIZES, seed=11))
    assert a != list(InterleavedSampler(SIZES, seed=12))


def test_epochs_advance_and_differ():
    sampler = InterleavedSampler(SIZES, seed=0)
    first, second = list(sampler), list(sampler)
    assert sampler.epoch == 2 and first != second
    assert first == sampler.epoch_indices(0).tolist() and second == sampler.epoch_indices(1).tolist()
    sampler.set_epoch(1)
    assert list(sampler) == second


@pytest.mark.parametrize("mode", ["interleave", "concatenate"])
def test_exact_resume_mid_epoch(mode):
    reference = InterleavedSampler(SIZES, seed=42, mode=mode)
    uninterrupted = list(reference) + list(reference) + list(reference)  # epochs 0, 1, 2

    run = InterleavedSampler(SIZES, seed=42, mode=mode)
    consumed = list(run)  # epoch 0
    it = iter(run)
    consumed += [next(it) for _ in range(337)]  # epoch 1, interrupted after 337 samples
    state = {**run.state_dict(), "position": 337}

    resumed = InterleavedSampler(SIZES, seed=42, mode=mode)
    resumed.load_state_dict(state)
    assert len(resumed) == 1010 - 337
    consumed += list(resumed) + list(resumed)  # rest of epoch 1, then epoch 2
    assert consumed == uninterrupted
    assert resumed.take(1010 + 337, 1010).tolist() == uninterrupted[1347:2357]

    with pytest.raises(ValueError, match="seed"):
        InterleavedSampler(SIZES, seed=1, mode=mode).load_state_dict(state)


def test_concatenate_mode_is_a_shuffled_concatenation():
    sampler = InterleavedSampler(SIZES, weights={"big": 1, "small": 1}, seed=0, mode="concatenate")
    e0, e1 = sampler.epoch_indices(0), sampler.epoch_indices(1)
    assert sorted(e0.tolist()) == list(range(1010)) and sorted(e1.tolist()) == list(range(1010))
    assert e0.tolist() != e1.tolist() and e0.tolist() != list(range(1010))
    assert Counter(domain_of(i) for i in e0) == {"big": 1000, "small": 10}  # weights ignored
    assert np.bincount(sampler.epoch_domain_ids(0)).tolist() == [1000, 10]


@pytest.mark.parametrize("mode", ["interleave", "concatenate"])
def test_from_domain_labels_maps_to_dataset_positions(mode):
    labels = ["a", "b", "b", "a", "b", "b", "b", "b"]
    sampler = InterleavedSampler.from_domain_labels(labels, seed=1, num_samples=400, mode=mode)
    assert sampler.domains == ["a", "b"]
    draws = list(sampler)
    assert set(draws) == set(range(len(labels)))
    counts = Counter(labels[i] for i in draws)
    assert counts == ({"a": 200, "b": 200} if mode == "interleave" else {"a": 100, "b": 300})
    with pytest.raises(ValueError, match=r"domains \['b'\] that are not in 'domains'"):
        InterleavedSampler.from_domain_labels(labels, domains=["a"])


def test_works_as_a_dataloader_sampler():
    dataset = list(range(1010))
    sampler = InterleavedSampler(SIZES, seed=0)
    loader = DataLoader(dataset, batch_size=101, sampler=sampler)
    batches = [b.tolist() for b in loader]
    assert len(loader) == 10 and len(batches) == 10
    assert [i for b in batches for i in b] == sampler.epoch_indices(0).tolist()


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"big": -1, "small": 1}, "weight of domain 'big' must be >= 0"),
        ({"big": 0, "small": 0}, "at least one domain weight must be positive"),
        ({"big": 1, "small": 1, "tiny": 1}, r"weights name unknown domains \['tiny'\]"),
        ({"big": 1}, r"weights are missing for domains \['small'\]"),
        ({"big": float("nan"), "small": 1}, "weight of domain 'big' must be a finite number"),
        ({"big": "1", "small": 1}, "weight of domain 'big' must be a finite number"),
    ],
)
def test_weight_validation(weights, message):
    with pytest.raises(ValueError, match=message):
        InterleavedSampler(SIZES, weights=weights)


def test_argument_validation():
    with pytest.raises(ValueError, match=r"domain 'empty' has weight 1\.0 but no examples"):
        InterleavedSampler({"a": 3, "empty": 0})
    assert normalize_weights({"a": 3, "empty": 0}, {"a": 2, "empty": 0}) == {"a": 1.0, "empty": 0.0}
    with pytest.raises(ValueError, match="mode must be one of"):
        InterleavedSampler(SIZES, mode="random")
    with pytest.raises(ValueError, match="num_samples must be a positive integer"):
        InterleavedSampler(SIZES, num_samples=0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        InterleavedSampler(SIZES, seed=-1)
    with pytest.raises(ValueError, match="size of domain 'a' must be a non-negative integer"):
        InterleavedSampler({"a": 2.5})
    with pytest.raises(ValueError, match="domain_sizes is empty"):
        InterleavedSampler({})
    with pytest.raises(ValueError, match="position must be in"):
        InterleavedSampler(SIZES).set_position(2000)
