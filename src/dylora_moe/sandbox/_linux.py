"""The few Linux calls the sandbox makes that Python's ``os`` module lacks, through ``ctypes`` (stdlib only).

Part of the fork server (``server.py``), which imports this folder's ``_*.py`` files as top-level modules;
nothing here imports the ``dylora_moe`` package. Constants are from the kernel's uapi headers (sched.h,
mount.h, prctl.h, fcntl.h); syscall numbers only for calls glibc 2.36 has no wrapper for.
"""

from __future__ import annotations

import os

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWTIME = 0x00000080
#: the namespace flags ``clone`` accepts (CLONE_NEWTIME only goes through ``unshare`` and ``clone3``)
CLONE_NAMESPACE_FLAGS = (CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET,
                         CLONE_NEWCGROUP)

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2

AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2

# no glibc wrapper (glibc 2.36): syscall numbers, the same on x86_64 and aarch64 for these two
_SYSCALLS = {"pivot_root": {"x86_64": 155, "aarch64": 41}, "mount_setattr": {"x86_64": 442, "aarch64": 442}}


class Libc:
    """``unshare``, ``prctl``, ``mount``, ``umount2``, ``pivot_root`` and ``mount_setattr``; errors as ``OSError``."""

    def __init__(self) -> None:
        import ctypes

        self.ctypes = ctypes
        self.lib = ctypes.CDLL(None, use_errno=True)

    def _check(self, ret: int, what: str) -> None:
        if ret != 0:
            errno = self.ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")

    def _syscall_number(self, name: str) -> int:
        number = _SYSCALLS[name].get(os.uname().machine)
        if number is None:
            raise OSError(38, f"{name}: unknown syscall number on {os.uname().machine}")
        return number

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

    def bind(self, source: str, target: str, *, readonly: bool = True, recursive: bool = False) -> None:
        """Bind ``source`` on ``target`` (then remount it read-only and nosuid unless ``readonly=False``)."""
        self.mount(source, target, None, MS_BIND | (MS_REC if recursive else 0), None)
        if readonly:
            self.mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID, None)

    def drop_capabilities(self) -> None:
        """Empty the effective, permitted and inheritable capability sets (``capset``, version 3).

        A uid change from root clears them anyway; a process that gained capabilities in a user namespace it
        created (the non-root path) keeps them across ``fork`` unless they are dropped here."""
        ctypes = self.ctypes

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        header, data = Header(0x20080522, 0), (Data * 2)()
        self._check(self.lib.capset(ctypes.byref(header), data), "capset")

    def setns(self, fd: int, nstype: int) -> None:
        self._check(self.lib.setns(self.ctypes.c_int(fd), self.ctypes.c_int(nstype)), "setns")

    def seccomp_program(self, bpf: bytes):
        """A ``struct sock_fprog`` holding the BPF program ``bpf`` (8-byte instructions), for :meth:`load_seccomp`."""
        ctypes = self.ctypes

        class SockFprog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

        if not bpf or len(bpf) % 8:
            raise ValueError(f"a BPF program is a whole number of 8-byte instructions, got {len(bpf)} bytes")
        buffer = ctypes.create_string_buffer(bpf, len(bpf))
        program = SockFprog(len(bpf) // 8, ctypes.cast(buffer, ctypes.c_void_p))
        program.buffer = buffer  # kept alive with the struct
        return program

    def load_seccomp(self, program) -> None:
        """Install a seccomp filter on this process (and its future children): ``prctl(PR_SET_SECCOMP,
        SECCOMP_MODE_FILTER, &program)``; needs ``no_new_privs`` first."""
        c_ulong = self.ctypes.c_ulong
        ret = self.lib.prctl(PR_SET_SECCOMP, c_ulong(SECCOMP_MODE_FILTER), self.ctypes.byref(program), c_ulong(0),
                             c_ulong(0))
        self._check(ret, "prctl(PR_SET_SECCOMP)")

    def umount2(self, target: str, flags: int) -> None:
        self._check(self.lib.umount2(os.fsencode(target), self.ctypes.c_int(flags)), f"umount {target}")

    def pivot_root(self, new_root: str, put_old: str) -> None:
        ret = self.lib.syscall(self.ctypes.c_long(self._syscall_number("pivot_root")), os.fsencode(new_root),
                               os.fsencode(put_old))
        self._check(ret, "pivot_root")

    def readonly_tree(self, path: str) -> None:
        """mount_setattr(AT_RECURSIVE): every mount under ``path`` read-only and nosuid (Linux >= 5.12)."""
        ctypes = self.ctypes

        class MountAttr(ctypes.Structure):
            _fields_ = [(name, ctypes.c_uint64) for name in ("set", "clr", "propagation", "userns_fd")]

        attr = MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
        ret = self.lib.syscall(
            ctypes.c_long(self._syscall_number("mount_setattr")),
            ctypes.c_int(AT_FDCWD),
            os.fsencode(path),
            ctypes.c_uint(AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
        self._check(ret, "mount_setattr")
