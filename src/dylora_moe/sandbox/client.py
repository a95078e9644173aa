"""Harness side of the sandbox: ``run_tests`` and ``run_program`` (stdlib only).

Each call sends one request to the harness's fork server (``server.py``, started on first use) and turns
what the run reported into an :class:`~.result.ExecutionResult`::

    from dylora_moe.sandbox import Submission, SandboxLimits, run_tests, run_program

    job = Submission(candidate="def add(a, b):\\n    return a + b\\n", tests="assert add(1, 2) == 3\\n",
                     entry_point="add")
    run_tests(job, SandboxLimits(timeout_s=5)).status      # "passed": judged in another process
    run_program("print(1)\\n").status                       # "passed": a whole program, one process

A *judged* run (``run_tests``) executes the candidate's code in one process and the tests in another, the
judge, which alone can write the verdict; only plain data passes between them (docs/sandbox.md). A whole
program (``run_program``) runs in one process and proves it reached its end with a nonce: fine for code
that is not trying to fool the harness, not for candidates.
"""

from __future__ import annotations

import ast
import builtins
import functools
import json
import math
import os
import secrets
import select
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import syscall_filter
from ._process import kill, killpg
from .limits import SandboxLimits
from .result import ERROR, ExecutionResult, verdict
from .server import PROGRAM_ENV, PROGRAM_PATH
from .viewplan import plan_view

# Sandboxed processes run as random uids from this range (when the harness is root): one uid per process
# role per run, so RLIMIT_NPROC is per run and a run cannot signal or ptrace anything else.
_UID_BASE = 1_800_000_000
_UID_SPAN = 100_000_000
_GRACE_S = 5.0  # the harness's own backstop fires this long after the fork server should have ended the run
_SERVER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "server.py")


@dataclass(frozen=True)
class Submission:
    """A candidate and the tests that judge it: what :func:`run_tests` runs.

    ``candidate`` is the untrusted code (a completion, a solution), executed as ``__main__`` in its own
    process. ``tests`` is trusted test code, executed in the judge's process; it uses the candidate's
    functions and classes by name. ``prelude`` is trusted code the judge executes first (HumanEval's prompt:
    its imports and helper functions, so a candidate cannot redefine what the tests rely on).
    ``entry_point`` is always taken from the candidate, even where the prelude defines a stub of it.
    """

    candidate: str
    tests: str
    prelude: str = ""
    entry_point: str | None = None

    def candidate_names(self) -> list[str]:
        """The names the tests take from the candidate: the entry point, and every name the tests read that
        neither the tests, nor the prelude, nor Python's builtins define (e.g. a class the tests build)."""
        return list(_candidate_names(self.prelude, self.tests, self.entry_point))


@functools.lru_cache(maxsize=1024)
def _candidate_names(prelude: str, tests: str, entry_point: str | None) -> tuple[str, ...]:
    """:meth:`Submission.candidate_names`, parsed once per problem (many samples share the tests)."""
    defined, used = set(dir(builtins)), set()
    for source, scan_uses in ((prelude, False), (tests, True)):
        try:
            with warnings.catch_warnings():  # invalid escapes in a data set's tests are not the harness's to report
                warnings.simplefilter("ignore")
                tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                (used if isinstance(node.ctx, ast.Load) and scan_uses else defined).add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.arg):
                defined.add(node.arg)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                defined.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    names = sorted(used - defined - {entry_point})
    return tuple(([entry_point] if entry_point else []) + names)


def run_tests(submission: Submission, limits: SandboxLimits | None = None) -> ExecutionResult:
    """Judge ``submission``: its candidate in one sandboxed process, its tests in another (the judge)."""
    spec = {"prelude": submission.prelude, "tests": submission.tests, "names": submission.candidate_names()}
    return _run(limits or SandboxLimits(), submission.candidate, spec)


def run_program(program: str, limits: SandboxLimits | None = None) -> ExecutionResult:
    """Run one whole program (e.g. solution + tests) in a sandboxed interpreter and return its verdict."""
    return _run(limits or SandboxLimits(), program, None)


def run_one(item: Submission | str, limits: SandboxLimits | None = None) -> ExecutionResult:
    """:func:`run_tests` or :func:`run_program` by the item's type; a harness-side failure becomes ``"error"``."""
    try:
        return run_tests(item, limits) if isinstance(item, Submission) else run_program(item, limits)
    except Exception as exc:  # one broken run must not lose a batch
        return ExecutionResult(ERROR, f"harness error: {type(exc).__name__}: {exc}", 0.0, None)


