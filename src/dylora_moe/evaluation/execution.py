"""Sandbox that runs untrusted, model-generated Python programs for pass@k (HumanEval / MBPP).

A *program* is the candidate solution followed by its test code, concatenated by the caller.
:func:`run_program` runs one program in a fresh interpreter and returns an :class:`ExecutionResult`;
:func:`run_many` runs a list of them in parallel, in order::

    from dylora_moe.evaluation import SandboxLimits, run_many, run_program

    result = run_program(completion + "\\n\\n" + tests, SandboxLimits(timeout_s=5))
    result.status, result.reason        # ("failed", "AssertionError: expected 3")
    results = run_many(programs, SandboxLimits(timeout_s=5), workers=2)
    pass_count = sum(r.passed for r in results)

The status is ``"passed"`` only when the program's main process executed its last statement -- proved by
a random per-run nonce that the trusted runner writes to a dedicated file descriptor *after* the
program's code returned -- and then exited with status 0. Nothing the program prints is ever parsed.

Process layout when the harness runs as root (the normal case for evaluation containers)::

    harness --Popen, once--> fork server: this file run as a script (``--serve``), single-threaded
      |   (one request per program over a socket pair: config + file descriptors)
      --fork--> supervisor: root, own session, PR_SET_PDEATHSIG, enforces the wall-clock limit
      --unshare(pid, net, ipc, uts) + fork--> keeper: pid 1 of the new namespaces, root; own mount
      |     namespace: read-only root file system, a private size-capped tmpfs behind the program's
      |     directory, /tmp, /var/tmp and /dev/shm, a fresh /proc
      --fork--> program: own session, rlimits, a random unprivileged uid, no_new_privs
      --execve--> python -s -S -B -c RUNNER   (scrubbed environment, stdin /dev/null)

When the program's main process ends (or the wall clock runs out) the keeper exits (or is killed), and
the kernel kills everything left in the pid namespace; the program's session and, without a pid
namespace, every process of the sandbox uid are killed as well. Without root the same layers are
attempted through an unprivileged user namespace, and whatever is unavailable is skipped:
``ExecutionResult.isolation`` lists the layers that were active. Threat model, layers and their limits:
``docs/sandbox.md``.
"""

from __future__ import annotations

import json
import math
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

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

PASSED = "passed"
FAILED = "failed"  # an exception, an assertion, a non-zero exit, or an exit before the last statement
TIMEOUT = "timeout"  # wall-clock or CPU-time limit
MEMORY = "memory"  # MemoryError under the address-space limit
SYNTAX_ERROR = "syntax_error"  # the program does not compile
KILLED = "killed"  # ended by a signal other than a time limit (e.g. SIGSEGV, SIGABRT)
ERROR = "error"  # the sandbox itself could not run the program
STATUSES = (PASSED, FAILED, TIMEOUT, MEMORY, SYNTAX_ERROR, KILLED, ERROR)

# Sandboxed programs run as a random uid from this range (when the harness is root): one uid per run, so
# RLIMIT_NPROC is per run and a run cannot signal or ptrace anything else.
_UID_BASE = 1_800_000_000
_UID_SPAN = 100_000_000
_GRACE_S = 5.0  # the harness's own backstop fires this long after the supervisor should have finished
_PROGRAM_PATH = "/usr/local/bin:/usr/bin:/bin"
# The environment of the fork server and of every program (which also gets HOME and TMPDIR = its directory).
_PROGRAM_ENV = {
    "PATH": _PROGRAM_PATH,
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONIOENCODING": "utf-8",
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONNOUSERSITE": "1",
    "PYTHONSAFEPATH": "1",
    "OMP_NUM_THREADS": "1",
}
_SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/run/shm")

