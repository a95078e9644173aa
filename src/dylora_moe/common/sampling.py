"""How replies are decoded (``SamplingSettings``): greedy or sampled, checked in one place. torch-free, so the
command line validates ``generate``'s flags with it before anything heavy is imported."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["SamplingSettings"]


@dataclass
class SamplingSettings:
    """How replies are decoded: ``temperature`` 0 is greedy; otherwise sampling with ``top_p``."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def validate(self, name: Callable[[str], str] = str) -> None:
        """Raise ``ValueError`` naming the first bad field as ``name(field)`` (the CLI passes its flag names)."""
        if self.max_new_tokens < 1:
            raise ValueError(f"{name('max_new_tokens')}={self.max_new_tokens}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"{name('temperature')}={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{name('top_p')}={self.top_p}: must be in (0, 1]")

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
