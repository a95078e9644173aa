"""Device and dtype selection, the same for every command and feature::

    resolve_device("auto")        # the first CUDA device if there is one, else the CPU
    resolve_dtype("bf16")         # torch.bfloat16; None -> float32
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import EvaluationError

__all__ = ["resolve_device", "resolve_dtype"]


def resolve_device(device: str | None = "auto") -> Any:
    """``"auto"`` (or None): the first CUDA device if there is one, else the CPU; otherwise ``torch.device(device)``."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise EvaluationError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"device {device!r} was asked for, but torch sees no CUDA device here")
    return resolved


def resolve_dtype(dtype: Any = None) -> Any:
    """None / ``"float32"`` (default), ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if str(dtype).lower() not in names:
        raise EvaluationError(f"dtype must be one of float32, bfloat16, float16, got {dtype!r}")
    return names[str(dtype).lower()]
