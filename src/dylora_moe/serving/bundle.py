"""Export a sequence-routed checkpoint as a bundle a multi-LoRA engine (vLLM) serves: one adapter per request.

A sequence-routed model sends a whole request to the expert its router picks from the prompt, and pins that
choice for the generation; so it is served by an engine that applies one LoRA adapter per request, given that
adapter's name, plus a small router that names it. ``export_bundle(model, tokenizer, directory)`` writes
(atomically: the folder appears complete or not at all)::

    adapters/expert_<i>/     expert i as a PEFT LoRA adapter (``export_expert``; loads with PeftModel.from_pretrained)
    router/router.safetensors  embedding [V, H] (base dtype), feature_mean / feature_std [H], the router's weights
    router/router.json       format version, routing, top_k, adapters, base model, router kind and settings,
                             prompt format (chat template or plain template)
    router/tokenizer*        the base model's tokenizer
    route.py                 ``BundleRouter.from_dir(bundle).choose(prompt_ids) -> (adapter, probabilities)``:
                             the model's routing, without dylora_moe (a copy of ``bundle_route.py``)
    README.md                the ``vllm serve`` command and a request, for this bundle

Exact only when the model itself routes one expert with weight 1 per request: sequence routing (token routing
is refused), sparse mode (all experts mature), ``top_k=1`` and the ``straight_through`` gate. Otherwise
``approximate=True`` still writes it, serving the router's first choice alone, and records why in router.json.
Run from the command line as ``dylora-moe export-bundle CHECKPOINT OUT_DIR`` (``cli/bundle_commands.py``).
"""

from __future__ import annotations

import inspect
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..atomic import write_folder_atomically
from ..config import DyLoRAMoEConfig
from ..data import Example, build_prompt, use_chat_format
from ..data.formatting import PLAIN_PROMPT, PLAIN_PROMPT_NO_INPUT
from ..loading import resolve_model_path
from ..router import LinearRouter, MLPRouter, Router, rms_normalize
from . import bundle_route

__all__ = ["BUNDLE_FORMAT_VERSION", "VLLM_LORA_RANKS", "adapter_name", "check_servable", "export_bundle",
           "serve_command"]

BUNDLE_FORMAT_VERSION = bundle_route.FORMAT_VERSION
ADAPTERS_DIR, ROUTE_SCRIPT, README = "adapters", "route.py", "README.md"
#: the values vLLM's ``--max-lora-rank`` accepts (``MaxLoRARanks`` in vLLM's ``LoRAConfig``)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_ROUTER_KINDS = {LinearRouter: "linear", MLPRouter: "mlp"}


def adapter_name(index: int) -> str:
    """The name of expert ``index``'s adapter: its folder under ``adapters/`` and its model name in vLLM."""
    return f"expert_{index}"


def check_servable(config: DyLoRAMoEConfig, maturity: Sequence[bool], *, approximate: bool = False) -> list[str]:
    """Why serving one adapter per request would not reproduce the model (empty: it would exactly).

    A token-routed model is always refused (ValueError); the other reasons are refused unless ``approximate``.
    """
    if config.routing != "sequence":
        raise ValueError(f"routing={config.routing!r}: a token-routed model picks experts per token and decoder "
                         "layer, which cannot be expressed as one LoRA adapter per request; a bundle needs a model "
                         "trained with moe.routing=sequence (or export single experts with export_expert)")
    reasons = []
    mode = config.routing_mode if config.routing_mode != "auto" else ("sparse" if all(maturity) else "dense")
    if mode == "dense" and len(maturity) > 1:
        reasons.append(f"the routing mode is dense (routing_mode={config.routing_mode!r}, maturity={list(maturity)}): "
                       "every request mixes all experts; mark the experts mature or set routing_mode='sparse'")
    if mode == "sparse" and min(config.top_k, len(maturity)) > 1:
        reasons.append(f"top_k={config.top_k}: every request mixes {config.top_k} experts, and the engine applies "
                       "one adapter per request")
    if mode == "sparse" and config.gate == "probability" and len(maturity) > 1:
        reasons.append("gate='probability': the model scales the chosen expert by its router probability, and the "
                       "engine applies the adapter with weight 1")
    if reasons and not approximate:
        raise ValueError("this model cannot be served exactly as one adapter per request: " + "; ".join(reasons)
                         + ". Pass approximate=True (dylora-moe export-bundle --approximate) to serve the router's "
                         "first choice alone")
    return reasons


