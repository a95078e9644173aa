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

from ..errors import DataError

__all__ = ["DataError"]