# Linux constants (include/uapi/linux/sched.h, mount.h, prctl.h, fcntl.h).
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_NAMESPACES = (  # unshared by the supervisor; the mount namespace is unshared by the child itself
    (_CLONE_NEWPID, "pid-ns"),
    (_CLONE_NEWNET, "net-ns"),
    (_CLONE_NEWIPC, "ipc-ns"),
    (_CLONE_NEWUTS, "uts-ns"),
)
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_SYS_MOUNT_SETATTR = {"x86_64": 442, "aarch64": 442}


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits and isolation switches for one sandboxed run.

    ``timeout_s`` is wall-clock time for the whole run; ``cpu_s`` is CPU time per process, all its threads
    together (RLIMIT_CPU, whole seconds, default ``ceil(timeout_s) + 1``): it stops multi-threaded burners
    before the wall clock does; ``memory_bytes`` is the address space per process (RLIMIT_AS, ``None`` for
    none); ``file_size_bytes`` caps every file the program writes, its
    captured stdout and stderr included (RLIMIT_FSIZE); ``max_processes`` caps processes *and threads*
    (RLIMIT_NPROC, effective per run only when the harness is root); ``max_output_bytes`` is how much of
    the end of stdout and stderr is kept in the result; ``scratch_bytes`` is the size of the private tmpfs
    behind the program's directory, /tmp, /var/tmp and /dev/shm. ``interpreter`` is the Python that runs
    the programs (default ``sys.executable``; only its standard library is importable). By default each
    program's process is forked from the sandbox's pre-started, pristine interpreter (one that never ran
    any program and holds no other run's data); ``fresh_interpreter=True`` (implied by ``interpreter``)
    executes a new interpreter for every program instead, about 16 ms more per program. ``namespaces`` and
    ``drop_privileges`` exist to run without those layers (tests, exotic hosts); leave them on.
    """

    timeout_s: float = 10.0
    cpu_s: int | None = None
    memory_bytes: int | None = 1 << 30
    file_size_bytes: int = 16 << 20
    max_processes: int = 32
    max_output_bytes: int = 8 << 10
    scratch_bytes: int = 64 << 20
    interpreter: str | None = None
    fresh_interpreter: bool = False
    namespaces: bool = True
    drop_privileges: bool = True

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.cpu_s is not None and self.cpu_s < 1:
            raise ValueError(f"cpu_s must be >= 1, got {self.cpu_s}")
        if self.memory_bytes is not None and self.memory_bytes < 32 << 20:
            raise ValueError(f"memory_bytes must be >= 32 MiB (the interpreter needs it), got {self.memory_bytes}")
        for name in ("file_size_bytes", "max_processes", "scratch_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_output_bytes < 0:
            raise ValueError(f"max_output_bytes must be >= 0, got {self.max_output_bytes}")

    @property
    def effective_cpu_s(self) -> int:
        return self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1


@dataclass
class ExecutionResult:
    """How one program ended.

    ``status`` is one of :data:`STATUSES`; ``reason`` is short human text (the exception type and message,
    the signal, the limit hit); ``duration_s`` is the program's wall time; ``returncode`` is the exit code
    of its main process, negative for a signal as in :mod:`subprocess` (``-9`` after a wall-clock timeout,
    ``None`` if it never ran);
    ``stdout_tail``/``stderr_tail`` are the last ``max_output_bytes`` of its output, for debugging only --
    they never influence ``status``; ``isolation`` lists the sandbox layers that were active.
    """

    status: str
    reason: str
    duration_s: float
    returncode: int | None
    stdout_tail: str = ""
    stderr_tail: str = ""
    isolation: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return self.status == PASSED


# ---------------------------------------------------------------------------------------------------------
# The runner: the only code that runs inside the sandboxed interpreter besides the program. It reads the
# nonce and the program from an inherited, unlinked file (then closes it), compiles and executes the
# program as ``__main__``, and writes one record to the proof descriptor: ``done <pid> <nonce>`` only after
# the program's code returned, or why it did not. It ends with ``os._exit`` so that atexit handlers,
# finalizers and non-daemon threads of the program can neither run after the verdict nor change it.
# ---------------------------------------------------------------------------------------------------------
_RUNNER = r"""
import os, sys
def _dylora_sandbox_runner(job_fd, proof_fd):
    write, exit_, getpid = os.write, os._exit, os.getpid  # immune to monkeypatching by the program
    with open(job_fd, "rb") as job:
        data = job.read()
    nonce, _, source = data.partition(b"\n")
    del data

    def record(kind, template, *args):
        try:
            text = " ".join((template % args).split())[:2000]
        except BaseException:
            text = "<unprintable>"
        try:
            write(proof_fd, ("%s\t%d\t%s\n" % (kind, getpid(), text)).encode("utf-8", "replace"))
        except BaseException:
            pass

    def describe(exc):
        try:
            message = str(exc)
        except BaseException:
            message = "<unprintable>"
        return "%s: %s" % (type(exc).__name__, message) if message else type(exc).__name__

    def flush():
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except BaseException:
                pass

    sys.argv[:] = ["<program>"]
    sys.path[:] = [p for p in sys.path if p and p != "."]
    try:
        code = compile(source, "<program>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        record("syntax_error", "%s", describe(exc))
        exit_(3)
    except MemoryError:
        record("memory", "MemoryError while compiling")
        exit_(4)
    except BaseException as exc:
        record("error", "%s while compiling", describe(exc))
        exit_(4)
    module = type(sys)("__main__")
    sys.modules["__main__"] = module
    try:
        exec(code, module.__dict__)
    except SystemExit as exc:
        flush()
        record("exit", "SystemExit(%r) raised before the last statement", exc.code)
        exit_(2)
    except BaseException as exc:
        record("memory" if isinstance(exc, MemoryError) else "exception", "%s", describe(exc))
        module.__dict__.clear()
        flush()
        try:
            import linecache, traceback  # only now: importing linecache costs more than most programs
            linecache.cache["<program>"] = (
                len(source), None, source.decode("utf-8", "replace").splitlines(True), "<program>")
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))
            write(2, text.encode("utf-8", "replace"))
        except BaseException:
            pass
        exit_(1)
    flush()
    write(proof_fd, b"done\t%d\t%s\n" % (getpid(), nonce))
    exit_(0)

