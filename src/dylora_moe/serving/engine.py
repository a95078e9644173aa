"""``Engine``: batched, streamed generation for the HTTP server (``dylora-moe serve``, ``serving/app.py``).

Requests arrive from many client threads; one worker thread takes them from a queue, waits up to
``batch_wait_s`` for more (at most ``max_batch_size``), and generates a batch with the model's own
``generate`` (left padding, KV cache, routing as the checkpoint routes: the prompt's expert for a sequence-routed
checkpoint, every token's for a token-routed one). Requests whose decoding settings differ (temperature, top-p)
go to separate batches; a request with a seed runs alone, so its sampling is repeatable. Each request gets its
text as it is produced, through a callback::

    engine = Engine(model, tokenizer, max_batch_size=16, batch_wait_s=0.01, max_total_tokens=2048)
    engine.start()
    ticket = engine.submit(Request(prompt_ids, max_new_tokens=64), on_event=print)   # ("delta", text) ...
    completion = ticket.result(timeout=60)          # a Completion: text, finish_reason, tokens, expert
    engine.stop()

A failure inside a batch reaches only that batch's requests (as an ``("error", exception)`` event); the worker
goes on with the next batch.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..common.generation import left_padded
from ..common.sampling import SamplingSettings
from ..data import resolve_pad_token_id

__all__ = ["Completion", "Engine", "EngineStats", "Request", "RequestError", "Ticket"]

Event = tuple[str, Any]  # ("delta", str) | ("done", Completion) | ("error", Exception)


class RequestError(ValueError):
    """A request the engine cannot run as asked (too many tokens, a bad setting); the server answers 400."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class Request:
    """One prompt to continue: token ids ``[T]``, how many tokens at most, how to decode, where to stop."""

    prompt_ids: list[int]
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False  # text is decoded as it grows only for a streamed request (or one with stop strings)

    def batch_key(self) -> tuple[float, float] | None:
        """Requests with the same key may share a batch; None: this request runs alone (it has a seed)."""
        if self.seed is not None:
            return None
        return (0.0, 1.0) if self.temperature == 0 else (self.temperature, self.top_p)


