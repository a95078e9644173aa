"""Adversarial tests of the sandbox's isolation (dylora_moe.sandbox), with whole programs (``run_program``).

Every run goes through ``run_checked``, which asserts -- besides the verdict each test checks -- that the
harness and the machine are unharmed: no process of the sandbox's uid range is still running, the test
process has no new child, and the sandbox's temporary directory is gone. Every hostile program is bounded
on its own (at most 256 forks, 2 GiB, 60 s), so nothing here can hurt the machine even if a limit failed.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from dylora_moe.sandbox import (
    FAILED,
    MEMORY,
    PASSED,
    SYNTAX_ERROR,
    TIMEOUT,
    SandboxLimits,
    client,
    run_many,
    run_program,
)

from .conftest import FAST, FRESH, MODES, ROOT, _live_processes, _sandbox_processes, _with_token, root_only


@pytest.fixture
def outside_dir(tmp_path):
    """A directory outside the sandbox that the sandbox can see (unlike tmp_path, hidden under /tmp)."""
    for parent in ("/var/lib", "/srv", "/opt", "/mnt"):
        if os.path.isdir(parent) and os.access(parent, os.W_OK):
            path = Path(tempfile.mkdtemp(prefix="dylora-sandbox-test-", dir=parent))
            path.chmod(0o755)
            try:
                yield path
            finally:
                for child in path.iterdir():
                    child.unlink()
                path.rmdir()
            return
    yield tmp_path


# --- ordinary programs ------------------------------------------------------------------------------------


def test_passing_program(run_checked):
    result = run_checked(
        """
        def add(a, b):
            return a + b

        assert add(1, 2) == 3
        print("hello from the sandbox")
        """
    )
    assert result.status == PASSED, result
    assert result.passed and result.returncode == 0
    assert "hello from the sandbox" in result.stdout_tail
    assert 0 < result.duration_s < 5


def test_failing_assert(run_checked):
    result = run_checked("def f(x):\n    return x\n\nassert f(1) == 2, 'expected 2'\n")
    assert result.status == FAILED
    assert result.reason == "AssertionError: expected 2"
    assert "line 4" in result.stderr_tail  # the traceback points into the program


def test_exception_is_a_failure(run_checked):
    result = run_checked("import json\njson.loads('{')\n")
    assert result.status == FAILED and result.reason.startswith("JSONDecodeError")


@pytest.mark.parametrize("program", ["def f(:\n    pass\n", "x = 1\n  y = 2\n", "print('a')\0\n"])
def test_syntax_error(run_checked, program):
    result = run_checked(program)
    assert result.status == SYNTAX_ERROR, result
    assert "Error" in result.reason


def test_runtime_syntax_error_is_a_failure(run_checked):
    result = run_checked("compile('def (', '<x>', 'exec')\n")
    assert result.status == FAILED and result.reason.startswith("SyntaxError")


def test_hash_seed_is_fixed(run_checked):
    first = run_checked("print(hash('dylora'))\n")
    second = run_checked("print(hash('dylora'))\n")
    fresh = run_checked("print(hash('dylora'))\n", FRESH)
    assert first.passed and first.stdout_tail == second.stdout_tail == fresh.stdout_tail


@pytest.mark.parametrize("limits", MODES)
def test_program_holds_no_harness_descriptor(run_checked, limits):
    """Only stdio and the proof descriptor are open: no control socket, no meta records, no other run's files."""
    result = run_checked(
        """
        import os, stat
        fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
        kinds = {}
        for fd in fds:
            try:
                mode = os.fstat(fd).st_mode
            except OSError:
                continue  # the descriptor listdir itself used
            kinds[fd] = "socket" if stat.S_ISSOCK(mode) else "file"
        print(kinds)
        assert "socket" not in kinds.values(), kinds
        assert len(kinds) <= 4, kinds  # stdin, stdout, stderr, proof
        """,
        limits,
    )
    assert result.status == PASSED, result


