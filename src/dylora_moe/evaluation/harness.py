"""``evaluate``: sandboxed pass@k of a DyLoRA-MoE checkpoint (or a plain base model) on HumanEval / MBPP.

Generation (:mod:`.generation`) and execution (:mod:`dylora_moe.sandbox`, behind its executor interface)
overlap: each generated batch is handed to the sandbox's workers while the next batch is generated. Each
sample is judged as a :class:`~dylora_moe.sandbox.Submission`: the solution in one sandboxed process, the
benchmark's tests in another. Outputs in ``output_dir``:

* ``results.jsonl``: one row per sample: ``task_id``, ``sample``, ``prompt``, ``completion``, ``solution``
  (chat styles: the extracted code), ``status`` (passed / failed / timeout / memory / syntax_error, or
  killed / error), ``reason``, ``expert`` and ``router_probs`` (None for a plain model), ``new_tokens``,
  ``duration_s``. The program itself (solution + tests) is not stored.
* ``summary.json``: ``pass@k`` for every k asked for, ``outcomes`` (count per status), per-expert counts
  and pass@1, timings, the settings and the sandbox's active isolation layers.
* ``generation.partial.jsonl`` while the run lasts: the samples generated so far (:mod:`.journal`); the
  same call into the same folder after an interruption resumes from it.

``references=True`` runs the dataset's own solutions instead of a model (HumanEval: also a body of
``pass`` for every problem, which must fail) and reports failures by task id::

    summary = evaluate("runs/ckpt", benchmark="humaneval", output_dir="eval/he")
    summary = evaluate("smollm2-135m", base_only=True, benchmark="mbpp", output_dir="eval/base", limit=10)
    summary = evaluate(None, benchmark="humaneval", references=True, output_dir="eval/refs")
    summary["pass@k"]["pass@1"], summary["outcomes"]
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..atomic import write_text_atomically
from ..common.devices import resolve_device, resolve_dtype
from ..common.inference import load_for_eval
from ..errors import EvaluationError
from ..sandbox import SandboxLimits
from .benchmarks import Problem, load_problems
from .config import EvalConfig, parse_ks
from .generation import GenerationConfig, Sample, generate_samples, render_prompt, resolve_prompt_style
from .journal import JOURNAL_FILE, GenerationJournal, JournalError, model_fingerprint
from .scoring import (
    MBPP_KNOWN_REFERENCE_FAILURES,
    SandboxPool,
    evaluate_references,
    progress_bar,
    rescore,
    run_references,
    summarise,
    write_jsonl,
)

__all__ = ["MBPP_KNOWN_REFERENCE_FAILURES", "EvaluationError", "evaluate", "load_for_eval", "rescore",
           "resolve_device", "resolve_dtype", "run_references"]

def _fingerprint(model: Any, tokenizer: Any, problems: Sequence[Problem], style: str,
                 gen: GenerationConfig) -> dict[str, Any]:
    """What decides an evaluation's samples, for its generation journal (see :mod:`.journal`)."""
    prompts = hashlib.sha256("\0".join(render_prompt(p, tokenizer, style) for p in problems).encode())
    return {"benchmark": problems[0].benchmark if problems else None, "problems": len(problems),
            "prompts_sha256": prompts.hexdigest()[:16], "prompt_style": style,
            "tokenizer": f"{type(tokenizer).__name__}/{len(tokenizer)}", "model": model_fingerprint(model),
            "max_new_tokens": gen.max_new_tokens, "temperature": gen.temperature,
            "top_p": gen.top_p if gen.temperature > 0 else None, "n_samples": gen.n_samples,
            "batch_size": gen.batch_size, "min_fill": gen.min_fill, "seed": gen.seed,
            **({"expert": gen.forced_expert} if gen.forced_expert is not None else {})}


