"""Skill data for continual learning: Code Alpaca split by programming language, and skill files.

``code_alpaca_language(example)`` labels one Code Alpaca example ``sql``, ``javascript``, ``python``,
``html``, ``java``, ``cpp`` or ``other`` from its instruction and its answer (the instruction naming a
language wins over the code's look). ``load_skill_examples(path_or_name)`` reads a skill's data: a JSON or
JSON Lines instruction file (``instruction``/``input``/``output``, errors name the file, line and field), a
registered dataset name, or ``code_alpaca:<language>``::

    sql = load_skill_examples("code_alpaca:sql", split="train")
    mine = load_skill_examples("my_skill.jsonl")
"""

from __future__ import annotations

import re
from pathlib import Path

from ..data import DatasetSpec, Example, get_spec, load_examples

__all__ = ["LANGUAGES", "code_alpaca_language", "load_skill_examples"]

LANGUAGES = ("sql", "javascript", "python", "html", "java", "cpp", "other")

_NAMED = [  # (language, pattern on the lower-cased instruction + input), first match wins
    ("sql", r"\bsql\b|\bmysql\b|\bpostgres|\bsqlite\b|\bquery\b"),
    ("javascript", r"javascript|\bjs\b|node\.?js|jquery|\breact\b|typescript"),
    ("python", r"\bpython\b|\bpandas\b|\bnumpy\b|\bdjango\b|\bflask\b"),
    ("java", r"\bjava\b"),
    ("cpp", r"c\+\+|\bc#"),
    ("html", r"\bhtml\b|\bcss\b"),
]
_LOOKS = [  # (language, pattern on the answer)
    ("sql", r"\bSELECT\b[\s\S]*\bFROM\b|\bINSERT INTO\b|\bCREATE TABLE\b|\bUPDATE\b[\s\S]*\bSET\b"),
    ("python", r"^\s*def \w+\(|^\s*import \w+|\bprint\("),
    ("javascript", r"console\.log|\bfunction\s*\w*\s*\(|=>|\b(?:const|let|var)\s+\w+\s*="),
    ("java", r"\bpublic\s+(?:static\s+)?(?:class|void|int|String)\b|System\.out\.print"),
    ("html", r"<(?:html|div|p|table|form|body|head|span|ul|li|input|h\d)\b"),
]


def code_alpaca_language(example: Example) -> str:
    """The programming language of a Code Alpaca example (see the module docstring)."""
    asked = f"{example.instruction} {example.input}".lower()
    for language, pattern in _NAMED:
        if re.search(pattern, asked):
            return language
    for language, pattern in _LOOKS:
        if re.search(pattern, example.output, flags=re.MULTILINE):
            return language
    return "other"


def load_skill_examples(source: str, split: str = "all", limit: int | None = None,
                        data_dir: str | Path | None = None) -> list[Example]:
    """A skill's examples from a JSON/JSONL instruction file, a registered dataset, or
    ``code_alpaca:<language>`` (:data:`LANGUAGES`); ``split`` and ``limit`` as in the data layer."""
    name, _, language = source.partition(":")
    if language:
        if name != "code_alpaca" or language not in LANGUAGES:
            raise ValueError(f"{source!r}: a language split must be code_alpaca:<language>, one of {LANGUAGES}")
        examples = [e for e in load_examples(get_spec("code_alpaca", split=split), data_dir)
                    if code_alpaca_language(e) == language]
        examples = [Example(domain=source, instruction=e.instruction, input=e.input, output=e.output, meta=e.meta)
                    for e in examples]
        return examples[:limit] if limit is not None else examples
    path = Path(source)
    if path.suffix.lower() in (".json", ".jsonl", ".ndjson") or path.is_file():
        spec = DatasetSpec(name=path.stem, loader="instruction", path=path.resolve(), split=split, limit=limit)
    else:
        spec = get_spec(source, split=split, limit=limit)
    return load_examples(spec, data_dir)