def test_program_sees_a_pristine_interpreter(run_checked):
    """Forked from the server, a program sees what a fresh interpreter would: its own __main__, no package."""
    result = run_checked(
        """
        import sys
        assert __name__ == "__main__" and sys.modules["__main__"].__dict__ is globals()
        assert not any(name.startswith("dylora_moe") for name in sys.modules), sorted(sys.modules)
        assert all("site-packages" not in path for path in sys.path), sys.path
        try:
            import dylora_moe
        except ImportError:
            pass
        else:
            raise AssertionError("the harness's package is importable")
        """
    )
    assert result.status == PASSED, result


@pytest.mark.parametrize("limits", MODES)
def test_sys_executable_is_runnable_even_from_a_hidden_venv(run_checked, limits, tmp_path, monkeypatch):
    """The harness's interpreter may be a venv symlink under /tmp, which the sandbox hides: a program must
    still be able to run ``sys.executable`` (the detached-child test does)."""
    link = tmp_path / "venv-python"
    link.symlink_to(os.path.realpath(sys.executable))
    monkeypatch.setattr(sys, "executable", str(link))
    monkeypatch.setattr(client, "_SERVER", None)  # a fresh fork server, started from the link
    result = run_checked(
        """
        import os, subprocess, sys
        assert os.access(sys.executable, os.X_OK), sys.executable
        done = subprocess.run([sys.executable, "-S", "-c", "print('child ok')"], capture_output=True, text=True)
        assert done.returncode == 0 and "child ok" in done.stdout, done
        """,
        limits,
    )
    assert result.status == PASSED, result
    client._SERVER.close()


def test_server_restarts_after_being_killed(run_checked):
    assert run_checked("x = 1\n").passed
    old = client.server_pid()
    os.kill(old, 9)
    for _ in range(100):
        if client._SERVER.process.poll() is not None:
            break
        time.sleep(0.01)
    result = run_program("x = 1\n", FAST)
    assert result.passed, result
    assert client.server_pid() not in (None, old)


def test_harness_death_ends_the_server_and_its_runs(tmp_path):
    """SIGKILL the harness in the middle of a run: the server, the run's keeper and the program all go too."""
    import subprocess

    script = tmp_path / "harness.py"
    script.write_text(textwrap.dedent(
        """
        import sys, threading, time
        from dylora_moe.sandbox import SandboxLimits, client, run_program
        threading.Thread(target=run_program, args=("import time\\ntime.sleep(60)\\n", SandboxLimits(timeout_s=60)),
                         daemon=True).start()
        def started():
            pid = client.server_pid()
            return pid is not None and open(f"/proc/{pid}/task/{pid}/children").read().split()
        for _ in range(300):  # the server is up and the run started: seconds, even on a loaded machine
            time.sleep(0.1)
            if started():
                break
        time.sleep(0.5)
        print(client.server_pid(), flush=True)
        time.sleep(60)
        """
    ))
    harness = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        server = int(harness.stdout.readline())
        table = _live_processes()
        family, grew = {server}, True
        while grew:
            grew = False
            for pid, status in table.items():
                if pid not in family and int(status.get("PPid", 0)) in family:
                    family.add(pid)
                    grew = True
        assert len(family) >= 3, family  # server, keeper (pid 1 of the run), program
    finally:
        harness.kill()
        harness.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and set(_live_processes()) & family:
        time.sleep(0.05)
    assert not set(_live_processes()) & family


# --- resource exhaustion ------------------------------------------------------------------------------------


@pytest.mark.parametrize("limits", MODES)
def test_fork_bomb(run_checked, limits):
    # Never more than 2**8 = 256 processes even with no limit at all, and each sleeps at most 60 s.
    limits = SandboxLimits(
        timeout_s=2.0,
        memory_bytes=512 << 20,
        max_processes=16,
        namespaces=limits.namespaces,
        interpreter=limits.interpreter,
    )
    result = run_checked(
        """
        import os, time
        refused = 0
        for _ in range(8):
            try:
                os.fork()
            except OSError:
                refused += 1
        if refused:
            print("fork refused", flush=True)
        time.sleep(60)
        """,
        limits,
    )
    assert result.status == TIMEOUT, result
    if ROOT:
        assert "fork refused" in result.stdout_tail  # RLIMIT_NPROC stopped it, not only the timeout


