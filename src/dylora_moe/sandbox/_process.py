"""The processes of one run, from the fork server's child to the runners (stdlib only; see ``server.py``).

The server forks one *top* process per run, as pid 1 of a new pid namespace when it is root. The top
process, still root: closes every descriptor that is not its run's, unshares the net, ipc, uts and mount
namespaces, moves into the run's memory cgroup, builds the file system view, and then

* for ``run_program``: is the *keeper*: forks the program, reaps orphans until the program ends, reports
  how it ended (``program_exit``) and exits, which ends the namespace;
* for ``run_tests``: forks the *candidate*'s process, then itself becomes the *judge*: pid 1, so the whole
  namespace ends with the verdict, and its own exit status is the run's (the server reports it).

Every run process drops everything before its runner starts (:func:`become`): own session, rlimits, a
random uid (the judge another than the candidate), no capabilities, ``no_new_privs``, the system-call
filter, an environment rebuilt from nothing, every descriptor but its own closed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

try:
    from . import _cgroup, _linux, _mounts
except ImportError:  # run by the fork server, which imports this folder's files as top-level modules
    import _cgroup  # type: ignore[no-redef]
    import _linux  # type: ignore[no-redef]
    import _mounts  # type: ignore[no-redef]

#: Without a memory cgroup, a run's cap is (processes) x (address space each); each gets at least this much.
MIN_PROCESS_BYTES = 128 << 20
#: Processes (and threads) the judge's uid may hold when a cgroup bounds memory (it starts none itself).
JUDGE_PROCESSES = 4
NAMESPACES = (
    (_linux.CLONE_NEWNET, "net-ns"),
    (_linux.CLONE_NEWIPC, "ipc-ns"),
    (_linux.CLONE_NEWUTS, "uts-ns"),
)


def emitter(meta_fd: int):
    """``emit(event, **fields)``: one JSON line on the run's meta file."""
    def emit(event: str, **fields: Any) -> None:
        os.write(meta_fd, (json.dumps({"event": event, **fields}) + "\n").encode())

    return emit


def top(cfg: dict[str, Any], fds: dict[str, int], state: Any, cgroup: _cgroup.RunCgroup | None,
        in_pid_ns: bool) -> int:
    """The run's top process (see the module docstring); returns the exit code (the judge never returns)."""
    libc = state.libc
    emit = emitter(fds["meta"])
    _own_descriptors(fds, [cgroup.fd] if cgroup is not None else [])
    os.setsid()
    libc.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != (0 if in_pid_ns else state.pid):  # the server is outside a new pid namespace: 0 there
        return 3  # the server is already gone
    os.chdir(str(cfg["workdir"]))
    layers = ["pid-ns"] if in_pid_ns else []
    if cfg["namespaces"]:
        layers += _unshare(libc, user=not in_pid_ns and os.geteuid() != 0)
        if "user-ns" in layers:  # the new pid namespace holds this process's children only: one more fork
            _proxy_for_child()
            layers.insert(0, "pid-ns")
        try:
            libc.unshare(_linux.CLONE_NEWNS)
            libc.mount(None, "/", None, _linux.MS_REC | _linux.MS_PRIVATE, None)
            layers.append("mount-ns")
        except OSError:
            pass
    if cgroup is not None:
        _cgroup.enter(cgroup)
    home = _file_system(cfg, libc, layers)
    libc.prctl(_linux.PR_SET_DUMPABLE, 0)  # /proc/1/* (fds, memory) out of reach even for a same-uid program
    processes, memory, judge_processes = budget(cfg, judged=cfg["mode"] == "judged", cgroup=cgroup is not None)
    layers.append("memory-cgroup" if cgroup is not None else "memory-rlimit")
    if cfg["mode"] == "judged":
        channel, judge_channel = _socketpair()
        candidate = spawn(cfg, state, "candidate", cfg["uid"], [fds["job"], channel], home, layers, emit,
                          processes, memory, close=[judge_channel, fds["judge_job"], fds["proof"]])
        emit("spawned", pids=[None if "pid-ns" in layers else candidate])
        for fd in (channel, fds["job"]):
            os.close(fd)
        become(cfg, state, "judge", cfg["judge_uid"], [fds["judge_job"], fds["proof"], judge_channel, candidate],
               "/", layers, emit, judge_processes, memory)
    program = spawn(cfg, state, "program", cfg["uid"], [fds["job"], fds["proof"]], home, layers, emit, processes,
                    memory, main=True)
    emit("spawned", pids=[None if "pid-ns" in layers else program])
    os.close(fds["job"])
    emit("program_exit", **reap_until(program))
    return 0


