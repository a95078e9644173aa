"""The sandbox's fork server: this file run as a script (stdlib only), once per harness process.

``python -s -S -B -u server.py --serve FD [--filter FD | --filter-error TEXT]`` (started by ``client.py``)
is single-threaded, so forking is safe here. It reads one request per run over a ``SOCK_SEQPACKET`` socket
(the run's config, marshalled, and its files as ``SCM_RIGHTS``), and for each run:

1. creates the run's memory cgroup (``_cgroup.py``) and, as root, a new pid namespace for its next child
   (``unshare(CLONE_NEWPID)``, then ``setns`` back so that later children are not in it);
2. forks the run's *top* process, pid 1 there (``_process.py``: namespaces, view, then the keeper of a
   program, or the judge of a candidate), writes its pid to the run's reply socket;
3. keeps the wall clock itself: one event loop over the control socket and every live run's pidfd. At the
   deadline it kills the top process, which ends the whole pid namespace. When the top process has ended it
   reports ``exit`` (and, for a judged run, the judge's ``program_exit``), closes the reply socket -- the
   harness's signal that the verdict is ready -- and then removes the cgroup.

Events go to the run's *meta* file as JSON lines; the harness turns them into a verdict (``result.py``).
Nothing here imports the ``dylora_moe`` package: this folder's ``_*.py`` files are imported as top-level
modules, then the folder is taken off ``sys.path`` so that programs cannot import them.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from typing import Any

try:
    from . import _cgroup, _linux, _process
except ImportError:  # run as the fork server (PYTHONSAFEPATH: its folder is not on sys.path by itself)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _cgroup  # type: ignore[no-redef]
    import _linux  # type: ignore[no-redef]
    import _process  # type: ignore[no-redef]

PROGRAM_PATH = "/usr/local/bin:/usr/bin:/bin"
#: The environment of the fork server and of every run process (which also gets HOME and TMPDIR).
PROGRAM_ENV = {
    "PATH": PROGRAM_PATH,
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
_RUNNER_FILES = {
    "program": ("_plain.py", "_runner_common.py", "_runner_program.py"),
    "candidate": ("_plain.py", "_runner_common.py", "_runner_candidate.py"),
    "judge": ("_plain.py", "_runner_judge.py"),
}


def runner_source(role: str) -> str:
    """The text a run process of ``role`` executes ('program', 'candidate' or 'judge')."""
    here = os.path.dirname(os.path.abspath(__file__))
    parts = []
    for name in _RUNNER_FILES[role]:
        with open(os.path.join(here, name), encoding="utf-8") as handle:
            parts.append(handle.read())
    return "\n\n".join(parts)


class State:
    """What the server prepares once: libc, the system-call filter, the cgroup parent, the runners."""

    def __init__(self, bpf: bytes | None, filter_error: str | None) -> None:
        self.pid = os.getpid()
        self.root = os.geteuid() == 0
        self.libc = _linux.Libc()
        self.program_env = dict(PROGRAM_ENV)
        self.runs = 0
        self.runners = {role: runner_source(role) for role in _RUNNER_FILES}
        # compiled once here (3-5 ms each), not in every run process
        self.compiled = {role: compile(text, f"<sandbox-{role}-runner>", "exec") for role, text in self.runners.items()}
        self.cgroup = _cgroup.find_parent() if self.root else None
        self.filter = self.libc.seccomp_program(bpf) if bpf else None
        self.filter_error = filter_error or "system-call filter unavailable"
        self.pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY) if self.root else None


class Run:
    """A live run, as the server tracks it."""

    def __init__(self, cfg: dict[str, Any], fds: dict[str, int], pid: int, cgroup: _cgroup.RunCgroup | None,
                 in_pid_ns: bool) -> None:
        self.cfg, self.fds, self.pid, self.cgroup, self.in_pid_ns = cfg, fds, pid, cgroup, in_pid_ns
        self.started = time.monotonic()
        self.deadline = self.started + float(cfg["timeout_s"])
        self.timed_out = False
        self.pidfd = os.pidfd_open(pid)


# ---------------------------------------------------------------------------------------------------------
# the event loop
# ---------------------------------------------------------------------------------------------------------
def serve(control_fd: int, state: State) -> int:
    """Start runs as requests arrive, end them as their top processes exit, until the harness goes away."""
    import socket

    control = socket.socket(fileno=control_fd)
    runs: dict[int, Run] = {}
    while True:
        now = time.monotonic()
        for run in runs.values():
            if not run.timed_out and now >= run.deadline:
                run.timed_out = True
                _timeout(run)
        wait = min([max(0.0, r.deadline - now) for r in runs.values() if not r.timed_out] + [0.5])
        ready, _, _ = select.select([control, *runs], [], [], wait)
        for pidfd in ready:
            if pidfd in runs:
                _finish(runs.pop(pidfd), state)
        if control in ready:
            request = _receive(control)
            if request is None:
                return 0
            run = _start(*request, state) if request[0] is not None else None
            if run is not None:
                runs[run.pidfd] = run


def _receive(control: Any) -> tuple[dict[str, Any] | None, dict[str, int]] | None:
    """The next request: ``(config, {name: fd})`` (config None if malformed), or None once the harness is gone."""
    import array
    import marshal
    import socket

    fd_size = array.array("i").itemsize
    try:
        message, ancillary, _, _ = control.recvmsg(1 << 20, socket.CMSG_SPACE(16 * fd_size), socket.MSG_CMSG_CLOEXEC)
    except InterruptedError:
        return None, {}
    except OSError:
        return None
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fd_size])
    if not message:  # the harness closed its end, or died
        return None
    try:
        cfg = marshal.loads(message)
    except (EOFError, ValueError, TypeError):
        cfg = None
    if not isinstance(cfg, dict) or len(fds) != len(cfg.get("fd_names", ())):
        for fd in fds:
            os.close(fd)
        return None, {}
    return cfg, dict(zip(cfg["fd_names"], fds))


def _start(cfg: dict[str, Any], fds: dict[str, int], state: State) -> Run | None:
    """The run's cgroup and pid namespace, then its top process."""
    state.runs += 1
    emit = _process.emitter(fds["meta"])
    cgroup = None
    if cfg["memory_bytes"] is not None and cfg["memory_cap"] != "rlimit" and state.cgroup is not None:
        try:
            cgroup = _cgroup.create(*state.cgroup, f"dylora-sandbox-{state.pid}-{state.runs}", int(cfg["memory_bytes"]))
        except OSError:
            cgroup = None
    if cgroup is None and cfg["memory_cap"] == "cgroup":
        emit("setup_error", error="memory_cap='cgroup' asked for, but no memory cgroup can be created here")
        emit("exit", timed_out=False, wall_s=0.0, keeper=None)
        _close(fds)
        return None
    in_pid_ns = False
    if cfg["namespaces"] and state.pid_ns is not None:
        try:
            state.libc.unshare(_linux.CLONE_NEWPID)  # for the next child only: setns undoes it below
            in_pid_ns = True
        except OSError:
            pass
    pid = os.fork()
    if pid == 0:
        code = 127
        try:
            code = _process.top(cfg, fds, state, cgroup, in_pid_ns)
        except BaseException as exc:  # report anything, never return into the server loop
            try:
                emit("setup_error", error=f"{type(exc).__name__}: {exc}")
            except BaseException:
                pass
        finally:
            os._exit(code)
    if in_pid_ns:
        state.libc.setns(state.pid_ns, _linux.CLONE_NEWPID)
    os.write(fds["reply"], b"%d\n" % pid)
    for name in ("job", "judge_job", "out", "err"):
        if name in fds:
            os.close(fds.pop(name))
    return Run(cfg, fds, pid, cgroup, in_pid_ns)


