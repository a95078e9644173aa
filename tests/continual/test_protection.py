"""Router protection (dylora_moe.continual.protection), the 'kept' skills of the library and plain-dict examples."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dylora_moe import CheckpointError, DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.continual.learner import as_examples, learn_skill
from dylora_moe.continual.library import KEEP_ROUTING, LIBRARY_FILE, SkillLibrary
from dylora_moe.continual.protection import guard_new_expert, routing_supervision
from dylora_moe.data import DataCollator, Example, tokenize_examples
from tests.continual import A_WORDS, B_WORDS, fast_config, skill_examples
from tests.tiny import make_base, make_tokenizer


def test_routing_supervision_sends_own_targets_home_and_keeps_the_new_expert_off_kept_units():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    own = routing_supervision(probs, torch.tensor([0, 2]), expert=2)
    assert own.item() == pytest.approx(-(math.log(0.7) + math.log(0.5)) / 2, rel=1e-5)
    # a kept sequence: -log(1 - p[new]) per token, masked; the second token is padding
    tokens = torch.tensor([[[0.5, 0.1, 0.4], [0.0, 0.0, 1.0]], [[0.1, 0.1, 0.8], [0.1, 0.1, 0.8]]])
    mask = torch.tensor([[1, 0], [1, 1]])
    loss = routing_supervision(probs, torch.tensor([KEEP_ROUTING, 2]), 2, (tokens,), mask)
    assert loss.item() == pytest.approx((-math.log(0.6) - math.log(0.5)) / 2, rel=1e-5)
    # the per-token form is stricter than the sequence mean: one token all on the new expert costs a lot
    spread = torch.tensor([[[0.9, 0.0, 0.1], [0.01, 0.0, 0.99]]], requires_grad=True)
    mean = spread.mean(1)
    per_token = routing_supervision(mean, torch.tensor([KEEP_ROUTING]), 2, (spread,), torch.ones(1, 2))
    per_sequence = routing_supervision(mean, torch.tensor([KEEP_ROUTING]), 2)
    assert per_token.item() > per_sequence.item() + 1
    per_token.backward()
    assert spread.grad is not None and spread.grad[0, 1, 2] > 0  # pushes the new expert's share down


def _batches(tokenizer, examples):
    items, _ = tokenize_examples(examples, tokenizer, 64)
    collate = DataCollator.from_tokenizer(tokenizer)
    return [{k: v for k, v in collate(items[i : i + 4]).items() if k != "domain_ids"} for i in range(0, len(items), 4)]


@pytest.mark.parametrize("routing", ["token", "sequence"])
def test_guard_lowers_only_the_new_experts_bias_until_no_replayed_unit_picks_it(routing):
    tok = make_tokenizer()
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=3, r=4, alpha=8, routing=routing),
                                 mature=True)
    with torch.no_grad():
        for router in model.routers:
            router.bias[2] = 5.0  # the new expert takes nearly every unit
    replay = _batches(tok, skill_examples(A_WORDS, 8, 0))
    before = [r.bias.detach().clone() for r in model.routers]
    weights = [r.weight.detach().clone() for r in model.routers]
    model.train()
    report = guard_new_expert(model, replay, _batches(tok, skill_examples(B_WORDS, 8, 1)), 2, margin=0.5)
    assert model.training  # the mode it was in, restored
    assert report.replay_share_before > 0.9 and report.replay_share_after == 0.0
    assert all(s > 0 for s in report.shifts) and len(report.shifts) == len(model.routers)
    for router, bias, weight, shift in zip(model.routers, before, weights, report.shifts):
        assert torch.equal(router.weight, weight) and torch.equal(router.bias[:2], bias[:2])
        assert router.bias[2].item() == pytest.approx(bias[2].item() - shift, abs=1e-5)
    model.eval()
    with torch.no_grad():
        for batch in replay:
            assert (model(**batch).expert_share[2] == 0).all()
    assert "replay 100.0% -> 0.0%" in report.line()


def test_a_plain_dict_is_an_example_and_a_wrong_one_is_named():
    examples = as_examples([{"instruction": "sort", "output": "x"}, Example("s", "a", "", "b")], "s")
    assert examples[0] == Example("s", "sort", "", "x") and examples[1].instruction == "a"
    with pytest.raises(TypeError, match=r"skill 's': example 1 needs .*missing \['output'\]"):
        as_examples([{"instruction": "a", "output": "b"}, {"instruction": "c"}], "s")
    with pytest.raises(TypeError, match="example 0 is a str"):
        as_examples(["not an example"], "s")
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=1, r=4, alpha=8))
    dicts = [{"instruction": e.instruction, "input": e.input, "output": e.output}
             for e in skill_examples(A_WORDS, 8, 0)]
    result = learn_skill(model, make_tokenizer(), dicts, "a", fast_config(), progress=False)
    assert result.created and model.skill_library.names == ["a"]


def test_kept_skills_replay_with_the_keep_target_and_a_bad_routing_is_refused(tmp_path):
    library = SkillLibrary()
    library.add("joint", torch.ones(4), 1, 10, replay=skill_examples(A_WORDS, 2, 0), routing="kept")
    library.add("later", torch.zeros(4) + 2, 2, 10, replay=skill_examples(B_WORDS, 1, 0))
    assert library.has_kept_routing
    assert [t for _, t in library.replay_examples()] == [KEEP_ROUTING, KEEP_ROUTING, 2]
    with pytest.raises(ValueError, match="routing='both' is not one of"):
        library.add("x", torch.ones(4), 0, routing="both")
    library.save(tmp_path)
    assert [s.routing for s in SkillLibrary.load(tmp_path).skills] == ["kept", "own"]
    data = json.loads((tmp_path / LIBRARY_FILE).read_text())
    data["skills"][0]["routing"] = "sometimes"
    (tmp_path / LIBRARY_FILE).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"skills\[0\]\.routing='sometimes' is not one of"):
        SkillLibrary.load(tmp_path)
