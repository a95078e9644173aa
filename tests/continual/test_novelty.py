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
    detector = NoveltyDetector(threshold=THRESHOLD, similarity="raw")
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
    assert not NoveltyDetector(0.75, "max", similarity="raw").decide(probe, library).novel
    # raw similarities ~ (1.0, 0.05, -0.05)
    median = NoveltyDetector(0.75, "median", similarity="raw").decide(probe, library)
    assert median.novel and abs(median.median_similarity - 0.05) < 0.01 and median.max_similarity > 0.99
    decision = NoveltyDetector(0.75, "max", entropy_threshold=0.5, similarity="raw").decide(
        probe, library, router_entropy=0.9)
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
    detector = NoveltyDetector(threshold=suggestion.threshold, similarity="raw")
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
    detector = NoveltyDetector()  # the defaults: standardized, threshold 0.8
    vec, spread = embedding_and_spread(model, tok, skill_examples(A_WORDS, 16, 99))
    same = detector.decide(vec, library, spread=spread, count=16)
    vec, spread = embedding_and_spread(model, tok, skill_examples(B_WORDS, 16, 5))
    new = detector.decide(vec, library, spread=spread, count=16)
    assert not same.novel and new.novel, (same.reason, new.reason)
    assert same.threshold == 0.8 and same.similarity == "standardized"


def test_default_threshold_follows_the_similarity_and_an_explicit_one_wins():
    from dylora_moe.continual import ContinualConfig

    assert (NoveltyDetector().similarity, NoveltyDetector().threshold) == ("standardized", 0.8)
    assert NoveltyDetector(similarity="raw").threshold == 0.75
    assert NoveltyDetector(0.6, similarity="raw").threshold == 0.6
    assert ContinualConfig().resolved_threshold() == 0.8
    assert ContinualConfig(similarity="raw").resolved_threshold() == 0.75
    assert ContinualConfig(threshold=0.9).resolved_threshold() == 0.9
    ContinualConfig(threshold=None).validate()


def test_sample_size_correction_keeps_small_samples_of_a_known_skill_known():
    from dylora_moe.continual.novelty import similarities

    gen = torch.Generator().manual_seed(0)
    known = torch.randn(256, 64, generator=gen)
    library = SkillLibrary()
    library.add("known", known.mean(0), 0, examples=256, spread=known.std(0))
    for n in (4, 8, 32):
        sample = torch.randn(n, 64, generator=gen)
        corrected = similarities(sample.mean(0), library, kind="standardized", spread=sample.std(0), count=n)[0]
        plain = similarities(sample.mean(0), library, kind="standardized", spread=sample.std(0))[0]
        # without the sample size, chance alone puts a 4-example sample of the same skill near exp(-1/4) = 0.78
        assert corrected > 0.9 and corrected > plain, (n, corrected, plain)
    assert similarities(torch.randn(4, 64, generator=gen).mean(0), library, kind="standardized",
                        count=4)[0] > 0.85
    shifted = torch.randn(8, 64, generator=gen) + 1.0  # one spread away in every dimension
    far = similarities(shifted.mean(0), library, kind="standardized", spread=shifted.std(0), count=8)[0]
    assert far < 0.5


def test_spreads_of_an_older_library_are_filled_from_its_replay_examples(model_and_tok):
    from dylora_moe.continual.library import fill_missing_spreads, pooled_states

    model, tok = model_and_tok
    replay = skill_examples(A_WORDS, 8, 3)
    library = SkillLibrary()
    library.add("old", embed_examples(model, tok, replay), 0, examples=8, replay=replay)
    library.add("no_replay", embed_examples(model, tok, skill_examples(B_WORDS, 8, 4)), 1, examples=8)
    assert library.spreads is None
    assert fill_missing_spreads(model, tok, library) == ["old"]
    torch.testing.assert_close(library.spreads[0], pooled_states(model, tok, replay).std(0))
    assert torch.isnan(library.spreads[1]).all()  # nothing to compute it from: the similarity names it
    with pytest.raises(ValueError, match=r"\['no_replay'\]"):
        NoveltyDetector().decide(library.embeddings[0], library)

