"""The generation journal: an evaluation cut short resumes where it stopped instead of starting over.

``evaluate`` appends every generated batch's samples to ``output_dir/generation.partial.jsonl`` as soon as
the batch is decoded (one line per batch, flushed and fsynced), and deletes the file once ``results.jsonl`` and
``summary.json`` are written. Run the same evaluation into the same folder again and the journaled
samples are kept: only batches with a missing sample are generated, and every journaled sample goes
through the sandbox again (cheap next to generation). Batches are planned over the whole problem set
exactly as in an uninterrupted run and keep their seeds, so a resumed run generates the same samples.

The journal's first line is a header whose ``fingerprint`` names what decides the samples (benchmark,
task ids, decoding settings, prompt style and :func:`model_fingerprint`); a journal written by another
evaluation is refused with the field that differs, never mixed in::

    journal = GenerationJournal(out / JOURNAL_FILE, fingerprint)
    done = journal.open(resume=True)     # {(task_id, sample): Sample} already generated
    journal.append(samples)              # after each batch
    journal.finish()                     # after results.jsonl / summary.json are written
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import JournalError
from ..layout import JOURNAL_FILE
from .generation import Sample

__all__ = ["JOURNAL_FILE", "JOURNAL_VERSION", "GenerationJournal", "JournalError", "model_fingerprint"]

JOURNAL_VERSION = 1
_SAMPLE_FIELDS = tuple(f.name for f in dataclasses.fields(Sample))


def model_fingerprint(model: Any) -> str:
    """A short digest of a model's parameters: names, shapes, dtypes, and each tensor's sum and sum of squares
    (float64, 9 significant digits, so the same weights on another device give the same digest).

    Reads every parameter once on its own device: about 0.2 s for a 135M-parameter model on a CPU.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            values = param.detach().double()
            digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|{values.sum().item():.9g}|"
                          f"{values.square().sum().item():.9g};".encode())
    return digest.hexdigest()[:16]


class GenerationJournal:
    """Append-only record of the samples generated so far; see the module docstring."""

    def __init__(self, path: str | Path, fingerprint: dict[str, Any]) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self._handle: Any = None

    def open(self, resume: bool = True) -> dict[tuple[str, int], Sample]:
        """Start the journal; with ``resume`` keep a matching journal's samples and return them by
        ``(task_id, sample index)``. Without ``resume`` an existing journal is discarded."""
        done: dict[tuple[str, int], Sample] = {}
        valid_bytes = 0
        if resume and self.path.is_file():
            done, valid_bytes = self._read()
        if valid_bytes:
            with open(self.path, "r+b") as handle:  # drop a line cut off by the interruption
                handle.truncate(valid_bytes)
            self._handle = open(self.path, "a", encoding="utf-8")
        else:
            self._handle = open(self.path, "w", encoding="utf-8")
            self._write([{"journal": JOURNAL_VERSION, "fingerprint": self.fingerprint}])
        return done

    def append(self, samples: Sequence[Sample]) -> None:
        """Record one generated batch as one line (flushed and fsynced before returning), so a batch is in the
        journal whole or, cut off by the interruption, not at all."""
        self._write([{"samples": [dataclasses.asdict(sample) for sample in samples]}])

    def finish(self) -> None:
        """Close and delete the journal (call once the final results are safely written)."""
        self.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def _write(self, rows: list[dict[str, Any]]) -> None:
        self._handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def _read(self) -> tuple[dict[tuple[str, int], Sample], int]:
        """The journal's samples and the byte length of its complete lines (a cut-off last line is dropped)."""
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        complete, tail = lines[:-1], lines[-1]  # tail: b"" when the file ends with a newline
        if not complete:
            return {}, 0  # not even a whole header: start over
        header = self._parse(complete[0], 1)
        if not isinstance(header, dict) or header.get("journal") != JOURNAL_VERSION:
            raise JournalError(f"{self.path}: line 1 is not a version-{JOURNAL_VERSION} generation journal "
                               "header; delete the file or evaluate with --no-resume")
        self._check(header.get("fingerprint") or {})
        done: dict[tuple[str, int], Sample] = {}
        for number, line in enumerate(complete[1:], start=2):
            batch = self._parse(line, number)
            rows = batch.get("samples") if isinstance(batch, dict) else None
            missing = sorted({f for row in rows for f in _SAMPLE_FIELDS if f not in row}) if isinstance(
                rows, list) and all(isinstance(row, dict) for row in rows) else ["samples"]
            if missing:
                raise JournalError(f"{self.path}: line {number} lacks field(s) {missing}; delete the file or "
                                   "evaluate with --no-resume")
            for row in rows:
                sample = Sample(**{f: row[f] for f in _SAMPLE_FIELDS})
                done[(sample.task_id, sample.index)] = sample
        return done, len(data) - len(tail)

    def _parse(self, line: bytes, number: int) -> Any:
        try:
            return json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise JournalError(f"{self.path}: line {number} is not valid JSON ({exc}); delete the file or "
                               "evaluate with --no-resume") from None

    def _check(self, stored: dict[str, Any]) -> None:
        for field in sorted(set(stored) | set(self.fingerprint)):
            if stored.get(field) != self.fingerprint.get(field):
                raise JournalError(
                    f"{self.path}: was written by a different evaluation ({field}: {stored.get(field)!r} there, "
                    f"{self.fingerprint.get(field)!r} now); evaluate into another --output folder, or pass "
                    "--no-resume (resume=False) to discard it")
