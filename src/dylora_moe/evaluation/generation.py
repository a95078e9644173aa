"""Generating solutions for code problems: prompts, batched KV-cached decoding, stop sequences, code extraction.

Two prompt styles (``prompt_style='auto'`` picks ``chat`` when the tokenizer has a chat template,
``completion`` otherwise; ``instruction`` is the plain ``### Instruction`` template of the data layer):

* ``completion``: the model continues :attr:`Problem.prompt`; the text is cut at the first stop sequence
  and the solution is ``prompt + completion``, the prompt kept byte for byte.
* ``chat`` / ``instruction``: the user message is :attr:`Problem.instruction`; the solution is extracted
  from the reply by :func:`extract_code` (the fenced block defining the entry point, test and demo code
  dropped). For HumanEval the problem's prompt comes first (its imports and helper functions), and the
  extracted function redefines the entry point.

Greedy decoding for pass@1 (``temperature=0``), sampling (temperature, top-p) for pass@k. For a
DyLoRA-MoE model, generation's own prefill forward records the router's choice per prompt
(``generate(on_prompt_routing=...)``, no second pass over the prompts); sequence routing stays pinned to
that choice for the whole reply::

    config = GenerationConfig(max_new_tokens=512, batch_size=8)
    samples = generate_samples(model, tokenizer, problems, config)
    samples[0].completion, samples[0].solution, samples[0].expert
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StoppingCriteria

from ..data import Example, build_prompt, use_chat_format
from .benchmarks import Problem
from .extraction import (
    PROMPT_STYLES,
    STOP_SEQUENCES,
    extract_code,
    fenced_blocks,
    sanitize_code,
    solution_for,
    stops_for,
    truncate_at_stop,
)

__all__ = [
    "PROMPT_STYLES",
    "STOP_SEQUENCES",
    "GenerationConfig",
    "Sample",
    "extract_code",
    "fenced_blocks",
    "generate_samples",
    "plan_batches",
    "render_prompt",
    "resolve_prompt_style",
    "sanitize_code",
    "solution_for",
    "stops_for",
    "truncate_at_stop",
]

@dataclass
class GenerationConfig:
    """Decoding settings. ``temperature=0`` is greedy (then ``n_samples`` must be 1).

    Prompts are generated longest first, at most ``batch_size`` at a time. A batch also ends early when its
    prompts' real tokens would fill less than ``min_fill`` of its padded prompt area (rows x longest prompt):
    one very long prompt (MBPP/493 has 1781 tokens, the next longest 242) then pads only a few rows, not a
    whole batch, whose every row would otherwise carry its length through prefill and every decoding step.
    ``min_fill=0`` gives plain fixed-size batches.
    """

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 0.95
    n_samples: int = 1
    batch_size: int = 8
    seed: int = 0
    prompt_style: str = "auto"
    min_fill: float = 0.5
    forced_expert: int | None = None  # a DyLoRA-MoE model: every prompt to this expert

    def validate(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.n_samples < 1:
            raise ValueError("max_new_tokens, batch_size and n_samples must be >= 1")
        if not 0.0 <= self.min_fill <= 1.0:
            raise ValueError(f"min_fill must be in [0, 1], got {self.min_fill}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature}, {self.top_p}")
        if self.temperature == 0 and self.n_samples > 1:
            raise ValueError("greedy decoding (temperature 0) gives identical samples: use temperature > 0 for n > 1")
        if self.prompt_style not in PROMPT_STYLES:
            raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {self.prompt_style!r}")


@dataclass
class Sample:
    """One generated sample: the raw reply, the code it yields, and the routing of its prompt."""

    task_id: str
    index: int
    prompt: str
    completion: str
    solution: str
    new_tokens: int
    expert: int | None = None
    router_probs: list[float] | None = None


# ----------------------------------------------------------------------------- prompts
def resolve_prompt_style(tokenizer: Any, style: str = "auto") -> str:
    """``chat`` if ``style`` is auto and the tokenizer has a chat template, else ``completion``."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style must be one of {PROMPT_STYLES}, got {style!r}")
    if style == "auto":
        return "chat" if use_chat_format(tokenizer) else "completion"
    if style == "chat" and not use_chat_format(tokenizer):
        raise ValueError("prompt_style 'chat' needs a tokenizer with a chat_template")
    return style


