"""Sandbox for untrusted, model-generated Python (pass@k), behind a small executor interface.

A *judged* run executes the candidate's code in one process and the trusted tests in another, the judge,
which alone writes the verdict; only plain data crosses between them, so a candidate cannot forge a pass
by introspection, tracing or objects that equal everything. Every process runs in its own pid, network,
mount, ipc and uts namespaces, on a minimal read-only file system view, as a random unprivileged uid, under
a seccomp filter, rlimits and a memory cap for the whole run. Linux only; threat model, layers and limits:
``docs/sandbox.md``::

    from dylora_moe.sandbox import SandboxExecutor, SandboxLimits, Submission, run_tests

    result = run_tests(Submission(candidate=code, tests=tests, entry_point="f"), SandboxLimits(timeout_s=5))
    result.status, result.reason        # ("failed", "AssertionError: expected 3")
    with SandboxExecutor(SandboxLimits(timeout_s=5), workers=2) as executor:
        results = executor.map(submissions)

Importing this package imports neither torch nor the rest of ``dylora_moe``'s model code.
"""

from .client import Submission, run_one, run_program, run_tests, server_pid
from .executor import Executor, SandboxExecutor, run_many
from .limits import SandboxLimits
from .result import ERROR, FAILED, KILLED, MEMORY, PASSED, STATUSES, SYNTAX_ERROR, TIMEOUT, ExecutionResult

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
    "Executor",
    "SandboxExecutor",
    "SandboxLimits",
    "Submission",
    "run_many",
    "run_one",
    "run_program",
    "run_tests",
    "server_pid",
]
