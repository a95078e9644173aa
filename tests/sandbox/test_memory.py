"""The memory cap holds for a whole run, every process together: a cgroup, or per-process limits whose product
is the cap. Four children each try to hold 300 MiB against a 512 MiB cap; what they hold at the same time
must stay under the cap, whichever mechanism this machine offers, and without a cap it does not."""

from __future__ import annotations

import pytest

from dylora_moe.sandbox import PASSED, SandboxLimits

from .conftest import root_only

CAP = 512 << 20
# Each child allocates in 16 MiB steps up to 300 MiB, reporting after each step, then holds what it got until
# every child has finished (or died: the cgroup's OOM killer sends SIGKILL). The parent sums what the
# children alive at that moment hold.
PROGRAM = """
import os, select
CHUNK, TARGET = 16 << 20, 300 << 20
r, w = os.pipe()
release_r, release_w = os.pipe()
kids = []
for i in range(4):
    try:
        pid = os.fork()
    except OSError:  # the process budget of the per-process fallback: fewer children
        break
    if pid == 0:
        os.close(r)
        os.close(release_w)
        held = []
        try:
            while len(held) * CHUNK < TARGET:
                held.append(bytearray(CHUNK))  # zero-filled: every page is touched
                os.write(w, b"%d %d\\n" % (i, len(held) * CHUNK))
        except MemoryError:
            pass
        os.write(w, b"%d done\\n" % i)
        os.read(release_r, 1)  # hold it until the parent has counted
        os._exit(0)
    kids.append(pid)
os.close(w)
os.close(release_r)
last, done, dead, pending = {}, set(), set(), b""

def reap():
    for i, kid in enumerate(kids):
        if i not in dead and os.waitpid(kid, os.WNOHANG)[0]:
            dead.add(i)

while not all(i in done or i in dead for i in range(len(kids))):
    if select.select([r], [], [], 0.05)[0]:
        *lines, pending = (pending + os.read(r, 1 << 16)).split(b"\\n")
        for line in lines:
            who, what = line.split()
            if what == b"done":
                done.add(int(who))
            else:
                last[int(who)] = int(what)
    reap()
reap()
alive = [i for i in range(len(kids)) if i not in dead]
print("children", len(kids), "alive", len(alive), "held", sum(last.get(i, 0) for i in alive))
os.close(release_w)
"""


def held(result) -> tuple[int, int, int]:
    assert result.status == PASSED, result
    words = result.stdout_tail.split()
    return int(words[1]), int(words[3]), int(words[5])


@root_only
def test_the_cap_holds_for_the_whole_run(run_checked):
    limits = SandboxLimits(timeout_s=20.0, memory_bytes=CAP, max_processes=16)
    children, alive, total = held(run_checked(PROGRAM, limits))
    assert children == 4 and total <= CAP, (children, alive, total)


@root_only
def test_the_cgroup_caps_the_run_where_one_can_be_made(run_checked):
    if not _cgroup_available():
        pytest.fail("no memory cgroup can be made on this machine: see docs/sandbox.md (memory_cap='rlimit' is "
                    "the fallback, tested below)")
    limits = SandboxLimits(timeout_s=20.0, memory_bytes=CAP, max_processes=16, memory_cap="cgroup")
    result = run_checked(PROGRAM, limits)
    children, alive, total = held(result)
    assert "memory-cgroup" in result.isolation
    assert children == 4 and alive < 4 and total <= CAP  # the OOM killer took some children
    assert 0 < result.memory_peak_bytes <= CAP


@root_only
def test_without_a_cgroup_the_product_of_process_limits_is_the_cap(run_checked):
    result = run_checked(PROGRAM, SandboxLimits(timeout_s=20.0, memory_bytes=CAP, max_processes=16,
                                                memory_cap="rlimit"))
    children, alive, total = held(result)
    assert "memory-rlimit" in result.isolation and result.memory_peak_bytes is None
    assert children == 3  # 512 MiB // 128 MiB = 4 processes in all: the program and three children
    assert total <= CAP


@root_only
def test_without_a_cap_the_children_hold_more_than_it(run_checked):
    """The control: the same program with no memory limit holds 4 x 300 MiB, so the tests above can fail."""
    children, alive, total = held(run_checked(PROGRAM, SandboxLimits(timeout_s=20.0, memory_bytes=None,
                                                                    max_processes=16)))
    assert children == alive == 4 and total > CAP


def _cgroup_available() -> bool:
    from dylora_moe.sandbox._cgroup import find_parent

    return find_parent() is not None