def _memory_file(name: str) -> Any:
    """An anonymous in-memory file (``memfd_create``; a temporary file where that is missing)."""
    try:
        return open(os.memfd_create(f"dylora-sandbox-{name}", os.MFD_CLOEXEC), "w+b")
    except (AttributeError, OSError):
        return tempfile.TemporaryFile()


def _random_uids(count: int) -> list[int]:
    uids: list[int] = []
    while len(uids) < count:
        uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
        if uid not in uids:
            uids.append(uid)
    return uids


def _config(limits: SandboxLimits, judged: bool, workdir: str, uids: tuple[int | None, int | None],
            fd_names: list[str]) -> dict[str, Any]:
    """What the fork server needs to know of one run (marshalled with the request)."""
    exe = os.path.realpath(limits.interpreter or sys.executable)
    if limits.interpreter is None:
        prefixes = sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)})
    else:
        prefixes = [os.path.dirname(os.path.dirname(exe))]
    return {
        "mode": "judged" if judged else "program",
        "exe": exe,
        "fork": limits.interpreter is None and not limits.fresh_interpreter,
        "prefixes": prefixes,
        "workdir": os.path.realpath(workdir),
        "uid": uids[0],
        "judge_uid": uids[1],
        "timeout_s": limits.timeout_s,
        "cpu_s": limits.effective_cpu_s,
        "memory_bytes": limits.memory_bytes,
        "memory_cap": limits.memory_cap,
        "file_size_bytes": limits.file_size_bytes,
        "max_processes": limits.max_processes,
        "scratch_bytes": limits.scratch_bytes,
        "namespaces": limits.namespaces,
        "view": limits.filesystem_view,
        "plan": plan_view(exe, prefixes) if limits.filesystem_view else None,
        "syscall_filter": limits.syscall_filter,
        "fd_names": fd_names,
    }


def _run(limits: SandboxLimits, code: str, judge: dict[str, Any] | None) -> ExecutionResult:
    """One run: its files, the request to the fork server, the wait (with the harness's own backstop), the
    verdict."""
    started = time.monotonic()
    nonce = secrets.token_hex(32)
    uids = _random_uids(2) if limits.drop_privileges and os.geteuid() == 0 else [None, None]
    workdir = tempfile.mkdtemp(prefix="dylora-sandbox-")
    names = ["job", "proof", "meta", "out", "err"] + (["judge_job"] if judge is not None else [])
    files = {name: _memory_file(name) for name in names}
    try:
        job = code.encode("utf-8", "surrogatepass")
        files["job"].write(job if judge is not None else nonce.encode("ascii") + b"\n" + job)
        if judge is not None:
            files["judge_job"].write(json.dumps({**judge, "nonce": nonce}).encode("utf-8", "surrogatepass"))
        for handle in files.values():
            handle.flush()
            handle.seek(0)
        if uids[0] is not None:
            os.chown(workdir, uids[0], uids[0])
        config = _config(limits, judge is not None, workdir, (uids[0], uids[1]), names + ["reply"])
        reply = _server().submit(config, [files[name].fileno() for name in names])
        for name in ("job", "judge_job"):  # the harness no longer needs the nonce where anyone could find it
            if name in files:
                files.pop(name).close()
        try:
            top, finished = _await_run(reply, limits.timeout_s + _GRACE_S)
        finally:
            reply.close()
        if not finished:
            if top is not None:
                killpg(top)  # still alive (the server's end of the reply socket is open): its pid is its own
            _backstop_kill(_read_records(files["meta"]), [u for u in uids if u is not None])
        return verdict(meta=_read_records(files["meta"]), proofs=_read_proofs(files["proof"]), nonce=nonce,
                       limits=limits, backstop=not finished, harness_s=time.monotonic() - started,
                       stdout_tail=_tail(files["out"], limits.max_output_bytes),
                       stderr_tail=_tail(files["err"], limits.max_output_bytes), judged=judge is not None)
    finally:
        for handle in files.values():
            handle.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _backstop_kill(meta: list[dict[str, Any]], uids: list[int]) -> None:
    """The fork server missed the run's deadline: kill the run's processes and every process of its uids."""
    import subprocess

    for record in meta:
        if record.get("event") == "spawned":
            for pid in record.get("pids", ()):
                if pid is not None:
                    killpg(int(pid))
                    kill(int(pid))
    for uid in uids:
        subprocess.run(
            [sys.executable, "-I", "-S", "-B", _SERVER_SCRIPT, "--sweep", str(uid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={"PATH": PROGRAM_PATH}, timeout=30, check=False,
        )


class _ForkServer:
    """Client side of the fork server: one pre-started server process per harness process.

    Requests go over a ``SOCK_SEQPACKET`` socket pair: the config (marshalled) and, as ``SCM_RIGHTS``, the
    run's files plus one end of a fresh reply socket. The server writes the run's top process's pid to the
    reply socket and closes it when the run is over, which the harness sees as end of file. The server exits
    when the harness closes (or loses) its end of the control socket; the runs' top processes die with it
    (``PR_SET_PDEATHSIG``), and their namespaces with them.
    """

    def __init__(self) -> None:
        import socket
        import subprocess

        self._socket = socket
        self.owner = os.getpid()
        self.lock = threading.Lock()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        passed = [theirs.fileno()]
        try:
            bpf = syscall_filter.compile_filter()
            read_end, write_end = os.pipe()
            os.write(write_end, bpf)  # a few hundred bytes: fits the pipe
            os.close(write_end)
            passed.append(read_end)
            extra = ["--filter", str(read_end)]
        except Exception as exc:  # no pyseccomp or no libseccomp: runs that need the filter end as "error"
            extra = ["--filter-error", f"system-call filter unavailable: {type(exc).__name__}: {exc}"]
        try:
            self.process = subprocess.Popen(
                # Not -I: its -E would ignore PYTHONHASHSEED, which the processes forked from it must share.
                # The real interpreter, not a venv symlink that may live in a folder the sandbox hides: the
                # processes forked from the server see it as their sys.executable.
                [os.path.realpath(sys.executable), "-s", "-S", "-B", "-u", _SERVER_SCRIPT, "--serve",
                 str(theirs.fileno()), *extra],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=tuple(passed), env=dict(PROGRAM_ENV), cwd="/", start_new_session=True,
            )
        finally:
            for fd in passed:
                os.close(fd)
        self.control = ours

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.owner == os.getpid() and self.process.poll() is None

    def submit(self, config: dict[str, Any], fds: Sequence[int]) -> Any:
        """Start one run; returns the harness's end of its reply socket."""
        import array
        import marshal

        socket = self._socket
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [*fds, theirs.fileno()]))]
            with self.lock:
                self.control.sendmsg([marshal.dumps(config)], rights)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return ours

    def close(self) -> None:
        self.control.close()
        try:
            self.process.wait(timeout=5)
        except Exception:
            self.process.kill()
            self.process.wait()