_dylora_sandbox_runner(int(sys.argv[1]), int(sys.argv[2]))
"""


# ---------------------------------------------------------------------------------------------------------
# Harness side (the calling process).
# ---------------------------------------------------------------------------------------------------------
def run_program(program: str, limits: SandboxLimits | None = None) -> ExecutionResult:
    """Run one program (solution + tests) in a fresh sandboxed interpreter and return its verdict."""
    import secrets
    import shutil
    import tempfile

    limits = limits or SandboxLimits()
    started = time.monotonic()
    nonce = secrets.token_hex(32)
    uid = None
    if limits.drop_privileges and os.geteuid() == 0:
        uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
    workdir = tempfile.mkdtemp(prefix="dylora-sandbox-")
    job, proof, meta, out, err = (tempfile.TemporaryFile() for _ in range(5))
    try:
        job.write(nonce.encode("ascii") + b"\n" + program.encode("utf-8", "surrogatepass"))
        job.flush()
        job.seek(0)
        if uid is not None:
            os.chown(workdir, uid, uid)
        exe = os.path.realpath(limits.interpreter or sys.executable)
        if limits.interpreter is None:
            prefixes = {os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)}
        else:
            prefixes = {os.path.dirname(os.path.dirname(exe))}
        config = {
            "exe": exe,
            "fork": limits.interpreter is None and not limits.fresh_interpreter,
            "prefixes": sorted(prefixes),
            "workdir": os.path.realpath(workdir),
            "uid": uid,
            "job_fd": job.fileno(),
            "proof_fd": proof.fileno(),
            "meta_fd": meta.fileno(),
            "timeout_s": limits.timeout_s,
            "cpu_s": limits.effective_cpu_s,
            "memory_bytes": limits.memory_bytes,
            "file_size_bytes": limits.file_size_bytes,
            "max_processes": limits.max_processes,
            "scratch_bytes": limits.scratch_bytes,
            "namespaces": limits.namespaces,
            "runner": _RUNNER,
        }
        reply = _server().submit(config, (job.fileno(), proof.fileno(), meta.fileno(), out.fileno(), err.fileno()))
        job.close()  # the harness no longer needs the nonce where anyone could find it
        try:
            supervisor, finished = _await_supervisor(reply, limits.timeout_s + _GRACE_S)
        finally:
            reply.close()
        backstop = not finished
        if backstop:
            if supervisor is not None:
                _killpg(supervisor)  # still alive (its end of the reply socket is open): its pid is its own
            _backstop_kill(_read_records(meta), uid)
        return _verdict(
            meta=_read_records(meta),
            proofs=_read_proofs(proof),
            nonce=nonce,
            limits=limits,
            backstop=backstop,
            harness_s=time.monotonic() - started,
            stdout_tail=_tail(out, limits.max_output_bytes),
            stderr_tail=_tail(err, limits.max_output_bytes),
        )
    finally:
        for handle in (job, proof, meta, out, err):
            handle.close()
        shutil.rmtree(workdir, ignore_errors=True)


def run_many(
    programs: Sequence[str],
    limits: SandboxLimits | None = None,
    workers: int | None = None,
    progress: Callable[[int, int, ExecutionResult], None] | None = None,
) -> list[ExecutionResult]:
    """Run ``programs`` in parallel (``workers`` at a time, default ``os.cpu_count()``), results in order.

    ``progress(done, total, result)`` is called from the calling thread after each program finishes. A
    harness-side failure for one program becomes an ``"error"`` result instead of aborting the batch.
    """
    from concurrent.futures import ThreadPoolExecutor, as_completed

    total = len(programs)
    results: list[ExecutionResult | None] = [None] * total
    if total == 0:
        return []
    workers = max(1, min(workers or os.cpu_count() or 1, total))

    def one(program: str) -> ExecutionResult:
        try:
            return run_program(program, limits)
        except Exception as exc:  # one broken run must not lose the batch
            return ExecutionResult(ERROR, f"harness error: {type(exc).__name__}: {exc}", 0.0, None)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        futures = {pool.submit(one, program): index for index, program in enumerate(programs)}
        for done, future in enumerate(as_completed(futures), start=1):
            result = future.result()
            results[futures[future]] = result
            if progress is not None:
                progress(done, total, result)
    return [result for result in results if result is not None]


def _verdict(
    *,
    meta: list[dict[str, Any]],
    proofs: list[tuple[str, int, str]],
    nonce: str,
    limits: SandboxLimits,
    backstop: bool,
    harness_s: float,
    stdout_tail: str,
    stderr_tail: str,
) -> ExecutionResult:
    events: dict[str, dict[str, Any]] = {}
    for record in meta:
        events.setdefault(str(record.get("event")), record)
    ready, finished, ended = events.get("ready", {}), events.get("exit"), events.get("program_exit")
    isolation = tuple(ready.get("layers", ()))

    def result(status: str, reason: str, returncode: int | None = None) -> ExecutionResult:
        duration = float(finished["wall_s"]) if finished else harness_s
        return ExecutionResult(status, reason, duration, returncode, stdout_tail, stderr_tail, isolation)

    if "setup_error" in events:
        return result(ERROR, f"sandbox setup failed: {events['setup_error'].get('error')}")
    if finished is None:
        if backstop:
            return result(TIMEOUT, f"wall-clock limit of {limits.timeout_s:g}s exceeded (harness backstop)")
        return result(ERROR, "the sandbox supervisor ended before reporting")
    if finished.get("timed_out"):  # SIGKILLed, with its whole namespace / session / uid
        return result(TIMEOUT, f"wall-clock limit of {limits.timeout_s:g}s exceeded", -signal.SIGKILL)
    if ended is None:
        return result(ERROR, f"the sandbox keeper ended with status {finished.get('keeper')} before reporting")
    returncode = int(ended["returncode"])

    main_pid = ready.get("pid")
    own = [p for p in proofs if p[1] == main_pid]
    last = own[-1] if own else None
    if returncode == 0 and last is not None and last[0] == "done" and last[2] == nonce:
        return result(PASSED, "all statements ran and the process exited with status 0", returncode)

    if returncode < 0:
        signum = -returncode
        name = _signal_name(signum)
        cpu_used = float(ended.get("cpu_s", 0.0))
        if signum == signal.SIGXCPU or (signum == signal.SIGKILL and cpu_used >= limits.effective_cpu_s - 0.05):
            return result(TIMEOUT, f"CPU time limit of {limits.effective_cpu_s}s exceeded ({name})", returncode)
        if last is not None and last[0] == "memory":
            return result(MEMORY, f"{last[2]} (then {name})", returncode)
        return result(KILLED, f"killed by {name}", returncode)
    if last is not None:
        kind, _, detail = last
        if kind == "syntax_error":
            return result(SYNTAX_ERROR, detail, returncode)
        if kind == "memory":
            return result(MEMORY, detail, returncode)
        if kind in ("exception", "exit", "error"):
            return result(FAILED, detail, returncode)
        if kind == "done":
            return result(FAILED, f"invalid completion record, exit status {returncode}", returncode)
    if returncode == 0:
        return result(FAILED, "exited with status 0 before its last statement (no completion proof)", returncode)
    return result(FAILED, f"exit status {returncode}", returncode)


def _backstop_kill(meta: list[dict[str, Any]], uid: int | None) -> None:
    """The supervisor missed its own deadline: kill its program and every process of the sandbox uid."""
    import subprocess

    for record in meta:
        if record.get("event") == "spawned" and record.get("pid") is not None:
            _killpg(int(record["pid"]))
            _kill(int(record["pid"]))
    if uid is not None:
        subprocess.run(
            [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), "--sweep", str(uid)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={"PATH": _PROGRAM_PATH},
            timeout=30,
            check=False,
        )


class _ForkServer:
    """Client side of the sandbox's fork server: one pre-started supervisor process per harness process.

    Starting a Python interpreter per program only to supervise it cost more than the program itself, so
    the supervisor interpreter is started once (``execution.py --serve FD``, single-threaded, isolated mode)
    and forks one supervisor per program. Requests go over a ``SOCK_SEQPACKET`` socket pair: the config
    (marshalled) and, as ``SCM_RIGHTS``, the run's job, proof, meta, stdout and stderr files plus one end of
    a fresh reply socket. The forked supervisor writes its pid to the reply socket and exits when the run is
    over, which the harness sees as end of file. The server exits when the harness closes (or loses) its
    end of the control socket; its supervisors die with it (``PR_SET_PDEATHSIG``), and their namespaces
    with them.
    """

    def __init__(self) -> None:
        import socket
        import subprocess
        import threading

        self._socket = socket
        self.owner = os.getpid()
        self.lock = threading.Lock()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = subprocess.Popen(
                # Not -I: its -E would ignore PYTHONHASHSEED, which the programs forked from it must share.
                # The real interpreter, not a venv symlink that may live in a folder the sandbox hides (/tmp):
                # programs forked from the server see it as their sys.executable.
                [os.path.realpath(sys.executable), "-s", "-S", "-B", "-u", os.path.abspath(__file__), "--serve",
                 str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                env=dict(_PROGRAM_ENV),
                cwd="/",
                start_new_session=True,
            )
        finally:
            theirs.close()
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
_SERVER_LOCK = __import__("threading").Lock()


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


def _await_supervisor(reply: Any, timeout: float) -> tuple[int | None, bool]:
    """``(supervisor pid, finished)``: wait up to ``timeout`` s for the run's supervisor to end (end of file)."""
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


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _killpg(pgid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pgid, sig)
    except OSError:
        pass


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has ended, without reaping it (its pid stays reserved until it is waited for)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for child ``pid`` to end, without reaping it; True if it ended."""
    deadline = time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return _exited(pid)
                if poller.poll(math.ceil(remaining * 1000)):
                    return True
        finally:
            os.close(pidfd)
    delay = 0.001
    while not _exited(pid):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.02)
    return True


# ---------------------------------------------------------------------------------------------------------
# Supervisor side: this file run once per harness process as ``python -I -S -B execution.py --serve FD``
# (the fork server; single-threaded, so forking here is safe, unlike in the harness). Everything below only needs the
# standard library and never imports the dylora_moe package.
# ---------------------------------------------------------------------------------------------------------
class _Libc:
    def __init__(self) -> None:
        import ctypes

        self.ctypes = ctypes
        self.lib = ctypes.CDLL(None, use_errno=True)

    def _check(self, ret: int, what: str) -> None:
        if ret != 0:
            errno = self.ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")

    def unshare(self, flags: int) -> None:
        self._check(self.lib.unshare(self.ctypes.c_int(flags)), "unshare")

    def prctl(self, option: int, value: int) -> None:
        c_ulong = self.ctypes.c_ulong
        self._check(self.lib.prctl(option, c_ulong(value), c_ulong(0), c_ulong(0), c_ulong(0)), "prctl")

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
        def enc(value: str | None) -> bytes | None:
            return None if value is None else os.fsencode(value)

        ret = self.lib.mount(enc(source), enc(target), enc(fstype), self.ctypes.c_ulong(flags), enc(data))
        self._check(ret, f"mount {target}")

    def readonly_tree(self, path: str) -> None:
        """mount_setattr(AT_RECURSIVE): every mount under ``path`` read-only and nosuid (Linux >= 5.12)."""
        ctypes = self.ctypes
        number = _SYS_MOUNT_SETATTR.get(os.uname().machine)
        if number is None:
            raise OSError(38, "mount_setattr: unknown syscall number on this architecture")

        class MountAttr(ctypes.Structure):
            _fields_ = [(name, ctypes.c_uint64) for name in ("set", "clr", "propagation", "userns_fd")]

        attr = MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)
        ret = self.lib.syscall(
            ctypes.c_long(number),
            ctypes.c_int(_AT_FDCWD),
            os.fsencode(path),
            ctypes.c_uint(_AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        self._check(ret, "mount_setattr")


def _serve(control_fd: int) -> int:
    """The fork server (``execution.py --serve FD``): one forked supervisor per request, until end of file."""
    import array
    import marshal
    import socket

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [path for path in sys.path if path and path != here]  # forked programs import no neighbours
    import resource  # noqa: F401  (imported once here rather than in every forked supervisor)

    control = socket.socket(fileno=control_fd)
    libc = _Libc()
    server = os.getpid()
    fd_size = array.array("i").itemsize
    while True:
        _reap_children()
        if not select.select([control], [], [], 0.5)[0]:
            continue
        try:
            space = socket.CMSG_SPACE(16 * fd_size)
            message, ancillary, _, _ = control.recvmsg(1 << 20, space, socket.MSG_CMSG_CLOEXEC)
        except InterruptedError:
            continue
        except OSError:
            return 0
        fds = array.array("i")
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[: len(data) - len(data) % fd_size])
        if not message:  # the harness closed its end, or died
            return 0
        try:
            cfg = marshal.loads(message) if len(fds) == 6 else None
        except (EOFError, ValueError, TypeError):
            cfg = None
        if isinstance(cfg, dict):
            pid = os.fork()
            if pid == 0:
                code = 127
                try:
                    control.close()
                    code = _supervisor(cfg, list(fds), libc, server)
                finally:
                    os._exit(code)
        for fd in fds:
            os.close(fd)


def _reap_children() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _supervisor(cfg: dict[str, Any], fds: list[int], libc: _Libc, server: int) -> int:
    """A forked supervisor: own session, dies with the server, the run's stdout/stderr, then :func:`_supervise`."""
    job, proof, meta, out, err, reply = fds
    os.setsid()
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server:
        return 3  # the server is already gone
    devnull = os.open(os.devnull, os.O_RDONLY)
    for source, target in ((devnull, 0), (out, 1), (err, 2)):
        os.dup2(source, target)
        os.close(source)
    os.chdir(str(cfg["workdir"]))
    os.write(reply, b"%d\n" % os.getpid())
    cfg.update(job_fd=job, proof_fd=proof, meta_fd=meta, reply_fd=reply)
    _supervise(cfg, libc)
    os.close(reply)  # the verdict is complete: the harness goes on while this process tears the namespaces down
    _killpg(os.getpid())  # whatever is left in this session's group, this process last
    return 0


