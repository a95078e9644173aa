"""Tests for dylora_moe.data.formatting: prompt formats, label masking, truncation, collation."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from dylora_moe.data import (
    IGNORE_INDEX,
    DataCollator,
    Example,
    build_prompt,
    build_prompt_ids,
    collate_batch,
    encode_example,
    resolve_pad_token_id,
    tokenize_examples,
    user_message,
)

from .conftest import CHAT_TEMPLATE

ADD = Example("math", "add two numbers", "", "return a + b")
ADD_WITH_INPUT = Example("math", "add two numbers", "x y", "return x + y")
# Plain prompt of ADD: "### Instruction:\nadd two numbers\n\n### Response:\n" -> 9 word-level tokens
PLAIN_PROMPT_TOKENS = ["###", "Instruction", ":", "add", "two", "numbers", "###", "Response", ":"]


def tokens(tok, ids):
    return tok.convert_ids_to_tokens(ids)


# ----------------------------------------------------------------------------- prompt text
def test_plain_prompt_text(plain_tokenizer):
    assert build_prompt(ADD, plain_tokenizer) == "### Instruction:\nadd two numbers\n\n### Response:\n"
    assert build_prompt(ADD_WITH_INPUT, plain_tokenizer) == (
        "### Instruction:\nadd two numbers\n\n### Input:\nx y\n\n### Response:\n"
    )
    assert user_message(ADD_WITH_INPUT) == "add two numbers\n\nx y"


def test_chat_prompt_uses_template_with_generation_prompt(chat_tokenizer, plain_tokenizer):
    assert build_prompt(ADD_WITH_INPUT, chat_tokenizer) == "<|user|>\nadd two numbers\n\nx y<|end|>\n<|assistant|>\n"
    # the chat template can be switched off, and cannot be forced when absent
    assert build_prompt(ADD, chat_tokenizer, use_chat_template=False).startswith("### Instruction:")
    with pytest.raises(ValueError, match="no chat_template"):
        build_prompt(ADD, plain_tokenizer, use_chat_template=True)


# ----------------------------------------------------------------------------- masking
def test_plain_labels_mask_prompt_exactly(plain_tokenizer):
    (item,), stats = tokenize_examples([ADD], plain_tokenizer, max_seq_length=64)
    assert tokens(plain_tokenizer, item.input_ids) == [*PLAIN_PROMPT_TOKENS, "return", "a", "+", "b", "<eos>"]
    assert item.labels[:9] == [IGNORE_INDEX] * 9
    assert item.labels[9:] == item.input_ids[9:]
    assert item.num_prompt_tokens == 9 and not item.truncated
    assert (item.domain, item.domain_id) == ("math", 0)
    assert stats.total.supervised_tokens == 5 and stats.total.tokens == 14


def test_bos_is_prepended_when_the_tokenizer_uses_one(tokenizer_factory):
    tok = tokenizer_factory(bos="<bos>")
    prompt_ids, response_ids = encode_example(ADD, tok)
    assert tokens(tok, prompt_ids) == ["<bos>", *PLAIN_PROMPT_TOKENS]
    assert build_prompt(ADD, tok).startswith("<bos>### Instruction:")
    assert tokens(tok, response_ids) == ["return", "a", "+", "b", "<eos>"]


def test_chat_labels_when_template_ends_turn_with_eos(chat_tokenizer):
    (item,), _ = tokenize_examples([ADD], chat_tokenizer, max_seq_length=64)
    toks = tokens(chat_tokenizer, item.input_ids)
    # the template's "\n" after <|end|> (= EOS) is dropped and no second EOS is added
    assert toks == [
        "<|user|>",
        "add",
        "two",
        "numbers",
        "<|end|>",
        "<|assistant|>",
        "return",
        "a",
        "+",
        "b",
        "<|end|>",
    ]
    assert item.labels == [IGNORE_INDEX] * 6 + item.input_ids[6:]


def test_chat_labels_append_eos_when_template_lacks_it(tokenizer_factory):
    tok = tokenizer_factory(CHAT_TEMPLATE, eos="<eos>")
    prompt_ids, response_ids = encode_example(ADD, tok)
    assert len(prompt_ids) == 6
    assert tokens(tok, response_ids) == ["return", "a", "+", "b", "<|end|>", "<eos>"]


@pytest.mark.parametrize("fixture", ["plain_tokenizer", "chat_tokenizer"])
def test_generation_prompt_matches_training_prefix(fixture, request):
    tok = request.getfixturevalue(fixture)
    tokenized, _ = tokenize_examples([ADD, ADD_WITH_INPUT], tok, max_seq_length=64)
    for ex, item in zip([ADD, ADD_WITH_INPUT], tokenized, strict=True):
        prompt_ids = build_prompt_ids(ex, tok)
        assert item.input_ids[: len(prompt_ids)] == prompt_ids
        assert item.num_prompt_tokens == len(prompt_ids)
        assert prompt_ids == tok(build_prompt(ex, tok), add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- truncation
def test_truncation_from_the_right_and_drop_counts(plain_tokenizer):
    # ADD: 9 prompt + 5 response tokens = 14
    examples = [ADD, Example("code", "print hello", "", "print hello world")]  # 8 + 4 tokens
    exact, stats = tokenize_examples(examples, plain_tokenizer, max_seq_length=14, domains=["math", "code"])
    assert [len(t) for t in exact] == [14, 12] and not any(t.truncated for t in exact)

    short, stats = tokenize_examples(examples, plain_tokenizer, max_seq_length=11, domains=["math", "code"])
    assert [len(t) for t in short] == [11, 11]
    assert tokens(plain_tokenizer, short[0].input_ids[9:]) == ["return", "a"]  # EOS cut off
    assert short[0].labels == [IGNORE_INDEX] * 9 + short[0].input_ids[9:]
    assert [t.truncated for t in short] == [True, True]
    assert (stats.domains["math"].truncated, stats.domains["code"].truncated) == (1, 1)

    tiny, stats = tokenize_examples(examples, plain_tokenizer, max_seq_length=9, domains=["math", "code"])
    assert [t.domain for t in tiny] == ["code"]  # math's 9-token prompt leaves no room: dropped
    assert tiny[0].labels[-1] == tiny[0].input_ids[-1] and tiny[0].num_prompt_tokens == 8
    m, c = stats.domains["math"], stats.domains["code"]
    assert (m.examples, m.kept, m.dropped, m.truncated) == (1, 0, 1, 0)
    assert (c.examples, c.kept, c.dropped, c.truncated) == (1, 1, 0, 1)
    assert stats.total.dropped == 1 and stats.as_dict()["total"]["kept"] == 1
    assert "math: 1 examples, 0 kept, 0 truncated, 1 dropped" in stats.summary()

    kept, stats = tokenize_examples(examples, plain_tokenizer, max_seq_length=11, min_response_tokens=3)
    assert [t.domain for t in kept] == ["code"]  # math: only 2 response tokens fit, below the minimum
    assert stats.total.dropped == 1


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, None])
def test_max_seq_length_must_be_positive(plain_tokenizer, bad):
    with pytest.raises(ValueError, match="'max_seq_length' must be a positive integer"):
        tokenize_examples([ADD], plain_tokenizer, max_seq_length=bad)


def test_domain_ids_follow_the_domain_list(plain_tokenizer):
    examples = [Example("b", "add", "", "a"), Example("a", "add", "", "b"), Example("b", "two", "", "a")]
    items, stats = tokenize_examples(examples, plain_tokenizer, 32)
    assert [(t.domain, t.domain_id) for t in items] == [("b", 1), ("a", 0), ("b", 1)]  # default: sorted
    items, stats = tokenize_examples(examples, plain_tokenizer, 32, domains=["b", "a", "c"])
    assert [t.domain_id for t in items] == [0, 1, 0]
    assert list(stats.domains) == ["b", "a", "c"] and stats.domains["c"].examples == 0
    with pytest.raises(ValueError, match=r"domains \['a'\] that are not in 'domains' \['b'\]"):
        tokenize_examples(examples, plain_tokenizer, 32, domains=["b"])


# ----------------------------------------------------------------------------- collation
def _items(tok):
    examples = [ADD, Example("code", "print hello", "", "print 1")]
    return tokenize_examples(examples, tok, 64, domains=["math", "code"])[0]


def test_collate_right_padding(plain_tokenizer):
    items = _items(plain_tokenizer)  # lengths 9 + 5 = 14 and 8 + 3 = 11
    assert [len(t) for t in items] == [14, 11]
    batch = DataCollator.from_tokenizer(plain_tokenizer)(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "domain_ids"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 14)
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][1].tolist() == items[1].input_ids + [0] * 3  # <pad> id 0
    assert batch["attention_mask"][1].tolist() == [1] * 11 + [0] * 3
    assert batch["labels"][1].tolist() == items[1].labels + [IGNORE_INDEX] * 3
    assert batch["labels"][0].tolist() == items[0].labels
    assert batch["domain_ids"].tolist() == [0, 1]


def test_collate_left_padding_multiple_and_mappings(plain_tokenizer):
    items = [{"input_ids": t.input_ids, "labels": t.labels, "domain_id": t.domain_id} for t in _items(plain_tokenizer)]
    batch = collate_batch(items, pad_token_id=7, padding_side="left", pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][1].tolist() == [7] * 5 + items[1]["input_ids"]
    assert batch["attention_mask"][0].tolist() == [0] * 2 + [1] * 14
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 5 + items[1]["labels"]
    with pytest.raises(ValueError, match="padding_side"):
        collate_batch(items, 0, padding_side="middle")
    with pytest.raises(ValueError, match="input_ids has 2 tokens but labels has 1"):
        collate_batch([{"input_ids": [1, 2], "labels": [1], "domain_id": 0}], 0)


def test_pad_id_falls_back_to_eos(tokenizer_factory):
    tok = tokenizer_factory(pad=None)
    assert tok.pad_token_id is None
    assert resolve_pad_token_id(tok) == tok.eos_token_id == 3
    batch = DataCollator.from_tokenizer(tok)(_items(tok))
    assert batch["input_ids"][1, 11:].tolist() == [3] * 3
    assert batch["labels"][1, 11:].tolist() == [IGNORE_INDEX] * 3  # pads are never supervised
    assert batch["labels"][1, 10].item() == 3  # while the real EOS is


def test_dataloader_end_to_end(chat_tokenizer):
    items = _items(chat_tokenizer) * 3
    loader = DataLoader(items, batch_size=4, collate_fn=DataCollator.from_tokenizer(chat_tokenizer))
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 2]
    for b in batches:
        supervised = b["labels"] != IGNORE_INDEX
        assert torch.equal(b["input_ids"][supervised], b["labels"][supervised])
        assert not (supervised & (b["attention_mask"] == 0)).any()


def test_empty_input_gives_empty_output(plain_tokenizer):
    items, stats = tokenize_examples([], plain_tokenizer, 16, domains=["math"])
    assert items == [] and stats.total.examples == 0 and list(stats.domains) == ["math"]


def test_token_digest_tells_tokenizations_apart(chat_tokenizer, tokenizer_factory):
    """The digest is a function of the token sequences: the same inputs give the same digest, and a tokenizer
    whose EOS is not the end-of-turn marker (an EOS appended after it in every example) gives another one."""
    _, first = tokenize_examples([ADD, ADD_WITH_INPUT], chat_tokenizer, max_seq_length=64)
    _, again = tokenize_examples([ADD, ADD_WITH_INPUT], chat_tokenizer, max_seq_length=64)
    assert len(first.sha256) == 64 and first.sha256 == again.sha256
    assert first.as_dict()["sha256"] == first.sha256 and f"token ids sha256: {first.sha256[:16]}" in first.summary()
    other_eos = tokenizer_factory(CHAT_TEMPLATE, eos="<eos>")
    _, shifted = tokenize_examples([ADD, ADD_WITH_INPUT], other_eos, max_seq_length=64)
    assert shifted.total.supervised_tokens == first.total.supervised_tokens + 2  # one "<eos>" per example
    assert shifted.sha256 != first.sha256
    _, cut = tokenize_examples([ADD, ADD_WITH_INPUT], chat_tokenizer, max_seq_length=8)
    _, reordered = tokenize_examples([ADD_WITH_INPUT, ADD], chat_tokenizer, max_seq_length=64)
    assert len({first.sha256, cut.sha256, reordered.sha256}) == 3
