"""Judged runs (run_tests): the candidate in one process, the tests in the judge's; verdicts it cannot forge."""

from __future__ import annotations

import pytest

from dylora_moe.sandbox import ERROR, FAILED, KILLED, MEMORY, PASSED, SYNTAX_ERROR, TIMEOUT, SandboxLimits, Submission

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = "assert add(1, 2) == 3\nassert add([1], [2]) == [1, 2]\nassert add('a', 'b') == 'ab'\n"


def test_a_correct_candidate_passes_and_a_wrong_one_fails(judge_checked):
    assert judge_checked(ADD, ADD_TESTS, entry_point="add").status == PASSED
    result = judge_checked("def add(a, b):\n    return a - b\n", "assert add(1, 2) == 3, 'expected 3'\n",
                           entry_point="add")
    assert result.status == FAILED and result.reason == "AssertionError: expected 3"


# --- the four forgeries that beat a one-process harness ----------------------------------------------------


def test_forgery_a_the_candidate_has_no_nonce_to_read_from_frames_or_gc(judge_checked):
    """Walking every frame and every object the collector knows finds no nonce, and records written to every
    descriptor reach nothing that decides the verdict."""
    result = judge_checked(
        """
        import gc, os, re, sys
        hexes = re.compile(rb"[0-9a-f]{64}")
        found = []
        frame = sys._getframe()
        while frame is not None:
            found += [v for v in frame.f_locals.values() if isinstance(v, (bytes, str)) and len(v) == 64]
            frame = frame.f_back
        for obj in gc.get_objects():
            if isinstance(obj, dict):
                found += [v for v in obj.values() if isinstance(v, bytes) and hexes.fullmatch(v)]
        print("nonce candidates:", found)
        for fd in range(3, 256):
            for pid in (1, 2, os.getpid()):
                for nonce in found + [b"0" * 64]:
                    try:
                        value = nonce if isinstance(nonce, bytes) else nonce.encode()
                        os.write(fd, b"done\\t%d\\t%s\\n" % (pid, value))
                    except OSError:
                        pass
        def add(a, b):
            return 0
        """, ADD_TESTS, entry_point="add")
    assert result.status == FAILED, result
    assert "nonce candidates: []" in result.stdout_tail


def test_forgery_b_dumpable_and_proc_mem_reach_nothing(judge_checked):
    """``prctl(PR_SET_DUMPABLE, 1)`` is refused by the filter; the candidate's own memory holds no nonce, and
    the judge's (pid 1, another uid, not dumpable) cannot be opened."""
    result = judge_checked(
        """
        import ctypes, os, re
        libc = ctypes.CDLL(None, use_errno=True)
        print("prctl:", libc.prctl(4, 1, 0, 0, 0), ctypes.get_errno())
        hits = 0
        with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
            for line in maps:
                span, perms = line.split()[:2]
                if "r" not in perms or "[vvar" in line or "[vsyscall" in line:
                    continue
                start, end = (int(x, 16) for x in span.split("-"))
                try:
                    mem.seek(start)
                    hits += len(re.findall(rb"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])", mem.read(end - start)))
                except (OSError, OverflowError, ValueError):
                    pass
        print("hex strings in own memory:", hits)
        for pid in ("1", "2"):
            try:
                open(f"/proc/{pid}/mem", "rb").read(1)
                print("read judge memory", pid)
            except OSError as exc:
                print("judge memory", pid, type(exc).__name__)
        def add(a, b):
            return 0
        """, ADD_TESTS, entry_point="add")
    assert result.status == FAILED, result
    assert "prctl: -1 38" in result.stdout_tail  # ENOSYS from the filter
    assert "read judge memory" not in result.stdout_tail


def test_forgery_c_settrace_changes_nothing_in_the_judge(judge_checked):
    """A tracer rewriting frames (jumping over lines, replacing code) only reaches the candidate's process."""
    result = judge_checked(
        """
        import sys
        def tracer(frame, event, arg):
            if event == "call" and frame.f_code.co_name == "check":
                frame.f_code = (lambda candidate: None).__code__
            return tracer
        sys.settrace(tracer)
        import threading
        threading.settrace(tracer)
        def add(a, b):
            return 0
        """,
        "def check(candidate):\n    assert candidate(1, 2) == 3\n\ncheck(add)\n", entry_point="add")
    assert result.status == FAILED and result.reason.startswith("AssertionError"), result


