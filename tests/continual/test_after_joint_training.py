"""Continual learning on a jointly trained checkpoint (issue #29): the domains joint training leaves as skills
protect their loss and routing when a new skill is added; a checkpoint without them is damaged."""

from __future__ import annotations

import pytest

from dylora_moe import DyLoRAMoEForCausalLM
from dylora_moe.continual.learner import learn_skill
from dylora_moe.continual.library import LIBRARY_FILE, SkillLibrary
from dylora_moe.data import DataCollator, load_examples, tokenize_examples
from dylora_moe.training import JointTrainer
from dylora_moe.training.evaluation import evaluate
from tests.continual import fast_config, skill_examples
from tests.tiny import make_base, make_tokenizer
from tests.training import isolate_data_registry, tiny_config, tiny_model_and_tokenizer, write_data_dir

DOMAINS = ["code_alpaca", "mbpp"]
NEW_WORDS = ["[", "]", "{", "}", "*", "/", "-", "y"]  # a skill of its own: symbols no training example uses


@pytest.fixture(scope="module", params=["sequence", "token"])
def jointly_trained(request, tmp_path_factory):
    """A tiny joint run on the two domains (register_skills is on by default), with sequence or token routing:
    its final adapter folder, 8 held-out examples per domain, and the same run's without registered skills."""
    root = tmp_path_factory.mktemp(f"joint-{request.param}")
    monkeypatch = pytest.MonkeyPatch()
    isolate_data_registry(monkeypatch)
    try:
        data_dir = write_data_dir(root / "data")
        config = tiny_config(root / "run", data_dir, **{"train.max_steps": 12, "train.eval_every": 0,
                                                        "train.save_every": 0, "moe.routing": request.param})
        result = JointTrainer(config, *tiny_model_and_tokenizer()).train()
        bare = JointTrainer(config.replace(output_dir=str(root / "bare"), **{"train.register_skills": False}),
                            *tiny_model_and_tokenizer()).train()
        eval_sets = {d: load_examples(d, data_dir, split="validation") for d in DOMAINS}
    finally:
        monkeypatch.undo()
    return result.final_dir, {d: eval_sets[d][:8] for d in DOMAINS}, bare.final_dir


def held_out(model, tokenizer, examples) -> dict:
    """Per-domain held-out loss and expert share of ``model``."""
    sets = {}
    for domain in DOMAINS:
        sets[domain], _ = tokenize_examples(examples[domain], tokenizer, 96)
    result = evaluate(model, sets, DataCollator.from_tokenizer(tokenizer), batch_size=4,
                      num_experts=model.num_experts)
    return {d: (result.domains[d].loss, result.domains[d].expert_share) for d in DOMAINS}


def symbols_loss(model, tokenizer) -> float:
    items, _ = tokenize_examples(skill_examples(NEW_WORDS, 8, 99, domain="symbols"), tokenizer, 96)
    return evaluate(model, {"s": items}, DataCollator.from_tokenizer(tokenizer), 4, model.num_experts).domains["s"].loss


def add_skill(model, tokenizer):
    config = fast_config(force=True, seed_steps=12, seed_lr=3e-2, consolidate_steps=6, consolidate_lr=3e-3,
                         router_lr=5e-2, replay_per_skill=8)
    result = learn_skill(model, tokenizer, skill_examples(NEW_WORDS, 32, 7, domain="symbols"), "symbols",
                         config, progress=False)
    assert result.created
    return result.expert, result.guard


def test_joint_training_registers_its_domains_as_kept_skills(jointly_trained):
    final_dir, _, _ = jointly_trained
    library = SkillLibrary.load(final_dir)
    assert library.names == DOMAINS and library.has_kept_routing
    assert all(s.routing == "kept" and len(s.replay) > 0 for s in library.skills)
    assert library.embeddings is not None and library.embeddings.shape[0] == 2


def test_adding_a_skill_keeps_the_old_domains_loss_and_routing(jointly_trained):
    final_dir, examples, _ = jointly_trained
    tokenizer = make_tokenizer()
    model = DyLoRAMoEForCausalLM.from_pretrained(final_dir, base_model=make_base("llama"))
    before = held_out(model, tokenizer, examples)
    loss_before_on_symbols = symbols_loss(model, tokenizer)
    new, guard = add_skill(model, tokenizer)
    after = held_out(model, tokenizer, examples)
    assert model.num_experts == 3 and new == 2
    for domain in DOMAINS:
        (loss0, share0), (loss1, share1) = before[domain], after[domain]
        assert share1[new] < 0.02, (domain, share1)  # the new expert stays off the old domains' inputs ...
        assert share1[:new] == pytest.approx(share0, abs=0.02)  # ... which keep the routing they had
        assert loss1 <= loss0 * 1.02, (domain, loss0, loss1)
    # the guard measured what it did: no replayed unit goes to the new expert any more
    assert guard is not None and guard.replay_share_after == 0.0 < guard.replay_share_before
    if model.moe_config.routing == "sequence":  # the new skill's sequences are told apart: it is learned
        symbols, _ = tokenize_examples(skill_examples(NEW_WORDS, 8, 99, domain="symbols"), tokenizer, 96)
        result = evaluate(model, {"s": symbols}, DataCollator.from_tokenizer(tokenizer), 4, model.num_experts)
        assert result.domains["s"].expert_share[new] > 0.75 and guard.new_share_after > 0.75
        assert result.domains["s"].loss < loss_before_on_symbols


def test_without_the_registered_skills_the_same_addition_damages_the_old_domains(jointly_trained):
    """The check above can fail: the checkpoint of the same run without registered skills (as before #29)
    loses its domains' routing."""
    _, examples, bare = jointly_trained
    assert not (bare / LIBRARY_FILE).exists()
    tokenizer = make_tokenizer()
    model = DyLoRAMoEForCausalLM.from_pretrained(bare, base_model=make_base("llama"))
    assert model.skill_library is None
    before = held_out(model, tokenizer, examples)
    with pytest.warns(UserWarning, match="no skill library: nothing protects the routing"):
        new, guard = add_skill(model, tokenizer)
    after = held_out(model, tokenizer, examples)
    assert guard is None  # nothing to guard: no replay examples
    taken = [after[d][1][new] for d in DOMAINS]
    worse = [after[d][0] / before[d][0] for d in DOMAINS]
    assert max(taken) > 0.5 or max(worse) > 1.05, (taken, worse)
