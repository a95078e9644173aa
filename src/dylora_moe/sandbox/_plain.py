"""Plain data across the sandbox: the only kind of value the candidate's process and the judge exchange.

Runner-side code (stdlib only, no ``from __future__``): the fork server prepends this file to each runner's
source, so the candidate's process and the judge share one codec. A value is sent as JSON, with tagged
lists for what JSON lacks::

    None, bool, str, float, int (|x| < 2**63)   as themselves
    ["i", hex]  big int         ["l", [...]] list      ["t", [...]] tuple     ["d", [[k, v], ...]] dict
    ["S", [...]] set            ["F", [...]] frozenset ["y", latin-1] bytes   ["Y", latin-1] bytearray
    ["c", re, im] complex       ["r", start, stop, step] range               ["h", id, type] a handle

Subclasses of these types travel as their base type's value (an ``IntEnum`` as its int, a ``namedtuple`` as a
tuple, a ``Counter`` as a dict), read through the base type's own slots, so an overridden ``__eq__`` never
crosses. Anything else becomes a *handle*: the object stays in the candidate's process and the judge holds a
stand-in that can be passed back, called, or have attributes read and set, but never compared.

``proof_recorder`` (what every runner writes its verdict records with) lives here too: this file is the part
all runners share.

``decode`` runs in the judge on bytes the candidate wrote: it builds nothing but the builtin types above and
rejects anything malformed, too deep or too large with ``PlainDataError``. Messages are framed as a 4-byte
big-endian length and the JSON text, at most ``MAX_MESSAGE_BYTES``.
"""

import json
import os

MAX_DEPTH = 200  # nested containers; three frames a level keeps decoding well inside the recursion limit
MAX_MESSAGE_BYTES = 64 << 20
_SMALL_INT = 1 << 63


class PlainDataError(ValueError):
    """A value that cannot cross the sandbox, or a malformed message."""


def encode(value, handle=None, depth=0):
    """``value`` as JSON-ready plain data; ``handle(obj) -> [ "h", id, type ]`` for other objects (None: refuse)."""
    if depth > MAX_DEPTH:
        raise PlainDataError(f"nested deeper than {MAX_DEPTH} levels")
    kind = type(value)
    if value is None or kind is bool or kind is str or kind is float:
        return value
    if kind is int:
        return value if -_SMALL_INT < value < _SMALL_INT else ["i", hex(value)]
    nested = depth + 1
    if kind is list:
        return ["l", [encode(item, handle, nested) for item in value]]
    if kind is tuple:
        return ["t", [encode(item, handle, nested) for item in value]]
    if kind is dict:
        return ["d", [[encode(k, handle, nested), encode(v, handle, nested)] for k, v in value.items()]]
    if isinstance(value, int):
        return encode(int.__index__(value), handle, depth)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, (list, tuple)):
        base = list if isinstance(value, list) else tuple
        return ["l" if base is list else "t", [encode(item, handle, nested) for item in base.__iter__(value)]]
    if isinstance(value, dict):
        return ["d", [[encode(k, handle, nested), encode(v, handle, nested)] for k, v in dict.items(value)]]
    if isinstance(value, (set, frozenset)):
        base = set if isinstance(value, set) else frozenset
        return ["S" if base is set else "F", [encode(item, handle, nested) for item in base.__iter__(value)]]
    if isinstance(value, (bytes, bytearray)):
        data = bytes(memoryview(value))
        return ["Y" if isinstance(value, bytearray) else "y", data.decode("latin-1")]
    if isinstance(value, complex):
        return ["c", complex.real.__get__(value), complex.imag.__get__(value)]
    if isinstance(value, range):
        return ["r", encode(value.start), encode(value.stop), encode(value.step)]
    if handle is not None:
        return handle(value)
    raise PlainDataError(f"a {kind.__name__} object is not plain data")


def _int(obj):
    if type(obj) is int:
        return obj
    if type(obj) is list and len(obj) == 2 and obj[0] == "i" and type(obj[1]) is str and len(obj[1]) < (1 << 20):
        return int(obj[1], 16)
    raise PlainDataError("malformed integer")


