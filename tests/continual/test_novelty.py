"""The novelty detector and threshold calibration (dylora_moe.continual.novelty)."""

from __future__ import annotations

import pytest
import torch

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.continual import NoveltyDetector, SkillLibrary, calibrate_threshold, embed_examples
from dylora_moe.continual.skills import load_skill_examples
from tests.continual import A_WORDS, B_WORDS, THRESHOLD, skill_examples, write_skill_file
from tests.tiny import make_base, make_tokenizer


@pytest.fixture(scope="module")
def model_and_tok():
    return DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=1, r=4, alpha=8)), make_tokenizer()


def test_flags_a_different_distribution_not_a_held_out_split(model_and_tok, tmp_path):
    model, tok = model_and_tok
    known = write_skill_file(tmp_path / "known.jsonl", skill_examples(A_WORDS, 48, 0))
    held = write_skill_file(tmp_path / "held.jsonl", skill_examples(A_WORDS, 16, 99))
    other = write_skill_file(tmp_path / "other.jsonl", skill_examples(B_WORDS, 16, 5))
    library = SkillLibrary()
    library.add("known", embed_examples(model, tok, load_skill_examples(str(known))), expert=0)
    detector = NoveltyDetector(threshold=THRESHOLD)
    same = detector.decide(embed_examples(model, tok, load_skill_examples(str(held))), library)
    new = detector.decide(embed_examples(model, tok, load_skill_examples(str(other))), library)
    assert not same.novel and same.best_skill == "known" and same.max_similarity > 0.95
    assert new.novel and new.max_similarity < THRESHOLD
    assert "closest skill 'known'" in new.reason
    empty = detector.decide(torch.ones(64), SkillLibrary())
    assert empty.novel and empty.reason == "the library is empty"


def test_median_reduction_and_entropy_criterion():
    library = SkillLibrary()
    for i, vec in enumerate(([1.0, 0.0], [0.0, 1.0], [0.0, -1.0])):
        library.add(f"s{i}", torch.tensor(vec), expert=i)
    probe = torch.tensor([1.0, 0.05])
    assert not NoveltyDetector(0.75, "max").decide(probe, library).novel
    median = NoveltyDetector(0.75, "median").decide(probe, library)  # similarities ~ (1.0, 0.05, -0.05)
    assert median.novel and abs(median.median_similarity - 0.05) < 0.01 and median.max_similarity > 0.99
    decision = NoveltyDetector(0.75, "max", entropy_threshold=0.5).decide(probe, library, router_entropy=0.9)
    assert decision.novel and "router entropy" in decision.reason
    with pytest.raises(ValueError, match="reduction"):
        NoveltyDetector(reduction="mean")


def test_calibration_suggests_a_separating_threshold(model_and_tok):
    model, tok = model_and_tok
    library = SkillLibrary()
    library.add("a", embed_examples(model, tok, skill_examples(A_WORDS, 32, 0)), expert=0)
    library.add("b", embed_examples(model, tok, skill_examples(B_WORDS, 32, 1)), expert=1)
    held = {"a": embed_examples(model, tok, skill_examples(A_WORDS, 16, 7)),
            "b": embed_examples(model, tok, skill_examples(B_WORDS, 16, 8))}
    suggestion = calibrate_threshold(held, library)
    assert suggestion.separable and suggestion.max_other < suggestion.threshold < suggestion.min_same
    detector = NoveltyDetector(threshold=suggestion.threshold)
    assert not detector.decide(held["a"], library).novel
    with pytest.raises(KeyError, match="not a skill"):
        calibrate_threshold({"zzz": held["a"]}, library)
