"""Ctrl-C during training: finish the step, save it, stop; a second Ctrl-C stops at once.

:class:`StopRequest` is a context manager the trainer holds around its loop. In a single process on the main
thread it replaces the SIGINT handler: the first Ctrl-C only sets ``requested`` (the trainer then writes a
checkpoint of the step it was in and raises :class:`~dylora_moe.errors.TrainingInterrupted`, which the command
line turns into the ``--resume`` command); the second restores Python's handler and interrupts at once. With
several processes (each gets the signal from the launcher) or off the main thread nothing is replaced: Ctrl-C
interrupts as usual, and the last periodic checkpoint is where ``--resume`` starts::

    with StopRequest(enabled=accelerator.num_processes == 1, say=print) as stop:
        for batch in batches:
            ...
            if stop.requested:
                raise TrainingInterrupted(step, total, save(), output_dir)
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["StopRequest"]


class StopRequest:
    """See the module docstring."""

    def __init__(self, enabled: bool = True, say: Callable[[str], Any] = print) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.say = say
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> StopRequest:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the second Ctrl-C stops at once
        self.say("Ctrl-C: stopping after this step and saving a checkpoint of it (Ctrl-C again to stop at once)")
