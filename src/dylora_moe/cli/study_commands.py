"""``study``, ``learn-skill`` and ``continual``: the commands that run experiments over many trainings.

``study`` is built from :class:`~dylora_moe.study.config.StudyConfig`, ``learn-skill`` from
:class:`~dylora_moe.continual.config.ContinualConfig` plus :class:`LearnSkillOptions`, ``continual`` from
:class:`~dylora_moe.continual.config.ContinualRunConfig`::

    dylora-moe study --config configs/study.yaml [--parallel 4] [seeds=[0,1] eval_limit=20 ...]
    dylora-moe learn-skill runs/ckpt/final --data sql.jsonl --name sql [--output DIR] [--force]
                           [--config continual.yaml] [seed_steps=20 protection=both ...]
    dylora-moe continual [--config run.yaml] [train_examples=128 continual.seed_steps=5 ...]

``learn-skill`` reads the data first, so a bad file fails before anything is loaded or written; the checkpoint
is rewritten (atomically, skill library included) only after the skill was learned.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import help_metadata as _help
from ..continual.config import ContinualConfig, ContinualRunConfig
from ..study.config import StudyConfig
from .options import add_common_arguments, add_config_options, config_from_options

__all__ = ["LearnSkillOptions", "RunOptions", "register"]


@dataclass
class RunOptions:
    """How a long command reports and what it runs."""

    report_only: bool = field(default=False, metadata=_help("Only aggregate the complete units (study)."))
    progress: bool = field(default=True, metadata=_help("Progress bars."))


@dataclass
class LearnSkillOptions:
    """Which checkpoint ``learn-skill`` extends, with which data, and where it saves it."""

    checkpoint: str = field(metadata=_help("Adapter folder, checkpoint-<step> folder or run directory."))
    data: str = field(metadata=_help("JSON/JSONL instruction file, dataset name or code_alpaca:<language>."))
    name: str = field(metadata=_help("Name of the new skill."))
    output: str | None = field(default=None, metadata=_help(
        "Write the updated checkpoint here (default: over CHECKPOINT, atomically)."))
    data_dir: str | None = field(default=None, metadata=_help("Data directory (for dataset names)."))
    device: str = field(default="auto", metadata=_help("'auto', 'cpu', 'cuda' or 'cuda:N'."))
    progress: bool = field(default=True, metadata=_help("Progress bars."))


def register(sub: Any) -> None:
    study = sub.add_parser(
        "study", help="quality study: the mixture against single-LoRA baselines (same data, steps and seed)",
        description="Train and evaluate every (variant, seed) of a study config, then write quality.json, plots "
        "and results_table.md. Complete units are skipped, so a study resumes. Overrides use the study config's "
        "dotted keys: seeds=[0,1,2], eval_limit=20, overrides=[train.max_steps=50], variants.0.seeds=[0].")
    add_config_options(study, StudyConfig, skip=("overrides",))
    add_config_options(study, RunOptions)
    add_common_arguments(study, "StudyConfig")
    study.set_defaults(func=_study)

    learn = sub.add_parser(
        "learn-skill", help="continual learning: add a skill to a checkpoint (new expert if it is novel)",
        description="Embed the data, ask the novelty detector, then train a new expert (novel) or fine-tune the "
        "matching skill's expert; saves the checkpoint with its skill library. Options and KEY=VALUE overrides "
        "set ContinualConfig fields (threshold=0.8 rank_schedule=[8,16,32] seed_steps=20 protection=both).")
    add_config_options(learn, LearnSkillOptions, positional=("checkpoint",))
    add_config_options(learn, ContinualConfig)
    add_common_arguments(learn, "ContinualConfig")
    learn.set_defaults(func=_learn_skill)

    continual = sub.add_parser(
        "continual", help="measure forgetting over a sequence of skills against a sequential LoRA baseline",
        description="Learn the stages in order, measure every skill's held-out loss after every stage; writes "
        "continual.json and continual.png. Options and KEY=VALUE overrides set ContinualRunConfig fields "
        "(stages=[mbpp,code_alpaca:sql] train_examples=128 continual.seed_steps=5).")
    add_config_options(continual, ContinualRunConfig)
    add_config_options(continual, RunOptions, skip=("report_only",))
    add_common_arguments(continual, "ContinualRunConfig")
    continual.set_defaults(func=_continual)


def _study(ns: argparse.Namespace) -> int:
    study = config_from_options(StudyConfig, ns, source="the built-in study")
    options = config_from_options(RunOptions, ns, overrides=False)

    from ..study import results_table, run_study  # imports torch

    quality = run_study(study, progress=options.progress, report_only=options.report_only)
    print(results_table(quality))
    print(f"wrote {study.output_dir}/quality.json, results_table.md and plots")
    return 0


def _learn_skill(ns: argparse.Namespace) -> int:
    options = config_from_options(LearnSkillOptions, ns, overrides=False)
    config = config_from_options(ContinualConfig, ns, source="continual config")

    from ..common.inference import load_for_eval  # imports torch
    from ..common.runs import resolve_adapter_dir
    from ..continual.learner import learn_skill
    from ..continual.skills import load_skill_examples

    examples = load_skill_examples(options.data, split="all", data_dir=options.data_dir)  # bad data fail first
    adapter = resolve_adapter_dir(options.checkpoint)
    model, tokenizer = load_for_eval(adapter, device=options.device)
    result = learn_skill(model, tokenizer, examples, options.name, config, progress=options.progress)
    output = Path(options.output) if options.output else adapter
    model.save_pretrained(output)
    print(result.summary())
    print("similarities: " + json.dumps({k: round(v, 4) for k, v in result.decision.similarities.items()}))
    library = model.skill_library
    print(f"library: {', '.join(f'{s.name} -> expert {s.expert}' for s in library.skills)}; "
          f"experts {model.num_experts}, routing {model.routing_mode}; saved {output}")
    return 0


def _continual(ns: argparse.Namespace) -> int:
    run = config_from_options(ContinualRunConfig, ns, source="continual run config")
    run.validate("continual run config")
    options = config_from_options(RunOptions, ns, overrides=False)

    from ..study.continual_benchmark import run_continual  # imports torch

    report = run_continual(run, progress=options.progress)
    print("method: AP (mean held-out loss after the last stage), BWT, FT, FWT; mean over orders [min, max]")
    for method, row in report["summary"].items():
        parts = []
        for metric in ("ap", "bwt", "ft", "fwt"):
            cell = row.get(metric)
            if cell is not None and cell["mean"] is not None:
                fmt = "{:.4f}" if metric == "ap" else "{:+.2%}"
                spread = (f" [{fmt.format(cell['min'])}, {fmt.format(cell['max'])}]"
                          if row.get("orders", 1) > 1 else "")
                parts.append(f"{metric.upper()} {fmt.format(cell['mean'])}{spread}")
        print(f"  {method}: {', '.join(parts)}")
    for key, unit in report["units"].items():
        if "routing_accuracy" in unit:
            print(f"{key}: routing accuracy {unit['routing_accuracy'].get('mean', float('nan')):.2f}")
    bar = report["bar"]
    print(f"detector: precision {bar.get('detector_precision')}, recall {bar.get('detector_recall')}")
    print(f"bar of issue #29: {'met' if bar['met'] else 'NOT met'} "
          f"({', '.join(k for k, v in bar.items() if v is False) or 'every check passes'})")
    print(f"wrote {run.output_dir}/continual.json and continual.png (units in {run.output_dir}/units)")
    return 0