_SERVER: _ForkServer | None = None
_SERVER_LOCK = threading.Lock()


def _server() -> _ForkServer:
    """The harness's fork server, started on first use and again if it died (or after a fork of the harness)."""
    global _SERVER
    with _SERVER_LOCK:
        if _SERVER is None or not _SERVER.alive():
            if _SERVER is not None and _SERVER.owner == os.getpid():
                _SERVER.close()
            _SERVER = _ForkServer()
            import atexit

            atexit.register(_SERVER.close)
        return _SERVER


def server_pid() -> int | None:
    """The pid of this process's sandbox fork server (a child of this process), or None before first use."""
    return _SERVER.pid if _SERVER is not None and _SERVER.alive() else None


def _await_run(reply: Any, timeout: float) -> tuple[int | None, bool]:
    """``(top process pid, finished)``: wait up to ``timeout`` s for the run's end (end of file on the reply)."""
    deadline = time.monotonic() + timeout
    data = b""
    poller = select.poll()
    poller.register(reply.fileno(), select.POLLIN | select.POLLHUP)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(math.ceil(remaining * 1000)):
            break
        chunk = reply.recv(64)
        if not chunk:
            head = data.split(b"\n", 1)[0]
            return (int(head) if head.isdigit() else None), True
        data += chunk
    head = data.split(b"\n", 1)[0]
    return (int(head) if head.isdigit() and b"\n" in data else None), False


def _read_all(handle: Any) -> bytes:
    size = os.fstat(handle.fileno()).st_size
    return os.pread(handle.fileno(), min(size, 1 << 20), 0) if size else b""


def _read_records(handle: Any) -> list[dict[str, Any]]:
    records = []
    for line in _read_all(handle).splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _read_proofs(handle: Any) -> list[tuple[str, int, str]]:
    proofs = []
    for line in _read_all(handle).decode("utf-8", "replace").splitlines():
        parts = line.split("\t", 2)
        if len(parts) == 3 and parts[1].isdigit():
            proofs.append((parts[0], int(parts[1]), parts[2]))
    return proofs


def _tail(handle: Any, limit: int) -> str:
    size = os.fstat(handle.fileno()).st_size
    count = min(size, limit)
    data = os.pread(handle.fileno(), count, size - count) if count else b""
    return data.decode("utf-8", "replace")