def _own_descriptors(fds: dict[str, int], extra: list[int]) -> None:
    """stdin /dev/null, stdout/stderr the run's files; every other descriptor closed but the run's own (the
    server holds other runs' sockets and files, which must not outlive their runs here)."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    for source, target in ((devnull, 0), (fds.pop("out"), 1), (fds.pop("err"), 2)):
        os.dup2(source, target)
        os.close(source)
    fds.pop("reply", None)
    close_all_but([*fds.values(), *extra])


def close_all_but(keep: list[int]) -> None:
    """Close every descriptor of this process but stdio and ``keep``."""
    low = 0
    for fd in sorted({0, 1, 2, *keep}):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 20)


def _unshare(libc: _linux.Libc, *, user: bool) -> list[str]:
    """Net, ipc and uts namespaces (with a user namespace and a pid namespace too when not root); best effort."""
    wanted = 0
    for flag, _ in NAMESPACES:
        wanted |= flag
    if user:
        uid, gid = os.getuid(), os.getgid()
        try:
            libc.unshare(_linux.CLONE_NEWUSER | _linux.CLONE_NEWPID | wanted)
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as handle:
                    handle.write(text)
        except OSError:
            return []
        return ["user-ns"] + [name for _, name in NAMESPACES]
    try:
        libc.unshare(wanted)
        return [name for _, name in NAMESPACES]
    except OSError:
        pass
    layers = []
    for flag, name in NAMESPACES:
        try:
            libc.unshare(flag)
            layers.append(name)
        except OSError:
            pass
    return layers


def _proxy_for_child() -> None:
    """Fork; the parent waits for the child and ends as it ended (exit code or signal). The child returns."""
    pid = os.fork()
    if pid == 0:
        return
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def _file_system(cfg: dict[str, Any], libc: _linux.Libc, layers: list[str]) -> str:
    """The run's file system (in its mount namespace); returns the program's home folder."""
    workdir = str(cfg["workdir"])
    if "mount-ns" not in layers:
        return workdir
    scratch = f"size={int(cfg['scratch_bytes'])},nr_inodes=8192,mode=0700"
    if cfg["view"]:
        layers += _mounts.build_view(libc, workdir, cfg["plan"], scratch_options=scratch, proc="pid-ns" in layers,
                                     uid=cfg["uid"])
        return "/tmp"
    layers += _mounts.legacy_view(libc, workdir, [str(cfg["exe"]), *cfg["prefixes"]], scratch_options=scratch,
                                  proc="pid-ns" in layers, uid=cfg["uid"])
    return workdir


def _socketpair() -> tuple[int, int]:
    import socket

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return ours.detach(), theirs.detach()


def budget(cfg: dict[str, Any], *, judged: bool, cgroup: bool) -> tuple[int, int | None, int]:
    """``(candidate processes, address space per process, judge processes)``.

    With a cgroup the cap is the cgroup's, and each process may use all of it. Without one the cap is a
    product: at most ``memory_bytes // MIN_PROCESS_BYTES`` processes in all (the judge included), each with
    ``memory_bytes`` / that many bytes of address space.
    """
    processes, memory = int(cfg["max_processes"]), cfg["memory_bytes"]
    if memory is None or cgroup:
        return processes, memory, JUDGE_PROCESSES
    extra = 1 if judged else 0
    slots = max(1 + extra, min(processes + extra, int(memory) // MIN_PROCESS_BYTES))
    return slots - extra, int(memory) // slots, 1


def reap(pid: int) -> dict[str, Any]:
    """Wait for child ``pid``: ``{"returncode", "cpu_s", "maxrss_kb"}``."""
    _, status, usage = os.wait4(pid, 0)
    return {"returncode": os.waitstatus_to_exitcode(status), "cpu_s": round(usage.ru_utime + usage.ru_stime, 4),
            "maxrss_kb": usage.ru_maxrss}


def reap_until(pid: int) -> dict[str, Any]:
    """Reap orphans re-parented to this process until ``pid`` ends (its pid stays reserved until then)."""
    while True:
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        if info is None or info.si_pid == pid:
            break
        os.waitpid(info.si_pid, 0)
    killpg(pid)  # whatever is left in the program's session
    return reap(pid)


def spawn(cfg: dict[str, Any], state: Any, role: str, uid: int | None, argv: list[int], home: str,
          layers: list[str], emit: Any, processes: int, memory: int | None, *, main: bool = False,
          close: list[int] = ()) -> int:
    """Fork one run process that becomes ``role``'s runner (:func:`become`); returns its pid."""
    pid = os.fork()
    if pid != 0:
        return pid
    try:
        for fd in close:
            os.close(fd)
        become(cfg, state, role, uid, argv, home, list(layers), emit if main else None, processes, memory)
    except BaseException as exc:
        try:
            emit("setup_error", error=f"{role}: {type(exc).__name__}: {exc}")
        finally:
            os._exit(127)
    os._exit(127)