# ----------------------------------------------------------------------------- evaluate
def evaluate(model: Any = None, tokenizer: Any = None, config: EvalConfig | None = None, *,
             limits: SandboxLimits | None = None, **fields: Any) -> dict[str, Any]:
    """Evaluate and write ``results.jsonl`` and ``summary.json`` to ``config.output_dir``; return the summary.

    ``config`` (an :class:`EvalConfig`; its fields may also be given as keywords, which override it) says what
    to run. ``model`` is a loaded model (with ``tokenizer``), or a checkpoint folder, or with ``base_only`` a
    base model name, path or alias; it is not needed with ``references``. A model given by name is loaded in
    ``dtype`` on ``device`` (``"auto"``: CUDA when available); a loaded model is used where it is. ``limits``
    overrides the sandbox limits (default: ``SandboxLimits(timeout_s=config.timeout_s)``).

    Generated samples are journaled batch by batch (:mod:`.journal`): with ``resume`` (default) a run cut
    short and started again into the same folder keeps them and generates only the rest; a journal from a
    different evaluation raises :class:`EvaluationError`. ``resume=False`` discards the journal.
    """
    if isinstance(model, (str, Path)):
        fields["model"] = str(model)
        model = None
    config = EvalConfig.resolve(config, **fields)
    limits = limits or SandboxLimits(timeout_s=config.timeout_s)
    if config.references:
        return evaluate_references(config, limits=limits)
    if model is None and config.model is None:
        raise EvaluationError("a model is needed (or use references=True)")
    if model is not None and tokenizer is None:
        raise EvaluationError("a tokenizer is needed with a loaded model")
    return _Evaluation(config, limits).run(model, tokenizer)


