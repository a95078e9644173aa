"""The novelty detector and threshold calibration (dylora_moe.continual.novelty)."""

from __future__ import annotations

import math

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


def test_standardized_similarity_measures_distance_in_units_of_the_examples_spread(tmp_path):
    from dylora_moe.continual.novelty import similarities

    library = SkillLibrary()
    library.add("a", torch.zeros(4), 0, spread=torch.ones(4))
    library.add("b", torch.full((4,), 10.0), 1, spread=torch.full((4,), 10.0))
    # one spread away in every dimension from 'a'; the same distance is a tenth of 'b''s spread
    sims = similarities(torch.ones(4), library, kind="standardized")
    assert sims[0] == pytest.approx(math.exp(-1.0)) and sims[1] == pytest.approx(math.exp(-0.81))
    # the new data's own spread enters the variance: (1 + 3^2) / 2 = 5 in 'a''s dimensions
    assert similarities(torch.ones(4), library, kind="standardized", spread=torch.full((4,), 3.0))[0] == \
        pytest.approx(math.exp(-1 / 5))
    # a single new example has no spread: the skill's alone is used
    assert similarities(torch.ones(4), library, kind="standardized", spread=torch.full((4,), float("nan")))[0] == \
        pytest.approx(sims[0])
    # scaling every state by 100 (another model's geometry) leaves it unchanged; raw cosine is scale-free too,
    # but not shift-free: a common offset pulls every raw similarity towards 1
    scaled = SkillLibrary()
    scaled.add("a", torch.zeros(4) * 100 + 50, 0, spread=torch.ones(4) * 100)
    assert similarities(torch.ones(4) * 100 + 50, scaled, kind="standardized")[0] == pytest.approx(sims[0])
    assert similarities(torch.ones(4) * 100 + 50, scaled)[0] > 0.99
    decision = NoveltyDetector(threshold=0.4, similarity="standardized").decide(torch.ones(4), library)
    assert not decision.novel and decision.best_skill == "b" and "standardized similarity" in decision.reason
    # skills without a spread (libraries saved before spreads were kept) are named
    old = SkillLibrary()
    old.add("old", torch.zeros(4), 0)
    old.add("new", torch.ones(4), 1, spread=torch.ones(4))
    with pytest.raises(ValueError, match=r"skills without one .*\['old'\]"):
        similarities(torch.ones(4), old, kind="standardized")
    old.save(tmp_path)
    loaded = SkillLibrary.load(tmp_path)
    assert torch.isnan(loaded.spreads[0]).all() and torch.equal(loaded.spreads[1], torch.ones(4))


def test_update_pools_the_spread_of_both_sets():
    library = SkillLibrary()
    a, b = torch.randn(300, 3), torch.randn(100, 3) * 2 + 1
    library.add("s", a.mean(0), 0, examples=300, spread=a.std(0, correction=0))
    library.update("s", b.mean(0), 100, spread=b.std(0, correction=0))
    both = torch.cat([a, b])
    torch.testing.assert_close(library.embeddings[0], both.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(library.spreads[0], both.std(0, correction=0), rtol=1e-4, atol=1e-4)


def test_the_standardized_detector_flags_the_other_skill_not_a_held_out_split(model_and_tok):
    from dylora_moe.continual.library import embedding_and_spread

    model, tok = model_and_tok
    library = SkillLibrary()
    vec, spread = embedding_and_spread(model, tok, skill_examples(A_WORDS, 48, 0))
    library.add("known", vec, 0, spread=spread)
    detector = NoveltyDetector(threshold=0.5, similarity="standardized")
    vec, spread = embedding_and_spread(model, tok, skill_examples(A_WORDS, 16, 99))
    same = detector.decide(vec, library, spread=spread)
    vec, spread = embedding_and_spread(model, tok, skill_examples(B_WORDS, 16, 5))
    new = detector.decide(vec, library, spread=spread)
    assert not same.novel and new.novel, (same.reason, new.reason)

