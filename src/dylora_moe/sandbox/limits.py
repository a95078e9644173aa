"""``SandboxLimits``: resource limits and isolation switches of one sandboxed run (stdlib only)."""

from __future__ import annotations

import math
from dataclasses import dataclass

MEMORY_CAPS = ("auto", "cgroup", "rlimit")


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits and isolation switches for one sandboxed run.

    ``timeout_s`` is wall-clock time for the whole run. ``cpu_s`` is CPU time per process, all its threads
    together (RLIMIT_CPU, whole seconds, default ``ceil(timeout_s) + 1``): it stops multi-threaded burners
    before the wall clock does. ``memory_bytes`` caps the memory of the *whole run*, every process and the
    scratch files together (``None`` for no cap): ``memory_cap='auto'`` uses a memory cgroup where one can
    be made (then each process may also use up to all of it), else per-process address-space limits whose
    product is the cap (``'rlimit'`` forces that, ``'cgroup'`` refuses to run without a cgroup); see
    docs/sandbox.md. ``file_size_bytes`` caps every file the program writes, its captured stdout and stderr
    included (RLIMIT_FSIZE). ``max_processes`` caps the candidate's processes *and threads* (RLIMIT_NPROC,
    effective per run only when the harness is root; lower without a cgroup, see above).
    ``max_output_bytes`` is how much of the end of stdout and stderr is kept in the result;
    ``scratch_bytes`` is the size of the private tmpfs at /tmp (also /var/tmp and /dev/shm).

    ``interpreter`` is the Python that runs the programs (default ``sys.executable``; only its standard
    library is importable). By default each process is forked from the sandbox's pre-started, pristine
    interpreter (one that never ran any program and holds no other run's data); ``fresh_interpreter=True``
    (implied by ``interpreter``) executes a new interpreter for every process instead.

    Layers that can be switched off, for tests and exotic hosts only: ``namespaces`` (pid, net, mount, ipc,
    uts), ``drop_privileges`` (a random uid per run), ``syscall_filter`` (the seccomp filter; when on and
    unavailable, the run ends as ``"error"``) and ``filesystem_view`` (off: the host tree, read-only).
    """

    timeout_s: float = 10.0
    cpu_s: int | None = None
    memory_bytes: int | None = 1 << 30
    memory_cap: str = "auto"
    file_size_bytes: int = 16 << 20
    max_processes: int = 32
    max_output_bytes: int = 8 << 10
    scratch_bytes: int = 64 << 20
    interpreter: str | None = None
    fresh_interpreter: bool = False
    namespaces: bool = True
    drop_privileges: bool = True
    syscall_filter: bool = True
    filesystem_view: bool = True

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.cpu_s is not None and self.cpu_s < 1:
            raise ValueError(f"cpu_s must be >= 1, got {self.cpu_s}")
        if self.memory_bytes is not None and self.memory_bytes < 64 << 20:
            raise ValueError(f"memory_bytes must be >= 64 MiB (the interpreters need it), got {self.memory_bytes}")
        if self.memory_cap not in MEMORY_CAPS:
            raise ValueError(f"memory_cap must be one of {MEMORY_CAPS}, got {self.memory_cap!r}")
        for name in ("file_size_bytes", "max_processes", "scratch_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_output_bytes < 0:
            raise ValueError(f"max_output_bytes must be >= 0, got {self.max_output_bytes}")

    @property
    def effective_cpu_s(self) -> int:
        return self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1
