"""SkillLibrary and embed_examples (dylora_moe.continual.library)."""

from __future__ import annotations

import pytest
import torch

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.continual import SkillLibrary, embed_examples
from dylora_moe.serialization import CheckpointError
from tests.continual import A_WORDS, B_WORDS, skill_examples
from tests.tiny import make_base, make_tokenizer, randomize_experts


def test_embedding_is_the_base_models_and_ignores_experts():
    tok = make_tokenizer()
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=2, r=4, alpha=8))
    examples = skill_examples(A_WORDS, 8, 0)
    before = embed_examples(model, tok, examples)
    randomize_experts(model)  # experts now change the model's outputs ...
    after = embed_examples(model, tok, examples)
    assert torch.equal(before, after)  # ... but not the skill embedding
    assert before.shape == (model.base_model.config.hidden_size,)
    with model.disable_adapters():
        ids = torch.tensor([[7, 8, 9, 10]])
        plain = model(input_ids=ids).logits
    assert not torch.allclose(plain, model(input_ids=ids).logits)  # adapters on again outside the block


def test_library_round_trips_through_the_checkpoint(tmp_path):
    tok = make_tokenizer()
    base = make_base("llama")
    model = DyLoRAMoEForCausalLM(base, DyLoRAMoEConfig(num_experts=2, r=4, alpha=8), mature=True)
    library = SkillLibrary()
    a, b = skill_examples(A_WORDS, 8, 0), skill_examples(B_WORDS, 8, 1)
    library.add("a", embed_examples(model, tok, a), expert=0, examples=8, replay=a[:3])
    library.add("b", embed_examples(model, tok, b), expert=1, examples=8, replay=b[:2])
    model.skill_library = library
    model.save_pretrained(tmp_path / "ckpt")
    loaded = DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=make_base("llama"))
    lib = loaded.skill_library
    assert lib.names == ["a", "b"] and lib.expert_of() == {"a": 0, "b": 1}
    assert torch.equal(lib.embeddings, library.embeddings)
    assert [e.output for e, _ in lib.replay_examples()] == [e.output for e in a[:3] + b[:2]]
    assert [t for _, t in lib.replay_examples(exclude=["a"])] == [1, 1]
    with pytest.raises(ValueError, match="already in the library"):
        lib.add("a", lib.embeddings[0], expert=0)


def test_library_naming_a_missing_expert_is_refused(tmp_path):
    tok = make_tokenizer()
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=1, r=4, alpha=8), mature=True)
    model.skill_library = SkillLibrary()
    model.skill_library.add("a", embed_examples(model, tok, skill_examples(A_WORDS, 4, 0)), expert=3)
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="names expert 3, but the model has 1"):
        DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=make_base("llama"))
