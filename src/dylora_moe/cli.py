"""The ``dylora-moe`` command line, built from the typed config dataclasses.

Only this module parses argv; the library takes config objects. Every ``DyLoRAMoEConfig`` field
becomes an option of ``report`` (``--num-experts 8``, ``--target-modules q_proj,v_proj``) with its
help text; ``train`` reads a YAML ``TrainConfig`` plus ``KEY=VALUE`` overrides (dotted keys)::

    dylora-moe report smollm2-135m --num-experts 4 --r 16
    dylora-moe train --config configs/cpu-demo.yaml [train.lr=3e-4 moe.num_experts=8 ...]
                     [--resume] [--data-dir DIR] [--output-dir DIR] [--overwrite-output-dir]
    dylora-moe generate runs/cpu-demo/final --prompt "Write a function that reverses a string."
    dylora-moe inspect runs/cpu-demo/final
    dylora-moe study --config configs/study.yaml [--parallel 4] [seeds=[0,1] eval_limit=20 ...]
    dylora-moe learn-skill runs/cpu-demo/final --data sql.jsonl --name sql
    dylora-moe continual [--config run.yaml] [train_examples=128 ...]

Errors in configs, data, checkpoints or base models print ``dylora-moe: error: ...`` on stderr and
exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from .config import DyLoRAMoEConfig
from .errors import USER_ERRORS, ConfigError


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    hints = typing.get_type_hints(cls)
    return hints.get(f.name, str)


def _parse_value(raw: str, annotation: Any) -> Any:
    """Convert a command-line string to the field's annotated type."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        # "a,b" is a list; a single word prefers a scalar type when the union has one
        options.sort(key=lambda a: (typing.get_origin(a) is list) != ("," in raw))
        for option in options:
            try:
                return _parse_value(raw, option)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"cannot parse {raw!r} as {annotation}")
    if origin is list:
        (item,) = args or (str,)
        return [_parse_value(part.strip(), item) for part in raw.split(",") if part.strip()]
    if annotation is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {raw!r}")
    return annotation(raw)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add one ``--option`` per dataclass field, with the field's help text and default."""
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        flag = "--" + prefix + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        group.add_argument(flag, dest=prefix + f.name, default=None, metavar=f.name.upper(),
                           help=f"{f.metadata.get('help', '')} (default: {default!r})")


def dataclass_from_args(cls: type, ns: argparse.Namespace, prefix: str = "", base: Any = None):
    """Build ``cls`` from parsed options that were given (others keep ``base``'s or default values)."""
    values = dataclasses.asdict(base) if base is not None else {}
    for f in dataclasses.fields(cls):
        raw = getattr(ns, prefix + f.name, None)
        if raw is None:
            continue
        try:
            values[f.name] = _parse_value(raw, _field_type(cls, f))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--{prefix}{f.name.replace('_', '-')}={raw!r}: {exc}") from None
    return cls(**values)


def _cmd_report(ns: argparse.Namespace) -> int:
    from .loading import load_base_model
    from .model import DyLoRAMoEForCausalLM

    config = dataclass_from_args(DyLoRAMoEConfig, ns)
    base, _ = load_base_model(ns.model)
    model = DyLoRAMoEForCausalLM(base, config, base_name_or_path=ns.model)
    print(model.parameter_report())
    return 0


def _cmd_train(ns: argparse.Namespace) -> int:
    from .training import JointTrainer, TrainConfig

    config = TrainConfig.from_yaml(ns.config, ns.overrides)
    changes: dict[str, Any] = {}
    if ns.resume:
        changes["resume"] = True
    if ns.overwrite_output_dir:
        changes["overwrite_output_dir"] = True
    if ns.data_dir is not None:
        changes["data.data_dir"] = ns.data_dir
    if ns.output_dir is not None:
        changes["output_dir"] = ns.output_dir
    if changes:
        config = config.replace(**changes)
    trainer = JointTrainer(config)
    result = trainer.train()
    trainer.accelerator.print(f"done: {result.global_step} optimizer steps in {result.train_time_s:.1f}s; "
                              f"final adapter in {result.final_dir}")  # once, on the main process
    return 0


def _load_for_inference(checkpoint: str, base_model: str | None):
    from .loading import load_base_model
    from .model import DyLoRAMoEForCausalLM
    from .serialization import read_checkpoint_meta
    from .training.checkpoint import resolve_adapter_dir

    adapter = resolve_adapter_dir(checkpoint)
    meta = read_checkpoint_meta(adapter)
    base, tokenizer = load_base_model(base_model or meta["base_model"]["name_or_path"])
    model = DyLoRAMoEForCausalLM.from_pretrained(adapter, base_model=base)
    model.eval()
    return adapter, meta, model, tokenizer


def _cmd_generate(ns: argparse.Namespace) -> int:
    import torch

    from .data import Example, build_prompt_ids, resolve_pad_token_id

    if ns.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={ns.max_new_tokens}: must be >= 1")
    adapter, _, model, tokenizer = _load_for_inference(ns.checkpoint, ns.base_model)
    example = Example(domain="prompt", instruction=ns.prompt, input=ns.input or "")
    ids = torch.tensor([build_prompt_ids(example, tokenizer)], device=model.device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        routed = model(input_ids=ids, attention_mask=mask)
        output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=ns.max_new_tokens,
                                do_sample=False, pad_token_id=resolve_pad_token_id(tokenizer))
    completion = tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True)
    probs = ", ".join(f"{p:.3f}" for p in routed.router_probs[0].tolist())
    print(completion)
    print(f"[router: expert {int(routed.expert_choice[0])} of {model.num_experts} "
          f"(probabilities {probs}); adapter {adapter}]")
    return 0


