"""Runner of the judge's process in a judged run: executes the tests, with the candidate in another process.

Runner-side code: the fork server prepends ``_plain.py`` and runs this text in the judge's sandboxed process
(``python -s -S -B -c TEXT JOB_FD PROOF_FD CHANNEL_FD CANDIDATE_PID`` or forked from the server), as a uid
other than the candidate's, not dumpable, under the same system-call filter, as pid 1 of the run's pid
namespace. The job (from the harness, trusted) holds the nonce, the *prelude* (trusted code the tests rely
on: HumanEval's prompt with its helper functions), the tests, and the names the tests take from the
candidate. The judge

1. waits for the candidate's process to report that the candidate's code ran (or why it did not);
2. executes the prelude, then looks each name up in the candidate's process: plain data arrives as a value,
   anything else (functions, classes, objects) as a :class:`Remote` stand-in that forwards calls and
   attribute access;
3. executes the tests. Arguments go to the candidate as plain data, results come back as plain data, and
   every comparison (``==``, ``<``, ``abs(x - y) < 1e-6``, ...) runs here, on values the candidate cannot
   have altered: a stand-in refuses to be compared;
4. writes one record to the proof descriptor, which only this process holds: ``done <pid> <nonce>`` when the
   tests completed, or why they did not (``exception``, ``memory``, ``syntax_error``, ``exit``, ``gone`` when
   the candidate's process ended or broke the protocol -- preceded by ``candidate <returncode> <cpu_s>`` once
   it has ended -- or ``error`` when the prelude itself failed).

An exception the candidate raises is raised here as the same builtin exception type when there is one (so a
test that expects ``ValueError`` behaves as in one process), else as ``CandidateError``.
"""

import builtins
import json
import os
import sys

_EXITS = ("SystemExit", "KeyboardInterrupt", "GeneratorExit")
_LOAD_FAILURES = ("syntax_error", "memory", "exception", "exit", "error")


class CandidateError(RuntimeError):
    """An exception raised by the candidate's code that has no builtin type of the same name."""


class CandidateExit(BaseException):
    """The candidate's code raised SystemExit (or KeyboardInterrupt): like in one process, ``except Exception``
    in the tests does not catch it."""


class CandidateGone(BaseException):
    """The candidate's process ended, or replied with something that is not a well-formed reply. Once raised,
    the run fails even if the tests catch it."""


