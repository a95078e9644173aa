"""Evaluation utilities: a sandbox that runs untrusted, model-generated programs for pass@k.

See :mod:`dylora_moe.evaluation.execution` and ``docs/sandbox.md``.
"""

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

__all__ = [
    "ERROR",
    "FAILED",
    "KILLED",
    "MEMORY",
    "PASSED",
    "STATUSES",
    "SYNTAX_ERROR",
    "TIMEOUT",
    "ExecutionResult",
    "SandboxLimits",
    "run_many",
    "run_program",
]
