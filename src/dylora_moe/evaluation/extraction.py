"""Code from a model's output: stop sequences, fenced blocks, sanitising, and the solution of a completion.

torch-free (``dylora-moe eval --rescore`` uses it without a model)::

    extract_code("Here you go:\n```python\ndef f(x):\n    return x\n```", "f")   # 'def f(x):\n    return x\n'
    solution_for(problem, completion, "completion")                              # problem.prompt + completion
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence

from .benchmarks import Problem

__all__ = [
    "PROMPT_STYLES",
    "STOP_SEQUENCES",
    "extract_code",
    "fenced_blocks",
    "sanitize_code",
    "solution_for",
    "stops_for",
    "truncate_at_stop",
]

PROMPT_STYLES = ("auto", "chat", "completion", "instruction")
#: Completion-style stop sequences (a new top-level statement ends the function being written).
STOP_SEQUENCES: dict[str, tuple[str, ...]] = {
    "humaneval": ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "),
    "mbpp": ("\nassert ", '\n"""', "\nprint(", "\nif __name__", "\n```"),
}
_PYTHON_FENCES = {"", "python", "py", "python3", "py3"}
_CODE_START = re.compile(r"^(?:def |class |import |from |@|async def )", re.M)


# ----------------------------------------------------------------------------- post-processing
def stops_for(benchmark: str) -> tuple[str, ...]:
    """The completion-style stop sequences of ``benchmark`` (HumanEval's for unknown names)."""
    return STOP_SEQUENCES.get(benchmark, STOP_SEQUENCES["humaneval"])


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut]


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, code)`` of every Markdown fenced block; an unclosed last block runs to the end."""
    blocks: list[tuple[str, str]] = []
    lang: str | None = None
    lines: list[str] = []
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if lang is None:
            if stripped.startswith("```"):
                lang, lines = stripped[3:].strip().lower(), []
        elif stripped.startswith("```"):
            blocks.append((lang, "".join(lines)))
            lang = None
        else:
            lines.append(line)
    if lang is not None and lines:
        blocks.append((lang, "".join(lines)))
    return blocks


def _defines(code: str, name: str) -> bool:
    return bool(name) and re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def _parsable_prefix(code: str) -> str | None:
    """The longest run of leading lines that parses (drops trailing prose or a cut-off statement)."""
    lines = code.splitlines(keepends=True)
    for end in range(len(lines), 0, -1):
        candidate = "".join(lines[:end])
        try:
            ast.parse(candidate)
        except (SyntaxError, ValueError):
            continue
        return candidate
    return None


def sanitize_code(code: str) -> str:
    """Keep the top-level definitions of ``code``: drop expression statements (``print(...)``), asserts and
    ``if __name__ == '__main__':`` blocks, which are demos or the model's own tests. Code that does not
    parse is cut to its longest parsable prefix when that prefix defines something, else kept unchanged.
    Kept statements are sliced from the original text, so their formatting and comments are preserved."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        prefix = _parsable_prefix(code)
        if prefix is None or prefix.strip() == code.strip() or "def " not in prefix:
            return code
        return sanitize_code(prefix)
    lines = code.splitlines(keepends=True)
    kept: list[str] = []
    for node in tree.body:
        if isinstance(node, (ast.Expr, ast.Assert)):
            continue
        if isinstance(node, ast.If) and "__name__" in ast.unparse(node.test):
            continue
        start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
        kept.append("".join(lines[start - 1 : node.end_lineno]).rstrip() + "\n")
    return "\n".join(kept)


def extract_code(reply: str, entry_point: str = "") -> str:
    """The solution code of a chat reply.

    The fenced blocks marked python (or unmarked) are candidates, else all fenced blocks; the first one
    that defines ``entry_point`` wins, else the first one. Code written before the first fence (from the
    first line that starts like code: ``def``, ``class``, ``import``, ``from``, ``@``) is a candidate too,
    ahead of the blocks: models often omit the opening fence and close the code with one, and the text
    after that closing fence is prose, not code. Without any fence, the reply from its first code-like
    line is used. The result goes through :func:`sanitize_code`; code that is only an indented function
    body is returned as is.
    """
    blocks = fenced_blocks(reply)
    candidates = [code for lang, code in blocks if lang in _PYTHON_FENCES] or [code for _, code in blocks]
    fence = re.search(r"^[ \t]*```", reply, re.M)
    lead = _CODE_START.search(reply[: fence.start()] if fence else reply)
    if lead:  # code before the first fence: that fence closes it (the reply never opened one)
        candidates.insert(0, reply[lead.start() : fence.start() if fence else len(reply)])
    if not candidates:
        return sanitize_code(reply)
    code = next((c for c in candidates if _defines(c, entry_point)), candidates[0])
    if code[:1] in (" ", "\t") and code.strip() and not _defines(code.lstrip(), entry_point):
        return code  # a function body continuing the prompt
    return sanitize_code(code)


def solution_for(problem: Problem, completion: str, style: str) -> str:
    """The complete code for ``completion`` (before the tests are appended)."""
    if style == "completion":
        return problem.prompt + completion
    code = extract_code(completion, problem.entry_point)
    if problem.benchmark != "humaneval":
        return code
    if code[:1] in (" ", "\t"):
        return problem.prompt + code  # the body of the prompt's function
    return problem.prompt + "\n\n" + code  # imports and helpers of the prompt, then the new definition
