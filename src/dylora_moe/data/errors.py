"""Error type for problems in training/evaluation data files.

Every loader in :mod:`dylora_moe.data` reports bad input with :class:`DataError`, a
``ValueError`` whose message says *what* is wrong and *where*: the file path, the 1-based line
number (JSON Lines files, or the line of a JSON syntax error), the record index (0-based
position in a JSON array) and the field name when one is involved.  Example messages::

    /data/code_alpaca/code_alpaca_2k.json: record 12: missing field 'output'
    /data/train.jsonl:7: malformed JSON (Expecting ',' delimiter: line 1 column 15)
    /data/mbpp/mbpp.jsonl:3: field 'test_list': expected a list of strings, got str

The parts are also available as attributes (``path``, ``line``, ``record``, ``field``,
``reason``) so callers and tests can inspect them without parsing the message.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DataError"]


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
