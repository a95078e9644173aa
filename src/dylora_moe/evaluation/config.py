"""``EvalConfig``: every setting of an evaluation run (``evaluate``, ``rescore``, the references check).

The ``dylora-moe eval`` options are generated from these fields (``cli/options.py``), and the library takes the
same object::

    config = EvalConfig(benchmark="mbpp", limit=10, output_dir="eval/mbpp")
    evaluate("runs/cpu-demo/final", config=config)
    evaluate(model, tokenizer, benchmark="humaneval", output_dir="eval/he")    # fields as keywords also work

torch-free, like the rest of what the references check and rescoring need.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..config import help_metadata as _help
from ..errors import EvaluationError
from .benchmarks import BENCHMARKS
from .extraction import PROMPT_STYLES

__all__ = ["DTYPES", "EvalConfig", "PROMPT_STYLES", "parse_ks"]

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class EvalConfig:
    """An evaluation run: benchmark, sampling, sandbox and output (see docs/evaluation.md)."""

    model: str | None = field(default=None, metadata=_help(
        "Checkpoint folder; with base_only a base model name, path or 'smollm2-135m'; not needed with references "
        "or rescore."))
    benchmark: str = field(default="humaneval", metadata=_help("'humaneval' or 'mbpp'."))
    output_dir: str | None = field(default=None, metadata=_help(
        "Output folder (default eval/<benchmark>; rescore needs one).", flag="--output"))
    limit: int | None = field(default=None, metadata=_help("Only the first N problems."))
    task_ids: list[str] = field(default_factory=list, metadata=_help("Only these problems (e.g. HumanEval/3)."))
    n_samples: int = field(default=1, metadata=_help("Samples per problem."))
    temperature: float = field(default=0.0, metadata=_help("0 = greedy; > 0 samples."))
    top_p: float = field(default=0.95, metadata=_help("Nucleus sampling (with temperature > 0)."))
    k: str = field(default="1", metadata=_help("Comma-separated k values of pass@k."))
    base_only: bool = field(default=False, metadata=_help("MODEL is a plain base model, not a checkpoint."))
    references: bool = field(default=False, metadata=_help(
        "Run the dataset's reference solutions instead of a model (HumanEval: also a body of 'pass', which must "
        "fail)."))
    rescore: str | None = field(default=None, metadata=_help(
        "No generation: score the completions stored in this evaluation folder again through today's code "
        "extraction and sandbox (needs output_dir, a new folder)."))
    batch_size: int = field(default=8, metadata=_help("Prompts generated together."))
    max_new_tokens: int = field(default=512, metadata=_help("Tokens generated at most per sample."))
    prompt_style: str = field(default="auto", metadata=_help(
        "'auto' (the chat template when the tokenizer has one, completion prompts otherwise), 'chat', "
        "'completion' or 'instruction'."))
    seed: int = field(default=0, metadata=_help("Seed of sampling."))
    workers: int | None = field(default=None, metadata=_help("Sandbox workers (default: the CPU count)."))
    timeout_s: float = field(default=20.0, metadata=_help("Wall-clock seconds per program.", flag="--timeout"))
    data_dir: str | None = field(default=None, metadata=_help("Data folder holding mbpp/mbpp.jsonl."))
    device: str = field(default="auto", metadata=_help("'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'."))
    dtype: str = field(default="float32", metadata=_help("Weights and activations while generating: 'float32', "
                                                         "'bfloat16' or 'float16'."))
    resume: bool = field(default=True, metadata=_help(
        "Keep the samples an interrupted run into the same output folder journaled and generate only the rest "
        "(off: discard them)."))
    overwrite: bool = field(default=False, metadata=_help(
        "Run again into an output folder that holds a finished evaluation, replacing it (without it, the same "
        "evaluation is not run again and another one is refused)."))
    threads: int | None = field(default=None, metadata=_help("torch CPU threads."))
    expert: int | None = field(default=None, metadata=_help(
        "Send every prompt to this expert of a DyLoRA-MoE model (the router is not used), e.g. the expert of "
        "the benchmark's domain in an oracle-routed model."))
    progress: bool = field(default=True, metadata=_help("Progress bars."))

    def validate(self, source: str = "evaluation config", origins: dict[str, str] | None = None) -> None:
        """Raise :class:`EvaluationError` naming the first invalid setting."""
        if self.benchmark.lower() not in BENCHMARKS:
            raise EvaluationError(f"{source}: benchmark={self.benchmark!r} is not one of {BENCHMARKS}")
        for name in ("n_samples", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise EvaluationError(f"{source}: {name}={getattr(self, name)} must be >= 1")
        if self.expert is not None and self.expert < 0:
            raise EvaluationError(f"{source}: expert={self.expert} must be >= 0")
        for name in ("limit", "workers", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise EvaluationError(f"{source}: {name}={getattr(self, name)} must be a positive integer")
        if not self.timeout_s > 0:
            raise EvaluationError(f"{source}: timeout_s={self.timeout_s} must be > 0")
        if self.prompt_style not in PROMPT_STYLES:
            raise EvaluationError(f"{source}: prompt_style={self.prompt_style!r} is not one of {PROMPT_STYLES}")
        if self.dtype not in DTYPES:
            raise EvaluationError(f"{source}: dtype={self.dtype!r} is not one of {DTYPES}")
        parse_ks(self.k)

    def replace(self, **changes: Any) -> EvalConfig:
        """A validated copy with ``changes``."""
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    @classmethod
    def resolve(cls, config: EvalConfig | None = None, **fields: Any) -> EvalConfig:
        """``config`` (default: the defaults) with ``fields`` set, validated; ``k`` may be given as a number or a
        list of numbers, ``output_dir`` and ``data_dir`` as paths."""
        if "k" in fields and not isinstance(fields["k"], str):
            k = fields["k"]
            fields["k"] = ",".join(str(v) for v in (k if isinstance(k, (list, tuple)) else [k]))
        for name in ("output_dir", "data_dir", "model", "rescore"):
            if fields.get(name) is not None:
                fields[name] = str(fields[name])
        if "task_ids" in fields:
            fields["task_ids"] = list(fields["task_ids"])
        return (config or cls()).replace(**fields)

    @property
    def output(self) -> str:
        return self.output_dir or f"eval/{self.benchmark.lower()}"


def parse_ks(k: int | str | list[int] | tuple[int, ...]) -> list[int]:
    """The k values of pass@k from ``"1,10"``, ``10`` or ``[1, 10]``, sorted and unique."""
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
