"""Tiny random causal LMs of several architectures, built in-process for tests.

Every model here has hidden size 64 and 2 layers, is built from a config with a fixed seed, and is
in eval mode, so tests are fast, offline and deterministic.
"""

from __future__ import annotations

import torch
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
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