def become(cfg: dict[str, Any], state: Any, role: str, uid: int | None, argv: list[int], home: str,
           layers: list[str], emit: Any, processes: int, memory: int | None) -> None:
    """In this run process, still privileged: own session, limits, uid, no capabilities, no_new_privs, the
    filter; then ``role``'s runner with ``argv`` (descriptors, and for the judge the candidate's pid). Never
    returns. ``emit`` (the main process only) reports ``ready`` with the pid whose proof counts."""
    libc = state.libc
    if role != "judge":  # the judge is the top process, which has its own session already
        os.setsid()
    os.chdir(home)
    set_rlimits(cfg, processes=processes, memory=memory, dropping=uid is not None)
    layers.append("rlimits")
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid):
            raise OSError("could not drop privileges")
        layers.append("uid")
    libc.drop_capabilities()
    libc.prctl(_linux.PR_SET_NO_NEW_PRIVS, 1)
    layers.append("no-new-privs")
    libc.prctl(_linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
    if role == "judge":
        libc.prctl(_linux.PR_SET_DUMPABLE, 0)
    if cfg["syscall_filter"]:
        if state.filter is None:
            raise OSError(state.filter_error)
        libc.load_seccomp(state.filter)
        layers.append("seccomp")
    descriptors = argv if role != "judge" else argv[:3]
    for fd in descriptors:
        os.set_inheritable(fd, True)
    env = {**state.program_env, "HOME": home, "TMPDIR": home}
    exe = str(cfg["exe"])
    if emit is not None:
        emit("ready", pid=os.getpid(), layers=layers)
    if cfg["fork"] and ("mount-ns" in layers or uid is None):  # the uid can read the interpreter's files
        run_forked(state.compiled[role], descriptors, argv, env, exe)
    if not os.access(exe, os.X_OK):
        raise PermissionError(
            f"{exe} cannot be executed by uid {os.getuid()} (without a mount namespace the "
            "interpreter must be reachable by any user: see SandboxLimits.interpreter)"
        )
    os.execve(exe, [exe, "-s", "-S", "-B", "-c", state.runners[role], *map(str, argv)], env)


def run_forked(code: Any, descriptors: list[int], argv: list[int], env: dict[str, str], exe: str) -> None:
    """Run the runner in this process: a fork of the server, whose interpreter never ran untrusted code.

    Equivalent to executing ``python -s -S -B -c TEXT ARGV...`` here: every descriptor but stdio and
    ``descriptors`` is closed, the environment is replaced, and the runner ends the process with ``os._exit``.
    """
    close_all_but(descriptors)
    os.environ.clear()
    os.environ.update(env)
    sys.executable = exe  # the interpreter the sandbox exposes, as after an execve of it
    sys.argv[:] = ["-c", *map(str, argv)]
    exec(code, {"__name__": "__sandbox_runner__"})
    os._exit(4)  # not reached: the runner always ends the process


def set_rlimits(cfg: dict[str, Any], *, processes: int, memory: int | None, dropping: bool) -> None:
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
    if memory is not None:
        limit(resource.RLIMIT_AS, int(memory))
    if not dropping:  # RLIMIT_NPROC counts every process of the uid: leave room for the ones already there
        processes += _count_processes_of(os.getuid())
    limit(resource.RLIMIT_NPROC, processes)


def _count_processes_of(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                count += os.stat(f"/proc/{entry}").st_uid == uid
            except OSError:
                pass
    return count


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def killpg(pgid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pgid, sig)
    except OSError:
        pass


def sweep_uid(uid: int) -> None:
    """SIGKILL every process of ``uid`` (from a child that becomes ``uid``: kill(-1) spares nothing else)."""
    import time

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