class _Channel:
    """The judge's end of the socket to the candidate's process: one request, one reply, plain data only."""

    def __init__(self, fd):
        self.fd = fd
        self.gone = None  # why the channel was lost, once it was

    def lost(self, reason):
        if self.gone is None:
            self.gone = reason
        raise CandidateGone(self.gone)

    def request(self, message):
        """The reply to ``message`` (a dict with ``value``), or the candidate's exception raised here."""
        if self.gone is not None:
            raise CandidateGone(self.gone)
        try:
            send(self.fd, message)
            reply = recv(self.fd)
        except PlainDataError as exc:
            self.lost(f"the candidate's process sent a malformed reply ({exc})")
        except OSError as exc:
            self.lost(f"the channel to the candidate's process failed ({describe(exc)})")
        if reply is None:
            self.lost("the candidate's process ended during the tests")
        if type(reply) is not dict or ("raise" not in reply and "value" not in reply):
            self.lost("the candidate's process sent a malformed reply")
        if "raise" in reply:
            raise self._exception(reply)
        return reply

    def value(self, encoded):
        try:
            return decode(encoded, Remote.make(self))
        except PlainDataError as exc:
            self.lost(f"the candidate's process sent a malformed value ({exc})")

    def _exception(self, reply):
        raised = reply.get("raise")
        if type(raised) is not list or len(raised) != 2 or not all(type(x) is str for x in raised):
            self.lost("the candidate's process sent a malformed reply")
        name, text = raised[0][:100], raised[1][:2000]
        message = text[len(name) + 2:] if text.startswith(name + ": ") else ("" if text == name else text)
        if reply.get("memory") is True:
            return MemoryError(message)
        if name in _EXITS:
            return CandidateExit(text)
        cls = getattr(builtins, name, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                return cls(message) if message else cls()
            except BaseException:
                pass
        return CandidateError(text)

    def apply_sync(self, sync, args, kwargs):
        """Change the judge's copies of the arguments the candidate changed in place (lists, dicts, sets,
        bytearrays), as they would have changed in one process."""
        if not sync:
            return
        if type(sync) is not list:
            self.lost("the candidate's process sent a malformed reply")
        for item in sync:
            if type(item) is not list or len(item) != 2:
                self.lost("the candidate's process sent a malformed reply")
            key, encoded = item
            if type(key) is int and 0 <= key < len(args):
                target = args[key]
            elif type(key) is str and key in kwargs:
                target = kwargs[key]
            else:
                self.lost("the candidate's process sent a malformed reply")
            new = self.value(encoded)
            if type(target) is type(new) and type(new) in (list, bytearray):
                target[:] = new
            elif type(target) is type(new) and type(new) in (dict, set):
                target.clear()
                target.update(new)


def _outgoing(obj):
    """A judge-side object on its way to the candidate: only stand-ins of the candidate's own objects."""
    if type(obj) is Remote:
        return ["h", object.__getattribute__(obj, "_id"), object.__getattribute__(obj, "_type")]
    raise TypeError(f"a {type(obj).__name__} cannot be passed to the candidate: only plain data crosses the "
                    "sandbox")


class Remote:
    """Stand-in for an object that lives in the candidate's process: call it, read or set attributes, iterate
    it, take its length or truth value; never compare it."""

    __slots__ = ("_channel", "_id", "_type")

    @staticmethod
    def make(channel):
        return lambda number, type_name: Remote(channel, number, type_name)

    def __init__(self, channel, number, type_name):
        object.__setattr__(self, "_channel", channel)
        object.__setattr__(self, "_id", number)
        object.__setattr__(self, "_type", type_name)

    def _ask(self, op, **fields):
        channel = object.__getattribute__(self, "_channel")
        reply = channel.request({"op": op, "h": object.__getattribute__(self, "_id"), **fields})
        return channel.value(reply["value"])

    def __call__(self, *args, **kwargs):
        channel = object.__getattribute__(self, "_channel")
        reply = channel.request({"op": "call", "h": object.__getattribute__(self, "_id"),
                                 "args": encode(list(args), _outgoing), "kwargs": encode(dict(kwargs), _outgoing)})
        channel.apply_sync(reply.get("sync"), args, kwargs)
        return channel.value(reply["value"])

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self._ask("getattr", attr=name)

    def __setattr__(self, name, new):
        self._ask("setattr", attr=name, value=encode(new, _outgoing))

    def __iter__(self):
        return iter(self._ask("iter"))

    def __len__(self):
        return self._ask("len")

    def __bool__(self):
        return bool(self._ask("bool"))

    def __repr__(self):
        return f"<candidate's {object.__getattribute__(self, '_type')}>"

    def _refuse(self, other):
        kind = object.__getattribute__(self, "_type")
        raise TypeError(f"a {kind} object of the candidate's cannot be compared: only plain data (numbers, "
                        "strings, lists, tuples, dicts, sets, bytes) crosses the sandbox, and comparisons run in "
                        "the judge")

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse
    __hash__ = object.__hash__


def _run_tests(spec, channel, finish):
    """Prelude, names, tests: returns once the tests completed; every other end goes through ``finish``."""
    module = type(sys)("__main__")
    sys.modules["__main__"] = module
    namespace = module.__dict__
    try:
        exec(compile(spec["prelude"], "<prelude>", "exec", dont_inherit=True), namespace)
        tests = compile(spec["tests"], "<tests>", "exec", dont_inherit=True)
    except BaseException as exc:
        finish("error", f"the trusted prelude or tests failed to run: {describe(exc)}", 4)
    try:
        for name in spec["names"]:
            try:
                namespace[name] = channel.value(channel.request({"op": "lookup", "name": name})["value"])
            except NameError:
                pass  # not defined by the candidate: the test meets the prelude's or a NameError, as in one process
        exec(tests, namespace)
    except CandidateGone:
        pass  # recorded by the caller
    except CandidateExit as exc:
        finish("exit", f"{exc} raised by the candidate's code during the tests", 2)
    except SystemExit as exc:
        finish("exit", f"SystemExit({exc.code!r}) raised in the tests", 2)
    except BaseException as exc:
        finish("memory" if isinstance(exc, MemoryError) else "exception", describe(exc), 1)


def _dylora_judge(job_fd, proof_fd, channel_fd, candidate):
    write, exit_, getpid = os.write, os._exit, os.getpid
    with open(job_fd, "rb") as job:
        spec = json.loads(job.read())

    record = proof_recorder(proof_fd)

    def finish(kind, text, code):
        if kind == "gone":
            ended = _candidate_status(candidate)
            if ended is not None:
                record("candidate", "{} {}".format(*ended))
        record(kind, text)
        exit_(code)

    try:
        hello = recv(channel_fd)
    except PlainDataError:
        hello = {"loaded": False, "kind": "gone", "reason": "the candidate's process sent a malformed message"}
    if hello is None:
        finish("gone", "the candidate's process ended before its code finished", 1)
    if type(hello) is not dict or hello.get("loaded") is not True:
        kind = hello.get("kind") if type(hello) is dict else None
        finish(kind if kind in _LOAD_FAILURES else "gone",
               hello.get("reason", "") if type(hello) is dict else "malformed message", 1)
    channel = _Channel(channel_fd)
    _run_tests(spec, channel, finish)
    if channel.gone is not None:  # even when the tests caught it
        finish("gone", channel.gone, 1)
    write(proof_fd, b"done\t%d\t%s\n" % (getpid(), spec["nonce"].encode("ascii")))
    exit_(0)


def _candidate_status(pid, grace_s=0.2):
    """``(returncode, cpu_s)`` of the candidate's process (a child of the judge) once it has ended, or None if
    it is still running after ``grace_s`` (its end of the channel closes just before it becomes a zombie)."""
    import time

    deadline = time.monotonic() + grace_s
    while True:
        try:
            ended, status, usage = os.wait4(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if ended:
            return os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            return None
        time.sleep(0.002)


_dylora_judge(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
