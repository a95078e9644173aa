"""Turn :class:`~dylora_moe.data.sources.Example`s into token ids for causal-LM training.

Prompt format (see docs/data.md):

* if the tokenizer has a ``chat_template`` (or ``use_chat_template=True``): one user message
  (instruction, plus ``"\\n\\n" + input`` when there is an input) rendered with
  ``apply_chat_template(..., add_generation_prompt=True)`` is the prompt; the response is what the
  template renders after it for the assistant message holding ``output``;
* otherwise the plain template ``"### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n
  ### Response:\\n"`` (the Input block only when the input is non-empty), preceded by the BOS
  token when the tokenizer itself adds BOS to its encodings (e.g. Llama); the response is ``output``.

The response is followed by EOS (unless the template already ends it with EOS).  Prompt and
response are tokenized separately (``add_special_tokens=False``) and concatenated, so the prompt
ids equal :func:`build_prompt_ids` exactly, which is what generation/evaluation should feed.

Labels are ``-100`` (:data:`IGNORE_INDEX`) on prompt tokens and on padding; response + EOS tokens
are supervised (labels equal input ids; the model shifts them).  Truncation keeps the start: a
sequence longer than ``max_seq_length`` is cut on the right; an example whose prompt leaves room
for fewer than ``min_response_tokens`` response tokens is dropped.  Counts are returned in a
:class:`FormatStats`.  Usage::

    tokenized, stats = tokenize_examples(examples, tokenizer, max_seq_length=1024,
                                         domains=["code_alpaca", "mbpp"])
    collate = DataCollator.from_tokenizer(tokenizer)
    batch = collate(tokenized[:8])   # input_ids/attention_mask/labels [B, T], domain_ids [B]
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .sources import Example

__all__ = [
    "IGNORE_INDEX",
    "DomainStats",
    "FormatStats",
    "TokenizedExample",
    "build_prompt",
    "build_prompt_ids",
    "encode_conversation",
    "encode_example",
    "resolve_pad_token_id",
    "tokenize_examples",
    "use_chat_format",
    "user_message",
]

IGNORE_INDEX = -100
PLAIN_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PLAIN_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass
class TokenizedExample:
    """One training sequence.

    Attributes:
        input_ids: token ids, length ``T <= max_seq_length`` (prompt then response then EOS).
        labels: same length; ``-100`` on the ``num_prompt_tokens`` prompt positions.
        domain: domain label; ``domain_id`` its index in the domain list.
        num_prompt_tokens: number of leading prompt tokens.
        truncated: whether tokens were cut off on the right.
    """

    input_ids: list[int]
    labels: list[int]
    domain: str
    domain_id: int
    num_prompt_tokens: int
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DomainStats:
    """Counts for one domain: ``examples`` seen = ``kept`` + ``dropped``; ``truncated`` of the kept."""

    examples: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    supervised_tokens: int = 0


@dataclass
class FormatStats:
    """Report of :func:`tokenize_examples`: per-domain :class:`DomainStats` and totals, and ``sha256``, a
    digest of every kept example's domain, prompt length and token ids. Two runs train on the same
    sequences only if their digests agree (a different tokenizer version can change the tokens)."""

    max_seq_length: int
    domains: dict[str, DomainStats] = field(default_factory=dict)
    sha256: str = ""

    @property
    def total(self) -> DomainStats:
        out = DomainStats()
        for stats in self.domains.values():
            for name, value in asdict(stats).items():
                setattr(out, name, getattr(out, name) + value)
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_seq_length": self.max_seq_length,
            "total": asdict(self.total),
            "domains": {name: asdict(s) for name, s in self.domains.items()},
            "sha256": self.sha256,
        }

    def summary(self) -> str:
        """One line per domain, e.g. ``mbpp: 374 examples, 374 kept, 3 truncated, 0 dropped``."""
        lines = []
        for name, s in [*self.domains.items(), ("total", self.total)]:
            lines.append(
                f"{name}: {s.examples} examples, {s.kept} kept, {s.truncated} truncated, "
                f"{s.dropped} dropped (max_seq_length={self.max_seq_length}), "
                f"{s.tokens} tokens, {s.supervised_tokens} supervised"
            )
        if self.sha256:
            lines.append(f"token ids sha256: {self.sha256[:16]}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- prompt building
def user_message(example: Example) -> str:
    """The user turn: the instruction, plus a blank line and the input when there is one."""
    if example.input.strip():
        return f"{example.instruction}\n\n{example.input}"
    return example.instruction


def use_chat_format(tokenizer: Any, use_chat_template: bool | None = None) -> bool:
    """Whether the chat template is used: ``use_chat_template``, or (if None) whether one is set."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template is None:
        return has_template
    if use_chat_template and not has_template:
        raise ValueError("use_chat_template=True but the tokenizer has no chat_template")
    return use_chat_template


