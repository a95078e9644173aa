"""The plain-data codec (dylora_moe.sandbox._plain): what crosses between the candidate and the judge."""

from __future__ import annotations

import collections
import enum
import json
import math
import os

import pytest

from dylora_moe.sandbox._plain import MAX_DEPTH, PlainDataError, decode, encode, recv, send


def roundtrip(value, handle=None, make=None):
    return decode(json.loads(json.dumps(encode(value, handle))), make)


@pytest.mark.parametrize("value", [
    None, True, False, 0, -7, 2**63, -(2**200), 10**5000, 1.5, -0.0, math.inf, -math.inf, "", "héllo\udc80",
    b"\x00\xff", bytearray(b"ab"), 3 + 4j, range(1, 10, 3), [1, [2, (3, {4})]], (1,), {"a": 1, (1, 2): [3]},
    {1, 2, 3}, frozenset({"x"}), [[]] * 3,
], ids=lambda value: type(value).__name__)
def test_values_cross_unchanged(value):
    back = roundtrip(value)
    assert back == value and type(back) is type(value)
    if isinstance(value, (list, tuple)):
        assert [type(x) for x in back] == [type(x) for x in value]


def test_nan_and_negative_zero_keep_their_identity():
    assert math.isnan(roundtrip(math.nan))
    assert math.copysign(1.0, roundtrip(-0.0)) == -1.0


def test_bool_is_not_an_int_after_the_crossing():
    assert roundtrip([True, 1]) == [True, 1] and [type(x) for x in roundtrip([True, 1])] == [bool, int]


def test_subclasses_travel_as_their_base_value_and_lose_their_methods():
    class Liar(int):
        def __eq__(self, other):
            return True

        __hash__ = int.__hash__

    class Color(enum.IntEnum):
        RED = 3

    class Shout(str):
        def __eq__(self, other):
            return True

        __hash__ = str.__hash__

    point = collections.namedtuple("Point", "x y")(1, 2)
    back = roundtrip([Liar(0), Color.RED, Shout("a"), point, collections.Counter("aab"), collections.OrderedDict(a=1)])
    assert back == [0, 3, "a", (1, 2), {"a": 2, "b": 1}, {"a": 1}]
    assert [type(x) for x in back] == [int, int, str, tuple, dict, dict]
    assert back[0] != 5 and back[2] != "b"  # the lie did not cross


def test_other_objects_need_a_handle():
    class Thing:
        pass

    with pytest.raises(PlainDataError, match="Thing object is not plain data"):
        encode([Thing()])
    made = []
    assert roundtrip([Thing()], handle=lambda obj: ["h", 7, type(obj).__name__],
                     make=lambda number, kind: made.append((number, kind)) or "stand-in") == ["stand-in"]
    assert made == [(7, "Thing")]
    with pytest.raises(PlainDataError):  # no handle factory on the receiving side: refused
        decode(["h", 7, "Thing"])


@pytest.mark.parametrize("message", [
    {"x": 1}, ["l"], ["l", 1], ["zz", []], ["i", "not hex"], ["i", 5], ["d", [[1]]], ["d", [[["l", []], 1]]],
    ["S", [["l", []]]], ["c", "1", 2], ["r", 1, 2], ["y", 5], ["h", "1", "T"], [1, 2],
])
def test_malformed_messages_are_refused(message):
    with pytest.raises(PlainDataError):
        decode(message, lambda number, kind: object())


def test_depth_is_bounded_both_ways():
    deep: list = []
    for _ in range(MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(PlainDataError, match="deeper"):
        encode(deep)
    nested = ["l", []]
    for _ in range(MAX_DEPTH + 5):
        nested = ["l", [nested]]
    with pytest.raises(PlainDataError, match="deeper"):
        decode(nested)


def test_framing_over_a_pipe_and_its_size_limit():
    read_end, write_end = os.pipe()
    try:
        send(write_end, {"value": encode([1, "two"])})
        assert decode(recv(read_end)["value"]) == [1, "two"]
        os.write(write_end, (2**31).to_bytes(4, "big"))
        with pytest.raises(PlainDataError, match="over the"):
            recv(read_end)
        os.write(write_end, (3).to_bytes(4, "big") + b"{x}")
        with pytest.raises(PlainDataError, match="malformed message"):
            recv(read_end)
    finally:
        os.close(write_end)
    assert recv(read_end) is None  # end of file
    os.close(read_end)
