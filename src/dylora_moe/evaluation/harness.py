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

from ..atomic import write_text_atomically
from ..errors import EvaluationError
from ..sandbox import SandboxLimits
from .benchmarks import Problem, load_problems
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
            "batch_size": gen.batch_size, "min_fill": gen.min_fill, "seed": gen.seed}


# ----------------------------------------------------------------------------- models
def resolve_device(device: str | None = "auto") -> Any:
    """``"auto"`` (or None): the first CUDA device if there is one, else the CPU; otherwise ``torch.device(device)``."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise EvaluationError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EvaluationError(f"device {device!r} was asked for, but torch sees no CUDA device here")
    return resolved


def resolve_dtype(dtype: Any = None) -> Any:
    """None / ``"float32"`` (default), ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if str(dtype).lower() not in names:
        raise EvaluationError(f"dtype must be one of float32, bfloat16, float16, got {dtype!r}")
    return names[str(dtype).lower()]


def load_for_eval(name_or_path: str | Path, base_only: bool = False, dtype: Any = None,
                  device: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: a DyLoRA-MoE checkpoint folder, or (``base_only``) a plain base model.

    ``dtype`` (default float32) and ``device`` (default: stay on the CPU) as in :func:`resolve_dtype` and
    :func:`resolve_device`.
    """
    model, tokenizer = _load_for_eval(name_or_path, base_only, resolve_dtype(dtype))
    if device is not None:
        model.to(resolve_device(device))
    return model, tokenizer


def _load_for_eval(name_or_path: str | Path, base_only: bool, dtype: Any) -> tuple[Any, Any]:
    from ..loading import load_base_model, resolve_model_path
    from ..serialization import CONFIG_FILE, read_checkpoint_meta

    if base_only:
        return load_base_model(str(name_or_path), dtype=dtype)
    path = Path(name_or_path)
    if not (path / CONFIG_FILE).is_file():
        raise EvaluationError(
            f"{name_or_path}: not a DyLoRA-MoE checkpoint folder ({CONFIG_FILE} not found); "
            "pass --base-only (base_only=True) to evaluate a plain base model"
        )
    from transformers import AutoTokenizer

    from ..model import DyLoRAMoEForCausalLM

    meta = read_checkpoint_meta(path)
    model = DyLoRAMoEForCausalLM.from_pretrained(path, dtype=dtype)
    source = path if (path / "tokenizer_config.json").is_file() else resolve_model_path(
        meta["base_model"]["name_or_path"])
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _parse_ks(k: int | str | Sequence[int]) -> list[int]:
    if isinstance(k, str):
        try:
            values = [int(part) for part in k.split(",") if part.strip()]
        except ValueError:
            raise EvaluationError(f"k must be a comma-separated list of integers, got {k!r}") from None
    elif isinstance(k, int):
        values = [k]
    else:
        values = [int(v) for v in k]
    if not values or any(v < 1 for v in values):
        raise EvaluationError(f"every k must be >= 1, got {k!r}")
    return sorted(set(values))


# ----------------------------------------------------------------------------- evaluate
def evaluate(
    model: Any = None,
    tokenizer: Any = None,
    *,
    benchmark: str = "humaneval",
    output_dir: str | Path = "eval",
    limit: int | None = None,
    task_ids: Sequence[str] = (),
    n_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 0.95,
    k: int | str | Sequence[int] = (1,),
    batch_size: int = 8,
    max_new_tokens: int = 512,
    prompt_style: str = "auto",
    seed: int = 0,
    workers: int | None = None,
    timeout_s: float = 20.0,
    limits: SandboxLimits | None = None,
    data_dir: str | Path | None = None,
    references: bool = False,
    base_only: bool = False,
    progress: bool = True,
    device: str | None = "auto",
    dtype: Any = None,
    resume: bool = True,
) -> dict[str, Any]:
    """Evaluate and write ``results.jsonl`` and ``summary.json`` to ``output_dir``; return the summary.

    Generated samples are journaled batch by batch (:mod:`.journal`): with ``resume`` (default) a run cut
    short and started again into the same ``output_dir`` keeps them and generates only the rest; a journal
    from a different evaluation raises :class:`EvaluationError`. ``resume=False`` discards the journal.

    ``model`` is a loaded model (with ``tokenizer``), or a checkpoint folder, or with ``base_only`` a base
    model name, path or alias; it is not needed with ``references=True``. A model given by name is loaded in
    ``dtype`` (default float32) on ``device`` (``"auto"``: CUDA when available); a loaded model is used where
    it is.
    """
    started = time.monotonic()
    ks = _parse_ks(k)
    workers = workers or os.cpu_count() or 1
    limits = limits or SandboxLimits(timeout_s=timeout_s)
    problems = load_problems(benchmark, limit=limit, data_dir=data_dir, task_ids=task_ids)
    out = Path(output_dir)  # created only once the arguments and the model are known to be good
    settings: dict[str, Any] = {"benchmark": benchmark.lower(), "problems": len(problems), "limit": limit,
                                "workers": workers, "timeout_s": limits.timeout_s, "memory_bytes": limits.memory_bytes}
    if references:
        return evaluate_references(benchmark, output_dir, limit=limit, task_ids=task_ids, workers=workers,
                                   limits=limits, data_dir=data_dir, progress=progress)
    if model is None:
        raise EvaluationError("a model is needed (or use references=True)")
    gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           n_samples=n_samples, batch_size=batch_size, seed=seed, prompt_style=prompt_style)
    try:
        gen.validate()
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None
    ks_note = f"pass@k for k > n_samples={n_samples} is undefined: reported as null" if max(ks) > n_samples else None
    model_name = str(model) if isinstance(model, (str, Path)) else type(model).__name__
    if isinstance(model, (str, Path)):
        model, tokenizer = load_for_eval(model, base_only, dtype=dtype, device=resolve_device(device))
    elif tokenizer is None:
        raise EvaluationError("a tokenizer is needed with a loaded model")
    loaded = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    style = resolve_prompt_style(tokenizer, prompt_style)
    by_id = {p.task_id: p for p in problems}
    total = len(problems) * n_samples
    journal = GenerationJournal(out / JOURNAL_FILE, _fingerprint(model, tokenizer, problems, style, gen))
    try:
        done = journal.open(resume=resume)
    except JournalError as exc:
        raise EvaluationError(str(exc)) from None
    sandbox = SandboxPool(limits, workers, progress, total)
    gen_bar = progress_bar(total, "generate", progress, position=0)

    def execute(samples: Sequence[Sample]) -> None:
        for sample in samples:
            sandbox.submit((sample.task_id, sample.index), by_id[sample.task_id].submission(sample.solution))

    def on_batch(samples: list[Sample]) -> None:
        journal.append(samples)
        execute(samples)
        gen_bar.update(len(samples))

    try:
        execute(list(done.values()))  # generated before an interruption: through the sandbox again
        gen_bar.update(len(done))
        samples = generate_samples(model, tokenizer, problems, gen, on_batch=on_batch, done=done)
    finally:
        gen_bar.close()
        journal.close()
        generated = time.monotonic()
        results = sandbox.results()
    rows = []
    for sample in samples:
        result = results[(sample.task_id, sample.index)]
        rows.append({
            "task_id": sample.task_id, "sample": sample.index, "prompt": sample.prompt,
            "completion": sample.completion, "solution": None if style == "completion" else sample.solution,
            "status": result.status, "reason": result.reason, "expert": sample.expert,
            "router_probs": sample.router_probs, "new_tokens": sample.new_tokens,
            "duration_s": round(result.duration_s, 4),
        })
    write_jsonl(out / "results.jsonl", rows)
    summary = summarise(rows, problems, ks, [results[key] for key in sorted(results)])
    finished = time.monotonic()
    summary = {
        **settings, "mode": "base-only" if base_only else "model", "model": model_name, "prompt_style": style,
        "n_samples": n_samples, "temperature": temperature, "top_p": top_p if temperature > 0 else None,
        "max_new_tokens": max_new_tokens, "batch_size": batch_size, "batch_min_fill": gen.min_fill, "seed": seed,
        "device": str(next(model.parameters()).device), "dtype": str(next(model.parameters()).dtype).replace(
            "torch.", ""), **summary,
        "note": ks_note, "resumed_samples": len(done),
        "timing": {"load_s": round(loaded - started, 2), "generation_s": round(generated - loaded, 2),
                   "execution_tail_s": round(finished - generated, 2), "total_s": round(finished - started, 2),
                   "samples_per_s": round((total - len(done)) / max(generated - loaded, 1e-9), 3)},
    }
    write_text_atomically(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    journal.finish()
    return summary