def export_bundle(model: Any, tokenizer: Any, directory: str | Path, *, use_chat_template: bool | None = None,
                  approximate: bool = False) -> Path:
    """Write the serving bundle of sequence-routed ``model`` to ``directory`` (see the module docstring).

    ``use_chat_template``: how the model's prompts were formatted in training (``data.use_chat_template``; None:
    the chat template when the tokenizer has one), recorded for ``route.py``. Returns ``directory``.
    """
    approximations = check_servable(model.moe_config, model.maturity, approximate=approximate)
    router = _sequence_router(model)
    tensors = _router_tensors(model, router)
    chat = use_chat_format(tokenizer, use_chat_template)

    def write(tmp: Path) -> None:
        ranks = [_export_adapter(model, i, tmp) for i in range(model.num_experts)]
        meta = _router_meta(model, router, tensors["embedding"], ranks, _prompt_format(tokenizer, chat),
                            approximations)
        (tmp / bundle_route.ROUTER_DIR).mkdir()
        save_file(tensors, str(tmp / bundle_route.ROUTER_DIR / bundle_route.ROUTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / bundle_route.ROUTER_DIR / bundle_route.ROUTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp / bundle_route.ROUTER_DIR))
        shutil.copyfile(bundle_route.__file__, tmp / ROUTE_SCRIPT)
        (tmp / README).write_text(bundle_readme(meta), encoding="utf-8")

    return write_folder_atomically(directory, write)


def _sequence_router(model: Any) -> Router:
    """The one router of a sequence-routed model, if ``route.py`` can compute it."""
    router = model.routers[0]
    if type(router) not in _ROUTER_KINDS:
        raise ValueError(f"router {type(router).__name__}: route.py computes the 'linear' and 'mlp' routers only")
    return router


def _router_tensors(model: Any, router: Router) -> dict[str, torch.Tensor]:
    """The router's state (``feature_mean``, ``feature_std``, weights) and ``embedding [V, H]``, on the CPU."""
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in router.state_dict().items()}
    tensors["embedding"] = _embedding_table(model.base_model)
    return tensors


@torch.no_grad()
def _embedding_table(base: Any) -> torch.Tensor:
    """What the base model's input embedding gives for every token id, ``[V, H]`` in its dtype (the weight itself
    for a plain ``nn.Embedding``; a scaled embedding's output includes its scale), read in chunks."""
    module = base.get_input_embeddings()
    vocab, device = module.weight.shape[0], module.weight.device
    chunks = [module(torch.arange(start, min(start + 8192, vocab), device=device)).detach().cpu()
              for start in range(0, vocab, 8192)]
    return torch.cat(chunks).contiguous()


def _export_adapter(model: Any, index: int, bundle: Path) -> int:
    """Write expert ``index`` under ``adapters/``; return its PEFT rank (a folded GOAT residual adds rank)."""
    folder = model.export_expert(index, bundle / ADAPTERS_DIR / adapter_name(index))
    return int(json.loads((folder / "adapter_config.json").read_text())["r"])


def _prompt_format(tokenizer: Any, chat: bool) -> dict[str, Any]:
    """How ``build_prompt_ids`` formats an instruction: the chat template, or the plain template after a prefix."""
    plain = build_prompt(Example("bundle", "{instruction}"), tokenizer, use_chat_template=False)
    return {
        "built_by": "dylora_moe.data.build_prompt_ids(Example(instruction, input), tokenizer)",
        "chat_template": chat,
        "plain_template": PLAIN_PROMPT,
        "plain_template_no_input": PLAIN_PROMPT_NO_INPUT,
        "bos_prefix": plain[: plain.index(PLAIN_PROMPT_NO_INPUT.split("{")[0])],
        "add_special_tokens": False,
    }


