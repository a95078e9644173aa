"""Helpers for the continual-learning tests: two obviously different synthetic skills on the tiny vocabulary.

Skill ``A`` uses arithmetic words, skill ``B`` list/printing words; both are written as JSON Lines
instruction files by the tests (so the data path is the real one). With the tiny random llama, held-out
batches of the same skill have raw cosine similarity ~0.99 and the two skills ~0.7, hence ``THRESHOLD`` for
the raw form; the helpers use the default detector (standardized similarity, its default threshold).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from dylora_moe.continual import ContinualConfig
from dylora_moe.data import Example

A_WORDS = ["add", "two", "numbers", "return", "a", "+", "b", "x", "y"]
B_WORDS = ["sort", "the", "list", "print", "hello", "world", "some", "context"]
THRESHOLD = 0.9


def skill_examples(words: list[str], n: int, seed: int, domain: str = "skill") -> list[Example]:
    rng = random.Random(seed)
    return [Example(domain, " ".join(rng.choice(words) for _ in range(6)), "",
                    " ".join(rng.choice(words) for _ in range(8))) for _ in range(n)]


def write_skill_file(path: Path, examples: list[Example]) -> Path:
    path.write_text("".join(json.dumps({"instruction": e.instruction, "input": e.input, "output": e.output}) + "\n"
                            for e in examples))
    return path


def fast_config(**changes) -> ContinualConfig:
    base = dict(seed_steps=3, seed_lr=1e-2, consolidate_steps=3, consolidate_lr=1e-3,
                batch_size=4, max_seq_length=64, embed_examples=32, replay_per_skill=4, replay_fraction=0.5)
    base.update(changes)
    config = ContinualConfig(**base)
    config.validate()
    return config
