"""Numeric exact match (dylora_moe.evaluation.exact_match): the number of the reply against the reference's."""

from __future__ import annotations

from fractions import Fraction

import torch

from dylora_moe.data import Example
from dylora_moe.evaluation.exact_match import exact_match, first_number
from tests.tiny import make_tokenizer


def test_first_number_reads_signs_separators_decimals_and_fractions():
    assert first_number("16 oranges") == 16
    assert first_number("She has 1,250.50 dollars, then 3") == Fraction("1250.50")
    assert first_number("the answer is -3") == -3 and first_number("3/4 of a cake") == Fraction(3, 4)
    assert first_number("12.0") == first_number("12")
    assert first_number("no digits here") is None


class ScriptedModel(torch.nn.Module):
    """Answers each prompt with the next scripted reply (token ids), like a greedy model would."""

    num_experts = 2  # a DyLoRA-MoE model's interface: forced_expert is checked against it

    def __init__(self, tokenizer, replies):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.replies = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in replies]
        self.calls = []

    @property
    def device(self):
        return self.weight.device

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, pad_token_id, **kwargs):
        self.calls.append({"rows": input_ids.shape[0], "left_padded": bool((attention_mask[:, -1] == 1).all()),
                           "greedy": not do_sample, **kwargs})
        batch = [self.replies.pop(0) for _ in range(input_ids.shape[0])]
        width = max(len(r) for r in batch)
        new = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in batch])
        return torch.cat([input_ids, new], dim=1)


def test_exact_match_scores_the_reply_number_against_the_reference():
    tokenizer = make_tokenizer()
    examples = [Example("math", "add two numbers", "1 2", "3 apples"), Example("math", "add", "2 2", "4"),
                Example("math", "add", "5 5", "10")]
    model = ScriptedModel(tokenizer, ["3", "5", "print"])
    model.train()
    result = exact_match(model, tokenizer, examples, batch_size=2, forced_expert=1, progress=False)
    assert (result.correct, result.total) == (1, 3) and result.accuracy == 1 / 3
    assert [r["correct"] for r in result.rows] == [True, False, False]
    assert [c["rows"] for c in model.calls] == [2, 1]
    assert all(c["left_padded"] and c["greedy"] and c["forced_expert"] == 1 for c in model.calls)
    assert model.training and tokenizer.padding_side == "right"  # both restored
    assert result.to_dict()["exact_match"] == result.accuracy
