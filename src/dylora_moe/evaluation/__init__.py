"""Evaluation: sandboxed pass@k on HumanEval and MBPP, and routing specialisation analysis.

* :mod:`dylora_moe.sandbox` -- the sandbox that judges untrusted, model-generated code (``docs/sandbox.md``);
  its names are re-exported here;
* :mod:`.benchmarks` -- HumanEval and MBPP problems, prompts and test programs;
* :mod:`.generation` -- batched generation, stop sequences, code extraction, routing per prompt;
* :mod:`.passk` -- the unbiased pass@k estimator;
* :mod:`.harness` -- :func:`evaluate`, tying them together (``results.jsonl``, ``summary.json``), and
  :func:`rescore`, which scores stored completions again;
* :mod:`.analysis` -- :func:`analyze`, per-domain loss and domain x expert routing statistics;
* :mod:`.compare` -- :func:`compare_runs`, two runs paired problem by problem (exact sign test);
* :mod:`.config` -- :class:`EvalConfig`, every setting of an evaluation (the ``eval`` command's options).

See ``docs/evaluation.md``. The model-side modules are imported lazily, so importing this package (and the
sandbox) does not import torch::

    from dylora_moe.evaluation import evaluate, analyze, pass_at_k
    summary = evaluate("runs/ckpt", benchmark="humaneval", output_dir="eval/he")
"""

from __future__ import annotations

from ..errors import EvaluationError
from ..lazy import lazy_exports
from ..sandbox import (
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
    Submission,
    run_many,
    run_program,
    run_tests,
)
from .config import EvalConfig
from .passk import mean_pass_at_k, pass_at_k, pass_at_k_table

_LAZY = {
    "Problem": ".benchmarks",
    "load_problems": ".benchmarks",
    "GenerationConfig": ".generation",
    "Sample": ".generation",
    "extract_code": ".generation",
    "generate_samples": ".generation",
    "evaluate": ".harness",
    "rescore": ".harness",
    "run_references": ".harness",
    "analyze": ".analysis",
    "normalized_mutual_information": ".analysis",
    "compare_runs": ".compare",
    "sign_test": ".compare",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


__all__ = [
    "ERROR",
    "FAILED",
    "KILLED",
    "MEMORY",
    "PASSED",
    "STATUSES",
    "SYNTAX_ERROR",
    "TIMEOUT",
    "EvalConfig",
    "EvaluationError",
    "ExecutionResult",
    "GenerationConfig",
    "Problem",
    "Sample",
    "SandboxLimits",
    "Submission",
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
    "run_tests",
    "sign_test",
]
