"""Helpers shared by the runners that execute untrusted code (``_runner_program.py``, ``_runner_candidate.py``).

Runner-side code (stdlib only, no ``from __future__``): the fork server concatenates ``_plain.py``, this file
and one runner into the text that the sandboxed interpreter executes.
"""

import sys

_SERVER_MODULES = ("_linux", "_mounts", "_seccomp", "_cgroup", "pyseccomp")


def _flush():
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except BaseException:
            pass


def _print_traceback(exc, source, write):
    try:
        import linecache  # only now: importing it costs more than most programs
        import traceback

        linecache.cache["<program>"] = (len(source), None, source.decode("utf-8", "replace").splitlines(True),
                                        "<program>")
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))
        write(2, text.encode("utf-8", "replace"))
    except BaseException:
        pass


def _compile_program(source, fail):
    """Compile the program in this process; ``fail(kind, reason, code)`` ends it when that is impossible."""
    try:
        return compile(source, "<program>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError) as exc:
        fail("syntax_error", describe(exc), 3)
    except MemoryError:
        fail("memory", "MemoryError while compiling", 4)
    except BaseException as exc:
        fail("error", f"{describe(exc)} while compiling", 4)


def _run_as_main(code, source, fail, write):
    """Execute ``code`` as a fresh ``__main__`` module; return its namespace, or end through ``fail``."""
    for name in _SERVER_MODULES:
        sys.modules.pop(name, None)
    sys.argv[:] = ["<program>"]
    sys.path[:] = [p for p in sys.path if p and p != "."]
    module = type(sys)("__main__")
    sys.modules["__main__"] = module
    try:
        exec(code, module.__dict__)
    except SystemExit as exc:
        _flush()
        fail("exit", f"SystemExit({exc.code!r}) raised before the last statement", 2)
    except BaseException as exc:
        kind = "memory" if isinstance(exc, MemoryError) else "exception"
        reason = describe(exc)
        module.__dict__.clear()
        _flush()
        _print_traceback(exc, source, write)
        fail(kind, reason, 1)
    _flush()
    return module.__dict__
