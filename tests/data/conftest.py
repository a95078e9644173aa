"""Fixtures for the data-layer tests: tiny in-process tokenizers and tiny data files (no downloads).

The tokenizers come from ``tests.tiny.make_tokenizer``: real ``transformers.PreTrainedTokenizerFast``
objects wrapping a ``tokenizers`` word-level model whose vocabulary is built from a fixed corpus,
with the ``Whitespace`` pre-tokenizer (``\\w+`` runs and punctuation runs are tokens), so token
counts in the tests can be worked out by hand.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from dylora_moe.data import sources
from tests.tiny import CHAT_TEMPLATE, CORPUS, SPECIAL, make_tokenizer  # noqa: F401  (re-exported for the tests)


@pytest.fixture(scope="session")
def plain_tokenizer() -> PreTrainedTokenizerFast:
    """No chat template, no BOS; pad ``<pad>`` (id 0), EOS ``<eos>`` (id 3)."""
    return make_tokenizer()


@pytest.fixture(scope="session")
def chat_tokenizer() -> PreTrainedTokenizerFast:
    """Chat template :data:`CHAT_TEMPLATE`; EOS is the end-of-turn marker ``<|end|>`` (id 6)."""
    return make_tokenizer(CHAT_TEMPLATE, eos="<|end|>")


@pytest.fixture
def tokenizer_factory() -> Callable[..., PreTrainedTokenizerFast]:
    return make_tokenizer


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the caller's data-dir variable or another test's registrations."""
    monkeypatch.delenv(sources.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(sources, "_REGISTRY", dict(sources._REGISTRY))


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_json(path: Path, value: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2), encoding="utf-8")
    return path


def mbpp_record(task_id: int, name: str = "f") -> dict[str, Any]:
    """An MBPP-format record with ``\\r\\n`` line endings in ``code`` like the original file."""
    return {
        "text": f"Write a function {name} number {task_id}.",
        "code": f"def {name}(x):\r\n    return x + {task_id}",
        "task_id": task_id,
        "test_setup_code": "",
        "test_list": [f"assert {name}(1) == {task_id + 1}", f"assert {name}(0) == {task_id}"],
        "challenge_test_list": [],
    }


#: Task ids of the tiny MBPP file: 2 prompt, 3 test, 2 validation, 4 train.
MBPP_IDS = [1, 10, 11, 200, 510, 511, 600, 601, 700, 900, 974]


def alpaca_records(n: int) -> list[dict[str, str]]:
    return [
        {"instruction": f"Write code number {i}", "input": "x = 1" if i % 2 else "", "output": f"print({i})"}
        for i in range(n)
    ]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data directory laid out like ``shared/data``: tiny mbpp.jsonl and code_alpaca_2k.json."""
    root = tmp_path / "data"
    write_jsonl(root / "mbpp" / "mbpp.jsonl", [mbpp_record(i) for i in MBPP_IDS])
    write_json(root / "code_alpaca" / "code_alpaca_2k.json", alpaca_records(40))
    return root