def test_forgery_d_an_object_equal_to_everything_cannot_be_compared(judge_checked):
    result = judge_checked(
        """
        class Everything:
            def __eq__(self, other):
                return True
            def __ne__(self, other):
                return False
            __hash__ = object.__hash__
        def add(a, b):
            return Everything()
        """, "assert add(1, 2) == 3\n", entry_point="add")
    assert result.status == FAILED and "cannot be compared" in result.reason, result


@pytest.mark.parametrize("returned", [
    "type('Liar', (int,), {'__eq__': lambda s, o: True, '__hash__': int.__hash__})(0)",
    "type('Liar', (str,), {'__eq__': lambda s, o: True, '__hash__': str.__hash__})('no')",
    "type('Liar', (list,), {'__eq__': lambda s, o: True})([0])",
    "type('Liar', (float,), {'__eq__': lambda s, o: True, '__hash__': float.__hash__})(0.5)",
])
def test_lying_subclasses_of_plain_types_arrive_as_their_true_value(judge_checked, returned):
    result = judge_checked(f"def add(a, b):\n    return {returned}\n", "assert add(1, 2) == 3\n", entry_point="add")
    assert result.status == FAILED and result.reason.startswith("AssertionError"), result


# --- the candidate's process ending, failing, or breaking the protocol ----------------------------------------


@pytest.mark.parametrize(("body", "status", "reason"), [
    ("import os; os._exit(0)", FAILED, "ended during the tests (exit status 0)"),
    ("import sys; sys.exit(0)", FAILED, "SystemExit"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", KILLED, "SIGKILL"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", KILLED, "SIGSEGV"),
])
def test_the_candidate_ending_during_a_call_fails_even_if_the_tests_catch_it(judge_checked, body, status, reason):
    tests = "try:\n    add(1, 2)\nexcept Exception:\n    pass\n"  # a test that swallows ordinary exceptions
    result = judge_checked(f"def add(a, b):\n    {body}\n", tests, entry_point="add")
    assert result.status == status and reason in result.reason, result


def test_a_memory_error_in_a_call_is_reported_as_memory(judge_checked):
    result = judge_checked("def add(a, b):\n    return bytearray(1 << 40)\n", ADD_TESTS, entry_point="add")
    assert result.status == MEMORY and "MemoryError" in result.reason, result


def test_an_infinite_loop_in_a_call_is_a_timeout(judge_checked):
    result = judge_checked("def add(a, b):\n    while True:\n        pass\n", ADD_TESTS,
                           SandboxLimits(timeout_s=1.5), entry_point="add")
    assert result.status == TIMEOUT, result


@pytest.mark.parametrize(("candidate", "status", "reason"), [
    ("def add(a, b)\n    return a\n", SYNTAX_ERROR, "SyntaxError"),
    ("import sys\nsys.exit(0)\n", FAILED, "SystemExit(0) raised before the last statement"),
    ("raise ValueError('at import')\n", FAILED, "ValueError: at import"),
    ("x = input()\n", FAILED, "EOFError"),
])
def test_the_candidates_own_code_failing_before_the_tests(judge_checked, candidate, status, reason):
    result = judge_checked(candidate, ADD_TESTS, entry_point="add")
    assert result.status == status and reason in result.reason, result


def test_garbage_on_the_channel_is_a_failure_not_a_pass(judge_checked):
    result = judge_checked(
        """
        import os, stat
        for fd in range(3, 64):
            try:
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    os.write(fd, b"\\x00\\x00\\x00\\x05{bad}" + b"\\xff" * 100)
            except OSError:
                pass
        def add(a, b):
            return a + b
        """, ADD_TESTS, entry_point="add")
    assert result.status == FAILED and "malformed" in result.reason, result


def test_a_result_too_large_to_cross_fails(judge_checked):
    result = judge_checked("def add(a, b):\n    return 'x' * (80 << 20)\n", "assert add(1, 2) == 'x'\n",
                           SandboxLimits(timeout_s=10, memory_bytes=1 << 30), entry_point="add")
    assert result.status == FAILED and "cannot cross the sandbox" in result.reason, result


# --- the tests see the candidate as they would in one process -------------------------------------------------


