"""Evaluation: sandboxed pass@k on HumanEval and MBPP, and routing specialisation analysis.

* :mod:`.execution` -- the sandbox that runs untrusted, model-generated programs (``docs/sandbox.md``);
* :mod:`.benchmarks` -- HumanEval and MBPP problems, prompts and test programs;
* :mod:`.generation` -- batched generation, stop sequences, code extraction, routing per prompt;
* :mod:`.passk` -- the unbiased pass@k estimator;
* :mod:`.harness` -- :func:`evaluate`, tying them together (``results.jsonl``, ``summary.json``), and
  :func:`rescore`, which scores stored completions again;
* :mod:`.analysis` -- :func:`analyze`, per-domain loss and domain x expert routing statistics;
* :mod:`.compare` -- :func:`compare_runs`, two runs paired problem by problem (exact sign test);
* :mod:`.commands` -- the ``eval``, ``compare`` and ``analyze`` subcommands.

See ``docs/evaluation.md``. The model-side modules are imported lazily, so importing the sandbox alone
stays cheap::

    from dylora_moe.evaluation import evaluate, analyze, pass_at_k
    summary = evaluate("runs/ckpt", benchmark="humaneval", output_dir="eval/he")
"""

from __future__ import annotations

from typing import Any

from .execution import (
    ERROR,
    FAILED,
    KILLED,
    MEMORY,
    PASSED,
    STATUSES,
    SYNTAX_ERROR,
    TIMEOUT,
    ExecutionResult,
    SandboxLimits,
    run_many,
    run_program,
)
from .passk import mean_pass_at_k, pass_at_k, pass_at_k_table

_LAZY = {
    "Problem": ".benchmarks",
    "load_problems": ".benchmarks",
    "GenerationConfig": ".generation",
    "Sample": ".generation",
    "extract_code": ".generation",
    "generate_samples": ".generation",
    "EvaluationError": ".harness",
    "evaluate": ".harness",
    "rescore": ".harness",
    "run_references": ".harness",
    "analyze": ".analysis",
    "normalized_mutual_information": ".analysis",
    "compare_runs": ".compare",
    "sign_test": ".compare",
    "add_commands": ".commands",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ERROR",
    "FAILED",
    "KILLED",
    "MEMORY",
    "PASSED",
    "STATUSES",
    "SYNTAX_ERROR",
    "TIMEOUT",
    "EvaluationError",
    "ExecutionResult",
    "GenerationConfig",
    "Problem",
    "Sample",
    "SandboxLimits",
    "add_commands",
    "analyze",
    "compare_runs",
    "evaluate",
    "extract_code",
    "generate_samples",
    "load_problems",
    "mean_pass_at_k",
    "normalized_mutual_information",
    "pass_at_k",
    "pass_at_k_table",
    "rescore",
    "run_many",
    "run_program",
    "run_references",
    "sign_test",
]