def _cmd_inspect(ns: argparse.Namespace) -> int:
    import json

    from .training.checkpoint import STATE_FILE, run_dir_of

    adapter, meta, model, _ = _load_for_inference(ns.checkpoint, ns.base_model)
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
    if history:
        from .training import EvalResult, summary_table

        results = [EvalResult.from_dict(h) for h in history]
        print(f"--- Routing and held-out loss (from {source}) ---")
        print(summary_table(results))
        for name, d in results[-1].domains.items():
            print(f"  {name}: router entropy {d.router_entropy:.3f} nats, balance loss {d.aux_loss:.4f}")
    else:
        print("(no metrics.json or trainer_state.json for this adapter)")
    return 0


def _cmd_study(ns: argparse.Namespace) -> int:
    from .study import StudyConfig, run_study

    overrides = list(ns.overrides) + ([f"parallel={ns.parallel}"] if ns.parallel is not None else [])
    study = (StudyConfig.from_yaml(ns.config, overrides) if ns.config
             else StudyConfig.from_dict({}, "the built-in study", overrides))
    quality = run_study(study, progress=not ns.no_progress, report_only=ns.report_only)
    from .study import results_table

    print(results_table(quality))
    print(f"wrote {study.output_dir}/quality.json, results_table.md and plots")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dylora-moe", description="Dynamic LoRA Mixture-of-Experts")
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="wrap a base model with experts and print the parameter report")
    report.add_argument("model", help="hub id, local folder, or the embedded default 'smollm2-135m'")
    add_dataclass_arguments(report, DyLoRAMoEConfig)
    report.set_defaults(func=_cmd_report)

    train = sub.add_parser(
        "train", help="train all experts and the router jointly (YAML config + KEY=VALUE overrides)",
        description="Joint training from a YAML TrainConfig. Overrides use dotted keys: moe.num_experts=8, "
        "train.lr=1e-4, data.max_seq_length=512, data.datasets.1.weight=2 (values are read as YAML). "
        "See docs/training.md for every key.")
    train.add_argument("--config", required=True, help="YAML config file, e.g. configs/cpu-demo.yaml")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (dotted keys)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    train.add_argument("--data-dir", help="data directory (sets data.data_dir)")
    train.add_argument("--output-dir", help="run directory (sets output_dir)")
    train.add_argument("--overwrite-output-dir", action="store_true",
                       help="start afresh even if output_dir holds an earlier run's checkpoints (deletes them)")
    train.set_defaults(func=_cmd_train)

    generate = sub.add_parser("generate", help="generate greedily with a trained adapter; reports the chosen expert")
    generate.add_argument("checkpoint", help="adapter folder, checkpoint-<step> folder, or run directory")
    generate.add_argument("--prompt", required=True, help="the instruction (formatted as in training)")
    generate.add_argument("--input", default="", help="optional input/context of the instruction")
    generate.add_argument("--max-new-tokens", type=int, default=256)
    generate.add_argument("--base-model", help="load this base model instead of the one recorded in the adapter")
    generate.set_defaults(func=_cmd_generate)

    inspect = sub.add_parser("inspect", help="show experts, ranks, maturity, parameters and the run's routing stats")
    inspect.add_argument("checkpoint", help="adapter folder, checkpoint-<step> folder, or run directory")
    inspect.add_argument("--base-model", help="load this base model instead of the one recorded in the adapter")
    inspect.set_defaults(func=_cmd_inspect)

    study = sub.add_parser(
        "study", help="quality study: the mixture against single-LoRA baselines (same data, steps and seed)",
        description="Train and evaluate every (variant, seed) of a study config, then write quality.json, "
        "plots and results_table.md. Complete units are skipped, so a study resumes. Overrides use the study "
        "config's dotted keys: seeds=[0,1,2], eval_limit=20, overrides=[train.max_steps=50], parallel=4.")
    study.add_argument("--config", default=None, help="YAML study config (default: the built-in study)")
    study.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="study config overrides (dotted keys)")
    study.add_argument("--parallel", type=int, default=None, help="units at once, each in its own process")
    study.add_argument("--report-only", action="store_true", help="only aggregate the complete units")
    study.add_argument("--no-progress", action="store_true", help="no progress bars")
    study.set_defaults(func=_cmd_study)

    from .continual.commands import add_commands as add_continual_commands
    from .evaluation.commands import add_commands

    add_commands(sub)  # eval, compare, analyze
    add_continual_commands(sub)  # learn-skill, continual
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if extra:  # KEY=VALUE overrides given after options (argparse only takes the first run of positionals)
        if hasattr(ns, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            ns.overrides = list(ns.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return ns.func(ns)
    except USER_ERRORS as exc:
        print(f"dylora-moe: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"dylora-moe: error: {exc.filename or exc}: file not found", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