def _supervise(cfg: dict[str, Any], libc: _Libc) -> int:
    """Supervisor: namespaces, then a keeper process (pid 1 there) that runs the program; wall-clock limit."""
    meta_fd = int(cfg["meta_fd"])

    def emit(event: str, **fields: Any) -> None:
        os.write(meta_fd, (json.dumps({"event": event, **fields}) + "\n").encode())

    layers = _enter_namespaces(libc) if cfg["namespaces"] else []
    if cfg["namespaces"]:
        # The run's mount namespace, private propagation so that no mount below can leak to the host. The
        # supervisor enters it too, rather than only the keeper, so that it holds the last reference: a
        # mount namespace's teardown waits for an RCU grace period (10-50 ms), which then happens as the
        # supervisor exits, after the harness has its verdict, not while the keeper's exit is awaited.
        try:
            libc.unshare(_CLONE_NEWNS)
            libc.mount(None, "/", None, _MS_REC | _MS_PRIVATE, None)
            layers.append("mount-ns")
        except OSError:
            pass
    started = time.monotonic()
    keeper = os.fork()
    if keeper == 0:
        code = 127
        try:
            os.close(int(cfg["reply_fd"]))  # the harness sees end of file when the supervisor alone is gone
            code = _keeper(cfg, libc, layers, emit)
        except BaseException as exc:  # report anything, never return into the supervisor
            try:
                emit("setup_error", error=f"{type(exc).__name__}: {exc}")
            except BaseException:
                pass
        finally:
            os._exit(code)
    os.close(int(cfg["job_fd"]))
    timed_out = not _wait_for_exit(keeper, float(cfg["timeout_s"]))
    if timed_out:
        program = _spawned_pid(meta_fd)
        if program is not None:  # no pid namespace: the program's session (its pid is still reserved)
            _killpg(program)
        _kill(keeper)  # pid 1 of the pid namespace: the kernel kills every process in it
    _, status, _ = os.wait4(keeper, 0)  # with a pid namespace, this returns once all of it is gone
    wall_s = time.monotonic() - started
    if cfg["uid"] is not None and "pid-ns" not in layers:
        # Processes that left the program's session (double fork + setsid) are found by their uid. With a
        # pid namespace they died with it already (and forking into the dead namespace is impossible).
        _sweep_uid(int(cfg["uid"]))
    emit("exit", timed_out=timed_out, wall_s=round(wall_s, 4), keeper=os.waitstatus_to_exitcode(status))
    return 0