def render_prompt(problem: Problem, tokenizer: Any, style: str) -> str:
    """The text fed to the model (special tokens included as text for chat/instruction styles)."""
    if style == "completion":
        return problem.prompt
    example = Example(domain=problem.benchmark, instruction=problem.instruction)
    return build_prompt(example, tokenizer, use_chat_template=style == "chat")


# ----------------------------------------------------------------------------- decoding
class _StopCriteria(StoppingCriteria):
    """Per-row stopping: a completion stop sequence, or (chat) a closed fenced code block.

    ``done(text)`` decides on the whole reply, but decoding every reply in full at every step costs
    O(length) per row (over 100 ms a step for 256 rows of 500 tokens, more than a GPU forward). So each
    step decodes only the last ``WINDOW`` tokens of the unfinished rows, and a row's whole reply is
    decoded only when that tail contains one of ``triggers`` (the stop sequences, or a code fence):
    anything that can newly make ``done`` true ends in the newest tokens.
    """

    WINDOW = 16

    def __init__(self, tokenizer: Any, prompt_length: int, done: Callable[[str], bool],
                 triggers: Sequence[str], on_step: Callable[[int], None] | None = None) -> None:
        super().__init__()
        self.tokenizer, self.prompt_length, self.done = tokenizer, prompt_length, done
        self.triggers = tuple(triggers)
        self.finished: list[bool] | None = None
        self.on_step = on_step

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        if self.on_step is not None:
            self.on_step(input_ids.shape[1] - self.prompt_length)
        if self.finished is None:
            self.finished = [False] * input_ids.shape[0]
        rows = [row for row, finished in enumerate(self.finished) if not finished]
        start = max(self.prompt_length, input_ids.shape[1] - self.WINDOW)
        tails = input_ids[rows, start:].tolist() if rows else []
        for row, tail in zip(rows, tails):
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            if any(t in text for t in self.triggers):
                reply = self.tokenizer.decode(input_ids[row, self.prompt_length :], skip_special_tokens=True)
                self.finished[row] = self.done(reply)
        return torch.tensor(self.finished, dtype=torch.bool, device=input_ids.device)


