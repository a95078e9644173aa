"""The ``learn-skill`` and ``continual`` subcommands of the ``dylora-moe`` command line::

    dylora-moe learn-skill runs/ckpt/final --data sql.jsonl --name sql [--output DIR] [--force]
                           [--config continual.yaml] [seed_steps=20 protection=both ...]
    dylora-moe continual [--config run.yaml] [train_examples=128 continual.seed_steps=5 ...]

``learn-skill`` reads the data first, so a bad file fails before anything is loaded or written; the
checkpoint is rewritten (atomically, skill library included) only after the skill was learned.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_commands"]


def _read_yaml(path: str | None) -> dict[str, Any]:
    from ..training.config import read_yaml_mapping

    return {} if path is None else read_yaml_mapping(path)


def _cmd_learn_skill(ns: argparse.Namespace) -> int:
    from ..evaluation.harness import load_for_eval
    from ..training.checkpoint import resolve_adapter_dir
    from .config import ContinualConfig
    from .learner import learn_skill
    from .skills import load_skill_examples

    overrides = list(ns.overrides) + (["force=true"] if ns.force else [])
    config = ContinualConfig.from_dict(_read_yaml(ns.config), ns.config or "continual config", overrides)
    examples = load_skill_examples(ns.data, split="all", data_dir=ns.data_dir)  # bad data fail here, first
    adapter = resolve_adapter_dir(ns.checkpoint)
    model, tokenizer = load_for_eval(adapter, device=ns.device)
    result = learn_skill(model, tokenizer, examples, ns.name, config, progress=not ns.no_progress)
    output = Path(ns.output) if ns.output else adapter
    model.save_pretrained(output)
    print(result.summary())
    print("similarities: " + json.dumps({k: round(v, 4) for k, v in result.decision.similarities.items()}))
    library = model.skill_library
    print(f"library: {', '.join(f'{s.name} -> expert {s.expert}' for s in library.skills)}; "
          f"experts {model.num_experts}, routing {model.routing_mode}; saved {output}")
    return 0


def _cmd_continual(ns: argparse.Namespace) -> int:
    from ..training.config import build_config
    from .benchmark import ContinualRunConfig, run_continual

    source = ns.config or "continual run config"
    run = build_config(ContinualRunConfig, _read_yaml(ns.config), source, list(ns.overrides))
    run.continual.validate(source)
    report = run_continual(run, progress=not ns.no_progress)
    for method, r in report["methods"].items():
        mf = r["max_forgetting"]
        print(f"{method}: max forgetting {'n/a' if mf is None else f'{mf:+.2%}'}, average "
              f"{r['average_forgetting']:+.2%}, backward transfer {r['backward_transfer']:+.4f}")
    detector = report["methods"]["dylora"]["detector"]
    print(f"detector: precision {detector['precision']}, recall {detector['recall']} "
          f"(threshold {detector['threshold']})")
    print(f"bar (max forgetting <= 2% and below the baseline): {'met' if report['bar']['met'] else 'NOT met'}")
    print(f"wrote {run.output_dir}/continual.json and continual.png")
    return 0


def add_commands(sub: Any) -> None:
    learn = sub.add_parser(
        "learn-skill", help="continual learning: add a skill to a checkpoint (new expert if it is novel)",
        description="Embed the data, ask the novelty detector, then train a new expert (novel) or fine-tune "
        "the matching skill's expert; saves the checkpoint with its skill library. KEY=VALUE overrides set "
        "ContinualConfig fields (threshold=0.8 rank_schedule=[8,16,32] seed_steps=20 protection=both).")
    learn.add_argument("checkpoint", help="adapter folder, checkpoint-<step> folder or run directory")
    learn.add_argument("--data", required=True, help="JSON/JSONL instruction file, dataset name or code_alpaca:<lang>")
    learn.add_argument("--name", required=True, help="name of the new skill")
    learn.add_argument("--output", help="write the updated checkpoint here (default: over CHECKPOINT, atomically)")
    learn.add_argument("--force", action="store_true", help="create a new expert even if the data are not novel")
    learn.add_argument("--config", help="YAML ContinualConfig")
    learn.add_argument("--data-dir", help="data directory (for dataset names)")
    learn.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    learn.add_argument("--no-progress", action="store_true")
    learn.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="ContinualConfig overrides")
    learn.set_defaults(func=_cmd_learn_skill)

    bench = sub.add_parser(
        "continual", help="measure forgetting over a sequence of skills against a sequential LoRA baseline",
        description="Learn the stages in order, measure every skill's held-out loss after every stage; writes "
        "continual.json and continual.png. KEY=VALUE overrides set ContinualRunConfig fields "
        "(stages=[mbpp,code_alpaca:sql] train_examples=128 continual.seed_steps=5).")
    bench.add_argument("--config", help="YAML ContinualRunConfig")
    bench.add_argument("--no-progress", action="store_true")
    bench.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="ContinualRunConfig overrides")
    bench.set_defaults(func=_cmd_continual)
