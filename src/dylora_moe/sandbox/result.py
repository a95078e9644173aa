"""How a sandboxed run ended: ``ExecutionResult`` and the verdict rules that turn the server's reports into it.

Stdlib only. The server writes JSON events to the run's *meta* file (``ready``, ``spawned``,
``program_exit``, ``exit``, ``setup_error``) and the main process of the run (the program,
or in a judged run the judge) writes records ``kind<TAB>pid<TAB>text`` to the *proof* file. ``verdict`` reads
both; only ``done <main pid> <nonce>`` from the main process, which then exits with status 0, is a pass.
(The judge writes ``candidate <returncode> <cpu_s>`` before its last record when the candidate's process
ended under it.)
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any

from .limits import SandboxLimits

PASSED = "passed"
FAILED = "failed"  # an exception, an assertion, a non-zero exit, or an exit before the last statement
TIMEOUT = "timeout"  # wall-clock or CPU-time limit
MEMORY = "memory"  # MemoryError, or the run's memory cap (cgroup OOM kill)
SYNTAX_ERROR = "syntax_error"  # the candidate's code does not compile
KILLED = "killed"  # ended by a signal other than a time or memory limit (e.g. SIGSEGV, SIGABRT)
ERROR = "error"  # the sandbox itself could not run the program (or the trusted test prelude failed)
STATUSES = (PASSED, FAILED, TIMEOUT, MEMORY, SYNTAX_ERROR, KILLED, ERROR)


@dataclass
class ExecutionResult:
    """How one run ended.

    ``status`` is one of :data:`STATUSES`; ``reason`` is short human text (the exception type and message,
    the signal, the limit hit); ``duration_s`` is the run's wall time; ``returncode`` is the exit code of its
    main process (the program, or the judge), negative for a signal as in :mod:`subprocess` (``-9`` after a
    wall-clock timeout, ``None`` if it never ran); ``stdout_tail``/``stderr_tail`` are the last
    ``max_output_bytes`` of the output, for debugging only -- they never influence ``status``; ``isolation``
    lists the sandbox layers that were active; ``memory_peak_bytes`` is the run's peak memory as its cgroup
    measured it (``None`` without a cgroup).
    """

    status: str
    reason: str
    duration_s: float
    returncode: int | None
    stdout_tail: str = ""
    stderr_tail: str = ""
    isolation: tuple[str, ...] = ()
    memory_peak_bytes: int | None = None

    @property
    def passed(self) -> bool:
        return self.status == PASSED


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _signal_verdict(returncode: int, cpu_s: float, limits: SandboxLimits, oom_kills: int,
                    last: tuple[str, int, str] | None, whose: str) -> tuple[str, str]:
    signum = -returncode
    name = signal_name(signum)
    if signum == signal.SIGXCPU or (signum == signal.SIGKILL and cpu_s >= limits.effective_cpu_s - 0.05):
        return TIMEOUT, f"CPU time limit of {limits.effective_cpu_s}s exceeded ({whose}{name})"
    if signum == signal.SIGKILL and oom_kills:
        return MEMORY, (f"the run's memory cap of {limits.memory_bytes} bytes was exceeded "
                        f"({whose}killed by the OOM killer)")
    if last is not None and last[0] == "memory":
        return MEMORY, f"{last[2]} (then {whose}{name})"
    return KILLED, f"{whose}killed by {name}"


def verdict(
    *,
    meta: list[dict[str, Any]],
    proofs: list[tuple[str, int, str]],
    nonce: str,
    limits: SandboxLimits,
    backstop: bool,
    harness_s: float,
    stdout_tail: str,
    stderr_tail: str,
    judged: bool = False,
) -> ExecutionResult:
    """The :class:`ExecutionResult` of a run from its meta events and proof records (see the module docstring).

    In a judged run the judge may also record how the candidate's process ended (``candidate <returncode>
    <cpu_s>``) when it lost the channel to it, which tells a crash or a limit from an early exit."""
    events: dict[str, dict[str, Any]] = {}
    for record in meta:
        events.setdefault(str(record.get("event")), record)
    ready, finished, ended = events.get("ready", {}), events.get("exit"), events.get("program_exit")
    peak = finished.get("memory_peak_bytes") if finished else None

    def result(status: str, reason: str, returncode: int | None = None) -> ExecutionResult:
        duration = float(finished["wall_s"]) if finished else harness_s
        return ExecutionResult(status, reason, duration, returncode, stdout_tail, stderr_tail,
                               tuple(ready.get("layers", ())), peak)

    if "setup_error" in events:
        return result(ERROR, f"sandbox setup failed: {events['setup_error'].get('error')}")
    if finished is None:
        if backstop:
            return result(TIMEOUT, f"wall-clock limit of {limits.timeout_s:g}s exceeded (harness backstop)")
        return result(ERROR, "the sandbox's fork server ended the run without reporting")
    if finished.get("timed_out"):  # SIGKILLed, with its whole namespace / session / uid
        return result(TIMEOUT, f"wall-clock limit of {limits.timeout_s:g}s exceeded", -signal.SIGKILL)
    if ended is None:
        return result(ERROR, f"the sandbox keeper ended with status {finished.get('keeper')} before reporting")
    returncode = int(ended["returncode"])
    own = [p for p in proofs if p[1] == ready.get("pid")]
    status, reason = _ending(returncode, float(ended.get("cpu_s", 0.0)), own, nonce, limits,
                             int(finished.get("oom_kills") or 0), judged)
    return result(status, reason, returncode)


def _ending(returncode: int, cpu_s: float, own: list[tuple[str, int, str]], nonce: str, limits: SandboxLimits,
            oom_kills: int, judged: bool) -> tuple[str, str]:
    """``(status, reason)`` of a run whose main process ended with ``returncode`` and wrote the records ``own``."""
    candidate = next((p[2].split() for p in own if p[0] == "candidate"), None)
    finals = [p for p in own if p[0] != "candidate"]
    last = finals[-1] if finals else None
    if returncode == 0 and last is not None and last[0] == "done" and last[2] == nonce:
        return PASSED, "all tests ran and the process exited with status 0"
    if returncode < 0:
        return _signal_verdict(returncode, cpu_s, limits, oom_kills, last, "the judge, " if judged else "")
    if last is not None and last[0] == "gone" and candidate is not None and len(candidate) == 2:
        code = int(candidate[0])
        if code < 0:
            return _signal_verdict(code, float(candidate[1]), limits, oom_kills, None, "the candidate's process, ")
        return FAILED, f"{last[2]} (exit status {code})"
    if last is None:
        if returncode == 0:
            return FAILED, "exited with status 0 before its last statement (no completion proof)"
        return FAILED, f"exit status {returncode}"
    kind, _, detail = last
    if kind == "done":
        return FAILED, f"invalid completion record, exit status {returncode}"
    if kind == "error" and judged:
        return ERROR, detail
    return {"syntax_error": SYNTAX_ERROR, "memory": MEMORY}.get(kind, FAILED), detail