@dataclass
class Completion:
    """The outcome of a request: ``finish_reason`` is 'stop' (end of sequence or a stop string) or 'length'."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    expert: int | None = None
    router_probs: list[float] | None = None


@dataclass
class EngineStats:
    """Counters of a running engine (read by tests and the benchmark)."""

    requests: int = 0
    batches: int = 0
    largest_batch: int = 0
    generated_tokens: int = 0


class Ticket:
    """A submitted request: its events go to ``on_event`` (from the worker thread); ``result`` waits for the end."""

    def __init__(self, request: Request, on_event: Callable[[Event], None] | None) -> None:
        self.request = request
        self._on_event = on_event
        self._done = threading.Event()
        self._outcome: Completion | Exception | None = None

    def emit(self, kind: str, value: Any) -> None:
        if kind in ("done", "error"):
            self._outcome = value
        if self._on_event is not None:
            self._on_event((kind, value))
        if kind in ("done", "error"):
            self._done.set()

    def result(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError(f"no completion within {timeout} s")
        if isinstance(self._outcome, Exception):
            raise self._outcome
        assert isinstance(self._outcome, Completion)
        return self._outcome


class Engine:
    """Batches concurrent requests onto one model (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int = 16, batch_wait_s: float = 0.01,
                 max_total_tokens: int | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: must be >= 1")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch_size, self.batch_wait_s = max_batch_size, batch_wait_s
        context = getattr(model.config, "max_position_embeddings", None)
        self.max_total_tokens = min(x for x in (max_total_tokens, context) if x) if (max_total_tokens or context) \
            else None
        self.pad_id = resolve_pad_token_id(tokenizer)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.stats = EngineStats()
        self._queue: queue.Queue[Ticket | None] = queue.Queue()
        self._held: list[Ticket] = []  # taken from the queue but left for a later batch (other settings)
        self._thread: threading.Thread | None = None
        self._stopped = False  # requests queue up until start() or run() begins taking them

    # ------------------------------------------------------------------ client side
    def check(self, request: Request) -> None:
        """Raise ``RequestError`` for a request that cannot run (before it is queued)."""
        if not request.prompt_ids:
            raise RequestError("the prompt is empty", param="prompt")
        if request.max_new_tokens < 1:
            raise RequestError(f"max_tokens={request.max_new_tokens}: must be >= 1", param="max_tokens")
        try:
            SamplingSettings(request.max_new_tokens, request.temperature, request.top_p, request.seed).validate()
        except ValueError as exc:
            raise RequestError(str(exc).replace("max_new_tokens", "max_tokens")) from None
        total = len(request.prompt_ids) + request.max_new_tokens
        if self.max_total_tokens is not None and total > self.max_total_tokens:
            raise RequestError(
                f"the prompt has {len(request.prompt_ids)} tokens and max_tokens is {request.max_new_tokens}: "
                f"{total} tokens exceed this server's limit of {self.max_total_tokens}; shorten the prompt or "
                "lower max_tokens", param="max_tokens", code="context_length_exceeded")

    def submit(self, request: Request, on_event: Callable[[Event], None] | None = None) -> Ticket:
        """Queue ``request`` (checked first: ``RequestError``); thread-safe."""
        self.check(request)
        if self._stopped:
            raise RuntimeError("the engine was stopped")
        ticket = Ticket(request, on_event)
        self._queue.put(ticket)
        return ticket

    def start(self) -> Engine:
        """Generate in a background thread (tests, notebooks). A server should call :meth:`run` from the main
        thread instead: torch's CPU thread pool is about half as fast when driven from another thread."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="dylora-moe-engine", daemon=True)
            self._thread.start()
        return self

    def run(self) -> None:
        """Generate in the calling thread until :meth:`stop` is called (from another thread)."""
        self._thread = threading.current_thread()
        self._work()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopped = True
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            if self._thread is not threading.current_thread() and self._thread is not threading.main_thread():
                self._thread.join(timeout)

    # ------------------------------------------------------------------ worker side
    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception as exc:  # a failed batch fails its requests, not the server
                for ticket in batch:
                    ticket.emit("error", exc)

    def _next_batch(self) -> list[Ticket] | None:
        """The next group of compatible requests: the oldest one, then whatever arrives within the wait."""
        first = self._held.pop(0) if self._held else self._queue.get()
        if first is None:
            return None
        key = first.request.batch_key()
        batch = [first]
        if key is None:
            return batch
        for ticket in [t for t in self._held if t.request.batch_key() == key][: self.max_batch_size - 1]:
            self._held.remove(ticket)
            batch.append(ticket)
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            try:
                arrived = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if arrived is None:
                self._queue.put(None)  # stop after this batch
                break
            (batch if arrived.request.batch_key() == key else self._held).append(arrived)
        return batch

    @torch.no_grad()
    def _run(self, batch: list[Ticket]) -> None:
        requests = [t.request for t in batch]
        first = requests[0]
        ids, mask = left_padded([r.prompt_ids for r in requests], self.pad_id, self.model.device)
        width = ids.shape[1]
        rows = [_Row(t, self.tokenizer, self.eos_ids) for t in batch]
        routing: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        if hasattr(self.model, "num_experts"):
            extra["on_prompt_routing"] = lambda choice, probs: routing.update(choice=choice.tolist(),
                                                                                probs=probs.float().tolist())
        if first.seed is not None:
            torch.manual_seed(first.seed)
        settings = SamplingSettings(max(r.max_new_tokens for r in requests), first.temperature, first.top_p)
        out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=settings.max_new_tokens,
                                  pad_token_id=self.pad_id, stopping_criteria=StoppingCriteriaList([_Progress(rows,
                                                                                                           width)]),
                                  **settings.generate_kwargs(), **extra)
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        for i, row in enumerate(rows):
            row.update(out[i, width:].tolist(), final=True)
            self.stats.generated_tokens += row.used
            expert = routing["choice"][i] if routing else None
            probs = routing["probs"][i] if routing else None
            row.ticket.emit("done", Completion(row.text, row.finish_reason or "length",
                                               len(row.ticket.request.prompt_ids), row.used, expert, probs))


class _Row:
    """The text of one request as tokens arrive: cut at the end of sequence or a stop string, streamed in pieces
    that never end inside a stop string or a partial character."""

    def __init__(self, ticket: Ticket, tokenizer: Any, eos_ids: set[int]) -> None:
        self.ticket, self.tokenizer, self.eos_ids = ticket, tokenizer, eos_ids
        self.limit = ticket.request.max_new_tokens
        self.stops = [s for s in ticket.request.stop if s]
        self.text, self.sent, self.used = "", 0, 0
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason not in (None, "pending")

    @property
    def stopped(self) -> bool:
        """No more tokens are needed for this row (``generate`` may stop it)."""
        return self.finish_reason is not None

    def update(self, generated: list[int], final: bool = False) -> None:
        if self.done:
            return
        if not (final or self.stops or self.ticket.request.stream):  # only the end and the limit matter now
            if len(generated) >= self.limit or any(t in self.eos_ids for t in generated[-1:]):
                self.finish_reason = "pending"  # stop generating this row; the final update decides the rest
            return
        if self.finish_reason == "pending":
            self.finish_reason = None
        tokens = generated[: self.limit]
        cut = next((k for k, t in enumerate(tokens) if t in self.eos_ids), None)
        if cut is not None:
            tokens, self.finish_reason = tokens[:cut], "stop"
        self.used = len(tokens) + (cut is not None)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        hits = [text.find(s) for s in self.stops if s in text]
        if hits:
            text, self.finish_reason = text[: min(hits)], "stop"
        if not self.done and len(generated) >= self.limit:
            self.finish_reason = "length"
        if not self.done and final:
            self.finish_reason = "length" if len(tokens) >= self.limit else "stop"
        self.text = text
        ready = len(text) if self.done else len(text) - max((len(s) - 1 for s in self.stops), default=0)
        if not self.done and text.endswith("\ufffd"):  # a character still incomplete
            ready = min(ready, len(text) - 1)
        if ready > self.sent:
            self.ticket.emit("delta", text[self.sent : ready])
            self.sent = ready


class _Progress(StoppingCriteria):
    """Called by ``generate`` after every step with all ids so far: streams each row's new text and stops the rows
    that are done (their own token limit, end of sequence, a stop string)."""

    def __init__(self, rows: list[_Row], width: int) -> None:
        self.rows, self.width = rows, width

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        generated = input_ids[:, self.width :].tolist()
        for row, ids in zip(self.rows, generated, strict=True):
            row.update(ids)
        return torch.tensor([row.stopped for row in self.rows], dtype=torch.bool, device=input_ids.device)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    config = getattr(getattr(model, "base_model", model), "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
