"""``export-bundle``: write a sequence-routed checkpoint as a bundle vLLM serves (one LoRA adapter per request).

    dylora-moe export-bundle runs/demo/final bundle/ [--base-model DIR] [--prompt-format plain] [--approximate]

The bundle (``serving/bundle.py``; docs/vllm.md) holds every expert as a PEFT adapter, the router with
``route.py`` to pick the adapter of a prompt, and a README with the ``vllm serve`` command. A token-routed
checkpoint is refused before its base model is loaded. Torch is imported when the command runs, not when the
parser is built.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.runs import resolve_adapter_dir, run_dir_of
from ..config import DyLoRAMoEConfig, with_predating_values
from ..config import help_metadata as _help
from ..errors import ConfigError
from ..layout import TRAIN_CONFIG_FILE
from .model_commands import InspectOptions, _load_for_inference
from .options import add_config_options, config_from_options

#: ``use_chat_template`` of each ``--prompt-format``
_CHAT_TEMPLATE: dict[str, bool | None] = {"auto": None, "chat": True, "plain": False}


@dataclass
class BundleOptions:
    """Where ``export-bundle`` writes, and how."""

    out_dir: str = field(metadata=_help("Folder to write the bundle to (replaced whole if it exists)."))
    prompt_format: str = field(default="auto", metadata=_help(
        "How the model's prompts were formatted in training (its data.use_chat_template), recorded for route.py: "
        "'chat' (the tokenizer's chat template), 'plain' (the '### Instruction:' template) or 'auto' (the "
        "run's data.use_chat_template from its train_config.json when there is one, else the chat template when "
        "the tokenizer has one)."))
    approximate: bool = field(default=False, metadata=_help(
        "Write the bundle even when one adapter per request only approximates the model (dense routing, "
        "top_k > 1, the 'probability' gate): the router's first choice is served alone."))

    def validate(self, source: str = "export-bundle") -> None:
        if self.prompt_format not in _CHAT_TEMPLATE:
            raise ConfigError(f"--prompt-format={self.prompt_format!r}: must be one of {sorted(_CHAT_TEMPLATE)}")


def register(sub: Any) -> None:
    bundle = sub.add_parser("export-bundle", help="write a sequence-routed checkpoint as a vLLM multi-LoRA bundle: "
                            "every expert a PEFT adapter, plus route.py to pick one per request")
    add_config_options(bundle, InspectOptions, positional=("checkpoint",))
    add_config_options(bundle, BundleOptions, positional=("out_dir",))
    bundle.set_defaults(func=_export_bundle)


def _export_bundle(ns: argparse.Namespace) -> int:
    options = config_from_options(BundleOptions, ns, overrides=False)
    inspect_options = config_from_options(InspectOptions, ns, overrides=False)

    from ..serialization import read_checkpoint_meta
    from ..serving.bundle import check_servable, export_bundle, serve_command

    folder = resolve_adapter_dir(inspect_options.checkpoint)
    saved = read_checkpoint_meta(folder)  # the model's settings, refused (if they are) before the base model loads
    config = DyLoRAMoEConfig.from_dict({**with_predating_values(saved["moe_config"]),
                                        "num_experts": len(saved["maturity"])}, source=str(folder))
    check_servable(config, saved["maturity"], approximate=options.approximate)
    chat = _use_chat_template(options.prompt_format, folder)
    adapter, _, model, tokenizer = _load_for_inference(inspect_options)
    out = export_bundle(model, tokenizer, options.out_dir, use_chat_template=chat, approximate=options.approximate)
    meta = json.loads((out / "router" / "router.json").read_text())
    print(f"wrote the bundle of {adapter} to {out}: {meta['num_experts']} adapters, a {meta['router']['kind']} "
          f"router{'' if meta['exact'] else ' (approximate: ' + '; '.join(meta['approximations']) + ')'}")
    print(f"serve it from {out} with:\n{serve_command(meta)}")
    return 0


def _use_chat_template(prompt_format: str, adapter: Path) -> bool | None:
    """``use_chat_template`` of ``--prompt-format``; 'auto' reads the run's ``data.use_chat_template`` (None: the
    chat template when the tokenizer has one, as training decided)."""
    if prompt_format != "auto":
        return _CHAT_TEMPLATE[prompt_format]
    train_config = run_dir_of(adapter) / TRAIN_CONFIG_FILE
    if not train_config.is_file():
        return None
    value = json.loads(train_config.read_text()).get("data", {}).get("use_chat_template")
    return value if isinstance(value, bool) else None
