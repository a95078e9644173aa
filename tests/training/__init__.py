"""Helpers for the trainer and CLI tests: tiny data files, a tiny model + tokenizer, a tiny TrainConfig.

The data use words of the tiny tokenizer's vocabulary (``tests.tiny.CORPUS``) so that the tiny
random llama has something learnable: fixed instruction -> output pairs in a Code Alpaca-style JSON
file and an MBPP-style JSON Lines file (task ids 511-516 are MBPP's validation split, 601-624 train).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dylora_moe import DyLoRAMoEConfig
from dylora_moe.data import sources
from dylora_moe.training import DataConfig, TrainConfig, TrainingArgs
from tests.tiny import make_base, make_tokenizer

WORDS = ["add", "two", "numbers", "sort", "the", "list", "print", "hello", "world", "some", "context"]
MBPP_VALIDATION = list(range(511, 517))
MBPP_TRAIN = list(range(601, 625))


def alpaca_records(n: int = 48) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(3 * i + 1) % len(WORDS)]
        out.append({"instruction": f"write a function to {a} {b} {i % 10}",
                    "input": "x = 1" if i % 3 == 0 else "",
                    "output": f"def f ( x ) : print ( {a} , {b} ) return x + {i % 10}"})
    return out


def mbpp_record(task_id: int) -> dict[str, Any]:
    d = task_id % 10
    return {
        "text": f"write a function to add {d} to the numbers .",
        "code": f"def f ( x ) :\r\n    return x + {d}",
        "task_id": task_id,
        "test_setup_code": "",
        "test_list": [f"assert f ( 1 ) == {d + 1}", f"assert f ( 0 ) == {d}"],
        "challenge_test_list": [],
    }


def write_data_dir(root: Path) -> Path:
    (root / "code_alpaca").mkdir(parents=True, exist_ok=True)
    (root / "mbpp").mkdir(parents=True, exist_ok=True)
    (root / "code_alpaca" / "code_alpaca_2k.json").write_text(json.dumps(alpaca_records(), indent=1))
    lines = [json.dumps(mbpp_record(t)) for t in MBPP_VALIDATION + MBPP_TRAIN]
    (root / "mbpp" / "mbpp.jsonl").write_text("\n".join(lines) + "\n")
    return root


def isolate_data_registry(monkeypatch) -> None:
    """Hide the caller's data-dir variable and other tests' dataset registrations (call from a fixture)."""
    monkeypatch.delenv(sources.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(sources, "_REGISTRY", dict(sources._REGISTRY))


def tiny_config(output_dir: Path, data_dir: Path, **changes: Any) -> TrainConfig:
    """A run of a few optimizer steps on the tiny data; ``changes`` are dotted keys, e.g. ``train.max_steps``."""
    config = TrainConfig(
        model="tiny-llama",
        output_dir=str(output_dir),
        moe=DyLoRAMoEConfig(num_experts=2, r=4, alpha=8, dropout=0.1),
        data=DataConfig(data_dir=str(data_dir), max_seq_length=96, eval_examples_per_domain=4, eval_batch_size=4),
        train=TrainingArgs(lr=1e-2, per_device_batch_size=4, gradient_accumulation_steps=2, max_steps=6,
                           warmup_steps=1, eval_every=3, save_every=2, save_total_limit=2, log_every=1),
    )
    return config.replace(**changes) if changes else config


def tiny_model_and_tokenizer():
    """A fresh tiny random llama (the trainer wraps it in place) and the tiny tokenizer."""
    return make_base("llama"), make_tokenizer()


BAD_DATA_CASES = ["malformed-jsonl-line", "missing-column", "missing-mbpp-column", "empty-file"]


def break_file(data_dir, case: str) -> str:
    """Damage one data file; return the regex the error message must match."""
    mbpp = data_dir / "mbpp" / "mbpp.jsonl"
    alpaca = data_dir / "code_alpaca" / "code_alpaca_2k.json"
    if case == "malformed-jsonl-line":
        lines = mbpp.read_text().splitlines()
        lines[2] = lines[2][:-5]  # cut the closing part of line 3
        mbpp.write_text("\n".join(lines) + "\n")
        return r"mbpp\.jsonl:3: malformed JSON"
    if case == "missing-column":
        records = json.loads(alpaca.read_text())
        del records[5]["output"]
        alpaca.write_text(json.dumps(records))
        return r"code_alpaca_2k\.json: record 5: missing field 'output'"
    if case == "missing-mbpp-column":
        record = mbpp_record(700)
        del record["test_list"]
        mbpp.write_text(mbpp.read_text() + json.dumps(record) + "\n")
        return r"mbpp\.jsonl:\d+: missing field 'test_list'"
    if case == "empty-file":
        mbpp.write_text("")
        return r"mbpp\.jsonl: empty file"
    raise AssertionError(case)
