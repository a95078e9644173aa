"""A memory cap on a whole run (every process of it together, its scratch files included): one cgroup per run.

Part of the fork server (``server.py``, stdlib only). ``find_parent()`` looks, once, for a cgroup under which
this process may create children with the memory controller:

* cgroup v2: this process's cgroup (``0::/path`` in ``/proc/self/cgroup``) on the ``cgroup2`` mount, when
  ``memory`` is in its ``cgroup.subtree_control`` (a delegated subtree) and a probe child can be created;
* cgroup v1: this process's cgroup in the ``memory`` hierarchy, when a probe child can be created there.

Each run then gets ``<parent>/dylora-sandbox-<server pid>-<n>`` with the limit (v2 ``memory.max`` and
``memory.swap.max = 0``; v1 ``memory.limit_in_bytes`` and, with swap accounting, ``memory.memsw.limit_in_bytes``).
The keeper moves itself in before it forks anything, so every process of the run is inside; when the run
is over the fork server reads the peak and the OOM kills, and removes the cgroup. Where neither exists
(no root, no delegation) the caller falls back to per-process limits whose product is the cap.
"""

from __future__ import annotations

import os
import time


def _own_paths() -> dict[str, str]:
    """``{controller or "": cgroup path}`` from ``/proc/self/cgroup`` ("" is the v2 hierarchy)."""
    paths = {}
    with open("/proc/self/cgroup") as handle:
        for line in handle:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                paths[name] = path
    return paths


def _mounts() -> list[tuple[str, str, str]]:
    """``(mount point, fs type, super options)`` of every mount, from ``/proc/self/mountinfo``."""
    found = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            if len(fields) >= 5 and len(rest) >= 3:
                found.append((fields[4].replace("\\040", " "), rest[0], rest[2]))
    return found


def _probe(parent: str) -> bool:
    probe = os.path.join(parent, f"dylora-sandbox-probe-{os.getpid()}")
    try:
        os.mkdir(probe)
    except OSError:
        return False
    try:
        os.rmdir(probe)
    except OSError:
        pass
    return True


def find_parent() -> tuple[str, str] | None:
    """``("v2" | "v1", folder)`` under which run cgroups can be made, or None."""
    try:
        own, mounts = _own_paths(), _mounts()
    except OSError:
        return None
    for point, fstype, _ in mounts:
        if fstype == "cgroup2" and "" in own:
            parent = os.path.normpath(point + own[""])
            try:
                with open(os.path.join(parent, "cgroup.subtree_control")) as handle:
                    delegated = "memory" in handle.read().split()
            except OSError:
                delegated = False
            if delegated and _probe(parent):
                return "v2", parent
    for point, fstype, options in mounts:
        if fstype == "cgroup" and "memory" in options.split(",") and "memory" in own:
            parent = os.path.normpath(point + own["memory"])
            if _probe(parent):
                return "v1", parent
    return None


class RunCgroup:
    """The cgroup of one run, held by directory descriptors (the run's top process keeps one across its
    ``pivot_root`` into the file system view, where the cgroup file system is not mounted)."""

    def __init__(self, kind: str, parent: str, name: str) -> None:
        self.kind, self.name = kind, name
        self.parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        os.mkdir(name, dir_fd=self.parent_fd)
        self.fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.parent_fd)

    def write(self, name: str, value: str) -> None:
        fd = os.open(name, os.O_WRONLY, dir_fd=self.fd)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def read(self, name: str) -> str:
        try:
            fd = os.open(name, os.O_RDONLY, dir_fd=self.fd)
        except OSError:
            return ""
        try:
            return os.read(fd, 1 << 16).decode(errors="replace")
        except OSError:
            return ""
        finally:
            os.close(fd)

    def has(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.fd)
            return True
        except OSError:
            return False


def create(kind: str, parent: str, name: str, limit_bytes: int) -> RunCgroup:
    """Make the run's cgroup ``parent/name`` with the memory limit."""
    run = RunCgroup(kind, parent, name)
    try:
        if kind == "v2":
            run.write("memory.max", str(limit_bytes))
            if run.has("memory.swap.max"):
                run.write("memory.swap.max", "0")
        else:
            run.write("memory.limit_in_bytes", str(limit_bytes))
            if run.has("memory.memsw.limit_in_bytes"):
                run.write("memory.memsw.limit_in_bytes", str(limit_bytes))
    except OSError:
        remove(run)
        raise
    return run


def enter(run: RunCgroup) -> None:
    """Move the calling process into the cgroup (its children follow)."""
    run.write("cgroup.procs", "0")


def stats(run: RunCgroup) -> dict[str, int]:
    """``{"peak_bytes": ..., "oom_kills": ...}`` of the run's cgroup (0 where the kernel does not say)."""
    def field(text: str, key: str) -> int:
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
                return int(parts[1])
        return 0

    v2 = run.kind == "v2"
    peak = run.read("memory.peak" if v2 else "memory.max_usage_in_bytes").strip()
    events = run.read("memory.events" if v2 else "memory.oom_control")
    return {"peak_bytes": int(peak) if peak.isdigit() else 0, "oom_kills": field(events, "oom_kill")}


def remove(run: RunCgroup, timeout_s: float = 1.0) -> bool:
    """Kill what is left in the cgroup and remove it; True once it is gone."""
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if run.kind == "v2" and run.has("cgroup.kill"):
                try:
                    run.write("cgroup.kill", "1")
                except OSError:
                    pass
            else:
                for pid in run.read("cgroup.procs").split():
                    try:
                        os.kill(int(pid), 9)
                    except (OSError, ValueError):
                        pass
            try:
                os.rmdir(run.name, dir_fd=run.parent_fd)
                return True
            except FileNotFoundError:
                return True
            except OSError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.002)
    finally:
        os.close(run.fd)
        os.close(run.parent_fd)