def _wants_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer itself starts an encoding with BOS (probed on the empty string)."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None or not getattr(tokenizer, "bos_token", None):
        return False
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos_id


def build_prompt(example: Example, tokenizer: Any, use_chat_template: bool | None = None) -> str:
    """The prompt text for ``example`` (training and generation use the same).

    Special tokens (BOS, chat markers) are included as text: tokenize it with
    ``add_special_tokens=False`` or use :func:`build_prompt_ids`.
    """
    conversation = example.meta.get("messages")
    if conversation:  # chat data: the conversation up to its last assistant turn, then the assistant header
        last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
        return _render(_chat_tokenizer(tokenizer, use_chat_template), conversation[:last], True)
    if use_chat_format(tokenizer, use_chat_template):
        return _render(tokenizer, [{"role": "user", "content": user_message(example)}], True)
    return _plain_prompt(example, tokenizer.bos_token if _wants_bos(tokenizer) else "")


def _chat_tokenizer(tokenizer: Any, use_chat_template: bool | None) -> Any:
    """``tokenizer`` when it can render conversations (chat data need its chat template), else a ValueError."""
    if use_chat_template is False or not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat (messages) data need the tokenizer's chat template, and this tokenizer has none "
                         "(or use_chat_template=False): use instruction data, or a tokenizer with a chat template")
    return tokenizer


def encode_conversation(messages: Sequence[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[int], int]:
    """``(input_ids, labels, num_prompt_tokens)`` of a chat conversation rendered with the tokenizer's chat
    template: every assistant turn (its content and the template's end-of-turn tokens) is supervised, everything
    else (system and user turns, the assistant headers) is masked with ``-100``. Each turn is the difference
    between the rendered conversation up to it and up to the turn before, so the template must render a
    conversation's prefixes as prefixes of it (a ValueError says where it does not)."""
    ids: list[int] = []
    labels: list[int] = []
    done, first_reply = "", None
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _render(tokenizer, list(messages[:i]), True)
        full = _render(tokenizer, list(messages[: i + 1]), False)
        if not (head.startswith(done) and full.startswith(head)):
            raise ValueError(f"the chat template does not render turn {i} of this conversation after the turns "
                             "before it (a template that rewrites earlier turns cannot be split into turns)")
        context, reply = _ids(tokenizer, [head[len(done):], full[len(head):]])
        ids += context
        labels += [IGNORE_INDEX] * len(context)
        first_reply = len(ids) if first_reply is None else first_reply
        ids += reply
        labels += reply
        done = full
    return ids, labels, first_reply or 0


def _plain_prompt(example: Example, prefix: str) -> str:
    if example.input.strip():
        return prefix + PLAIN_PROMPT.format(instruction=example.instruction, input=example.input)
    return prefix + PLAIN_PROMPT_NO_INPUT.format(instruction=example.instruction)


def build_prompt_ids(example: Example, tokenizer: Any, use_chat_template: bool | None = None) -> list[int]:
    """Token ids of :func:`build_prompt` (identical to the prompt part of the training sequence)."""
    return _ids(tokenizer, [build_prompt(example, tokenizer, use_chat_template)])[0]


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def _response_text(example: Example, tokenizer: Any, prompt: str, chat: bool) -> str:
    if not chat:
        return example.output
    messages = [
        {"role": "user", "content": user_message(example)},
        {"role": "assistant", "content": example.output},
    ]
    full = _render(tokenizer, messages, False)
    if not full.startswith(prompt):
        warnings.warn(
            "chat template: the rendered conversation does not start with the generation "
            "prompt; supervising the raw output + EOS instead",
            stacklevel=3,
        )
        return example.output
    response = full[len(prompt) :]
    eos = tokenizer.eos_token
    cut = response.rfind(eos) if eos else -1
    if cut >= 0 and not response[cut + len(eos) :].strip():
        response = response[: cut + len(eos)]  # drop whitespace the template puts after EOS
    return response


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _encode_many(
    examples: Sequence[Example], tokenizer: Any, use_chat_template: bool | None
) -> list[tuple[list[int], list[int]]]:
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token; set one before formatting")
    chat = use_chat_format(tokenizer, use_chat_template)
    if not examples:
        return []
    if chat:
        prompts = [build_prompt(ex, tokenizer, True) for ex in examples]
    else:
        prefix = tokenizer.bos_token if _wants_bos(tokenizer) else ""
        prompts = [_plain_prompt(ex, prefix) for ex in examples]
    responses = [_response_text(ex, tokenizer, p, chat) for ex, p in zip(examples, prompts, strict=True)]
    out = []
    for prompt_ids, response_ids in zip(_ids(tokenizer, prompts), _ids(tokenizer, responses), strict=True):
        if not response_ids or response_ids[-1] != eos_id:
            response_ids.append(eos_id)
        out.append((prompt_ids, response_ids))
    return out


def encode_example(
    example: Example, tokenizer: Any, use_chat_template: bool | None = None
) -> tuple[list[int], list[int]]:
    """Untruncated ``(prompt_ids, response_ids)``; ``response_ids`` ends with the EOS id."""
    return _encode_many([example], tokenizer, use_chat_template)[0]


# ----------------------------------------------------------------------------- tokenization
def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    max_seq_length: int,
    domains: Sequence[str] | None = None,
    use_chat_template: bool | None = None,
    min_response_tokens: int = 1,
) -> tuple[list[TokenizedExample], FormatStats]:
    """Tokenize, mask and truncate ``examples``.

    Args:
        examples: the examples (any mix of domains).
        tokenizer: a Hugging Face tokenizer with an EOS token.
        max_seq_length: maximum sequence length (> 0); longer sequences are cut on the right.
        domains: the domain list defining ``domain_id`` (default: sorted domains of ``examples``).
        use_chat_template: force (True) / forbid (False) the chat template; None = auto.
        min_response_tokens: drop an example when fewer response tokens than this fit.

    Returns:
        ``(tokenized, stats)``: the kept examples in input order, and the per-domain counts.
    """
    domain_list = _checked_domains(examples, max_seq_length, domains, min_response_tokens)
    domain_ids = {name: i for i, name in enumerate(domain_list)}
    stats = FormatStats(max_seq_length, {name: DomainStats() for name in domain_list})
    digest = hashlib.sha256()
    out: list[TokenizedExample] = []
    for ex, (ids, labels, n_prompt) in zip(examples, _sequences(examples, tokenizer, use_chat_template), strict=True):
        s = stats.domains[ex.domain]
        s.examples += 1
        kept = labels[:max_seq_length]
        supervised = sum(label != IGNORE_INDEX for label in kept)
        if supervised < min(min_response_tokens, sum(label != IGNORE_INDEX for label in labels)) or supervised == 0:
            s.dropped += 1
            continue
        truncated = len(ids) > max_seq_length
        ids = ids[:max_seq_length]
        s.kept += 1
        s.truncated += int(truncated)
        s.tokens += len(ids)
        s.supervised_tokens += supervised
        digest.update(f"{ex.domain}|{n_prompt}|{','.join(map(str, ids))};".encode())
        out.append(TokenizedExample(input_ids=ids, labels=kept, domain=ex.domain, domain_id=domain_ids[ex.domain],
                                    num_prompt_tokens=n_prompt, truncated=truncated))
    stats.sha256 = digest.hexdigest()
    return out, stats


