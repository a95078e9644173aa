"""Names a package exports but imports on first use (PEP 562), so that importing the package stays cheap.

Used by the packages whose modules need torch, so that the sandbox, the data readers and the commands that
need no model (``dylora-moe eval --rescore``) never import it::

    __getattr__, __dir__ = lazy_exports(__name__, {"DyLoRAMoEForCausalLM": ".model"}, globals())
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, names: Mapping[str, str],
                 namespace: dict[str, Any]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps an exported name to the module (relative to
    the package) that defines it; a name is imported once, on first access, and then cached in ``namespace``."""

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name], package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*namespace, *names})

    return __getattr__, __dir__
