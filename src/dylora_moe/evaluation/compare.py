"""Paired comparison of two evaluation runs on the same problems.

Two models' pass@1 on a few hundred problems differ by a few problems from chance alone. Pairing the runs
problem by problem says more than the two scores: only the problems that exactly one side solves carry
information, and the exact two-sided sign test on them (McNemar's exact test) gives the probability of a
split at least that uneven if both sides were equally good::

    result = compare_runs("eval/lora-mbpp", "eval/moe-mbpp")
    result.only_a, result.only_b, result.p_value

CLI: ``dylora-moe compare RUN_A RUN_B [--json FILE]`` (each a folder written by ``dylora-moe eval``). Each
problem's verdict is its first sample's (``sample`` 0): greedy pass@1 runs have exactly one.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PairedComparison", "compare_runs", "count_pairs", "read_verdicts", "sign_test"]


@dataclass
class PairedComparison:
    """Two runs paired problem by problem (``a`` and ``b`` are their folders)."""

    a: str
    b: str
    benchmark: str | None
    pairs: int = field(metadata={"help": "problems both runs scored"})
    both: int = 0
    only_a: int = 0
    only_b: int = 0
    neither: int = 0
    p_value: float = 1.0
    only_a_tasks: list[str] = field(default_factory=list)
    only_b_tasks: list[str] = field(default_factory=list)

    @property
    def pass_at_1(self) -> tuple[float, float]:
        """pass@1 of a and of b over the paired problems."""
        return (self.both + self.only_a) / self.pairs, (self.both + self.only_b) / self.pairs

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pass@1": list(self.pass_at_1)}


def sign_test(only_a: int, only_b: int) -> float:
    """Exact two-sided sign test on the discordant pairs of a paired comparison: the probability, if both
    sides were equally good, of a split at least this uneven. 1.0 with no discordant pair."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n)


def read_verdicts(run_dir: str | Path) -> dict[str, bool]:
    """``{task_id: passed}`` from a run's ``results.jsonl`` (first sample of each problem); a
    ``ValueError`` names the file and line of a row it cannot read. In a references run (``eval
    --references``) only the reference solutions' rows count: its ``pass_body`` rows are the sandbox's
    sanity check (an empty body), not the run's verdicts."""
    path = Path(run_dir) / "results.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (a folder written by `dylora-moe eval` holds it)")
    verdicts: dict[str, bool] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            task, status, sample = row["task_id"], row["status"], row.get("sample", 0)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}, line {number}: not a result row with task_id and status ({exc})") from None
        if sample == 0 and row.get("kind", "reference") == "reference":
            verdicts[task] = status == "passed"
    return verdicts


def count_pairs(a: dict[str, bool], b: dict[str, bool]) -> dict[str, Any]:
    """Counts over the problems both verdict maps hold: ``both``, ``only_a``, ``only_b``, ``neither``, and
    the task ids only one side solves (sorted)."""
    common = sorted(a.keys() & b.keys())
    only_a = [t for t in common if a[t] and not b[t]]
    only_b = [t for t in common if b[t] and not a[t]]
    both = sum(a[t] and b[t] for t in common)
    return {"pairs": len(common), "both": both, "only_a": len(only_a), "only_b": len(only_b),
            "neither": len(common) - both - len(only_a) - len(only_b), "only_a_tasks": only_a,
            "only_b_tasks": only_b}


def _benchmark(run_dir: Path) -> str | None:
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text()).get("benchmark") if summary.is_file() else None


def compare_runs(a: str | Path, b: str | Path) -> PairedComparison:
    """Pair two runs' verdicts; raises ``ValueError`` when they are of different benchmarks or share no
    problem."""
    a, b = Path(a), Path(b)
    bench_a, bench_b = _benchmark(a), _benchmark(b)
    if bench_a and bench_b and bench_a != bench_b:
        raise ValueError(f"{a} is a {bench_a} run and {b} a {bench_b} run: nothing to pair")
    counts = count_pairs(read_verdicts(a), read_verdicts(b))
    if counts["pairs"] == 0:
        raise ValueError(f"{a} and {b} share no problem (task ids differ)")
    return PairedComparison(str(a), str(b), bench_a or bench_b, **counts,
                            p_value=sign_test(counts["only_a"], counts["only_b"]))
