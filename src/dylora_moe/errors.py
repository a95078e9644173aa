"""Every error a user can meet, in one module at the bottom of the package (stdlib only).

Each says *what* is wrong and *where* (file, line, field) and how to fix it; the command line prints any of
them as ``dylora-moe: error: ...`` with exit status 2. They live here, not beside the code that raises them,
so that the command line (and ``dylora-moe eval --rescore``, which needs no model) can catch them without
importing torch. The modules that raise them re-export them under their old names.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "USER_ERRORS",
    "BaseModelError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "EvaluationError",
    "JournalError",
    "StudyError",
    "TargetError",
    "TrainingInterrupted",
    "TrainingError",
]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the value."""


class DataError(ValueError):
    """A data file, record or dataset selection is invalid.

    Args:
        message: what is wrong, e.g. ``"missing field 'output'"``.
        path: the file concerned (``str`` or ``Path``), if any.
        line: 1-based line number in ``path`` (JSON Lines record, or JSON syntax error).
        record: 0-based index of the record in a JSON array.
        field: name of the offending field; prefixed to the message as ``field 'x': `` unless
            the message already quotes it.

    The formatted message is ``"{path}:{line}: {message}"`` when a line is known, else
    ``"{path}: record {record}: {message}"``, else ``"{path}: {message}"``.
    """

    def __init__(
        self,
        message: str,
        path: str | Path | None = None,
        line: int | None = None,
        field: str | None = None,
        record: int | None = None,
    ) -> None:
        self.reason = message
        self.path = None if path is None else Path(path)
        self.line = line
        self.record = record
        self.field = field
        super().__init__(self._format())

    def _format(self) -> str:
        text = self.reason
        if self.field is not None and f"'{self.field}'" not in text:
            text = f"field '{self.field}': {text}"
        location = ""
        if self.path is not None:
            location = str(self.path)
            if self.line is not None:
                location += f":{self.line}"
        elif self.line is not None:
            location = f"line {self.line}"
        if self.record is not None and self.line is None:
            location = f"{location}: record {self.record}" if location else f"record {self.record}"
        return f"{location}: {text}" if location else text


class TargetError(ValueError):
    """No usable target module, or a requested one does not exist."""


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, from a newer format, or for another base model."""


class BaseModelError(RuntimeError):
    """The base model cannot be found or loaded; the message says how to fix it."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many consecutive non-finite steps); the message says what to do."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C: after the step it was in, with a checkpoint of that step (``checkpoint``;
    None when the second Ctrl-C stopped it at once), so that ``--resume`` goes on from there."""

    def __init__(self, step: int, total_steps: int, checkpoint: Path | None, output_dir: Path) -> None:
        self.step, self.total_steps, self.checkpoint, self.output_dir = step, total_steps, checkpoint, output_dir
        kept = (f"{checkpoint} holds step {step}" if checkpoint is not None
                else "no checkpoint of this step was written")
        super().__init__(f"training interrupted at step {step} of {total_steps}; {kept}")


class StudyError(RuntimeError):
    """The study's units cannot be aggregated as they are; the message names the units."""


class EvaluationError(ValueError):
    """Invalid evaluation settings or inputs; the message says what to change."""


class JournalError(ValueError):
    """A journal that cannot be resumed from; the message names the file, the line or field, and the fix."""


#: what the command line reports as ``dylora-moe: error: ...`` (exit status 2) rather than a traceback
USER_ERRORS = (ConfigError, DataError, TargetError, CheckpointError, BaseModelError, TrainingError, StudyError,
               EvaluationError, JournalError)
