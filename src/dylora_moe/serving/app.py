"""The HTTP server of ``dylora-moe serve``: the OpenAI completions and chat-completions API on FastAPI.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``"stream": true`` as server-sent
events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``. Requests are batched by
:class:`~dylora_moe.serving.engine.Engine`. Each choice carries, besides OpenAI's fields, ``dylora_moe``: the
expert the prompt was routed to and the router's probabilities. Bad requests get a 400 with OpenAI's error
object (``{"error": {"message", "type", "param", "code"}}``), naming the field: malformed JSON, unknown fields,
wrong types, too many tokens, ``n`` > 1; the server stays up. Build and run it::

    app = create_app(Engine(model, tokenizer).start(), model_name="my-adapter", chat_prompt=...)
    uvicorn.run(app, host="127.0.0.1", port=8000)

A chat request is formatted as the model was trained (``chat_prompt(messages) -> token ids``, see
``serving/prompts.py``); a completions request continues its prompt text as it is.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .engine import Completion, Engine, RequestError, Ticket
from .engine import Request as EngineRequest

__all__ = ["ChatRequest", "CompletionRequest", "create_app"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Sampling(_Strict):
    model: str | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Sampling):
    """``POST /v1/completions``."""

    prompt: str | list[str]
    max_tokens: int = Field(default=16, ge=1)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def create_app(engine: Engine, *, model_name: str, chat_prompt: Callable[[list[dict[str, str]]], list[int]],
               default_max_tokens: int = 256) -> FastAPI:
    """The FastAPI application over a started ``engine``."""
    app = FastAPI(title="DyLoRA-MoE", version="1")
    tokenizer = engine.tokenizer

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, _validation_message(exc), param=_first_param(exc))

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> JSONResponse:
        return _error(400, str(exc), param=exc.param, code=exc.code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = engine.stats
        return {"status": "ok", "requests": stats.requests, "batches": stats.batches,
                "largest_batch": stats.largest_batch}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "dylora-moe"}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest) -> Any:
        _check_common(body, model_name)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise RequestError("prompt: give at least one prompt", param="prompt")
        requests = [_engine_request(body, tokenizer(p, add_special_tokens=False)["input_ids"], body.max_tokens)
                    for p in prompts]
        return await _respond(engine, requests, body.stream, "text_completion", model_name)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest) -> Any:
        _check_common(body, model_name)
        ids = chat_prompt([m.model_dump() for m in body.messages])
        limit = body.max_completion_tokens or body.max_tokens or default_max_tokens
        return await _respond(engine, [_engine_request(body, ids, limit)], body.stream, "chat.completion", model_name)

    return app


def _check_common(body: _Sampling, model_name: str) -> None:
    if body.n != 1:
        raise RequestError(f"n={body.n}: this server returns one choice per prompt (n=1)", param="n")
    if body.model is not None and body.model != model_name:
        raise RequestError(f"model {body.model!r} is not served here; this server serves {model_name!r} "
                           "(GET /v1/models)", param="model", code="model_not_found")


def _engine_request(body: _Sampling, ids: list[int], max_tokens: int) -> EngineRequest:
    return EngineRequest(list(ids), max_tokens, body.temperature, body.top_p, body.seed, body.stops(), body.stream)


async def _respond(engine: Engine, requests: list[EngineRequest], stream: bool, kind: str, model_name: str) -> Any:
    for request in requests:
        engine.check(request)  # every prompt is checked before any is queued
    loop = asyncio.get_running_loop()
    queues: list[asyncio.Queue[tuple[str, Any]]] = [asyncio.Queue() for _ in requests]
    tickets: list[Ticket] = []
    for request, events in zip(requests, queues, strict=True):
        def deliver(event: tuple[str, Any], events: asyncio.Queue[tuple[str, Any]] = events) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)
        tickets.append(engine.submit(request, on_event=deliver))
    ident = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if stream:
        return StreamingResponse(_stream(queues, kind, ident, created, model_name), media_type="text/event-stream")
    completions = []
    for events in queues:
        while True:
            event, value = await events.get()
            if event == "error":
                return _error(500, f"generation failed: {value}", kind="server_error")
            if event == "done":
                completions.append(value)
                break
    choices = [_choice(i, c, kind) for i, c in enumerate(completions)]
    usage = {"prompt_tokens": sum(c.prompt_tokens for c in completions),
             "completion_tokens": sum(c.completion_tokens for c in completions)}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return {"id": ident, "object": kind, "created": created, "model": model_name, "choices": choices, "usage": usage}


async def _stream(queues: list[asyncio.Queue[tuple[str, Any]]], kind: str, ident: str, created: int,
                  model_name: str) -> AsyncIterator[str]:
    chunk_kind = f"{kind}.chunk" if kind.startswith("chat") else kind
    for index, events in enumerate(queues):
        if kind.startswith("chat"):
            yield _sse(ident, chunk_kind, created, model_name, {"index": index, "delta": {"role": "assistant"},
                                                                  "finish_reason": None})
        while True:
            event, value = await events.get()
            if event == "delta":
                body = {"delta": {"content": value}} if kind.startswith("chat") else {"text": value}
                yield _sse(ident, chunk_kind, created, model_name, {"index": index, **body, "finish_reason": None})
            elif event == "done":
                final: dict[str, Any] = {"delta": {}} if kind.startswith("chat") else {"text": ""}
                yield _sse(ident, chunk_kind, created, model_name, {"index": index, **final,
                                                                      "finish_reason": value.finish_reason,
                                                                      "dylora_moe": _routing(value)})
                break
            else:
                yield f"data: {json.dumps({'error': {'message': f'generation failed: {value}'}})}\n\n"
                break
    yield "data: [DONE]\n\n"


def _sse(ident: str, kind: str, created: int, model_name: str, choice: dict[str, Any]) -> str:
    chunk = {"id": ident, "object": kind, "created": created, "model": model_name, "choices": [choice]}
    return f"data: {json.dumps(chunk)}\n\n"


def _choice(index: int, completion: Completion, kind: str) -> dict[str, Any]:
    body: dict[str, Any] = ({"message": {"role": "assistant", "content": completion.text}} if kind.startswith("chat")
                            else {"text": completion.text, "logprobs": None})
    return {"index": index, **body, "finish_reason": completion.finish_reason, "dylora_moe": _routing(completion)}


def _routing(completion: Completion) -> dict[str, Any]:
    return {"expert": completion.expert, "router_probs": completion.router_probs}


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None,
           kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def _first_param(exc: RequestValidationError) -> str | None:
    errors = exc.errors()
    loc = [str(part) for part in errors[0].get("loc", ()) if part != "body"] if errors else []
    return ".".join(loc) or None


def _validation_message(exc: RequestValidationError) -> str:
    """One line per problem, naming the field: unknown fields, wrong types, missing fields, malformed JSON."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        if error.get("type") == "json_invalid":
            ctx = error.get("ctx") or {}
            lines.append(f"malformed JSON body: {ctx.get('error', error.get('msg'))} at position "
                         f"{error.get('loc', ('', '?'))[-1]}")
        elif error.get("type") == "extra_forbidden":
            lines.append(f"unknown field '{where}' (not part of this endpoint's request)")
        elif error.get("type") == "missing":
            lines.append(f"missing field '{where}'")
        else:
            lines.append(f"field '{where}': {error.get('msg')}")
    return "; ".join(lines) or "invalid request"