def _spawned_pid(meta_fd: int) -> int | None:
    data = os.pread(meta_fd, 1 << 16, 0)
    for line in data.splitlines():
        record = json.loads(line)
        if record.get("event") == "spawned" and record.get("pid") is not None:
            return int(record["pid"])
    return None


def _keeper(cfg: dict[str, Any], libc: _Libc, layers: list[str], emit: Callable[..., None]) -> int:
    """Keeper, still privileged (pid 1 of the pid namespace): sets up the file system, forks the program,
    reaps orphans until the program ends, reports how it ended, and exits -- which ends the namespace.

    The program is not pid 1 itself because pid 1 is immune to its own signals (``os.kill(os.getpid(),
    SIGKILL)`` would be a no-op) and would have to reap orphans.
    """
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if "mount-ns" in layers:
        layers += _setup_mounts(cfg, libc, in_pid_ns="pid-ns" in layers)
    libc.prctl(_PR_SET_DUMPABLE, 0)  # /proc/1/* (fds, memory) out of reach even for a same-uid program
    program = os.fork()
    if program == 0:
        try:
            _exec_program(cfg, libc, layers, emit)
        except BaseException as exc:
            try:
                emit("setup_error", error=f"{type(exc).__name__}: {exc}")
            finally:
                os._exit(127)
    # Host-visible pid for the supervisor's timeout path; inside a pid namespace it would name the wrong
    # process out there (and is not needed: killing the keeper ends the namespace).
    emit("spawned", pid=None if "pid-ns" in layers else program)
    os.close(int(cfg["job_fd"]))
    while True:  # reap orphans re-parented to us, without reaping the program (its pid stays reserved)
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        if info is None or info.si_pid == program:
            break
        os.waitpid(info.si_pid, 0)
    _killpg(program)  # whatever is left in the program's session
    _, status, usage = os.wait4(program, 0)
    emit(
        "program_exit",
        returncode=os.waitstatus_to_exitcode(status),
        cpu_s=round(usage.ru_utime + usage.ru_stime, 4),
        maxrss_kb=usage.ru_maxrss,
    )
    return 0


