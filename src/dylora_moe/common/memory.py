"""Peak memory of a stretch of work: the allocator's peak on CUDA, the process's peak resident set on a CPU.

::

    reset_peak_memory(device)
    ...                                          # train
    peak_memory_bytes(device)                    # bytes at the peak since the reset (None where unknown)

On Linux the CPU peak is ``VmHWM`` (reset through ``/proc/self/clear_refs``); elsewhere it is unknown (None).
Large freed buffers leave the resident set only when malloc hands them back (``MALLOC_MMAP_THRESHOLD_``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["peak_memory_bytes", "reset_peak_memory", "rss_bytes"]


def rss_bytes(field: str = "VmRSS") -> int | None:
    """``VmRSS`` (or ``VmHWM``, the peak) of this process in bytes, from ``/proc/self/status``; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _is_cuda(device: Any) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def reset_peak_memory(device: Any) -> None:
    """Start measuring the peak from now."""
    if _is_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    except OSError:
        pass


def peak_memory_bytes(device: Any) -> int | None:
    """The peak since :func:`reset_peak_memory`: allocated bytes on CUDA, the resident set on a CPU."""
    if _is_cuda(device):
        return int(torch.cuda.max_memory_allocated(device))
    return rss_bytes("VmHWM")