def test_exceptions_keep_their_builtin_type(judge_checked):
    candidate = "def root(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x ** 0.5\n"
    tests = ("try:\n    root(-1)\nexcept ValueError as exc:\n    assert str(exc) == 'negative'\n"
             "else:\n    assert False\n")
    assert judge_checked(candidate, tests, entry_point="root").status == PASSED


def test_arguments_changed_in_place_change_in_the_tests_too(judge_checked):
    tests = "data = [3, 1, 2]\nsort_in_place(data)\nassert data == [1, 2, 3]\nd = {}\nfill(d)\nassert d == {'k': 1}\n"
    candidate = "def sort_in_place(xs):\n    xs.sort()\n\ndef fill(d):\n    d['k'] = 1\n"
    assert judge_checked(candidate, tests, entry_point="sort_in_place").status == PASSED
    # and a candidate that damages its argument fails a test that reuses it, as in one process
    damaging = "def first(xs):\n    return xs.pop(0)\n"
    assert judge_checked(damaging, "xs = [1, 2]\nassert first(xs) == 1\nassert first(xs) == 1\n",
                         entry_point="first").status == FAILED


def test_candidate_objects_travel_as_handles(judge_checked):
    """MBPP/367's pattern: the tests build a tree from the candidate's class, then ask a question about it."""
    candidate = """
        class Node:
            def __init__(self, data):
                self.data, self.left, self.right = data, None, None
        def height(node):
            return 0 if node is None else 1 + max(height(node.left), height(node.right))
        def numbers(n):
            yield from range(n)
        """
    tests = """
        root = Node(1)
        root.left = Node(2)
        root.left.left = Node(3)
        assert height(root) == 3 and root.left.data == 2
        assert list(numbers(3)) == [0, 1, 2] and len(list(numbers(2))) == 2
        """
    assert judge_checked(candidate, tests, entry_point="height").status == PASSED


def test_the_prelude_and_builtins_are_the_judges_own(judge_checked):
    """HumanEval's prompt defines helpers the tests use (``poly``); a candidate that redefines them, or a
    builtin the tests rely on, changes nothing in the judge."""
    prelude = ("def poly(xs, x):\n    return sum(c * x ** i for i, c in enumerate(xs))\n\n"
               "def find_zero(xs):\n    '''doc'''\n")
    candidate = prelude + ("def find_zero(xs):\n    return 1.0\n\ndef poly(xs, x):\n    return 0.0\n\n"
                           "abs = lambda x: 0\n")
    tests = "def check(candidate):\n    assert abs(poly([1, 2], candidate([1, 2]))) < 1e-6\n\ncheck(find_zero)\n"
    result = judge_checked(candidate, tests, prelude=prelude, entry_point="find_zero")
    assert result.status == FAILED and result.reason.startswith("AssertionError"), result
    honest = prelude + "def find_zero(xs):\n    return -0.5\n"
    assert judge_checked(honest, tests, prelude=prelude, entry_point="find_zero").status == PASSED


def test_an_entry_point_named_like_a_builtin_is_the_candidates(judge_checked):
    """MBPP/126 names its function ``sum``: the tests must call the candidate's, not the builtin."""
    candidate = "def sum(a, b):\n    return len([i for i in range(1, min(a, b)) if a % i == 0 and b % i == 0])\n"
    assert judge_checked(candidate, "assert sum(10, 15) == 2\n", entry_point="sum").status == PASSED


def test_a_missing_entry_point_and_unpassable_arguments_fail(judge_checked):
    assert judge_checked("def other():\n    pass\n", ADD_TESTS, entry_point="add").reason.startswith("NameError")
    result = judge_checked(ADD, "assert add(lambda: 1, 2) == 3\n", entry_point="add")
    assert result.status == FAILED and "cannot be passed to the candidate" in result.reason


def test_a_failing_prelude_is_a_harness_error_not_the_candidates(judge_checked):
    result = judge_checked(ADD, ADD_TESTS, prelude="raise RuntimeError('broken dataset')\n", entry_point="add")
    assert result.status == ERROR and "prelude" in result.reason, result


def test_candidate_names_come_from_the_tests():
    job = Submission(candidate="", prelude="import math\ndef helper():\n    pass\n",
                     tests=("def check(c):\n    x = Node(1)\n    assert helper() is None and math.pi and len([x])\n"
                            "check(f)\n"),
                     entry_point="f")
    assert job.candidate_names() == ["f", "Node"]