def _enter_namespaces(libc: _Libc) -> list[str]:
    """Unshare pid/net/ipc/uts namespaces (through a user namespace when not root); best effort."""
    wanted = 0
    for flag, _ in _NAMESPACES:
        wanted |= flag
    if os.geteuid() != 0:
        uid, gid = os.getuid(), os.getgid()
        try:
            libc.unshare(_CLONE_NEWUSER | wanted)
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as handle:
                    handle.write(text)
        except OSError:
            return []
        return ["user-ns"] + [name for _, name in _NAMESPACES]
    try:
        libc.unshare(wanted)
        return [name for _, name in _NAMESPACES]
    except OSError:
        pass
    layers = []
    for flag, name in _NAMESPACES:
        try:
            libc.unshare(flag)
            layers.append(name)
        except OSError:
            pass
    return layers


def _exec_program(cfg: dict[str, Any], libc: _Libc, layers: list[str], emit: Callable[..., None]) -> None:
    """In the program's process, still privileged: own session, limits, unprivileged uid, then the runner."""
    uid = cfg["uid"]
    workdir = str(cfg["workdir"])
    os.setsid()
    os.chdir(workdir)
    _set_rlimits(cfg, dropping=uid is not None)
    layers.append("rlimits")
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid):
            raise OSError("could not drop privileges")
        layers.append("uid")
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1)
    layers.append("no-new-privs")
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
    os.set_inheritable(int(cfg["job_fd"]), True)
    os.set_inheritable(int(cfg["proof_fd"]), True)
    os.set_inheritable(int(cfg["meta_fd"]), False)
    env = {**_PROGRAM_ENV, "HOME": workdir, "TMPDIR": workdir}
    exe = str(cfg["exe"])
    if cfg["fork"] and ("mount-ns" in layers or uid is None):
        # The pristine interpreter this process was forked from runs the program (see _run_forked).
        emit("ready", pid=os.getpid(), layers=layers)
        _run_forked(cfg, env)
    if not os.access(exe, os.X_OK):
        raise PermissionError(
            f"{exe} cannot be executed by uid {os.getuid()} (without a mount namespace the "
            "interpreter must be reachable by any user: see SandboxLimits.interpreter)"
        )
    argv = [exe, "-s", "-S", "-B", "-c", str(cfg["runner"]), str(cfg["job_fd"]), str(cfg["proof_fd"])]
    emit("ready", pid=os.getpid(), layers=layers)
    os.execve(exe, argv, env)