class _Evaluation:
    """One evaluation with a model: problems, generation overlapped with the sandbox, results and summary."""

    def __init__(self, config: EvalConfig, limits: SandboxLimits) -> None:
        self.config, self.limits = config, limits
        self.started = time.monotonic()
        self.workers = config.workers or os.cpu_count() or 1
        self.problems = load_problems(config.benchmark, limit=config.limit, data_dir=config.data_dir,
                                      task_ids=config.task_ids)
        self.out = Path(config.output)  # created only once the arguments and the model are known to be good
        c = config
        self.gen = GenerationConfig(max_new_tokens=c.max_new_tokens, temperature=c.temperature, top_p=c.top_p,
                                    n_samples=c.n_samples, batch_size=c.batch_size, seed=c.seed,
                                    prompt_style=c.prompt_style, forced_expert=c.expert)
        try:
            self.gen.validate()
        except ValueError as exc:
            raise EvaluationError(str(exc)) from None

    def run(self, model: Any, tokenizer: Any) -> dict[str, Any]:
        c = self.config
        model_name = c.model if model is None else type(model).__name__
        if model is None:
            model, tokenizer = load_for_eval(c.model, c.base_only, dtype=c.dtype, device=resolve_device(c.device))
        loaded = time.monotonic()
        style = resolve_prompt_style(tokenizer, c.prompt_style)
        fingerprint = _fingerprint(model, tokenizer, self.problems, style, self.gen)
        finished = self._finished(fingerprint)
        if finished is not None:
            return finished
        self.out.mkdir(parents=True, exist_ok=True)
        journal = GenerationJournal(self.out / JOURNAL_FILE, fingerprint)
        try:
            done = journal.open(resume=c.resume)
        except JournalError as exc:
            raise EvaluationError(str(exc)) from None
        samples, results, generated = self._generate_and_execute(model, tokenizer, journal, done)
        rows = [_row(sample, results[(sample.task_id, sample.index)], style) for sample in samples]
        write_jsonl(self.out / "results.jsonl", rows)
        ks = parse_ks(c.k)
        summary = summarise(rows, self.problems, ks, [results[key] for key in sorted(results)])
        timing = {"load_s": loaded - self.started, "generation_s": generated - loaded,
                  "execution_tail_s": time.monotonic() - generated, "total_s": time.monotonic() - self.started}
        total = len(self.problems) * c.n_samples
        timing = {k: round(v, 2) for k, v in timing.items()} | {
            "samples_per_s": round((total - len(done)) / max(generated - loaded, 1e-9), 3)}
        note = (f"pass@k for k > n_samples={c.n_samples} is undefined: reported as null"
                if max(ks) > c.n_samples else None)
        summary = {**self._settings(model, model_name, style), **summary, "note": note,
                   "resumed_samples": len(done), "timing": timing, "fingerprint": fingerprint}
        write_text_atomically(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        journal.finish()
        return summary

    def _finished(self, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
        """A finished evaluation already in the output folder: the same one is returned as it is (nothing is
        generated again); another one, or one from before summaries kept their fingerprint, is refused unless
        ``overwrite``."""
        summary_path, results_path = self.out / "summary.json", self.out / "results.jsonl"
        if self.config.overwrite or not summary_path.is_file():
            return None
        summary = json.loads(summary_path.read_text())
        if summary.get("fingerprint") == fingerprint and results_path.is_file():
            if self.config.progress:
                print(f"{self.out}: this evaluation is already finished there (summary.json); nothing to generate. "
                      "Pass --overwrite to run it again.", flush=True)
            return summary
        before = summary.get("fingerprint") or {}
        differs = [k for k in sorted(set(before) | set(fingerprint)) if before.get(k) != fingerprint.get(k)]
        changes = ", ".join(f"{k}: {before.get(k)!r} there, {fingerprint.get(k)!r} now" for k in differs[:3])
        what = f"another evaluation ({changes})" if before else "an evaluation that did not record what it ran"
        raise EvaluationError(f"{self.out} already holds a finished evaluation (summary.json) of {what}: choose "
                              "another --output, or pass --overwrite to replace it")

    def _generate_and_execute(self, model: Any, tokenizer: Any, journal: GenerationJournal,
                              done: dict[Any, Sample]) -> tuple[list[Sample], dict[Any, Any], float]:
        """Generate the samples not journaled yet, judging each batch in the sandbox while the next one is
        generated; journaled samples go through the sandbox again first."""
        by_id = {p.task_id: p for p in self.problems}
        total = len(self.problems) * self.config.n_samples
        sandbox = SandboxPool(self.limits, self.workers, self.config.progress, total)
        gen_bar = progress_bar(total, "generate", self.config.progress, position=0)
        token_bar = tqdm(total=self.gen.max_new_tokens, unit="tok", disable=not self.config.progress, position=2,
                         leave=False, dynamic_ncols=True)

        def on_token(step: int, batches_left: int) -> None:
            if step == 1:  # a new batch: its tokens so far, against the cap, with the batches still to generate
                token_bar.reset(total=self.gen.max_new_tokens)
                token_bar.set_description(f"tokens of this batch ({batches_left} to generate)")
            token_bar.update(step - token_bar.n)

        def execute(samples: Sequence[Sample]) -> None:
            for sample in samples:
                sandbox.submit((sample.task_id, sample.index), by_id[sample.task_id].submission(sample.solution))

        def on_batch(samples: list[Sample]) -> None:
            journal.append(samples)
            execute(samples)
            gen_bar.update(len(samples))

        try:
            execute(list(done.values()))
            gen_bar.update(len(done))
            samples = generate_samples(model, tokenizer, self.problems, self.gen, on_batch=on_batch, done=done,
                                       on_token=on_token)
        finally:
            token_bar.close()
            gen_bar.close()
            journal.close()
            generated = time.monotonic()
            results = sandbox.results()
        return samples, results, generated

    def _settings(self, model: Any, model_name: str, style: str) -> dict[str, Any]:
        c, first = self.config, next(model.parameters())
        return {"benchmark": c.benchmark.lower(), "problems": len(self.problems), "limit": c.limit,
                "workers": self.workers, "timeout_s": self.limits.timeout_s, "memory_bytes": self.limits.memory_bytes,
                "mode": "base-only" if c.base_only else "model", "model": model_name, "prompt_style": style,
                "n_samples": c.n_samples, "temperature": c.temperature,
                "top_p": c.top_p if c.temperature > 0 else None, "max_new_tokens": c.max_new_tokens,
                "batch_size": c.batch_size, "batch_min_fill": self.gen.min_fill, "seed": c.seed,
                "forced_expert": c.expert, "device": str(first.device),
                "dtype": str(first.dtype).replace("torch.", "")}


def _row(sample: Sample, result: Any, style: str) -> dict[str, Any]:
    """One line of ``results.jsonl``."""
    return {"task_id": sample.task_id, "sample": sample.index, "prompt": sample.prompt,
            "completion": sample.completion, "solution": None if style == "completion" else sample.solution,
            "status": result.status, "reason": result.reason, "expert": sample.expert,
            "router_probs": sample.router_probs, "new_tokens": sample.new_tokens,
            "duration_s": round(result.duration_s, 4)}
