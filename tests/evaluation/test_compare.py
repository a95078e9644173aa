"""Paired comparison of two evaluation runs: counts, the exact sign test, bad input and the CLI."""

from __future__ import annotations

import json

import pytest

from dylora_moe.cli import main
from dylora_moe.evaluation.compare import compare_runs, count_pairs, read_verdicts, sign_test


def _run(folder, passed: dict[str, bool], benchmark: str = "mbpp", extra_rows=()) -> str:
    folder.mkdir(parents=True)
    rows = [{"task_id": t, "sample": 0, "status": "passed" if ok else "failed"} for t, ok in passed.items()]
    rows += list(extra_rows)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "summary.json").write_text(json.dumps({"benchmark": benchmark}))
    return str(folder)


def test_sign_test_exact_values():
    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert sign_test(5, 0) == pytest.approx(2 / 32) == sign_test(0, 5)
    assert sign_test(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert sign_test(1, 0) == 1.0  # one discordant problem says nothing
    assert sign_test(40, 10) < 1e-4


def test_count_pairs_uses_only_the_problems_both_runs_scored():
    a = {"T/1": True, "T/2": True, "T/3": False, "T/4": False, "T/5": True}
    b = {"T/1": True, "T/2": False, "T/3": True, "T/4": False, "T/9": True}
    counts = count_pairs(a, b)
    assert (counts["pairs"], counts["both"], counts["only_a"], counts["only_b"], counts["neither"]) == (4, 1, 1, 1, 1)
    assert counts["only_a_tasks"] == ["T/2"] and counts["only_b_tasks"] == ["T/3"]


def test_compare_runs_and_the_command(tmp_path, capsys):
    tasks = [f"MBPP/{i}" for i in range(11, 31)]
    a = _run(tmp_path / "a", {t: i < 8 for i, t in enumerate(tasks)},
             extra_rows=[{"task_id": "MBPP/11", "sample": 1, "status": "failed"}])  # later samples: ignored
    b = _run(tmp_path / "b", {t: i < 2 or i == 19 for i, t in enumerate(tasks)})
    result = compare_runs(a, b)
    assert (result.pairs, result.both, result.only_a, result.only_b, result.neither) == (20, 2, 6, 1, 11)
    assert result.pass_at_1 == (8 / 20, 3 / 20) and result.benchmark == "mbpp"
    assert result.p_value == pytest.approx(sign_test(6, 1)) == pytest.approx(16 / 128)
    assert result.only_b_tasks == ["MBPP/30"]
    out = tmp_path / "cmp.json"
    assert main(["compare", a, b, "--json", str(out), "--list"]) == 0
    text = capsys.readouterr().out
    assert "20 problems in both runs" in text and "only A 6, only B 1" in text and "p = 0.125" in text
    assert "only B: MBPP/30" in text
    saved = json.loads(out.read_text())
    assert saved["only_a"] == 6 and saved["pass@1"] == [0.4, 0.15]


def test_compare_rejects_what_cannot_be_paired(tmp_path, capsys):
    a = _run(tmp_path / "a", {"MBPP/11": True})
    other = _run(tmp_path / "he", {"HumanEval/0": True}, benchmark="humaneval")
    with pytest.raises(ValueError, match="mbpp run .* humaneval run"):
        compare_runs(a, other)
    disjoint = _run(tmp_path / "d", {"MBPP/12": True})
    with pytest.raises(ValueError, match="share no problem"):
        compare_runs(a, disjoint)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.jsonl").write_text(json.dumps({"task_id": "MBPP/11", "status": "passed"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad/results.jsonl, line 2: not a result row"):
        read_verdicts(bad)
    assert main(["compare", a, str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dylora-moe: error:") and "missing/results.jsonl: not found" in err


def test_compare_with_a_references_run_counts_the_references_not_their_pass_bodies(tmp_path, capsys):
    """A `dylora-moe eval --references` folder holds a `reference` row and a `pass_body` row (the sandbox's
    check that an empty body fails) per HumanEval problem; compare must read the references' verdicts."""
    refs = tmp_path / "refs"
    assert main(["eval", "--references", "--benchmark", "humaneval", "--limit", "5", "--workers", "2",
                 "--no-progress", "--output", str(refs)]) == 0
    kinds = [json.loads(line)["kind"] for line in (refs / "results.jsonl").read_text().splitlines()]
    assert kinds.count("reference") == 5 and kinds.count("pass_body") == 5
    assert read_verdicts(refs) == {f"HumanEval/{i}": True for i in range(5)}
    model = _run(tmp_path / "model", {f"HumanEval/{i}": i < 2 for i in range(5)}, benchmark="humaneval")
    result = compare_runs(model, refs)
    assert result.pass_at_1 == (0.4, 1.0) and (result.only_a, result.only_b) == (0, 3)
    capsys.readouterr()
    assert main(["compare", model, str(refs)]) == 0
    assert "only A 0, only B 3" in capsys.readouterr().out
