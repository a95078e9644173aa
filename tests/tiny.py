"""Tiny random causal LMs of several architectures, and a tiny word-level tokenizer, built in-process for tests.

Every model here has hidden size 64 and 2 layers, is built from a config with a fixed seed, and is
in eval mode, so tests are fast, offline and deterministic. ``make_tokenizer`` builds a real
``PreTrainedTokenizerFast`` over a word-level vocabulary of 75 tokens (fits the models' vocabulary
of 96), with or without a chat template.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96
ARCHS = ("llama", "qwen2", "gemma", "gpt2")


def make_base(arch: str = "llama", seed: int = 0):
    """A tiny random causal LM of ``arch`` (eval mode, float32)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common))
    else:
        cls_cfg = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config),
                   "gemma": (GemmaForCausalLM, GemmaConfig)}[arch]
        model = cls_cfg[0](cls_cfg[1](hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=128, **common))
    return model.eval()


def randomize_experts(model, std: float = 0.2, seed: int = 1) -> None:
    """Give every expert a non-zero B so that experts change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.expert_layers:
            for b in layer.lora_B:
                b.copy_(torch.randn(b.shape, generator=gen) * std)


# ----------------------------------------------------------------------------- tokenizer
SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>"]
CORPUS = """
### Instruction: Input: Response: add two numbers return a + b x y def f ( ) , = - * / [ ] { }
write a function to sort the list print hello world assert == 1 2 3 4 5 6 7 8 9 0 some context
You are an expert Python programmer and here is your task Your code should pass these tests .
"""
#: A small chat template in the style of common instruct models (one turn per line, end marker).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _vocab() -> dict[str, int]:
    words = list(dict.fromkeys(re.findall(r"\w+|[^\w\s]+", CORPUS)))
    return {tok: i for i, tok in enumerate(SPECIAL + [w for w in words if w not in SPECIAL])}


def make_tokenizer(
    chat_template: str | None = None, eos: str = "<eos>", bos: str | None = None, pad: str | None = "<pad>"
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer; ``chat_template``/``bos``/``pad`` optional, ``eos`` chosen."""
    backend = Tokenizer(models.WordLevel(vocab=_vocab(), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIAL)
    kwargs: dict[str, Any] = {"eos_token": eos, "unk_token": "<unk>"}
    if pad is not None:
        kwargs["pad_token"] = pad
    if bos is not None:
        kwargs.update(bos_token=bos, add_bos_token=True)  # encodings start with BOS, like Llama
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok
