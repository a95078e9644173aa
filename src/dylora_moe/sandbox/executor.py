"""The executor interface the evaluation harness uses: submit runs, get results; isolation stays in here.

``Executor`` is what a harness needs (``submit`` a :class:`~.client.Submission` or a whole program, get a
future of its :class:`~.result.ExecutionResult`; ``map`` many in order); ``SandboxExecutor`` is the one
implementation, a thread pool over the fork server::

    with SandboxExecutor(SandboxLimits(timeout_s=5), workers=2) as executor:
        future = executor.submit(Submission(candidate=code, tests=tests, entry_point="f"))
        results = executor.map(submissions, progress=lambda done, total, result: ...)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Protocol

from .client import Submission, run_one
from .limits import SandboxLimits
from .result import ExecutionResult


class Executor(Protocol):
    """Runs submissions (or whole programs) somewhere isolated; the caller never sees how."""

    def submit(self, item: Submission | str) -> Future[ExecutionResult]: ...

    def map(self, items: Sequence[Submission | str],
            progress: Callable[[int, int, ExecutionResult], None] | None = None) -> list[ExecutionResult]: ...

    def close(self) -> None: ...


class SandboxExecutor:
    """``workers`` runs at a time (default ``os.cpu_count()``) in this package's sandbox, with ``limits``."""

    def __init__(self, limits: SandboxLimits | None = None, workers: int | None = None) -> None:
        import os

        self.limits = limits or SandboxLimits()
        self.workers = max(1, workers or os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sandbox")

    def submit(self, item: Submission | str) -> Future[ExecutionResult]:
        return self._pool.submit(run_one, item, self.limits)

    def map(self, items: Sequence[Submission | str],
            progress: Callable[[int, int, ExecutionResult], None] | None = None) -> list[ExecutionResult]:
        """Run ``items``, results in input order; ``progress(done, total, result)`` from the calling thread."""
        futures = {self.submit(item): index for index, item in enumerate(items)}
        results: list[ExecutionResult | None] = [None] * len(items)
        for done, future in enumerate(as_completed(futures), start=1):
            results[futures[future]] = future.result()
            if progress is not None:
                progress(done, len(items), results[futures[future]])
        return [r for r in results if r is not None]

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> SandboxExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_many(
    items: Sequence[Submission | str],
    limits: SandboxLimits | None = None,
    workers: int | None = None,
    progress: Callable[[int, int, ExecutionResult], None] | None = None,
) -> list[ExecutionResult]:
    """Run ``items`` (submissions, or whole programs) in parallel, ``workers`` at a time (default
    ``os.cpu_count()``); results in input order. ``progress(done, total, result)`` is called from the calling
    thread after each run. A harness-side failure for one item becomes an ``"error"`` result."""
    with SandboxExecutor(limits, workers) as executor:
        return executor.map(items, progress)