def _router_meta(model: Any, router: Router, embedding: torch.Tensor, ranks: list[int], prompt_format: dict[str, Any],
                 approximations: list[str]) -> dict[str, Any]:
    """The content of ``router/router.json``."""
    cfg = model.moe_config
    kind = _ROUTER_KINDS[type(router)]
    return {
        "format": "dylora-moe-bundle",
        "format_version": BUNDLE_FORMAT_VERSION,
        "routing": cfg.routing,
        "routing_mode": model.routing_mode,
        "top_k": cfg.top_k,
        "top_p": cfg.top_p,
        "gate": cfg.gate,
        "num_experts": model.num_experts,
        "adapters": [adapter_name(i) for i in range(model.num_experts)],
        "adapter_dirs": [f"{ADAPTERS_DIR}/{adapter_name(i)}" for i in range(model.num_experts)],
        "adapter_ranks": ranks,
        "max_lora_rank": next((r for r in VLLM_LORA_RANKS if r >= max(ranks)), max(ranks)),
        "exact": not approximations,
        "approximations": approximations,
        "base_model": {
            "name_or_path": resolve_model_path(model.base_name_or_path) if model.base_name_or_path else "",
            "model_type": getattr(model.config, "model_type", None),
            "hidden_size": int(embedding.shape[1]),
            "vocab_size": int(embedding.shape[0]),
            "embedding_dtype": str(embedding.dtype).removeprefix("torch."),
        },
        "router": {
            "kind": kind,
            "in_features": router.in_features,
            "hidden": router.hidden.out_features if isinstance(router, MLPRouter) else None,
            "temperature": cfg.temperature,
            "rms_eps": inspect.signature(rms_normalize).parameters["eps"].default,
            "features": "mean of the input embedding (float32) over the prompt's tokens",
            "maths": "softmax(logits(rms_norm((x - feature_mean) / feature_std)) / temperature); "
                     + ("logits(z) = weight z + bias" if kind == "linear"
                        else "logits(z) = weight gelu(hidden.weight z + hidden.bias) + bias"),
        },
        "prompt_format": prompt_format,
    }


def serve_command(meta: dict[str, Any]) -> str:
    """The ``vllm serve`` command of a bundle (run in the bundle folder), from its router.json ``meta``."""
    modules = " \\\n    ".join(f"{name}={folder}" for name, folder in zip(meta["adapters"], meta["adapter_dirs"]))
    return (f"vllm serve {meta['base_model']['name_or_path'] or '<base model>'} \\\n  --enable-lora \\\n"
            f"  --lora-modules \\\n    {modules} \\\n  --max-lora-rank {meta['max_lora_rank']} \\\n"
            f"  --max-loras {meta['num_experts']}")


def bundle_readme(meta: dict[str, Any]) -> str:
    """The README.md of a bundle: what it holds and how to serve it with vLLM."""
    first, base = meta["adapters"][0], meta["base_model"]["name_or_path"] or "<base model>"
    fmt = "the chat template" if meta["prompt_format"]["chat_template"] else "the plain `### Instruction:` template"
    caveat = ("Serving is exact: the model routes each request to one expert with weight 1, which is what the engine "
              "applies." if meta["exact"] else "**Approximate**: " + "; ".join(meta["approximations"]) + ".")
    return f"""# DyLoRA-MoE serving bundle

{meta['num_experts']} experts of a sequence-routed DyLoRA-MoE model on `{base}`,
each a standard PEFT LoRA adapter, and the router that picks one per request. {caveat}

* `adapters/expert_<i>/`: expert i (`peft.PeftModel.from_pretrained(base, "adapters/expert_<i>")`); ranks
  {meta['adapter_ranks']}.
* `router/`: `router.json` (settings), `router.safetensors` (the input-embedding table, the feature statistics
  and the {meta['router']['kind']} router's weights), the tokenizer.
* `route.py`: picks the adapter of a prompt (needs torch, safetensors, transformers; not dylora_moe).

## Serve

In this folder:

```bash
{serve_command(meta)}
```

`--max-lora-rank` is the smallest value vLLM accepts ({', '.join(map(str, VLLM_LORA_RANKS))}) that holds the
largest adapter rank ({max(meta['adapter_ranks'])}); `--max-loras` lets one batch hold requests for every expert.
Run elsewhere, give the adapters' absolute paths.

## Request

The router reads the prompt once and its choice holds for the whole reply, as in the model's own `generate`.
Send the prompt as token ids, formatted as in training ({fmt}), so that the engine sees exactly the
tokens the router saw:

```python
import json, urllib.request
from route import BundleRouter

router = BundleRouter.from_dir(".")
ids = router.prompt_ids("Write a function that reverses a string.")
adapter, probabilities = router.choose(ids)          # e.g. "{first}"
body = {{"model": adapter, "prompt": ids, "max_tokens": 256, "temperature": 0}}
request = urllib.request.Request("http://localhost:8000/v1/completions", json.dumps(body).encode(),
                                 {{"Content-Type": "application/json"}})
print(json.load(urllib.request.urlopen(request))["choices"][0]["text"])
```

or from the shell: `python route.py "Write a function that reverses a string."` prints the adapter name
(`--json`: with the probabilities and the prompt's token ids).
"""
