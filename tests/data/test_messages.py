"""Chat (messages) data, column mapping and Hub data sets: from files, YAML configs and the Hub (a stand-in)."""

from __future__ import annotations

import json

import pytest

from dylora_moe.data import IGNORE_INDEX, DataError, DatasetSpec, build_prompt, load_examples, tokenize_examples
from tests.tiny import CHAT_TEMPLATE, make_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "add two numbers"}, {"role": "assistant", "content": "return a + b"},
     {"role": "user", "content": "sort the list"}, {"role": "assistant", "content": "print x"}],
    [{"role": "system", "content": "some context"}, {"role": "user", "content": "print hello"},
     {"role": "assistant", "content": "print hello world"}],
] * 20


def write_conversations(path, conversations=CONVERSATIONS, key="messages"):
    path.write_text("".join(json.dumps({key: c}) + "\n" for c in conversations))
    return path


def test_only_assistant_turns_are_supervised(tmp_path):
    tok = make_tokenizer(CHAT_TEMPLATE)
    spec = DatasetSpec(name="chat", loader="messages", path=write_conversations(tmp_path / "chat.jsonl"), split="all")
    examples = load_examples(spec)
    assert len(examples) == 40 and examples[0].instruction == "add two numbers" and examples[0].output == "print x"
    [two_turns, with_system], _ = tokenize_examples(examples[:2], tok, max_seq_length=128)
    supervised = tok.decode([t for t, label in zip(two_turns.input_ids, two_turns.labels) if label != IGNORE_INDEX])
    assert supervised.split() == "return a + b <|end|> print x <|end|>".split()
    masked = tok.decode([t for t, label in zip(two_turns.input_ids, two_turns.labels) if label == IGNORE_INDEX])
    assert "add two numbers" in masked and "sort the list" in masked and "print x" not in masked
    whole = tok.apply_chat_template(CONVERSATIONS[0], tokenize=False)  # the conversation as the template renders it
    assert two_turns.input_ids == tok(whole, add_special_tokens=False)["input_ids"]
    # generation's prompt: the conversation up to its last reply, then the assistant header
    assert build_prompt(examples[0], tok) == tok.apply_chat_template(CONVERSATIONS[0][:3], tokenize=False,
                                                                     add_generation_prompt=True)
    kept = tok.decode([t for t, label in zip(with_system.input_ids, with_system.labels) if label != IGNORE_INDEX])
    assert kept.split() == "print hello world <|end|>".split()
    # truncation keeps what fits; a conversation whose first reply does not fit is dropped
    short, stats = tokenize_examples(examples[:2], tok, max_seq_length=12)
    assert stats.total.dropped + stats.total.kept == 2 and all(len(t.input_ids) <= 12 for t in short)


@pytest.mark.parametrize("conversation,message", [
    ("not a list", "chat.jsonl:1: .*expected a non-empty list of messages"),
    ([{"role": "user", "content": "x"}], "chat.jsonl:1: .*needs an assistant turn after a user turn"),
    ([{"role": "bot", "content": "x"}], "chat.jsonl:1: .*role 'bot'"),
    ([{"role": "user"}], "chat.jsonl:1: .*string 'content'"),
])
def test_bad_conversations_name_the_file_line_and_field(tmp_path, conversation, message):
    path = write_conversations(tmp_path / "chat.jsonl", [conversation])
    with pytest.raises(DataError, match=message):
        load_examples(DatasetSpec(name="chat", loader="messages", path=path, split="all"))


def test_messages_need_a_chat_template_and_columns_map_the_conversation(tmp_path):
    path = write_conversations(tmp_path / "chat.jsonl", key="conversations")
    spec = DatasetSpec(name="chat", loader="messages", path=path, split="all", columns={"messages": "conversations"})
    examples = load_examples(spec)
    with pytest.raises(ValueError, match="need the tokenizer's chat template"):
        tokenize_examples(examples, make_tokenizer(), max_seq_length=64)
    with pytest.raises(ValueError, match="unknown keys in 'columns'"):
        load_examples(spec.replace(columns={"output": "x"}))


def test_hub_data_sets_read_the_given_config_and_split_and_errors_are_clear(monkeypatch):
    import datasets

    calls = []

    def load_dataset(hub_id, config, split):
        calls.append((hub_id, config, split))
        if hub_id == "me/offline":
            raise ConnectionError("Couldn't reach 'me/offline' on the Hub (LocalEntryNotFoundError)")
        return [{"question": f"add {i}", "answer": f"return {i}"} for i in range(40)]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    spec = DatasetSpec(name="qa", hub_id="me/qa", hub_config="python", hub_split="test", split="train",
                       columns={"instruction": "question", "output": "answer"})
    examples = load_examples(spec)
    assert calls == [("me/qa", "python", "test")] and examples[0].instruction.startswith("add")
    assert len(examples) + len(load_examples(spec.replace(split="validation"))) == 40
    with pytest.raises(DataError, match=r"cannot load 'me/offline' \(config None, split 'train'\) from the Hugging "
                                        r"Face Hub \(ConnectionError: Couldn't reach"):
        load_examples(DatasetSpec(name="x", hub_id="me/offline"))


def test_a_yaml_config_trains_on_chat_data_and_mapped_columns(tmp_path, monkeypatch):
    import yaml

    from dylora_moe.training import JointTrainer, TrainConfig
    from tests.tiny import make_base
    from tests.training import isolate_data_registry

    isolate_data_registry(monkeypatch)
    write_conversations(tmp_path / "chat.jsonl", key="conversations")
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"question": f"add {i % 9} numbers",
                                                           "answer": f"return a + {i % 9}"}) + "\n"
                                               for i in range(40)))
    config = {"model": "tiny", "output_dir": str(tmp_path / "run"),
              "moe": {"num_experts": 2, "r": 4, "alpha": 8},
              "data": {"data_dir": str(tmp_path), "max_seq_length": 64, "eval_examples_per_domain": 2,
                       "datasets": [{"name": "chat", "path": "chat.jsonl", "format": "messages",
                                     "columns": {"messages": "conversations"}},
                                    {"name": "qa", "path": "qa.jsonl",
                                     "columns": {"instruction": "question", "output": "answer"}}]},
              "train": {"max_steps": 2, "per_device_batch_size": 2, "gradient_accumulation_steps": 1,
                        "eval_every": 0, "save_every": 0, "lr": 1e-2, "report_to": []}}
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(config))
    result = JointTrainer(TrainConfig.from_yaml(path), make_base("llama"), make_tokenizer(CHAT_TEMPLATE)).train()
    assert result.global_step == 2 and set(result.metrics["eval_loss"]["end"]) == {"chat", "qa"}
    with pytest.raises(Exception, match=r"data.datasets.0.columns.*unknown field\(s\) \['output'\]"):
        TrainConfig.from_yaml(path, ["data.datasets.0.columns={output: x}"])
    with pytest.raises(Exception, match=r"data.datasets.1.format.*must be one of"):
        TrainConfig.from_yaml(path, ["data.datasets.1.format=sharegpt"])
