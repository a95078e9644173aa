"""The program's file system: a new, read-only root that holds only what the interpreter needs.

Part of the fork server (``server.py``, stdlib only). Inside the run's private mount namespace the keeper
builds a small tmpfs root and ``pivot_root``s into it::

    /                     tmpfs skeleton, read-only once built (directories and symlinks only)
    <interpreter prefix>  bind, read-only: the standard library; its site-packages hidden by an empty tmpfs
    <library folders>     bind, read-only: the folders of the shared libraries that the interpreter and its
                          standard-library extension modules load (found once with ``ldd``)
    /dev/null zero full random urandom   the host's device nodes, bound one by one
    /proc                 a fresh proc of the run's pid namespace
    /tmp                  the run's private, size-capped scratch tmpfs (also at /var/tmp and /dev/shm)

Everything else on the host (``/etc``, ``/home``, ``/root``, the project, data sets, ``/sys``) is not in the
view at all. Paths keep their host names, so symlinks such as ``/lib -> usr/lib`` are recreated.
What the view holds is planned in the harness (``viewplan.py``, once per interpreter); ``build_view`` builds
it in the run's mount namespace; ``legacy_view`` is what ``SandboxLimits(filesystem_view=False)`` asks for
(the host tree read-only, with untraversable folders on the interpreter's path covered).
"""

from __future__ import annotations

import os
import stat

try:
    from . import _linux
except ImportError:  # run by the fork server, which imports this folder's files as top-level modules
    import _linux  # type: ignore[no-redef]

DEVICES = ("null", "zero", "full", "random", "urandom")
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/run/shm")


def _makedirs(root: str, path: str) -> str:
    target = root + path
    os.makedirs(target, mode=0o755, exist_ok=True)
    return target


def build_view(libc: _linux.Libc, root: str, plan: dict[str, list], *, scratch_options: str, proc: bool,
               uid: int | None) -> list[str]:
    """Build the view at ``root`` (an empty folder in this private mount namespace) and pivot into it.

    Afterwards ``/`` is the view, read-only but for the scratch at ``/tmp`` (and ``/var/tmp``, ``/dev/shm``),
    and the current directory is ``/``. Returns the layers set up.
    """
    libc.mount("tmpfs", root, "tmpfs", _linux.MS_NOSUID | _linux.MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    for path, target in plan["links"]:
        _makedirs(root, os.path.dirname(path))
        if not os.path.lexists(root + path):
            os.symlink(target, root + path)
    for folder in plan["binds"]:
        libc.bind(folder, _makedirs(root, folder), readonly=False, recursive=True)
    for folder in plan["masks"]:
        libc.mount("tmpfs", root + folder, "tmpfs", _linux.MS_NOSUID | _linux.MS_NODEV, "size=4k,nr_inodes=4,mode=0755")
    _makedirs(root, "/dev")
    for name in DEVICES:
        if os.path.exists(f"/dev/{name}"):
            os.close(os.open(f"{root}/dev/{name}", os.O_CREAT | os.O_WRONLY, 0o644))
            libc.bind(f"/dev/{name}", f"{root}/dev/{name}", readonly=False)
    layers = ["fs-view"]
    if proc:  # before the pivot: the kernel mounts a new proc only while a full one is visible
        flags = _linux.MS_NOSUID | _linux.MS_NODEV | _linux.MS_NOEXEC
        libc.mount("proc", _makedirs(root, "/proc"), "proc", flags, None)
        layers.append("private-proc")
    for folder in ("/tmp", "/var/tmp", "/dev/shm", "/.old-root"):
        _makedirs(root, folder)
    libc.pivot_root(root, root + "/.old-root")
    os.chdir("/")
    libc.umount2("/.old-root", _linux.MNT_DETACH)
    os.rmdir("/.old-root")
    libc.readonly_tree("/")
    layers.append("readonly-root")
    _mount_scratch(libc, "/tmp", scratch_options, uid, binds=("/var/tmp", "/dev/shm"))
    layers.append("scratch-tmpfs")
    return layers


def _mount_scratch(libc: _linux.Libc, where: str, options: str, uid: int | None, binds: tuple[str, ...]) -> None:
    owner = f",uid={uid},gid={uid}" if uid is not None else ""
    libc.mount("tmpfs", where, "tmpfs", _linux.MS_NOSUID | _linux.MS_NODEV, options + owner)
    scratch = os.open(where, os.O_PATH | os.O_DIRECTORY)
    try:
        for path in binds:
            if os.path.isdir(path) and not os.path.islink(path) and os.path.realpath(path) != where:
                libc.mount(f"/proc/self/fd/{scratch}", path, None, _linux.MS_BIND, None)
    finally:
        os.close(scratch)


def legacy_view(libc: _linux.Libc, workdir: str, expose: list[str], *, scratch_options: str, proc: bool,
                uid: int | None) -> list[str]:
    """Fallback when the view cannot be built: the host tree read-only, untraversable folders on the
    interpreter's path covered (only the needed entries bound back), a scratch tmpfs at ``workdir`` and the
    usual temporary folders. Host files stay readable."""
    layers = []
    if uid is not None:
        _expose_paths(libc, expose)
    try:
        libc.readonly_tree("/")
        layers.append("readonly-root")
    except OSError:
        pass
    if proc:
        try:
            libc.mount("proc", "/proc", "proc", _linux.MS_NOSUID | _linux.MS_NODEV | _linux.MS_NOEXEC, None)
            layers.append("private-proc")
        except OSError:
            pass
    _mount_scratch(libc, workdir, scratch_options, uid, binds=SCRATCH_DIRS)
    if not os.path.isdir(workdir):  # the workdir was under /tmp, which now is the scratch itself
        os.makedirs(workdir, mode=0o700)
        if uid is not None:
            os.chown(workdir, uid, uid)
    layers.append("scratch-tmpfs")
    return layers


def _expose_paths(libc: _linux.Libc, targets: list[str]) -> None:
    """Make ``targets`` reachable for an unprivileged uid without touching the host: a folder on the way that
    others cannot search (e.g. ``/root`` holding a pyenv interpreter) is covered, in this mount namespace only,
    by an empty tmpfs into which just the needed entries are bound back."""
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
            libc.mount("tmpfs", blocked, "tmpfs", _linux.MS_NOSUID | _linux.MS_NODEV, "size=1m,nr_inodes=64,mode=0755")
            for name, handle in handles.items():
                point = os.path.join(blocked, name)
                if stat.S_ISDIR(os.fstat(handle).st_mode):
                    os.mkdir(point)
                else:
                    os.close(os.open(point, os.O_CREAT | os.O_WRONLY, 0o644))
                libc.mount(f"/proc/self/fd/{handle}", point, None, _linux.MS_BIND | _linux.MS_REC, None)
        finally:
            for handle in handles.values():
                os.close(handle)