def _stop_test(style: str, benchmark: str) -> tuple[Callable[[str], bool], tuple[str, ...]]:
    """``(done, triggers)`` for :class:`_StopCriteria`."""
    if style == "completion":
        stops = stops_for(benchmark)
        return (lambda text: any(s in text for s in stops)), stops
    return (lambda text: sum(line.strip().startswith("```") for line in text.splitlines()) >= 2), ("```",)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config = getattr(model, "generation_config", None) or getattr(getattr(model, "base_model", None),
                                                                  "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, (list, tuple)):
        ids.update(int(i) for i in configured)
    return sorted(ids)


def plan_batches(jobs: Sequence[Any], lengths: Sequence[int], batch_size: int,
                 min_fill: float = 0.5) -> list[list[Any]]:
    """Split ``jobs`` (sorted longest first; ``lengths[j]`` is job j's prompt length) into consecutive batches
    of at most ``batch_size``, each ending early when its real tokens would fill less than ``min_fill`` of
    ``rows x longest`` (see :class:`GenerationConfig`)."""
    batches: list[list[Any]] = []
    batch: list[Any] = []
    longest = real = 0
    for job, length in zip(jobs, lengths):
        if batch and (len(batch) == batch_size or (real + length) < min_fill * (len(batch) + 1) * longest):
            batches.append(batch)
            batch, real = [], 0
        if not batch:
            longest = length
        batch.append(job)
        real += length
    if batch:
        batches.append(batch)
    return batches


def _record_routes(routes: list[tuple[int, list[float]]], choice: torch.Tensor, probs: torch.Tensor) -> None:
    rows = probs.float().tolist()
    routes.extend((int(c), [round(float(p), 6) for p in row]) for c, row in zip(choice.tolist(), rows))


def generate_samples(
    model: Any,
    tokenizer: Any,
    problems: Sequence[Problem],
    config: GenerationConfig | None = None,
    *,
    on_batch: Callable[[list[Sample]], None] | None = None,
    done: Mapping[tuple[str, int], Sample] | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[Sample]:
    """Generate ``config.n_samples`` samples per problem, in problem order then sample order.

    Prompts are sorted by length and generated ``batch_size`` at a time (left padding, KV cache).
    ``on_batch(samples)`` is called after each generated batch (e.g. to start executing them).
    ``done`` holds samples generated earlier, by ``(task_id, sample index)`` (a resumed run): a batch whose
    every sample is there is not generated again and is not passed to ``on_batch``. Batches are planned and
    seeded over all problems either way, so the other batches come out as in a run from scratch.
    ``on_token(step, batches_left)`` is called after every decoding step (``step`` 1.. within the batch; a
    progress bar over a batch's tokens).
    """
    config = config or GenerationConfig()
    config.validate()
    run = _Generation(model, tokenizer, problems, config)
    jobs = sorted(((i, s) for i in range(len(problems)) for s in range(config.n_samples)),
                  key=lambda j: -run.lengths[j[0]])
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    samples: dict[tuple[int, int], Sample] = {}
    done = done or {}
    batches = plan_batches(jobs, [run.lengths[i] for i, _ in jobs], config.batch_size, config.min_fill)
    left = sum(not all((problems[i].task_id, s) in done for i, s in batch) for batch in batches)
    try:
        for number, batch in enumerate(batches):
            kept = [done.get((problems[i].task_id, s)) for i, s in batch]
            if all(sample is not None for sample in kept):
                samples.update(zip(batch, kept))
                continue
            step = None if on_token is None else functools.partial(on_token, batches_left=left)
            made = run.batch(batch, seed=config.seed + number, on_token=step)
            left -= 1
            samples.update(zip(batch, made))
            if on_batch is not None:
                on_batch(made)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return [samples[(i, s)] for i in range(len(problems)) for s in range(config.n_samples)]


class _Generation:
    """What every batch of one :func:`generate_samples` call shares: prompts, their lengths, stop tokens."""

    def __init__(self, model: Any, tokenizer: Any, problems: Sequence[Problem], config: GenerationConfig) -> None:
        self.model, self.tokenizer, self.problems, self.config = model, tokenizer, problems, config
        self.style = resolve_prompt_style(tokenizer, config.prompt_style)
        self.add_special = self.style == "completion"
        self.prompts = [render_prompt(p, tokenizer, self.style) for p in problems]
        self.lengths = [len(tokenizer(text, add_special_tokens=self.add_special)["input_ids"]) for text in self.prompts]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = _eos_ids(model, tokenizer)
        self.device = next(model.parameters()).device

    def batch(self, batch: list[tuple[int, int]], seed: int,
              on_token: Callable[[int], None] | None = None) -> list[Sample]:
        """Generate the samples ``(problem index, sample index)`` of ``batch`` together (left padding, KV cache),
        sampling seeded with ``seed``; ``on_token(step)`` after every decoding step."""
        config, tokenizer, problems = self.config, self.tokenizer, self.problems
        enc = tokenizer([self.prompts[i] for i, _ in batch], add_special_tokens=self.add_special, padding=True,
                        return_tensors="pt").to(self.device)
        width = enc["input_ids"].shape[1]
        stop = _StopCriteria(tokenizer, width, *_stop_test(self.style, problems[batch[0][0]].benchmark),
                             on_step=on_token)
        kwargs: dict[str, Any] = {"do_sample": False}
        if config.temperature > 0:
            kwargs = {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p, "top_k": 0}
        routes: list[tuple[int, list[float]]] = []
        if hasattr(self.model, "moe_config"):  # the prompts' routing, as generation's own prefill decided it
            kwargs["on_prompt_routing"] = functools.partial(_record_routes, routes)
            if config.forced_expert is not None:
                kwargs["forced_expert"] = config.forced_expert
        torch.manual_seed(seed)
        out = self.model.generate(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=config.max_new_tokens,
            pad_token_id=self.pad_id, eos_token_id=self.eos_ids, stopping_criteria=[stop], use_cache=True, **kwargs,
        )
        made = []
        for row, (i, s) in enumerate(batch):
            new = out[row, width:]
            keep = new[~torch.isin(new, torch.tensor([self.pad_id, *self.eos_ids], device=new.device))]
            text = tokenizer.decode(new, skip_special_tokens=True)
            completion = truncate_at_stop(text, stops_for(problems[i].benchmark)) if self.style == "completion" \
                else text
            expert, probs = routes[row] if routes else (None, None)
            made.append(Sample(problems[i].task_id, s, self.prompts[i], completion,
                               solution_for(problems[i], completion, self.style), int(keep.numel()), expert, probs))
        return made