def _run_forked(cfg: dict[str, Any], env: dict[str, str]) -> None:
    """Run the program in this process: a fork of the server, whose interpreter never ran untrusted code.

    Equivalent to executing ``python -s -S -B -c RUNNER`` here: every descriptor but stdio, the job and the
    proof is closed, the environment is replaced, and the same runner compiles and executes the program
    as a fresh ``__main__`` module and ends the process with ``os._exit``.
    """
    keep = sorted({0, 1, 2, int(cfg["job_fd"]), int(cfg["proof_fd"])})
    low = 0
    for fd in keep:
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)
    os.environ.clear()
    os.environ.update(env)
    sys.executable = str(cfg["exe"])  # the interpreter the sandbox exposes, as after an execve of it
    sys.argv[:] = ["-c", str(cfg["job_fd"]), str(cfg["proof_fd"])]
    exec(compile(str(cfg["runner"]), "<sandbox-runner>", "exec"), {"__name__": "__sandbox_runner__"})
    os._exit(4)  # not reached: the runner always ends the process


def _setup_mounts(cfg: dict[str, Any], libc: _Libc, *, in_pid_ns: bool) -> list[str]:
    """Inside the private mount namespace: interpreter reachable, / read-only, fresh /proc, tmpfs scratch."""
    layers = []
    uid = cfg["uid"]
    workdir = str(cfg["workdir"])
    if uid is not None:
        _expose_paths(libc, [str(cfg["exe"]), *cfg["prefixes"]])
    try:
        libc.readonly_tree("/")
        layers.append("readonly-root")
    except OSError:
        pass
    if in_pid_ns:
        try:
            libc.mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)
            layers.append("private-proc")
        except OSError:
            pass
    owner = f",uid={uid},gid={uid}" if uid is not None else ""
    options = f"size={int(cfg['scratch_bytes'])},nr_inodes=8192,mode=0700{owner}"
    libc.mount("tmpfs", workdir, "tmpfs", _MS_NOSUID | _MS_NODEV, options)
    scratch = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
    try:
        for path in _SCRATCH_DIRS:
            if os.path.isdir(path) and not os.path.islink(path) and os.path.realpath(path) != workdir:
                libc.mount(f"/proc/self/fd/{scratch}", path, None, _MS_BIND, None)
    finally:
        os.close(scratch)
    if not os.path.isdir(workdir):  # the workdir was under /tmp, which now is the scratch itself
        os.makedirs(workdir, mode=0o700)
        if uid is not None:
            os.chown(workdir, uid, uid)
    layers.append("scratch-tmpfs")
    return layers


