"""``serve``: an HTTP server with the OpenAI completions and chat-completions API over a trained adapter.

    dylora-moe serve runs/cpu-demo/final --port 8000 --max-batch-size 16
    curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Reverse a string in Python."}], "max_tokens": 64}'

Options are checked before torch is imported; the server itself is ``serving/app.py`` on uvicorn.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..config import help_metadata as _help
from ..errors import ConfigError
from .model_commands import InspectOptions, _load_for_inference
from .options import add_config_options, config_from_options


@dataclass
class ServeOptions:
    """Where ``serve`` listens and how it batches."""

    host: str = field(default="127.0.0.1", metadata=_help("Address to listen on (0.0.0.0: every interface)."))
    port: int = field(default=8000, metadata=_help("TCP port."))
    max_batch_size: int = field(default=16, metadata=_help("Requests generated together at most."))
    batch_wait_ms: float = field(default=10.0, metadata=_help(
        "How long the first request of a batch waits for others to join it."))
    max_total_tokens: int | None = field(default=None, metadata=_help(
        "Prompt + max_tokens allowed per request (default: the base model's context length)."))
    default_max_tokens: int = field(default=256, metadata=_help(
        "max_tokens of a chat request that gives none."))
    model_name: str | None = field(default=None, metadata=_help(
        "The model id clients send and /v1/models lists (default: the adapter folder's name)."))
    use_chat_template: bool | None = field(default=None, metadata=_help(
        "Format chat prompts with the tokenizer's chat template (null = when it has one, as training does)."))

    def validate(self, source: str = "serve", origins: dict[str, str] | None = None) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port={self.port}: must be in 0..65535")
        for name in ("max_batch_size", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={getattr(self, name)}: must be >= 1")
        if self.batch_wait_ms < 0:
            raise ConfigError(f"--batch-wait-ms={self.batch_wait_ms}: must be >= 0")
        if self.max_total_tokens is not None and self.max_total_tokens < 2:
            raise ConfigError(f"--max-total-tokens={self.max_total_tokens}: must be >= 2")


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve an adapter over HTTP with the OpenAI completions and chat API "
                                         "(batching, streaming); docs/serving.md")
    add_config_options(serve, InspectOptions, positional=("checkpoint",))
    add_config_options(serve, ServeOptions)
    serve.set_defaults(func=_serve)


def _serve(ns: argparse.Namespace) -> int:
    options = config_from_options(ServeOptions, ns, overrides=False)  # before torch is imported
    adapter, _, model, tokenizer = _load_for_inference(config_from_options(InspectOptions, ns, overrides=False))

    import uvicorn

    from ..serving.app import create_app
    from ..serving.engine import Engine
    from ..serving.prompts import chat_prompt_ids

    engine = Engine(model, tokenizer, max_batch_size=options.max_batch_size,
                    batch_wait_s=options.batch_wait_ms / 1000, max_total_tokens=options.max_total_tokens)
    name = options.model_name or adapter.name
    app = create_app(engine, model_name=name, default_max_tokens=options.default_max_tokens,
                     chat_prompt=lambda messages: chat_prompt_ids(messages, tokenizer, options.use_chat_template))
    # HTTP in a background thread, generation in the main thread (torch's CPU thread pool is about twice as fast
    # there); Ctrl-C or SIGTERM stops both
    server = uvicorn.Server(uvicorn.Config(app, host=options.host, port=options.port, log_level="warning"))
    http = threading.Thread(target=server.run, name="dylora-moe-http", daemon=True)
    http.start()
    while not server.started and http.is_alive():
        time.sleep(0.05)
    if not http.is_alive():
        raise ConfigError(f"could not listen on {options.host}:{options.port} (in use, or not an address here)")
    print(f"serving {adapter} as {name!r} on http://{options.host}:{options.port}/v1 "
          f"({model.num_experts} experts, {model.moe_config.routing} routing)", flush=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: engine.stop())
    try:
        engine.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.should_exit = True
        http.join(10)
    return 0