def test_memory_bomb(run_checked):
    limits = SandboxLimits(timeout_s=5.0, memory_bytes=256 << 20)
    result = run_checked(
        """
        blocks = []
        for _ in range(64):  # 2 GiB at most, even with no limit
            blocks.append(bytearray(32 << 20))
        raise AssertionError("allocated 2 GiB")
        """,
        limits,
    )
    assert result.status == MEMORY, result
    assert result.reason.startswith("MemoryError")


def test_infinite_loop(run_checked):
    result = run_checked("while True:\n    pass\n", SandboxLimits(timeout_s=1.0))
    assert result.status == TIMEOUT, result
    assert "wall-clock" in result.reason and result.returncode is not None and result.returncode < 0
    assert result.duration_s < 2.0


def test_cpu_limit(run_checked):
    # Two busy threads burn CPU time faster than wall time; RLIMIT_CPU ends it before the wall clock.
    program = """
        import threading
        def spin():
            while True:
                pass
        threading.Thread(target=spin, daemon=True).start()
        spin()
        """
    result = run_checked(program, SandboxLimits(timeout_s=8.0, cpu_s=1))
    assert result.status == TIMEOUT, result
    assert "CPU time" in result.reason


def test_long_sleep(run_checked):
    started = time.monotonic()
    result = run_checked("import time\ntime.sleep(120)\n", SandboxLimits(timeout_s=1.0))
    assert result.status == TIMEOUT, result
    assert time.monotonic() - started < 2.5


def test_output_flood_is_bounded(run_checked):
    limits = SandboxLimits(timeout_s=5.0, file_size_bytes=1 << 20, max_output_bytes=1000)
    result = run_checked("for _ in range(100):\n    print('x' * (1 << 20))\n", limits)
    assert result.status == FAILED, result
    assert "File too large" in result.reason  # RLIMIT_FSIZE on the captured stdout
    assert len(result.stdout_tail) <= 1000 and len(result.stderr_tail) <= 1000


# --- the file system ----------------------------------------------------------------------------------------


@root_only
def test_write_outside_its_directory(run_checked, tmp_path, outside_dir):
    token = secrets.token_hex(8)
    denied = [tmp_path / "evil.txt", outside_dir / "evil.txt", Path(f"/etc/dylora-evil-{token}")]
    private = [Path(f"/tmp/dylora-evil-{token}"), Path(f"/var/tmp/dylora-evil-{token}")]
    try:
        result = run_checked(
            f"""
            import os
            for path in {[str(p) for p in denied]!r}:
                try:
                    with open(path, "w") as handle:
                        handle.write("pwned")
                except OSError as exc:
                    print("denied", path, exc)
                else:
                    raise AssertionError("wrote " + path)
            for path in {[str(p) for p in private]!r}:  # succeeds, but only in the private scratch
                with open(path, "w") as handle:
                    handle.write("scratch")
            with open("own.txt", "w") as handle:  # its own directory is writable
                handle.write("ok")
            """
        )
        assert result.status == PASSED, result
        for path in denied + private:
            assert not path.exists(), path
    finally:
        for path in denied + private:
            if path.exists():
                path.unlink()


@root_only
def test_delete_outside_its_directory(run_checked, tmp_path, outside_dir):
    victims = [tmp_path / "victim.txt", outside_dir / "victim.txt"]
    for victim in victims:
        victim.write_text("precious")
        victim.chmod(0o666)  # world-writable: only the read-only mount protects the content
    result = run_checked(
        f"""
        import os, shutil
        for path in {[str(v) for v in victims]!r}:
            for attack in (os.remove, lambda p: open(p, "w").close(), lambda p: os.rename(p, p + ".x"),
                           lambda p: os.chmod(p, 0o000), lambda p: shutil.rmtree(os.path.dirname(p))):
                try:
                    attack(path)
                except OSError as exc:
                    print("denied", path, exc)
                else:
                    raise AssertionError("attack on " + path + " succeeded")
        """
    )
    assert result.status == PASSED, result
    for victim in victims:
        assert victim.read_text() == "precious"
        assert victim.stat().st_mode & 0o777 == 0o666


