"""The seccomp filter: one test per denied call, each checked against a run without the filter.

Call numbers come from libseccomp (``pyseccomp.resolve_syscall``) for the machine's architecture. Every
probe runs inside the sandbox as the unprivileged program; with the filter the call fails with ENOSYS (the
filter's answer), without it the kernel answers otherwise (success, or EPERM/EACCES), so each test fails if
its rule is removed.
"""

from __future__ import annotations

import errno

import pyseccomp
import pytest

from dylora_moe.sandbox import PASSED, SandboxLimits

from .conftest import FAST, root_only

UNFILTERED = SandboxLimits(timeout_s=5.0, memory_bytes=512 << 20, max_processes=16, syscall_filter=False)


def number(name: str) -> int:
    return pyseccomp.resolve_syscall(pyseccomp.system_arch(), name)


CLONE_NEWUSER, SIGCHLD = 0x10000000, 17
PROBES = {
    "unshare(CLONE_NEWUSER)": f"libc.unshare({CLONE_NEWUSER})",
    "clone(CLONE_NEWUSER)": "clone_newuser()",
    "ptrace": "libc.ptrace(0, 0, None, None)",  # PTRACE_TRACEME
    "mount": 'libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)',
    "prctl(PR_SET_DUMPABLE)": "libc.prctl(4, 1, 0, 0, 0)",
    "bpf": "libc.syscall({bpf}, 0, None, 0)",  # BPF_MAP_CREATE with no attributes
    "keyctl": "libc.syscall({keyctl}, 0, -3, 0)",  # KEYCTL_GET_KEYRING_ID of the session keyring
    "perf_event_open": "libc.syscall({perf_event_open}, attr, 0, -1, -1, 0)",
}
PROGRAM = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
attr = ctypes.create_string_buffer(128)  # a zeroed perf_event_attr: type HARDWARE, config CPU_CYCLES
ctypes.memmove(attr, (128).to_bytes(4, "little"), 0)
attr[4:8] = (128).to_bytes(4, "little")  # attr.size
libc.syscall.restype = ctypes.c_long

def clone_newuser():
    pid = libc.syscall({clone}, {flags}, None, None, None, None)
    if pid == 0:
        os._exit(0)  # a child in a new user namespace: gone at once
    if pid > 0:
        os.waitpid(pid, 0)
        return 0
    return pid

ctypes.set_errno(0)
ret = {call}
print("result", int(ret), ctypes.get_errno() if ret < 0 else 0)
"""


def probe(run_checked, name: str, limits: SandboxLimits) -> tuple[int, int]:
    call = PROBES[name].format(bpf=number("bpf"), keyctl=number("keyctl"), perf_event_open=number("perf_event_open"))
    program = PROGRAM.replace("{call}", call).replace("{clone}", str(number("clone")))
    program = program.replace("{flags}", str(CLONE_NEWUSER | SIGCHLD))
    result = run_checked(program, limits)
    assert result.status == PASSED, result
    ret, err = result.stdout_tail.split("result", 1)[1].split()
    return int(ret), int(err)


@root_only
@pytest.mark.parametrize("name", sorted(PROBES))
def test_the_call_is_denied_by_the_filter(run_checked, name):
    assert probe(run_checked, name, FAST) == (-1, errno.ENOSYS)
    unfiltered = probe(run_checked, name, UNFILTERED)
    assert unfiltered != (-1, errno.ENOSYS), unfiltered  # without the filter the kernel answers otherwise


@root_only
def test_ordinary_programs_run_under_the_filter(run_checked):
    """Threads (glibc tries clone3, gets ENOSYS, falls back to clone), subprocesses and a new interpreter."""
    result = run_checked(
        """
        import subprocess, sys, threading
        seen = []
        worker = threading.Thread(target=lambda: seen.append(sum(range(10))))
        worker.start()
        worker.join()
        out = subprocess.run([sys.executable, "-S", "-c", "print(6 * 7)"], capture_output=True, text=True)
        assert seen == [45] and out.stdout.strip() == "42", (seen, out)
        assert "Seccomp:\\t2" in open("/proc/self/status").read()
        """
    )
    assert result.status == PASSED, result
    assert "seccomp" in result.isolation
