"""Chat messages as the prompt the model was trained on (``serve``'s ``/v1/chat/completions``).

A single user message becomes exactly the training prompt of an instruction
(:func:`~dylora_moe.data.build_prompt_ids`: the tokenizer's chat template, or the plain instruction format);
a longer conversation is rendered with the chat template and its generation prompt; without a chat template,
the earlier turns become the input (context) of the last user message::

    ids = chat_prompt_ids([{"role": "user", "content": "Reverse a string."}], tokenizer)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..data import Example, build_prompt_ids, use_chat_format
from .engine import RequestError

__all__ = ["chat_prompt_ids"]


def chat_prompt_ids(messages: Sequence[dict[str, str]], tokenizer: Any,
                    use_chat_template: bool | None = None) -> list[int]:
    """Token ids of the prompt for ``messages`` (each ``{"role", "content"}``); see the module docstring."""
    if not messages:
        raise RequestError("messages: give at least one message", param="messages")
    if messages[-1]["role"] != "user":
        raise RequestError(f"messages: the last message must be the user's, got {messages[-1]['role']!r}",
                           param="messages")
    if len(messages) == 1:
        return build_prompt_ids(Example("chat", messages[0]["content"], ""), tokenizer, use_chat_template)
    if use_chat_format(tokenizer, use_chat_template):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    context = "\n".join(f"{m['role']}: {m['content']}" for m in messages[:-1])
    return build_prompt_ids(Example("chat", messages[-1]["content"], context), tokenizer, use_chat_template)
