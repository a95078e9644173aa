"""Pick the LoRA adapter of a prompt exactly as the sequence-routed DyLoRA-MoE model that wrote this bundle does.

This file is copied into every bundle as ``route.py`` (``dylora_moe.serving.bundle.export_bundle``); it imports
only torch, safetensors, json and transformers' ``AutoTokenizer`` (for text prompts), never dylora_moe, so it
runs beside any serving engine. The bundle's ``router/`` folder holds what it needs: ``router.json`` (settings),
``router.safetensors`` (the input-embedding table ``embedding [V, H]`` in the base model's dtype, the router's
``feature_mean``/``feature_std [H]`` and weights) and the tokenizer.

The maths, as in ``DyLoRAMoEForCausalLM`` (``_sequence_features``, ``router.py``, ``routing.decide``), for a
prompt of ``T`` token ids:

    x = mean over the T tokens of embedding[ids].float()                      # [H] (float32)
    z = rms_norm((x - feature_mean) / feature_std)                            # [H], eps from router.json
    logits = W z + b                         (linear router)                  # [E]
           = W2 gelu(W1 z + b1) + b2         (mlp router)
    probabilities = softmax(logits / temperature)                             # [E]
    adapter = adapters[argmax(probabilities)]    (top-1: the first of torch.topk, as the model picks)

Run it::

    python route.py "Write a function that reverses a string."       # prints the adapter, e.g. expert_2
    python route.py --input "[1, 2]" --json "Sum the list."           # adapter, probabilities, prompt token ids
    python route.py --ids 1,17,5,9                                    # route token ids as they are

or from Python::

    router = BundleRouter.from_dir("path/to/bundle")
    ids = router.prompt_ids("Write a function that reverses a string.")   # formatted as in training
    adapter, probabilities = router.choose(ids)                           # e.g. ("expert_2", [0.1, 0.2, 0.6, 0.1])
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

#: the newest router.json ``format_version`` this file reads
FORMAT_VERSION = 1
ROUTER_DIR, ROUTER_CONFIG, ROUTER_WEIGHTS = "router", "router.json", "router.safetensors"


class BundleRouter:
    """The router of a bundle: prompt token ids -> ``(adapter name, probabilities [E])``."""

    def __init__(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor], tokenizer_dir: Path | None = None):
        version = meta.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"router.json format_version={version!r}: this route.py reads versions up to "
                             f"{FORMAT_VERSION}; use the route.py of the same bundle")
        if meta.get("routing") != "sequence":
            raise ValueError(f"router.json: routing={meta.get('routing')!r}, only 'sequence' routing is a bundle")
        self.meta = meta
        self.adapters: list[str] = list(meta["adapters"])
        self.router: dict[str, Any] = meta["router"]
        self.tensors = tensors
        self.embedding = tensors["embedding"]
        self._tokenizer_dir = tokenizer_dir
        self._tokenizer: Any = None

    @classmethod
    def from_dir(cls, path: str | Path) -> BundleRouter:
        """Load the router of the bundle at ``path`` (the bundle folder, or its ``router/`` folder)."""
        folder = Path(path)
        if not (folder / ROUTER_CONFIG).is_file():
            folder = folder / ROUTER_DIR
        meta = json.loads((folder / ROUTER_CONFIG).read_text(encoding="utf-8"))
        return cls(meta, load_file(str(folder / ROUTER_WEIGHTS)), folder)

    # ------------------------------------------------------------------ prompts
    @property
    def tokenizer(self) -> Any:
        """The base model's tokenizer saved with the bundle (loaded on first use)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer  # only text prompts need it, and it is slow to import

            if self._tokenizer_dir is None:
                raise ValueError("this BundleRouter has no tokenizer folder: route token ids, or use from_dir")
            self._tokenizer = AutoTokenizer.from_pretrained(str(self._tokenizer_dir))
        return self._tokenizer

    def prompt_text(self, instruction: str, input: str = "") -> str:
        """The prompt text the model was trained on for ``instruction`` (and optional ``input``); special tokens
        are text in it: tokenize it with ``add_special_tokens=False`` (or use :meth:`prompt_ids`)."""
        fmt = self.meta["prompt_format"]
        if fmt["chat_template"]:
            message = f"{instruction}\n\n{input}" if input.strip() else instruction
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                      add_generation_prompt=True)
            return str(text)
        template = fmt["plain_template"] if input.strip() else fmt["plain_template_no_input"]
        return str(fmt["bos_prefix"]) + str(template).format(instruction=instruction, input=input)

    def prompt_ids(self, instruction: str, input: str = "") -> list[int]:
        """Token ids of :meth:`prompt_text`: what the model saw in training, and what to send to the engine."""
        return list(self.tokenizer(self.prompt_text(instruction, input), add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ routing
    def _ids(self, prompt_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < self.embedding.shape[0]):
            raise ValueError(f"token ids must lie in [0, {self.embedding.shape[0]}), got {ids.tolist()}")
        return ids

    def features(self, prompt_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The mean input embedding of the prompt, ``[H]`` float32 (zeros for an empty prompt, as the model)."""
        ids = self._ids(prompt_ids)
        embeds = self.embedding[ids].unsqueeze(0)  # [1, T, H], the base model's dtype
        weights = torch.ones(1, ids.numel(), 1, dtype=torch.float32)
        return ((embeds.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0))[0]

    def logits(self, prompt_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The router's logits ``[E]`` (float32) for the prompt."""
        t = self.tensors
        x = (self.features(prompt_ids).unsqueeze(0) - t["feature_mean"]) / t["feature_std"]  # [1, H], as the model
        z = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + float(self.router["rms_eps"]))
        kind = self.router["kind"]
        if kind == "mlp":
            z = torch.nn.functional.gelu(torch.nn.functional.linear(z, t["hidden.weight"], t["hidden.bias"]))
        elif kind != "linear":
            raise ValueError(f"router kind {kind!r}: this route.py computes 'linear' and 'mlp' routers")
        return torch.nn.functional.linear(z, t["weight"], t["bias"])[0]

    def probabilities(self, prompt_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The router's softmax at the model's temperature, ``[E]`` (float32)."""
        return torch.softmax(self.logits(prompt_ids).float() / float(self.router["temperature"]), dim=-1)

    def choose(self, prompt: str | Sequence[int] | torch.Tensor) -> tuple[str, list[float]]:
        """``(adapter name, probabilities)`` of a prompt: its token ids, or an instruction text (formatted as in
        training by :meth:`prompt_ids` first)."""
        ids = self.prompt_ids(prompt) if isinstance(prompt, str) else prompt
        probs = self.probabilities(ids)
        best = int(torch.topk(probs, k=1, dim=-1).indices[0])
        return self.adapters[best], probs.tolist()


def main(argv: Sequence[str] | None = None) -> int:
    """Print the adapter chosen for the prompt given on the command line (``--json``: with the probabilities)."""
    parser = argparse.ArgumentParser(description="Pick the LoRA adapter (expert) of a prompt for this bundle.")
    parser.add_argument("instruction", nargs="?", help="the instruction, formatted as in training")
    parser.add_argument("--input", default="", help="optional input/context of the instruction")
    parser.add_argument("--ids", default=None, help="route these comma-separated token ids instead")
    parser.add_argument("--bundle", default=str(Path(__file__).resolve().parent), help="the bundle folder")
    parser.add_argument("--json", action="store_true", help="print adapter, probabilities and prompt token ids")
    args = parser.parse_args(argv)
    if (args.instruction is None) == (args.ids is None):
        parser.error("give an instruction or --ids")
    router = BundleRouter.from_dir(args.bundle)
    ids = ([int(i) for i in args.ids.split(",") if i.strip()] if args.ids is not None
           else router.prompt_ids(args.instruction, args.input))
    adapter, probabilities = router.choose(ids)
    if args.json:
        print(json.dumps({"adapter": adapter, "probabilities": probabilities, "prompt_token_ids": ids}))
    else:
        print(adapter)
    return 0


if __name__ == "__main__":
    sys.exit(main())
