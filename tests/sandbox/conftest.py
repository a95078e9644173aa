"""Shared fixtures of the sandbox tests: every run is checked to leave the harness and the machine unharmed.

``run_checked`` (a whole program) and ``judge_checked`` (a submission: candidate + tests) assert, besides
the verdict each test checks, that no process of the test's private uid range is left, that the test process
has no new child, that the sandbox's temporary folders are gone, that the run took less than ``timeout_s +
3 s``, and (as root) that every isolation layer was active. Every hostile program is bounded on its own (at
most 256 forks, 2 GiB, 60 s), so nothing here can hurt the machine even if a limit failed.
"""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from dylora_moe.sandbox import STATUSES, ExecutionResult, SandboxLimits, Submission, client, run_program, run_tests

ROOT = os.geteuid() == 0
FAST = SandboxLimits(timeout_s=5.0, memory_bytes=512 << 20, max_processes=16)


def _world_executable_python() -> str | None:
    """An interpreter any uid can run: needed when the sandbox has no mount namespace to expose one."""
    for candidate in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        path = os.path.realpath(candidate)
        parts = Path(path).parents
        if os.path.isfile(path) and os.stat(path).st_mode & 0o001 and all(p.stat().st_mode & 0o001 for p in parts):
            return path
    return None


# Without namespaces, as root: the fresh uid, rlimits and the uid sweep are what is left.
_PLAIN_PYTHON = _world_executable_python() if ROOT else None
NO_NAMESPACES = SandboxLimits(
    timeout_s=5.0, memory_bytes=512 << 20, max_processes=16, namespaces=False, interpreter=_PLAIN_PYTHON
)
# Programs are forked from the server's pristine interpreter by default; FRESH executes a new one per program.
FRESH = SandboxLimits(timeout_s=5.0, memory_bytes=512 << 20, max_processes=16, fresh_interpreter=True)
MODES = [pytest.param(FAST, id="full"), pytest.param(FRESH, id="fresh-interpreter")] + (
    [pytest.param(NO_NAMESPACES, id="no-namespaces")] if _PLAIN_PYTHON else []
)
FULL_LAYERS = {"pid-ns", "net-ns", "mount-ns", "fs-view", "readonly-root", "private-proc", "scratch-tmpfs", "uid",
               "rlimits", "no-new-privs", "seccomp"}

root_only = pytest.mark.skipif(not ROOT, reason="the isolation layers checked here need root")


@pytest.fixture(autouse=True)
def narrow_uid_range(monkeypatch):
    """Sandbox uids come from a range private to this test, so leftovers can be found (and are ours)."""
    base = client._UID_BASE + secrets.randbelow(client._UID_SPAN // 1000) * 1000
    monkeypatch.setattr(client, "_UID_BASE", base)
    monkeypatch.setattr(client, "_UID_SPAN", 1000)
    return range(base, base + 1000)


@pytest.fixture(autouse=True)
def private_tempdir(monkeypatch, tmp_path_factory):
    """The harness's temporary files and sandbox directories go to a directory private to this test."""
    path = tmp_path_factory.mktemp("harness-tmp")
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


def _proc_status(pid: str) -> dict[str, str]:
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    except OSError:
        pass
    return fields


def _live_processes() -> dict[int, dict[str, str]]:
    """pid -> /proc status of every process that is not a zombie."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            status = _proc_status(entry)
            if status and not status.get("State", "").startswith("Z"):
                table[int(entry)] = status
    return table


def _sandbox_processes(uids: range) -> list[int]:
    return [pid for pid, st in _live_processes().items() if int(st.get("Uid", "0").split()[0]) in uids]


def _my_children() -> set[int]:
    me = str(os.getpid())
    return {pid for pid, st in _live_processes().items() if st.get("PPid") == me}


def _with_token(token: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if token.encode() in handle.read():
                        found.append(int(entry))
            except OSError:
                pass
    return [pid for pid in found if pid in _live_processes()]


def _check_unharmed(run, limits: SandboxLimits, uids: range, private_tempdir: Path) -> ExecutionResult:
    client._server()  # the fork server is the harness's one long-lived child: started before counting
    children = _my_children()
    started = time.monotonic()
    result = run()
    elapsed = time.monotonic() - started
    assert elapsed < limits.timeout_s + 3.0, (elapsed, result)
    assert _sandbox_processes(uids) == [], result
    assert _my_children() <= children, result
    assert list(private_tempdir.iterdir()) == [], result  # sandbox directory removed
    assert result.status in STATUSES
    if ROOT and limits.namespaces and result.status != "error":
        switched_off = {"seccomp"} if not limits.syscall_filter else set()
        switched_off |= {"fs-view"} if not limits.filesystem_view else set()
        assert FULL_LAYERS - switched_off <= set(result.isolation), result.isolation
        assert not switched_off & set(result.isolation), result.isolation
        assert {"memory-cgroup", "memory-rlimit"} & set(result.isolation), result.isolation
    return result


@pytest.fixture
def run_checked(narrow_uid_range, private_tempdir):
    """run_program + the checks that the harness and the machine are unharmed."""

    def run(program: str, limits: SandboxLimits = FAST) -> ExecutionResult:
        return _check_unharmed(lambda: run_program(textwrap.dedent(program), limits), limits, narrow_uid_range,
                               private_tempdir)

    return run


@pytest.fixture
def judge_checked(narrow_uid_range, private_tempdir):
    """run_tests(Submission(candidate, tests, ...)) + the same checks."""

    def run(candidate: str, tests: str, limits: SandboxLimits = FAST, **fields) -> ExecutionResult:
        submission = Submission(candidate=textwrap.dedent(candidate), tests=textwrap.dedent(tests), **fields)
        return _check_unharmed(lambda: run_tests(submission, limits), limits, narrow_uid_range, private_tempdir)

    return run
