"""Runner of the candidate's process in a judged run: executes the candidate's code, then answers the judge.

Runner-side code: the fork server prepends ``_plain.py`` and ``_runner_common.py`` and runs this text in the
candidate's sandboxed process (``python -s -S -B -c TEXT JOB_FD CHANNEL_FD`` or forked from the server).
It holds no nonce and no proof descriptor: nothing in this process decides the verdict. It executes the
candidate's program as ``__main__``, tells the judge whether that worked (``{"loaded": true}`` or the
reason), and then serves the judge's requests over the channel, one reply per request:

* ``{"op": "lookup", "name": n}``: the value of global ``n`` (plain data, or a handle for a function, a
  class or any other object);
* ``{"op": "call", "h": id, "args": ..., "kwargs": ...}``: call handle ``id`` with plain-data arguments
  (handles among them resolved); the reply holds the result and the new value of each list, dict, set or
  bytearray argument the call changed, so the judge's copies change as they would in one process;
* ``getattr`` / ``setattr`` / ``iter`` / ``len`` / ``bool`` on a handle.

An exception in the candidate's code is replied as ``{"raise": [type, "Type: message"], "memory": bool}``.
The process ends when the judge closes the channel. Whatever this code replies, the judge only ever
receives plain data: every comparison happens in the judge's process.
"""

import os
import sys

_MUTABLE = (list, dict, set, bytearray)


class _Objects:
    """The candidate's objects the judge holds stand-ins for, by number (the same object, the same number)."""

    def __init__(self):
        self.by_number, self.numbers = {}, {}

    def handle(self, obj):
        key = id(obj)
        if key not in self.numbers:
            self.numbers[key] = len(self.by_number) + 1
            self.by_number[self.numbers[key]] = obj  # kept alive, so its id stays its own
        return ["h", self.numbers[key], type(obj).__name__]

    def resolve(self, number, _type):
        if number not in self.by_number:
            raise PlainDataError(f"unknown handle {number}")
        return self.by_number[number]


def _serve(message, namespace, objects):
    """The reply to one request of the judge (see the module docstring)."""
    op = message.get("op")
    if op == "lookup":
        name = message.get("name")
        if name not in namespace:
            raise NameError(f"name {name!r} is not defined")
        return {"value": encode(namespace[name], objects.handle)}
    target = objects.resolve(message.get("h"), None)
    if op == "call":
        encoded_args = message.get("args")
        args = decode(encoded_args, objects.resolve)
        kwargs = decode(message.get("kwargs"), objects.resolve)
        result = target(*args, **kwargs)
        sync = [[i, encode(a, objects.handle)] for i, a in enumerate(args) if isinstance(a, _MUTABLE)]
        sync = [[i, value] for i, value in sync if value != encoded_args[1][i]]
        sync += [[k, encode(v, objects.handle)] for k, v in kwargs.items() if isinstance(v, _MUTABLE)]
        return {"value": encode(result, objects.handle), "sync": sync}
    if op == "getattr":
        return {"value": encode(getattr(target, message.get("attr")), objects.handle)}
    if op == "setattr":
        setattr(target, message.get("attr"), decode(message.get("value"), objects.resolve))
        return {"value": None}
    if op == "iter":
        return {"value": encode(list(target), objects.handle)}
    if op == "len":
        return {"value": len(target)}
    if op == "bool":
        return {"value": bool(target)}
    raise PlainDataError(f"unknown request {op!r}")


def _dylora_candidate(job_fd, channel):
    exit_, write = os._exit, os.write
    send_, recv_, describe_ = send, recv, describe  # bound before the candidate's code can rebind globals
    with open(job_fd, "rb") as job:
        source = job.read()

    def fail(kind, reason, code):
        try:
            send_(channel, {"loaded": False, "kind": kind, "reason": reason})
        except BaseException:
            pass
        exit_(code)

    code = _compile_program(source, fail)
    namespace = _run_as_main(code, source, fail, write)
    send_(channel, {"loaded": True})
    objects = _Objects()
    while True:
        try:
            message = recv_(channel)
        except BaseException:
            exit_(5)
        if message is None:
            _flush()
            exit_(0)
        try:
            reply = _serve(message, namespace, objects)
        except BaseException as exc:  # SystemExit from the candidate's code too: reported, not obeyed
            reply = {"raise": [type(exc).__name__, describe_(exc)], "memory": isinstance(exc, MemoryError)}
        try:
            send_(channel, reply)
        except BaseException as exc:
            send_(channel, {"raise": ["ValueError", f"the result cannot cross the sandbox: {describe_(exc)}"],
                            "memory": isinstance(exc, MemoryError)})


_dylora_candidate(int(sys.argv[1]), int(sys.argv[2]))