# --- network, secrets, signals ------------------------------------------------------------------------------


@root_only
def test_network_is_unreachable(run_checked):
    abstract = f"\0dylora-sandbox-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener, socket.socket(socket.AF_UNIX) as unix:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        unix.bind(abstract)
        unix.listen(8)
        port = listener.getsockname()[1]
        result = run_checked(
            f"""
            import socket
            for address in [("127.0.0.1", {port}), ("8.8.8.8", 53)]:
                try:
                    socket.create_connection(address, timeout=1).close()
                except OSError as exc:
                    print("blocked", address, exc)
                else:
                    raise AssertionError("connected to %r" % (address,))
            client = socket.socket(socket.AF_UNIX)
            try:
                client.connect({abstract!r})
            except OSError as exc:
                print("blocked abstract socket", exc)
            else:
                raise AssertionError("connected to the abstract unix socket")
            """
        )
        assert result.status == PASSED, result
        for server in (listener, unix):
            server.setblocking(False)
            with pytest.raises(BlockingIOError):
                server.accept()  # nobody connected


def test_parent_environment_is_not_visible(run_checked, monkeypatch):
    secret = "s3cr3t-" + secrets.token_hex(16)
    monkeypatch.setenv("DYLORA_SECRET_TEST", secret)
    result = run_checked(
        f"""
        import os
        print("environ:", dict(os.environ))
        for pid in ["self", "1", "{os.getpid()}", str(os.getppid())] + os.listdir("/proc"):
            try:
                with open("/proc/%s/environ" % pid, "rb") as handle:
                    print(pid, handle.read())
            except OSError as exc:
                print(pid, exc)
        assert "DYLORA_SECRET_TEST" not in os.environ, os.environ["DYLORA_SECRET_TEST"]
        """
    )
    assert result.status == PASSED, result
    assert "environ:" in result.stdout_tail
    for text in (result.reason, result.stdout_tail, result.stderr_tail):
        assert secret not in text


@pytest.mark.parametrize("limits", MODES)
def test_killing_the_parent(run_checked, limits):
    harness = os.getpid()
    kill_all = "os.kill(-1, signal.SIGKILL)" if ROOT else "pass"  # without root this would be our own uid
    result = run_checked(
        f"""
        import os, signal
        for target in (os.getppid(), {harness}, 1):
            try:
                os.kill(target, signal.SIGKILL)
            except OSError as exc:
                print("cannot kill", target, exc)
        try:
            {kill_all}
        except OSError as exc:
            print("kill(-1):", exc)
        print("survived")
        """,
        limits,
    )
    assert os.getpid() == harness  # still here, obviously, and still the same process
    assert result.status == PASSED, result
    assert "survived" in result.stdout_tail


# --- forged verdicts ----------------------------------------------------------------------------------------

FAKE_MARKERS = 'print("passed"); print("OK"); print("All tests passed"); print({"passed": True}); print("1/1 passed")'


@pytest.mark.parametrize(
    "ending",
    [
        "assert False",
        "import os; os._exit(0)",
        "import sys; sys.exit(0)",
        "raise SystemExit",
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
    ],
)
def test_fake_success_markers(run_checked, ending):
    result = run_checked(f"{FAKE_MARKERS}\n{ending}\nassert 1 == 1\n")
    assert result.status != PASSED, result
    assert "passed" in result.stdout_tail  # printed, and ignored


def test_sys_exit_zero_before_the_tests(run_checked):
    result = run_checked("def f():\n    return 1\n\nimport sys\nsys.exit(0)\nassert f() == 2\n")
    assert result.status == FAILED
    assert "SystemExit(0)" in result.reason


def test_os_exit_zero_before_the_tests(run_checked):
    result = run_checked("def f():\n    return 1\n\nimport os\nos._exit(0)\nassert f() == 2\n")
    assert result.status == FAILED and result.returncode == 0
    assert "no completion proof" in result.reason


