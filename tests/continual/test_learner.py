"""The skill lifecycle (dylora_moe.continual.learner): growth, maturity, protection, fine-tuning."""

from __future__ import annotations

import pytest
import torch

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.continual.learner import learn_skill
from tests.continual import A_WORDS, B_WORDS, fast_config, skill_examples
from tests.tiny import make_base, make_tokenizer

PROBE = torch.tensor([[7, 8, 9, 10, 11, 12]])


def fresh(num_experts: int = 1, mature: bool = False) -> DyLoRAMoEForCausalLM:
    return DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=num_experts, r=4, alpha=8),
                                mature=mature)


def snapshot(model, index):
    return [p.detach().clone() for p in model.expert_parameters(index)]


@pytest.mark.exact
def test_lifecycle_grows_a_new_expert_and_keeps_old_ones_bit_exact():
    tok = make_tokenizer()
    model = fresh()
    first = learn_skill(model, tok, skill_examples(A_WORDS, 32, 0), "a", fast_config(), progress=False)
    assert first.created and first.expert == 0 and model.num_experts == 1  # the fresh expert is claimed
    assert model.maturity == [True] and model.skill_library.names == ["a"]
    old_params = snapshot(model, 0)
    with torch.no_grad():
        old_out = model(input_ids=PROBE, forced_expert=0).logits

    modes = []
    handle = model.register_forward_hook(lambda m, args, out: modes.append(out.routing_mode))
    second = learn_skill(model, tok, skill_examples(B_WORDS, 32, 1), "b", fast_config(rank_schedule=[4, 8]),
                         progress=False)
    handle.remove()
    assert second.created and second.expert == 1 and second.rank == 8  # schedule: 2nd skill -> 8
    assert model.expert_ranks == [4, 8] and model.expert_alphas[1] == 16.0
    # the router mixes every expert while the new one is immature (every training step) ...
    dense = modes.index("sparse")
    assert dense >= len(second.losses) and set(modes[:dense]) == {"dense"}
    assert set(modes[dense:]) == {"sparse"} and second.guard is not None  # ... the guard's passes follow, mature
    assert model.routing_mode == "sparse" and model.maturity == [True, True]  # ... and is sparse again after
    assert all(torch.equal(a, b) for a, b in zip(old_params, snapshot(model, 0)))
    with torch.no_grad():
        assert torch.equal(model(input_ids=PROBE, forced_expert=0).logits, old_out)
    assert model.skill_library.expert_of() == {"a": 0, "b": 1}
    assert len(second.losses) == 6 and {r["phase"] for r in second.losses} == {"seed", "consolidate"}
    assert [r["lr"] for r in second.losses][:3] == [1e-2] * 3  # seeding rate, then the low consolidation rate
    assert max(r["lr"] for r in second.losses[3:]) <= 1e-3


def test_add_new_skill_matches_a_known_skill_and_fine_tunes_its_expert():
    tok = make_tokenizer()
    model = fresh()
    assert model.add_new_skill(skill_examples(A_WORDS, 32, 0), tok, "a", fast_config()) is True
    assert model.add_new_skill(skill_examples(B_WORDS, 32, 1), tok, "b", fast_config()) is True
    b_before, router_before = snapshot(model, 1), [p.detach().clone() for p in model.router_parameters()]
    a_before = snapshot(model, 0)
    result = learn_skill(model, tok, skill_examples(A_WORDS, 16, 42), "a-more", fast_config(), progress=False)
    assert not result.created and result.decision.best_skill == "a" and result.expert == 0
    assert model.num_experts == 2 and model.skill_library.names == ["a", "b"]
    assert model.skill_library.get("a").examples == 48
    assert not all(torch.equal(x, y) for x, y in zip(a_before, snapshot(model, 0)))  # expert 0 fine-tuned
    assert all(torch.equal(x, y) for x, y in zip(b_before, snapshot(model, 1)))  # the others untouched
    assert all(torch.equal(x, y) for x, y in zip(router_before, model.router_parameters()))
    forced = learn_skill(model, tok, skill_examples(A_WORDS, 16, 43), "a-forced", fast_config(force=True),
                         progress=False)
    assert forced.created and forced.expert == 2 and "forced" in forced.decision.reason


def test_frozen_router_rows_protect_old_routing():
    tok = make_tokenizer()
    model = fresh()
    learn_skill(model, tok, skill_examples(A_WORDS, 32, 0), "a", fast_config(), progress=False)
    before = [p.detach().clone() for p in model.router_parameters()]
    learn_skill(model, tok, skill_examples(B_WORDS, 32, 1), "b", fast_config(protection="freeze_rows"),
                progress=False)
    after = list(model.router_parameters())
    for old, new in zip(before, after):
        if new.shape[0] == model.num_experts:  # per-expert rows: the old expert's row is unchanged
            assert torch.equal(new[0], old[0]) and not torch.equal(new[1], torch.zeros_like(new[1]))
        else:
            assert torch.equal(new, old)


def test_replay_and_routing_supervision_keep_old_skills_on_their_expert():
    tok = make_tokenizer()
    model = fresh()
    a = skill_examples(A_WORDS, 32, 0)
    learn_skill(model, tok, a, "a", fast_config(), progress=False)
    learn_skill(model, tok, skill_examples(B_WORDS, 32, 1), "b", fast_config(seed_steps=6, consolidate_steps=6),
                progress=False)
    from dylora_moe.data import DataCollator, tokenize_examples

    def choices(examples):
        items, _ = tokenize_examples(examples, tok, 64)
        batch = DataCollator.from_tokenizer(tok)(items)
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).expert_choice.tolist()

    old = choices(skill_examples(A_WORDS, 16, 77))
    new = choices(skill_examples(B_WORDS, 16, 78))
    assert sum(c == 0 for c in old) >= 14, old  # held-out data of the old skill still go to its expert
    assert sum(c == 1 for c in new) >= 14, new  # and the new skill's data to the new expert
