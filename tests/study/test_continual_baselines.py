"""The baselines of the continual benchmark (dylora_moe.study.continual_baselines), on a tiny model on disk."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dylora_moe.continual import learner
from dylora_moe.continual.config import ContinualRunConfig
from dylora_moe.study.continual_baselines import (
    olora_penalty,
    run_multitask_lora,
    run_olora,
    run_oracle,
    run_sequential_lora,
)
from dylora_moe.study.continual_benchmark import skill_loss
from tests.continual import A_WORDS, B_WORDS, fast_config, skill_examples
from tests.tiny import make_base, make_tokenizer

RANK = 4


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    make_base("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def run_config(base_dir, **changes) -> ContinualRunConfig:
    return ContinualRunConfig(model=str(base_dir), rank=RANK, continual=fast_config(**changes))


def two_skills():
    return [skill_examples(A_WORDS, 32, 0, "a"), skill_examples(B_WORDS, 32, 1, "b")]


def snapshot(model):
    return [(layer.lora_A[0].detach().clone(), layer.lora_B[0].detach().clone()) for layer in model.expert_layers]


def test_olora_freezes_earlier_blocks_and_keeps_the_new_one_orthogonal(base_dir):
    seen = []

    def evaluate(model):
        seen.append(snapshot(model))
        return {"a": {"loss": 0.0}}

    result = run_olora(run_config(base_dir, seed_lr=5e-2), two_skills(), ["a", "b"], evaluate, progress=False)
    first, second = seen
    for (a0, b0), (a1, b1) in zip(first, second):
        assert a0.shape[0] == 2 * RANK and b0.shape[1] == 2 * RANK  # one expert: two rank blocks
        assert torch.equal(a0[:RANK], a1[:RANK]) and torch.equal(b0[:, :RANK], b1[:, :RANK])  # block 0 frozen
        assert b0[:, :RANK].abs().sum() > 0 and b1[:, RANK:].abs().sum() > 0  # each block learned its stage
        assert torch.equal(b0[:, RANK:], torch.zeros_like(b0[:, RANK:]))  # block 1 untouched during stage 0
    assert result["orthogonality"][0] == 0.0
    penalty = {}
    for weight in (0.0, 1e3):
        run = dataclasses.replace(run_config(base_dir, seed_lr=5e-2), olora_lambda=weight)
        penalty[weight] = run_olora(run, two_skills(), ["a", "b"], lambda m: {"a": {"loss": 0.0}},
                                    progress=False)["orthogonality"][1]
    assert penalty[1e3] < 0.5 * penalty[0.0]


def test_olora_penalty_is_the_squared_overlap_of_the_blocks(base_dir):
    from dylora_moe.study.continual_baselines import lora_model

    model, _ = lora_model(run_config(base_dir), 2 * RANK)
    assert olora_penalty(model, 0, RANK).item() == 0.0
    expected = sum(float((layer.lora_A[0][RANK:] @ layer.lora_A[0][:RANK].T).pow(2).sum().detach())
                   for layer in model.expert_layers)
    assert olora_penalty(model, 1, RANK).item() == pytest.approx(expected, rel=1e-5)


def test_replay_lora_mixes_earlier_skills_into_every_batch_and_forgets_less(base_dir, monkeypatch):
    made = []
    original = learner._SkillBatches.__init__

    def spy(self, new_items, replay_items, *args, **kwargs):
        original(self, new_items, replay_items, *args, **kwargs)
        made.append((len(replay_items), self.n_replay))

    monkeypatch.setattr(learner._SkillBatches, "__init__", spy)
    tokenizer = make_tokenizer()
    held_a = skill_examples(A_WORDS, 16, 9, "a")

    def loss_of_a(model):
        return {"a": {"loss": skill_loss(model, tokenizer, held_a, max_seq_length=64)}}

    losses = {}
    for replay in (False, True):
        made.clear()
        rows = run_sequential_lora(run_config(base_dir, seed_lr=5e-2, seed_steps=6), two_skills(), ["a", "b"],
                                   loss_of_a, replay=replay, progress=False)["rows"]
        losses[replay] = [row["a"]["loss"] for row in rows]
        # stage 0 has nothing to replay; stage 1 replays skill a's 4 kept examples in half of every batch
        assert made == ([(0, 0), (4, 2)] if replay else [(0, 0), (0, 0)])
    assert losses[True][1] - losses[True][0] < losses[False][1] - losses[False][0]


def test_the_bounds_train_on_all_skills_at_once_and_on_each_alone(base_dir, monkeypatch):
    calls = []
    original = learner.train_expert

    def spy(model, tokenizer, examples, *args, phases, **kwargs):
        calls.append(({e.domain for e in examples}, [s for _, s, _ in phases], model.expert_ranks[0]))
        return original(model, tokenizer, examples, *args, phases=phases, **kwargs)

    monkeypatch.setattr("dylora_moe.study.continual_baselines.train_expert", spy)
    run = run_config(base_dir)
    multi = run_multitask_lora(run, two_skills(), lambda m: {"a": {"loss": 1.0}, "b": {"loss": 2.0}},
                               progress=False)
    assert calls == [({"a", "b"}, [6, 6], 2 * RANK)] and multi["rank"] == 2 * RANK  # twice a stage's steps
    calls.clear()
    oracle = run_oracle(run, two_skills(), ["a", "b"], lambda m, name: {"loss": float(len(name))}, progress=False)
    assert calls == [({"a"}, [3, 3], RANK), ({"b"}, [3, 3], RANK)] and set(oracle["final"]) == {"a", "b"}