def _expose_paths(libc: _Libc, targets: list[str]) -> None:
    """Make ``targets`` reachable for an unprivileged uid without touching the host.

    A directory on the way that others cannot search (e.g. ``/root`` holding a pyenv interpreter) is
    covered, in this mount namespace only, by an empty tmpfs into which just the needed entries are
    bind-mounted back; everything else in it becomes invisible to the program.
    """
    import stat

    needed: dict[str, set[str]] = {}
    for target in targets:
        current = "/"
        for name in [part for part in target.split("/") if part]:
            if not os.stat(current).st_mode & stat.S_IXOTH:
                needed.setdefault(current, set()).add(name)
            current = os.path.join(current, name)
    for blocked in sorted(needed, key=len):
        handles = {name: os.open(os.path.join(blocked, name), os.O_PATH) for name in needed[blocked]}
        try:
            libc.mount("tmpfs", blocked, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,nr_inodes=64,mode=0755")
            for name, handle in handles.items():
                point = os.path.join(blocked, name)
                if stat.S_ISDIR(os.fstat(handle).st_mode):
                    os.mkdir(point)
                else:
                    os.close(os.open(point, os.O_CREAT | os.O_WRONLY, 0o644))
                libc.mount(f"/proc/self/fd/{handle}", point, None, _MS_BIND | _MS_REC, None)
        finally:
            for handle in handles.values():
                os.close(handle)


def _set_rlimits(cfg: dict[str, Any], *, dropping: bool) -> None:
    import resource

    def limit(which: int, soft: int, hard: int | None = None) -> None:
        hard = soft if hard is None else hard
        _, current_hard = resource.getrlimit(which)
        if current_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, current_hard), min(hard, current_hard)
        resource.setrlimit(which, (soft, hard))

    cpu = int(cfg["cpu_s"])
    limit(resource.RLIMIT_CORE, 0)
    limit(resource.RLIMIT_CPU, cpu, cpu + 1)  # SIGXCPU at the soft limit, SIGKILL one second later
    limit(resource.RLIMIT_FSIZE, int(cfg["file_size_bytes"]))
    if cfg["memory_bytes"] is not None:
        limit(resource.RLIMIT_AS, int(cfg["memory_bytes"]))
    nproc = int(cfg["max_processes"])
    if not dropping:  # RLIMIT_NPROC counts every process of the uid: leave room for the ones already there
        nproc += _count_processes_of(os.getuid())
    limit(resource.RLIMIT_NPROC, nproc)


def _count_processes_of(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                count += os.stat(f"/proc/{entry}").st_uid == uid
            except OSError:
                pass
    return count


def _sweep_uid(uid: int) -> None:
    """SIGKILL every process of ``uid`` (from a child that becomes ``uid``: kill(-1) spares nothing else)."""
    for _ in range(4):
        pid = os.fork()
        if pid == 0:
            code = 4
            try:
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
                os.kill(-1, signal.SIGKILL)
                code = 0
            except ProcessLookupError:
                code = 3  # nothing left
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            return
        time.sleep(0.002)


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--serve" and argv[1].isdigit():
        return _serve(int(argv[1]))
    if len(argv) == 2 and argv[0] == "--sweep" and os.geteuid() == 0:
        _sweep_uid(int(argv[1]))
        return 0
    print("usage: execution.py --serve FD | --sweep UID (internal to run_program)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