def test_atexit_handler_cannot_fake_success(run_checked):
    result = run_checked(
        """
        import atexit, os, sys
        def fake():
            print("passed", flush=True)
            for fd in range(3, 256):
                try:
                    os.write(fd, b"done\\t1\\t" + b"0" * 64 + b"\\n")
                except OSError:
                    pass
            os._exit(0)
        atexit.register(fake)
        assert False, "the tests fail"
        """
    )
    assert result.status == FAILED and result.reason == "AssertionError: the tests fail"


def test_forged_completion_record(run_checked):
    result = run_checked(
        """
        import os
        for fd in range(3, 256):
            for pid in (1, os.getpid()):
                try:
                    os.write(fd, b"done\\t%d\\t%s\\n" % (pid, b"f" * 64))
                except OSError:
                    pass
        os._exit(0)
        assert False
        """
    )
    assert result.status == FAILED, result


def test_fork_then_main_process_exits_early(run_checked):
    # The forked child runs the tests to the end, but the main process exits 0 without having done so.
    result = run_checked("import os, time\nif os.fork():\n    time.sleep(1)\n    os._exit(0)\nassert 1 + 1 == 2\n")
    assert result.status == FAILED and result.returncode == 0, result


@pytest.mark.parametrize(
    ("program", "expected"),
    [
        ("import os, sys\nsys.stdout.close()\nos.close(1)\nos.close(2)\nassert 1 + 1 == 2\n", PASSED),
        ("import os, sys\nsys.stdout = open(os.devnull, 'w')\nsys.stderr = sys.stdout\nassert 1 + 1 == 2\n", PASSED),
        ("import os\nos.dup2(os.open(os.devnull, os.O_WRONLY), 1)\nprint('passed')\nassert 1 + 1 == 2\n", PASSED),
        ("import os, sys\nsys.stdout.close()\nos.close(1)\nos.close(2)\nassert 1 + 1 == 3\n", FAILED),
        ("import os, sys\nsys.stdout = open(os.devnull, 'w')\nsys.exit(0)\n", FAILED),
    ],
)
def test_closing_or_redirecting_stdout(run_checked, program, expected):
    assert run_checked(program).status == expected


@pytest.mark.parametrize("limits", MODES)
def test_detached_child_does_not_outlive_the_run(run_checked, limits):
    token = "dylora-detached-" + secrets.token_hex(8)
    result = run_checked(
        f"""
        import os, sys, time
        if os.fork() == 0:  # double fork + setsid: a daemon re-parented away from the program
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-S", "-c",
                         "import time\\nwhile True: time.sleep(0.1)", "{token}"])
            os._exit(0)
        os.wait()
        for _ in range(100):
            alive = [p for p in os.listdir("/proc") if p.isdigit()
                     and b"{token}" in open("/proc/%s/cmdline" % p, "rb").read()]
            if alive:
                break
            time.sleep(0.05)
        assert alive, "the daemon did not start"
        """,
        limits,
    )
    assert result.status == PASSED, result
    assert _with_token(token) == []
    time.sleep(0.3)
    assert _with_token(token) == []


# --- the rest of the API ------------------------------------------------------------------------------------


def test_run_many_keeps_order_and_reports_progress(narrow_uid_range):
    programs = ["assert True\n", "assert False\n", "def (:\n", "import time\ntime.sleep(30)\n", "x = 1\n"]
    seen = []
    results = run_many(
        programs, SandboxLimits(timeout_s=1.0), workers=2, progress=lambda d, t, r: seen.append((d, t, r.status))
    )
    assert [r.status for r in results] == [PASSED, FAILED, SYNTAX_ERROR, TIMEOUT, PASSED]
    assert [d for d, _, _ in seen] == [1, 2, 3, 4, 5] and {t for _, t, _ in seen} == {5}
    assert _sandbox_processes(narrow_uid_range) == []
    assert run_many([], SandboxLimits()) == []


def test_limits_are_validated():
    with pytest.raises(ValueError):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ValueError):
        SandboxLimits(memory_bytes=1 << 20)
    assert SandboxLimits(timeout_s=2.5).effective_cpu_s == 4