def _sequences(examples: Sequence[Example], tokenizer: Any,
               use_chat_template: bool | None) -> list[tuple[list[int], list[int], int]]:
    """``(input_ids, labels, num_prompt_tokens)`` per example, untruncated: prompt then response (labels on the
    response), or a chat conversation (labels on its assistant turns)."""
    plain = [ex for ex in examples if not ex.meta.get("messages")]
    encoded = iter(_encode_many(plain, tokenizer, use_chat_template))
    out = []
    for ex in examples:
        if ex.meta.get("messages"):
            out.append(encode_conversation(ex.meta["messages"], _chat_tokenizer(tokenizer, use_chat_template)))
        else:
            prompt_ids, response_ids = next(encoded)
            out.append((prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids,
                        len(prompt_ids)))
    return out


def _checked_domains(examples: Sequence[Example], max_seq_length: int, domains: Sequence[str] | None,
                     min_response_tokens: int) -> list[str]:
    """The domain list of :func:`tokenize_examples` (default: the examples' domains, sorted), after checking
    its arguments."""
    if isinstance(max_seq_length, bool) or not isinstance(max_seq_length, int) or max_seq_length <= 0:
        raise ValueError(f"'max_seq_length' must be a positive integer, got {max_seq_length!r}")
    if isinstance(min_response_tokens, bool) or not isinstance(min_response_tokens, int) or min_response_tokens < 1:
        raise ValueError(f"'min_response_tokens' must be an integer >= 1, got {min_response_tokens!r}")
    domain_list = sorted({ex.domain for ex in examples}) if domains is None else list(domains)
    if len(set(domain_list)) != len(domain_list):
        raise ValueError(f"'domains' has duplicates: {domain_list}")
    unknown = sorted({ex.domain for ex in examples} - set(domain_list))
    if unknown:
        raise ValueError(f"examples have domains {unknown} that are not in 'domains' {domain_list}")
    return domain_list


# ----------------------------------------------------------------------------- batching
def resolve_pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to its EOS id."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has neither a pad_token nor an eos_token to pad with")
