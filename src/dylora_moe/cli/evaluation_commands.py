"""``eval``, ``compare`` and ``analyze``: the commands that measure a model or compare measurements.

``eval`` is built from :class:`~dylora_moe.evaluation.config.EvalConfig` (every field an option), ``compare``
and ``analyze`` from the small option sets below::

    dylora-moe eval runs/ckpt --benchmark humaneval --output eval/he
    dylora-moe eval smollm2-135m --base-only --benchmark mbpp --limit 10 --output eval/base-mbpp
    dylora-moe eval --references --benchmark humaneval --output eval/refs      # no model, no torch
    dylora-moe eval runs/ckpt --n-samples 20 --temperature 0.8 --k 1,10 --output eval/he-k
    dylora-moe eval --rescore eval/he --output eval/he-rescored    # stored completions, today's harness
    dylora-moe compare eval/lora-mbpp eval/moe-mbpp        # paired: problems only one run solves, sign test
    dylora-moe analyze runs/ckpt --data code_alpaca mbpp my_sql.jsonl --output analysis/

The references check, ``--rescore`` and ``compare`` never import torch.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import help_metadata as _help
from ..errors import ConfigError, EvaluationError
from ..evaluation.config import EvalConfig
from ..layout import JOURNAL_FILE
from .options import add_common_arguments, add_config_options, config_from_options

__all__ = ["AnalyzeOptions", "CompareOptions", "register"]


@dataclass
class CompareOptions:
    """The two evaluation runs ``compare`` pairs."""

    run_a: str = field(metadata=_help("Folder of the first run (results.jsonl)."))
    run_b: str = field(metadata=_help("Folder of the second run."))
    json: str | None = field(default=None, metadata=_help("Also write the comparison here."))
    list: bool = field(default=False, metadata=_help("Print the task ids only one run solves."))


@dataclass
class AnalyzeOptions:
    """What ``analyze`` reads and writes."""

    checkpoint: str = field(metadata=_help("DyLoRA-MoE checkpoint folder (or run directory)."))
    data: list[str] = field(metadata=_help(
        "Registered dataset names (code_alpaca, mbpp) or JSON/JSONL instruction files, one domain each."))
    output: str = field(metadata=_help("Output folder (analysis.json and heatmaps)."))
    split: str = field(default="validation", metadata=_help("Split of each dataset."))
    limit: int | None = field(default=None, metadata=_help("At most N examples per domain."))
    batch_size: int = field(default=8, metadata=_help("Examples per forward pass."))
    max_seq_length: int = field(default=512, metadata=_help("Tokens per example at most."))
    data_dir: str | None = field(default=None, metadata=_help("Data directory (for dataset names)."))
    threads: int | None = field(default=None, metadata=_help("torch CPU threads."))
    progress: bool = field(default=True, metadata=_help("Progress bars."))

    def validate(self, source: str = "analyze", origins: dict[str, str] | None = None) -> None:
        if not self.data:
            raise ConfigError(f"{source}: --data needs at least one dataset name or file")
        for name in ("limit", "batch_size", "max_seq_length", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{source}: --{name.replace('_', '-')}={value} must be a positive integer")


@dataclass
class PoolEditOptions:
    """What ``prune`` and ``merge-experts`` read, change and write."""

    checkpoint: str = field(metadata=_help("DyLoRA-MoE checkpoint folder (or run directory, or Hub id)."))
    data: list[str] = field(metadata=_help(
        "Datasets whose held-out examples measure load and loss (names or JSON/JSONL files, one domain each)."))
    output: str = field(metadata=_help("Where the edited checkpoint goes (with pool_edit.json)."))
    min_load: float | None = field(default=None, metadata=_help(
        "prune: remove the experts whose share of the routing decisions is below this."))
    experts: list[int] = field(default_factory=list, metadata=_help("prune: remove these experts instead."))
    remap: list[str] = field(default_factory=list, metadata=_help(
        "prune: give the skills of a removed expert another one, OLD:NEW (e.g. 3:0)."))
    min_similarity: float | None = field(default=None, metadata=_help(
        "merge-experts: merge every group of experts whose updates are at least this alike (cosine)."))
    groups: list[str] = field(default_factory=list, metadata=_help(
        "merge-experts: merge these groups instead, each as indices joined by '+', e.g. 0+2 1+3 (each group into "
        "its first expert)."))
    method: str = field(default="average", metadata=_help("merge-experts: 'average' or 'ties' (TIES-Merging)."))
    density: float = field(default=0.5, metadata=_help("merge-experts, ties: share of each update's entries kept."))
    limit: int | None = field(default=None, metadata=_help("At most N held-out examples per domain."))
    batch_size: int = field(default=8, metadata=_help("Examples per forward pass."))
    max_seq_length: int = field(default=512, metadata=_help("Tokens per example at most."))
    data_dir: str | None = field(default=None, metadata=_help("Data directory (for dataset names)."))
    progress: bool = field(default=True, metadata=_help("Progress bars."))

    def validate(self, source: str = "pool edit", origins: dict[str, str] | None = None) -> None:
        for item in self.remap:
            if not re.fullmatch(r"\d+:\d+", item):
                raise ConfigError(f"{source}: --remap {item!r} must be OLD:NEW expert indices, e.g. 3:0")
        for item in self.groups:
            if not re.fullmatch(r"\d+(\+\d+)+", item):
                raise ConfigError(f"{source}: --groups {item!r} must be two or more expert indices joined by '+', "
                                  "e.g. 0+2")
        if self.method not in ("average", "ties"):
            raise ConfigError(f"{source}: --method={self.method!r} must be 'average' or 'ties'")
        for name in ("limit", "batch_size", "max_seq_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{source}: --{name.replace('_', '-')}={value} must be a positive integer")


def register(sub: Any) -> None:
    evaluate = sub.add_parser(
        "eval", help="sandboxed pass@k on HumanEval or MBPP",
        description="Generate solutions with a DyLoRA-MoE checkpoint (or, with --base-only, a plain base model) "
        "and run them in the sandbox; writes results.jsonl and summary.json. Also: --references (the dataset's "
        "own solutions) and --rescore EVAL_DIR (stored completions through today's harness).")
    add_config_options(evaluate, EvalConfig, positional=("model",))
    add_common_arguments(evaluate, "EvalConfig")
    evaluate.set_defaults(func=_eval)

    compare = sub.add_parser(
        "compare", help="pair two evaluation runs problem by problem (exact sign test)",
        description="Pair two runs of `dylora-moe eval` on the same problems: how many problems only one of "
        "them solves, and the exact two-sided sign test on those.")
    add_config_options(compare, CompareOptions, positional=("run_a", "run_b"))
    compare.set_defaults(func=_compare)

    analyze = sub.add_parser(
        "analyze", help="routing specialisation of a checkpoint across domains",
        description="Per-domain held-out loss, domain x expert share matrix, normalised mutual information, "
        "router entropy and per-expert load; writes analysis.json and PNGs.")
    add_config_options(analyze, AnalyzeOptions, positional=("checkpoint",))
    analyze.set_defaults(func=_analyze)

    prune = sub.add_parser("prune", help="remove under-used experts (routing load on held-out data), measured "
                           "before and after; refuses what would break the checkpoint")
    add_config_options(prune, PoolEditOptions, positional=("checkpoint",))
    prune.set_defaults(func=_pool_edit, action="prune")
    merge = sub.add_parser("merge-experts", help="merge similar experts (average or TIES), measured before and "
                           "after; refuses what would break the checkpoint")
    add_config_options(merge, PoolEditOptions, positional=("checkpoint",))
    merge.set_defaults(func=_pool_edit, action="merge")


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch  # only commands that run a model import torch (start-up time)

        torch.set_num_threads(threads)


def _eval(ns: argparse.Namespace) -> int:
    config = config_from_options(EvalConfig, ns, source="eval options")
    if config.rescore is not None:
        return _rescore(config)
    if config.references:
        from ..evaluation.scoring import evaluate_references  # torch-free

        summary = evaluate_references(config)
        print(_references_line(summary["references"]))
    else:
        if config.model is None:
            raise EvaluationError("MODEL is required (a checkpoint folder, or a base model with --base-only) "
                                  "unless --references or --rescore is given")
        from ..evaluation.harness import evaluate  # imports torch

        _set_threads(config.threads)
        try:
            summary = evaluate(config=config)
        except KeyboardInterrupt:
            _explain_interruption(Path(config.output))
            raise
        _print_scores(summary)
        if summary.get("resumed_samples"):
            print(f"resumed: {summary['resumed_samples']} samples kept from the interrupted run's journal")
    print(f"wrote {config.output}/results.jsonl and {config.output}/summary.json")
    return 0


def _references_line(refs: dict[str, Any]) -> str:
    line = f"references: {refs['passed']}/{refs['total']} pass"
    if refs["failed_task_ids"]:
        line += f" (failing: {', '.join(refs['failed_task_ids'])})"
    if "pass_body" in refs:
        line += f"; 'pass' bodies: {refs['pass_body']['passed']}/{refs['pass_body']['total']} pass"
    return line


def _rescore(config: EvalConfig) -> int:
    from ..evaluation.scoring import rescore  # torch-free

    if config.output_dir is None:
        raise EvaluationError("--rescore needs --output (a new folder: the stored results are kept as they are)")
    if config.model is not None or config.references:
        raise EvaluationError("--rescore takes no MODEL and no --references: it re-scores stored completions")
    summary = rescore(config.rescore, config)
    _print_scores(summary)
    print(f"stored run: {_scores_text(summary['previous']['pass@k'])}")
    print(f"wrote {config.output_dir}/results.jsonl and {config.output_dir}/summary.json")
    return 0


def _explain_interruption(output: Path) -> None:
    """After Ctrl-C: how many samples the journal kept, and how to go on from them."""
    journal = output / JOURNAL_FILE
    if journal.is_file():
        batches = journal.read_bytes().count(b"\n") - 1
        print(f"dylora-moe: {max(batches, 0)} generated batch(es) are kept in {journal}: run the same command "
              "again to resume from them", file=sys.stderr)


def _scores_text(pass_at_k: dict[str, float | None]) -> str:
    return ", ".join(f"{name} = {'n/a' if v is None else f'{v:.4f}'}" for name, v in pass_at_k.items())


def _print_scores(summary: dict[str, Any]) -> None:
    print(f"{summary['benchmark']}: {summary['problems']} problems, {_scores_text(summary['pass@k'])}")
    print("outcomes: " + json.dumps({k: v for k, v in summary["outcomes"].items() if v}))


def _compare(ns: argparse.Namespace) -> int:
    from ..evaluation.compare import compare_runs

    options = config_from_options(CompareOptions, ns, overrides=False)
    result = compare_runs(options.run_a, options.run_b)
    a, b = result.pass_at_1
    print(f"{result.benchmark or 'benchmark unknown'}: {result.pairs} problems in both runs")
    print(f"  A {options.run_a}: pass@1 {a:.4f}; B {options.run_b}: pass@1 {b:.4f}")
    print(f"  both solve {result.both}, only A {result.only_a}, only B {result.only_b}, neither {result.neither}; "
          f"exact sign test p = {result.p_value:.3f}")
    if options.list:
        print(f"  only A: {' '.join(result.only_a_tasks) or '-'}")
        print(f"  only B: {' '.join(result.only_b_tasks) or '-'}")
    if options.json:
        Path(options.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"wrote {options.json}")
    return 0


def _analyze(ns: argparse.Namespace) -> int:
    options = config_from_options(AnalyzeOptions, ns, overrides=False)

    from ..evaluation.analysis import analyze  # imports torch

    _set_threads(options.threads)
    report = analyze(options.checkpoint, options.data, output_dir=options.output, split=options.split,
                     limit=options.limit, batch_size=options.batch_size, max_seq_length=options.max_seq_length,
                     data_dir=options.data_dir, progress=options.progress)
    nmi = report["nmi"]
    print(f"{len(report['domains'])} domains, {report['num_experts']} experts: "
          f"NMI(domain; expert) = {'n/a' if nmi is None else f'{nmi:.3f}'}, "
          f"router entropy = {report['router_entropy']:.3f} nats")
    for name, domain in report["domains"].items():
        print(f"  {name}: loss {domain['loss']:.4f} over {domain['examples']} examples, "
              f"share {[round(s, 3) for s in domain['expert_share']]}")
    print(f"wrote {options.output}/analysis.json and heatmaps")
    return 0


def _pool_edit(ns: argparse.Namespace) -> int:
    options = config_from_options(PoolEditOptions, ns, overrides=False)

    from ..common.runs import resolve_adapter_dir
    from ..evaluation.pool_edit import merge_checkpoint, prune_checkpoint  # imports torch

    common = {"limit": options.limit, "batch_size": options.batch_size, "max_seq_length": options.max_seq_length,
              "data_dir": options.data_dir, "progress": options.progress}
    checkpoint = resolve_adapter_dir(options.checkpoint)
    if ns.action == "prune":
        remap = dict(tuple(int(x) for x in item.split(":")) for item in options.remap)
        report = prune_checkpoint(checkpoint, options.data, options.output, min_load=options.min_load,
                                  experts=options.experts, remap=remap, **common)
    else:
        groups = [[int(x) for x in item.split("+")] for item in options.groups]
        report = merge_checkpoint(checkpoint, options.data, options.output, min_similarity=options.min_similarity,
                                  groups=groups, method=options.method, density=options.density, **common)
    print("\n".join(report.lines()))
    return 0