def _timeout(run: Run) -> None:
    """The wall clock ran out: kill the top process (and with a pid namespace, everything in it)."""
    if not run.in_pid_ns:  # no pid namespace: the run's sessions, whose pids are still reserved
        for pid in _spawned_pids(run.fds["meta"]):
            _process.killpg(pid)
    _process.killpg(run.pid)
    _process.kill(run.pid)


def _finish(run: Run, state: State) -> None:
    """The top process has ended: report, hand the verdict to the harness, then clean up."""
    emit = _process.emitter(run.fds["meta"])
    status = _process.reap(run.pid)
    os.close(run.pidfd)
    wall_s = time.monotonic() - run.started
    if not run.in_pid_ns:
        # Processes that left their session (double fork + setsid) are found by their uid. With a pid
        # namespace they died with it already (and forking into the dead namespace is impossible).
        for pid in _spawned_pids(run.fds["meta"]):
            _process.killpg(pid)
        for uid in (run.cfg["uid"], run.cfg.get("judge_uid")):
            if uid is not None and state.root:
                _process.sweep_uid(int(uid))
    if run.cfg["mode"] == "judged" and not run.timed_out:
        emit("program_exit", **status)  # the judge was the top process
    memory: dict[str, Any] = {}
    if run.cgroup is not None:
        stats = _cgroup.stats(run.cgroup)
        memory = {"memory_peak_bytes": stats["peak_bytes"], "oom_kills": stats["oom_kills"]}
    emit("exit", timed_out=run.timed_out, wall_s=round(wall_s, 4), keeper=status["returncode"], **memory)
    _close(run.fds)  # the reply socket too: the harness now reads the verdict
    if run.cgroup is not None:
        _cgroup.remove(run.cgroup)


def _close(fds: dict[str, int]) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


def _spawned_pids(meta_fd: int) -> list[int]:
    import json

    pids = []
    for line in os.pread(meta_fd, 1 << 16, 0).splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == "spawned":
            pids += [int(p) for p in record.get("pids", ()) if p is not None]
    return pids


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "--serve" and argv[1].isdigit():
        here = os.path.dirname(os.path.abspath(__file__))
        sys.path[:] = [path for path in sys.path if path and path != here]  # programs import no neighbours
        options = dict(zip(argv[2::2], argv[3::2]))
        bpf = None
        if options.get("--filter", "").isdigit():
            with os.fdopen(int(options["--filter"]), "rb") as handle:
                bpf = handle.read()
        import gc
        import json  # noqa: F401  (for the runners: a pristine interpreter with what the sandbox needs)
        import resource  # noqa: F401

        state = State(bpf, options.get("--filter-error"))
        gc.collect()
        gc.freeze()  # what the server holds now is never scanned again: forked children copy fewer pages
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        return serve(int(argv[1]), state)
    if len(argv) == 2 and argv[0] == "--sweep" and os.geteuid() == 0:
        _process.sweep_uid(int(argv[1]))
        return 0
    print("usage: server.py --serve FD [--filter FD | --filter-error TEXT] | --sweep UID (internal)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