def _items(obj, handle, depth):
    if len(obj) != 2 or type(obj[1]) is not list:
        raise PlainDataError(f"malformed {obj[0]!r} value")
    return [decode(item, handle, depth + 1) for item in obj[1]]


def decode(obj, handle=None, depth=0):
    """The value ``obj`` (parsed JSON) stands for; ``handle(id, type) -> stand-in`` (None: refuse handles)."""
    if depth > MAX_DEPTH:
        raise PlainDataError(f"nested deeper than {MAX_DEPTH} levels")
    kind = type(obj)
    if obj is None or kind is bool or kind is str or kind is int or kind is float:
        return obj
    if kind is not list or not obj or type(obj[0]) is not str:
        raise PlainDataError(f"malformed value of JSON type {kind.__name__}")
    tag = obj[0]
    try:
        if tag == "l":
            return _items(obj, handle, depth)
        if tag == "t":
            return tuple(_items(obj, handle, depth))
        if tag == "S":
            return set(_items(obj, handle, depth))
        if tag == "F":
            return frozenset(_items(obj, handle, depth))
        if tag == "d":
            if len(obj) != 2 or type(obj[1]) is not list:
                raise PlainDataError("malformed dict")
            out = {}
            for pair in obj[1]:
                if type(pair) is not list or len(pair) != 2:
                    raise PlainDataError("malformed dict item")
                out[decode(pair[0], handle, depth + 1)] = decode(pair[1], handle, depth + 1)
            return out
        if tag == "i":
            return _int(obj)
        if tag in ("y", "Y") and len(obj) == 2 and type(obj[1]) is str:
            data = obj[1].encode("latin-1")
            return data if tag == "y" else bytearray(data)
        if tag == "c" and len(obj) == 3 and all(type(x) in (int, float) for x in obj[1:]):
            return complex(obj[1], obj[2])
        if tag == "r" and len(obj) == 4:
            return range(_int(obj[1]), _int(obj[2]), _int(obj[3]))
        if tag == "h" and len(obj) == 3 and type(obj[1]) is int and type(obj[2]) is str and handle is not None:
            return handle(obj[1], obj[2][:200])
    except PlainDataError:
        raise
    except (TypeError, ValueError, UnicodeError, RecursionError, MemoryError, OverflowError) as exc:
        raise PlainDataError(f"malformed {tag!r} value: {type(exc).__name__}") from None
    raise PlainDataError(f"unknown or malformed tag {tag[:20]!r}")


def send(fd, message):
    """Write one framed message (a JSON-ready object) to ``fd``."""
    data = json.dumps(message, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    if len(data) > MAX_MESSAGE_BYTES:
        raise PlainDataError(f"message of {len(data)} bytes is over the {MAX_MESSAGE_BYTES} byte limit")
    view = memoryview(len(data).to_bytes(4, "big") + data)
    while view:
        view = view[os.write(fd, view):]


def _read_exactly(fd, size):
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv(fd):
    """Read one framed message from ``fd``; None at end of file. Raises ``PlainDataError`` if malformed."""
    header = _read_exactly(fd, 4)
    if header is None:
        return None
    size = int.from_bytes(header, "big")
    if size > MAX_MESSAGE_BYTES:
        raise PlainDataError(f"message of {size} bytes is over the {MAX_MESSAGE_BYTES} byte limit")
    data = _read_exactly(fd, size)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise PlainDataError(f"malformed message: {type(exc).__name__}") from None


def describe(exc):
    """``"TypeName: message"`` of an exception, never raising."""
    try:
        message = str(exc)
    except BaseException:
        message = "<unprintable>"
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def proof_recorder(proof_fd):
    """``record(kind, text)``: one ``kind<TAB>pid<TAB>text`` line on the proof descriptor, never raising; bound
    to ``os.write`` and ``os.getpid`` now, so a program that rebinds them later changes nothing."""
    write, getpid = os.write, os.getpid

    def record(kind, text):
        line = "{}\t{}\t{}\n".format(kind, getpid(), " ".join(str(text).split())[:2000])
        try:
            write(proof_fd, line.encode("utf-8", "replace"))
        except BaseException:
            pass

    return record
