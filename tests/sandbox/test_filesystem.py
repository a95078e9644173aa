"""The file system view: the interpreter's standard library and a private scratch, nothing else of the host."""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

from dylora_moe.sandbox import PASSED, SandboxLimits

from .conftest import FAST, root_only

HOST_VIEW = SandboxLimits(timeout_s=5.0, memory_bytes=512 << 20, max_processes=16, filesystem_view=False)
PROJECT = Path(__file__).resolve().parents[2]


def host_paths(tmp_path: Path) -> list[str]:
    """World-readable host paths a program must not see: system files, the project, its data, this test's
    temporary folder, the interpreter's third-party packages."""
    paths = ["/etc/passwd", "/etc/hostname", "/etc", "/home", "/sys/kernel", "/var/lib", "/usr/share", "/usr/local",
             str(PROJECT / "pyproject.toml"), str(PROJECT.parent), str(tmp_path)]
    site = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    return [p for p in paths + site if os.path.exists(p)]


@root_only
def test_host_paths_are_invisible(run_checked, tmp_path):
    (tmp_path / "secret.txt").write_text("secret")
    paths = host_paths(tmp_path) + [str(tmp_path / "secret.txt")]
    result = run_checked(
        f"""
        import os
        seen = []
        for path in {paths!r}:
            try:
                if os.path.isdir(path):
                    content = os.listdir(path)
                    if content:
                        seen.append((path, content[:3]))
                else:
                    with open(path, "rb") as handle:
                        seen.append((path, handle.read(20)))
            except OSError:
                pass
        assert not seen, seen
        print(sorted(os.listdir("/")))
        """
    )
    assert result.status == PASSED, result
    top = set(ast.literal_eval(result.stdout_tail.strip().splitlines()[-1]))
    assert {"dev", "proc", "tmp", "usr"} <= top, top  # the interpreter's prefix and libraries live under /usr here
    assert not top & {"etc", "home", "sys", "srv", "opt", "mnt"}, top  # (the project itself: host_paths above)


@root_only
def test_without_the_view_the_same_paths_are_readable(run_checked, tmp_path):
    """The control: the host tree, read-only, shows them, so the test above can fail."""
    result = run_checked("print(open('/etc/passwd').read()[:4])\nimport os\nprint(os.path.isdir('/home'))\n",
                         HOST_VIEW)
    assert result.status == PASSED and "root" in result.stdout_tail and "True" in result.stdout_tail, result


@root_only
def test_what_programs_need_works_in_the_view(run_checked):
    result = run_checked(
        """
        import ctypes, decimal, hashlib, json, os, sqlite3, subprocess, sys, tempfile, zlib
        assert os.getcwd() == "/tmp" and os.environ["HOME"] == "/tmp"
        with open("own.txt", "w") as handle:  # the scratch is writable
            handle.write("ok")
        with tempfile.NamedTemporaryFile() as handle:
            handle.write(b"x")
        with open("/dev/null", "w") as sink:
            sink.write("discarded")
        assert len(open("/dev/urandom", "rb").read(8)) == 8
        assert sqlite3.connect(":memory:").execute("select 1 + 1").fetchone() == (2,)
        assert hashlib.sha256(b"").hexdigest().startswith("e3b0") and zlib.compress(b"a")
        out = subprocess.run([sys.executable, "-S", "-c", "import json; print(json.dumps([1]))"],
                             capture_output=True, text=True)
        assert out.stdout.strip() == "[1]", out
        try:
            open("/usr/evil", "w")
        except OSError as exc:
            print("read-only:", exc.errno)
        """
    )
    assert result.status == PASSED, result
    assert "read-only: 30" in result.stdout_tail  # EROFS
    assert "fs-view" in result.isolation


def test_the_view_holds_the_standard_library_and_hides_third_party_packages(run_checked):
    result = run_checked(
        """
        import os, sys, sysconfig
        stdlib = sysconfig.get_paths()["stdlib"]
        assert os.path.isfile(os.path.join(stdlib, "json", "__init__.py"))
        site = os.path.join(stdlib, "site-packages")
        print("site-packages:", os.listdir(site) if os.path.isdir(site) else None)
        """,
        FAST,
    )
    assert result.status == PASSED, result
    assert "site-packages: []" in result.stdout_tail or "site-packages: None" in result.stdout_tail
