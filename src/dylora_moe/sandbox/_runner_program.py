"""Runner of a whole program (``run_program``): the only code besides the program in its interpreter.

Runner-side code: the fork server prepends ``_plain.py`` and ``_runner_common.py`` and runs this text in the
sandboxed process, forked from the server or as ``python -s -S -B -c TEXT JOB_FD PROOF_FD``. It reads the
nonce and the program from an inherited, unlinked file (then closes it), compiles and executes the program
as ``__main__``, and writes one record to the proof descriptor: ``done <pid> <nonce>`` only after the
program's code returned, or why it did not. It ends with ``os._exit``, so atexit handlers, finalizers and
leftover threads can neither run after the verdict nor change it. The nonce lives in this interpreter, so
code written against this runner can forge the record (docs/sandbox.md); judged runs
(``_runner_candidate.py`` + ``_runner_judge.py``) have no such limit.
"""

import os
import sys


def _dylora_program(job_fd, proof_fd):
    write, exit_, getpid = os.write, os._exit, os.getpid  # immune to monkeypatching by the program
    with open(job_fd, "rb") as job:
        data = job.read()
    nonce, _, source = data.partition(b"\n")
    del data

    record = proof_recorder(proof_fd)

    def fail(kind, reason, code):
        record(kind, reason)
        exit_(code)

    code = _compile_program(source, fail)
    _run_as_main(code, source, fail, write)
    write(proof_fd, b"done\t%d\t%s\n" % (getpid(), nonce))
    exit_(0)


_dylora_program(int(sys.argv[1]), int(sys.argv[2]))
