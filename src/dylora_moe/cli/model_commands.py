"""``train``, ``report``, ``generate``, ``push`` and ``inspect``: the commands that make, look at or share a model.

Each takes typed configs (``TrainConfig``, ``DyLoRAMoEConfig``, and the small option sets below); the functions
import what they run when they run, so that building the parser stays free of torch.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.sampling import SamplingSettings
from ..config import DyLoRAMoEConfig
from ..config import help_metadata as _help
from ..errors import ConfigError
from ..layout import STATE_FILE
from ..training.config import TrainConfig
from .options import add_common_arguments, add_config_options, config_from_options


@dataclass
class ReportOptions:
    """What ``report`` wraps."""

    model: str = field(metadata=_help("Hub id, local folder, or the embedded default 'smollm2-135m'."))


@dataclass
class InspectOptions:
    """Which adapter ``inspect`` and ``generate`` load, onto which base model."""

    checkpoint: str = field(metadata=_help("Adapter folder, checkpoint-<step> folder, or run directory."))
    base_model: str | None = field(default=None, metadata=_help(
        "Load this base model instead of the one recorded in the adapter."))


@dataclass
class GenerateOptions:
    """What ``generate`` answers and how it decodes."""

    prompt: str | None = field(default=None, metadata=_help("The instruction (formatted as in training)."))
    prompts_file: str | None = field(default=None, metadata=_help(
        "Answer every prompt of this file instead: JSON / JSON Lines records with 'instruction' (and optionally "
        "'input'), or a .txt file with one instruction per line."))
    input: str = field(default="", metadata=_help("Optional input/context of --prompt."))
    max_new_tokens: int = field(default=256, metadata=_help("Tokens generated at most."))
    temperature: float = field(default=0.0, metadata=_help("Sampling temperature; 0 = greedy decoding."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling: the smallest set of tokens whose "
                                                     "probabilities add up to this (with --temperature > 0)."))
    seed: int | None = field(default=None, metadata=_help("Seed of sampling, for repeatable replies."))
    expert: int | None = field(default=None, metadata=_help(
        "Send every prompt to this expert instead of routing it."))
    batch_size: int = field(default=8, metadata=_help("Prompts generated at once."))
    output: str | None = field(default=None, metadata=_help(
        "Also write the replies here as JSON Lines (instruction, input, reply, expert, router_probs)."))

    def validate(self, source: str = "generate", origins: dict[str, str] | None = None) -> None:
        if (self.prompt is None) == (self.prompts_file is None):
            raise ConfigError("give exactly one of --prompt and --prompts-file")
        try:
            self.sampling().validate(name=lambda f: "--" + f.replace("_", "-"))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size={self.batch_size}: must be >= 1")
        if self.expert is not None and self.expert < 0:
            raise ConfigError(f"--expert={self.expert}: must be >= 0")


    def sampling(self) -> SamplingSettings:
        return SamplingSettings(self.max_new_tokens, self.temperature, self.top_p, self.seed)


@dataclass
class PushOptions:
    """What ``push`` uploads, and where."""

    checkpoint: str = field(metadata=_help("Adapter folder, checkpoint-<step> folder, or run directory."))
    repo_id: str = field(metadata=_help("Hugging Face Hub model repository, owner/name (created if missing)."))
    private: bool = field(default=False, metadata=_help("Create the repository private."))
    revision: str | None = field(default=None, metadata=_help("Branch to push to (default: main)."))
    commit_message: str = field(default="Upload DyLoRA-MoE adapter", metadata=_help("The commit message."))


def register(sub: Any) -> None:
    train = sub.add_parser(
        "train", help="train all experts and the router jointly (YAML config + KEY=VALUE overrides)",
        description="Joint training from a YAML TrainConfig. Overrides use dotted keys: moe.num_experts=8, "
        "train.lr=1e-4, data.max_seq_length=512, data.datasets.1.weight=2 (values are read as YAML). "
        "See docs/training.md for every key.")
    add_config_options(train, TrainConfig)
    train.add_argument("--data-dir", dest="data_dir_alias", default=None, help="data directory (sets data.data_dir)")
    add_common_arguments(train, "TrainConfig")
    train.set_defaults(func=_train)

    report = sub.add_parser("report", help="wrap a base model with experts and print the parameter report")
    add_config_options(report, ReportOptions, positional=("model",))
    add_config_options(report, DyLoRAMoEConfig)
    report.set_defaults(func=_report)

    generate = sub.add_parser("generate", help="answer a prompt (or a file of prompts) with a trained adapter, greedy "
                              "or sampled; reports the expert each prompt went to, or forces one (--expert)")
    add_config_options(generate, InspectOptions, positional=("checkpoint",))
    add_config_options(generate, GenerateOptions)
    generate.set_defaults(func=_generate)

    push = sub.add_parser("push", help="upload an adapter folder (with its model card) to the Hugging Face Hub; "
                          "from_pretrained and every command load it back by its id")
    add_config_options(push, PushOptions, positional=("checkpoint", "repo_id"))
    push.set_defaults(func=_push)

    inspect = sub.add_parser("inspect", help="show experts, ranks, maturity, parameters and the run's routing stats")
    add_config_options(inspect, InspectOptions, positional=("checkpoint",))
    inspect.set_defaults(func=_inspect)


def _train(ns: argparse.Namespace) -> int:
    if ns.data_dir_alias is not None:
        label = f"--data-dir {ns.data_dir_alias}"
        ns.overrides = [*ns.overrides, (label, f"data.data_dir={json.dumps(ns.data_dir_alias)}")]
    config = config_from_options(TrainConfig, ns, source="train config")  # config errors come before torch

    from ..training import JointTrainer

    trainer = JointTrainer(config)
    result = trainer.train()
    trainer.accelerator.print(f"done: {result.global_step} optimizer steps in {result.train_time_s:.1f}s; "
                              f"final adapter in {result.final_dir}")  # once, on the main process
    trainer.shutdown()
    return 0


def _report(ns: argparse.Namespace) -> int:
    options = config_from_options(ReportOptions, ns, overrides=False)
    config = config_from_options(DyLoRAMoEConfig, ns, overrides=False)

    from ..api import DyLoRAMoEForCausalLM
    from ..loading import load_base_model

    base, _ = load_base_model(options.model)
    model = DyLoRAMoEForCausalLM(base, config, base_name_or_path=options.model)
    print(model.parameter_report())
    return 0


def _load_for_inference(options: InspectOptions) -> tuple[Any, dict[str, Any], Any, Any]:
    from ..api import DyLoRAMoEForCausalLM
    from ..common.runs import resolve_adapter_dir
    from ..loading import load_base_model
    from ..serialization import read_checkpoint_meta

    adapter = resolve_adapter_dir(options.checkpoint)
    meta = read_checkpoint_meta(adapter)
    base, tokenizer = load_base_model(options.base_model or meta["base_model"]["name_or_path"])
    model = DyLoRAMoEForCausalLM.from_pretrained(adapter, base_model=base)
    model.eval()
    return adapter, meta, model, tokenizer


def _generate(ns: argparse.Namespace) -> int:
    options = config_from_options(GenerateOptions, ns, overrides=False)

    from ..atomic import write_text_atomically
    from ..common.generation import generate_replies, read_prompts
    from ..data import Example

    prompts = (read_prompts(options.prompts_file) if options.prompts_file is not None  # bad files fail first
               else [Example("prompt", options.prompt or "", options.input)])
    adapter, _, model, tokenizer = _load_for_inference(config_from_options(InspectOptions, ns, overrides=False))
    if options.expert is not None and options.expert >= model.num_experts:
        raise ConfigError(f"--expert={options.expert}: {adapter} has {model.num_experts} experts "
                          f"(0..{model.num_experts - 1})")
    replies = generate_replies(model, tokenizer, prompts, options.sampling(), expert=options.expert,
                               batch_size=options.batch_size, progress=len(prompts) > options.batch_size)
    for i, reply in enumerate(replies):
        if len(replies) > 1:
            print(f"### {i}: {reply.instruction[:70]}")
        print(reply.text)
        if reply.forced:
            print(f"[expert {reply.expert} of {model.num_experts}, forced; adapter {adapter}]")
        else:
            probs = ", ".join(f"{p:.3f}" for p in reply.router_probs or [])
            print(f"[router: expert {reply.expert} of {model.num_experts} (probabilities {probs}); adapter {adapter}]")
    if options.output is not None:
        rows = [{"instruction": r.instruction, "input": r.input, "reply": r.text, "expert": r.expert,
                 "forced": r.forced, "router_probs": r.router_probs} for r in replies]
        write_text_atomically(Path(options.output), "".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {len(rows)} replies to {options.output}")
    return 0


def _push(ns: argparse.Namespace) -> int:
    from ..common.runs import resolve_adapter_dir  # torch-free, like the upload
    from ..hub import push_folder

    options = config_from_options(PushOptions, ns, overrides=False)
    adapter = resolve_adapter_dir(options.checkpoint)
    url = push_folder(adapter, options.repo_id, private=options.private or None, revision=options.revision,
                      commit_message=options.commit_message)
    print(f"pushed {adapter} to {options.repo_id}: {url}")
    return 0


def _inspect(ns: argparse.Namespace) -> int:
    from ..common.runs import run_dir_of

    adapter, meta, model, _ = _load_for_inference(config_from_options(InspectOptions, ns, overrides=False))
    print(f"adapter: {adapter}")
    print(f"base model: {meta['base_model']['name_or_path']} ({meta['base_model'].get('model_type')})")
    print(f"experts: {model.num_experts}  routing: {model.moe_config.routing}, top_k={model.moe_config.top_k}, "
          f"mode now: {model.routing_mode}")
    for i, (rank, alpha, mature) in enumerate(zip(model.expert_ranks, model.expert_alphas, model.maturity)):
        print(f"  expert {i}: rank {rank}, alpha {alpha:g}, {'mature' if mature else 'immature'}")
    print(model.parameter_report())
    # the run's metrics.json, else (a run still in progress) the checkpoint's own history
    metrics_path, state_path = run_dir_of(adapter) / "metrics.json", adapter.parent / STATE_FILE
    source = next((p for p in (metrics_path, state_path) if p.is_file()), None)
    history = json.loads(source.read_text()).get("eval_history", []) if source is not None else []
    if not history:
        print("(no metrics.json or trainer_state.json for this adapter)")
        return 0
    from ..training import EvalResult, summary_table

    results = [EvalResult.from_dict(h) for h in history]
    print(f"--- Routing and held-out loss (from {source}) ---")
    print(summary_table(results))
    for name, d in results[-1].domains.items():
        print(f"  {name}: router entropy {d.router_entropy:.3f} nats, balance loss {d.aux_loss:.4f}")
    return 0
