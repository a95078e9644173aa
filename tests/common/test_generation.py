"""Replies to prompts (dylora_moe.common.generation): greedy and sampled, routed or forced, and prompt files."""

from __future__ import annotations

import json

import pytest

from dylora_moe import DyLoRAMoEConfig, DyLoRAMoEForCausalLM
from dylora_moe.common.generation import SamplingSettings, generate_replies, read_prompts
from dylora_moe.data import DataError, Example
from tests.tiny import make_base, make_tokenizer, randomize_experts

PROMPTS = [Example("prompt", "add two numbers"), Example("prompt", "sort the list", "x y"),
           Example("prompt", "print hello world")]


@pytest.fixture(scope="module")
def model_and_tok():
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=3, r=4, alpha=8), mature=True)
    randomize_experts(model)
    return model, make_tokenizer()


def test_batched_greedy_replies_equal_one_at_a_time_and_report_routing(model_and_tok):
    model, tok = model_and_tok
    model.train()
    batched = generate_replies(model, tok, PROMPTS, SamplingSettings(max_new_tokens=5), batch_size=2)
    single = [generate_replies(model, tok, [p], SamplingSettings(max_new_tokens=5))[0] for p in PROMPTS]
    assert [r.text for r in batched] == [r.text for r in single]
    assert model.training  # restored
    for reply in batched:
        assert reply.expert in range(3) and len(reply.router_probs) == 3 and not reply.forced
        assert sum(reply.router_probs) == pytest.approx(1.0, abs=1e-5)


def test_forcing_an_expert_changes_the_replies_and_is_checked(model_and_tok):
    model, tok = model_and_tok
    settings = SamplingSettings(max_new_tokens=6)
    forced = {e: [r.text for r in generate_replies(model, tok, PROMPTS, settings, expert=e)] for e in range(3)}
    assert len({tuple(v) for v in forced.values()}) > 1  # the experts differ
    reply = generate_replies(model, tok, PROMPTS[:1], settings, expert=2)[0]
    assert reply.forced and reply.expert == 2 and reply.router_probs is None
    with pytest.raises(ValueError, match=r"expert=3: the model has 3 experts \(0..2\)"):
        generate_replies(model, tok, PROMPTS, settings, expert=3)


def test_sampling_is_repeatable_with_a_seed(model_and_tok):
    model, tok = model_and_tok

    def sample(seed):
        return [r.text for r in generate_replies(model, tok, PROMPTS, SamplingSettings(8, 3.0, 0.95, seed))]

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    with pytest.raises(ValueError, match="top_p"):
        generate_replies(model, tok, PROMPTS, SamplingSettings(top_p=1.5))


def test_read_prompts_accepts_jsonl_json_and_text_and_names_bad_records(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"instruction": "a", "input": "b"}) + "\n\n" + json.dumps({"instruction": "c"}) + "\n")
    assert [(e.instruction, e.input) for e in read_prompts(jsonl)] == [("a", "b"), ("c", "")]
    array = tmp_path / "p.json"
    array.write_text(json.dumps([{"instruction": "a"}, {"instruction": "b", "input": 3}]))
    with pytest.raises(DataError, match=r"p.json: record 1: .*'input' must be a string"):
        read_prompts(array)
    text = tmp_path / "p.txt"
    text.write_text("first\n\n  second  \n")
    assert [e.instruction for e in read_prompts(text)] == ["first", "second"]
    with pytest.raises(DataError, match="file not found"):
        read_prompts(tmp_path / "missing.jsonl")
