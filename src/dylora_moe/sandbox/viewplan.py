"""What the program's file system view holds (harness side, once per interpreter): see ``_mounts.py``.

``plan_view(exe, prefixes)`` lists the folders to bind read-only (the interpreter's prefix, and the folders
of the shared libraries that the interpreter and its standard-library extension modules load, as ``ldd``
lists them), the folders to mask (third-party packages) and the symlinks to recreate (``/lib -> usr/lib``).
The fork server receives the plan with each run and never runs ``ldd`` itself.
"""

from __future__ import annotations

import glob
import os
import subprocess

_FALLBACK_LIBRARY_DIRS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64")
_PLANS: dict[tuple[str, ...], dict[str, list]] = {}


def _walk(path: str, links: dict[str, str], depth: int = 0) -> str:
    """Resolve ``path`` component by component, recording every symlink met; return the real path."""
    if depth > 40:
        raise OSError(40, f"too many symlinks resolving {path}")
    parts = [part for part in path.split("/") if part]
    current = "/"
    for index, name in enumerate(parts):
        candidate = os.path.join(current, name)
        if os.path.islink(candidate):
            target = os.readlink(candidate)
            links[candidate] = target
            resolved = os.path.normpath(os.path.join(current, target))
            rest = "/".join(parts[index + 1:])
            return _walk(os.path.join(resolved, rest) if rest else resolved, links, depth + 1)
        current = candidate
    return current


def _shared_libraries(files: list[str]) -> set[str]:
    """Absolute paths of the shared libraries ``files`` load, as ``ldd`` lists them (empty if it cannot)."""
    found: set[str] = set()
    for start in range(0, len(files), 64):
        try:
            out = subprocess.run(["ldd", *files[start:start + 64]], capture_output=True, text=True, timeout=30,
                                 env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            return set()
        for line in out.splitlines():
            for token in line.replace("=>", " ").split():
                if token.startswith("/") and not token.endswith(":"):
                    found.add(token)
    return found


def plan_view(exe: str, prefixes: list[str]) -> dict[str, list]:
    """What the view of interpreter ``exe`` holds: ``{"binds": [...], "masks": [...], "links": [[path, target]]}``.

    ``binds`` are real host folders bound read-only at the same path, ``masks`` folders inside them covered by
    an empty tmpfs (third-party packages), ``links`` symlinks recreated in the skeleton. Computed once per
    interpreter and harness process (``ldd`` runs here, never per program).
    """
    key = (exe, *prefixes)
    if key not in _PLANS:
        _PLANS[key] = _plan(exe, prefixes)
    return _PLANS[key]


def _plan(exe: str, prefixes: list[str]) -> dict[str, list]:
    links: dict[str, str] = {}
    binds = {_walk(os.path.realpath(p), links) for p in prefixes}
    binds.add(os.path.dirname(_walk(exe, links)))
    packages = [glob.glob(os.path.join(os.path.realpath(p), "lib", "python*", "*-packages")) for p in prefixes]
    masks = sorted(d for found in packages for d in found if os.path.isdir(d))
    modules = [exe, *sorted(glob.glob(os.path.join(os.path.dirname(exe), "..", "lib", "libpython*.so*")))]
    for prefix in prefixes:
        modules += sorted(glob.glob(os.path.join(prefix, "lib", "python*", "lib-dynload", "*.so")))
    libraries = _shared_libraries([os.path.realpath(m) for m in modules if os.path.exists(m)])
    if libraries:
        binds |= {os.path.dirname(_walk(lib, links)) for lib in libraries if os.path.exists(lib)}
    else:  # no ldd: every usual library folder
        binds |= {_walk(d, links) for d in _FALLBACK_LIBRARY_DIRS if os.path.isdir(d)}

    def inside(path: str, folders: set[str]) -> bool:
        return any(path != f and path.startswith(f.rstrip("/") + "/") for f in folders)

    kept = {b for b in binds if not inside(b, binds)}  # a folder inside another bound folder comes with it
    return {"binds": sorted(kept), "masks": masks,
            "links": sorted([k, v] for k, v in links.items() if not inside(k, kept))}
