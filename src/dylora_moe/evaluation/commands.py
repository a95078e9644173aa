"""The ``eval``, ``compare`` and ``analyze`` subcommands of the ``dylora-moe`` command line.

``add_commands(subparsers)`` registers them on an argparse subparsers object (the main CLI calls it);
until then, or standalone, run them as ``python -m dylora_moe.evaluation.commands eval ...``::

    dylora-moe eval runs/ckpt --benchmark humaneval --output eval/he
    dylora-moe eval smollm2-135m --base-only --benchmark mbpp --limit 10 --output eval/base-mbpp
    dylora-moe eval --references --benchmark humaneval --output eval/refs      # no model needed
    dylora-moe eval runs/ckpt --n-samples 20 --temperature 0.8 --k 1,10 --output eval/he-k
    dylora-moe eval --rescore eval/he --output eval/he-rescored    # stored completions, today's harness
    dylora-moe compare eval/lora-mbpp eval/moe-mbpp        # paired: problems only one run solves, sign test
    dylora-moe analyze runs/ckpt --data code_alpaca mbpp my_sql.jsonl --output analysis/

Errors (bad options, missing data, a folder that is not a checkpoint, ...) print
``dylora-moe: error: ...`` on stderr and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import USER_ERRORS, EvaluationError

__all__ = ["add_commands", "main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_eval(sub: Any) -> None:
    p = sub.add_parser("eval", help="sandboxed pass@k on HumanEval or MBPP",
                       description="Generate solutions with a DyLoRA-MoE checkpoint (or, with --base-only, a plain "
                                   "base model) and run them in the sandbox; writes results.jsonl and summary.json.")
    p.add_argument("model", nargs="?", help="checkpoint folder; with --base-only a base model name, path or "
                                            "'smollm2-135m'; not needed with --references")
    p.add_argument("--benchmark", choices=("humaneval", "mbpp"), default="humaneval")
    p.add_argument("--limit", type=_positive_int, help="only the first N problems")
    p.add_argument("--n-samples", type=_positive_int, default=1, help="samples per problem (default 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    p.add_argument("--k", default="1", help="comma-separated k values for pass@k (default 1)")
    p.add_argument("--output", default=None, help="output folder (default eval/<benchmark>)")
    p.add_argument("--base-only", action="store_true", help="MODEL is a plain base model, not a checkpoint")
    p.add_argument("--references", action="store_true", help="run the dataset's reference solutions instead")
    p.add_argument("--rescore", metavar="EVAL_DIR", default=None,
                   help="no generation: score the completions stored in EVAL_DIR (an earlier eval's output) again "
                        "through today's code extraction and sandbox; needs --output")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--max-new-tokens", type=_positive_int, default=512)
    p.add_argument("--prompt-style", choices=("auto", "chat", "completion", "instruction"), default="auto",
                   help="auto: chat template when the tokenizer has one, completion prompts otherwise")
    p.add_argument("--workers", type=_positive_int, default=None, help="sandbox workers (default: CPU count)")
    p.add_argument("--timeout", type=float, default=20.0, help="wall-clock seconds per program (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true",
                   help="discard the samples an interrupted run into --output journaled (default: keep them and "
                        "generate only the rest)")
    p.add_argument("--data-dir", default=None, help="data folder holding mbpp/mbpp.jsonl")
    p.add_argument("--device", default="auto", help="auto (CUDA when available, default), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="weights and activations while generating (default float32)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_guarded(_cmd_eval))


def _add_analyze(sub: Any) -> None:
    p = sub.add_parser("analyze", help="routing specialisation of a checkpoint across domains",
                       description="Per-domain held-out loss, domain x expert share matrix, normalised mutual "
                                   "information, router entropy and per-expert load; writes analysis.json and PNGs.")
    p.add_argument("checkpoint", help="DyLoRA-MoE checkpoint folder")
    p.add_argument("--data", nargs="+", required=True, metavar="NAME_OR_FILE",
                   help="registered dataset names (code_alpaca, mbpp) or JSON/JSONL instruction files")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--split", default="validation", help="split of each dataset (default validation)")
    p.add_argument("--limit", type=_positive_int, default=None, help="at most N examples per domain")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--max-seq-length", type=_positive_int, default=512)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_guarded(_cmd_analyze))


def _add_compare(sub: Any) -> None:
    p = sub.add_parser("compare", help="pair two evaluation runs problem by problem (exact sign test)",
                       description="Pair two runs of `dylora-moe eval` on the same problems: how many problems "
                       "only one of them solves, and the exact two-sided sign test on those.")
    p.add_argument("run_a", help="folder of the first run (results.jsonl)")
    p.add_argument("run_b", help="folder of the second run")
    p.add_argument("--json", default=None, help="also write the comparison here")
    p.add_argument("--list", action="store_true", help="print the task ids only one run solves")
    p.set_defaults(func=_guarded(_cmd_compare))


def add_commands(subparsers: Any) -> None:
    """Register the ``eval``, ``compare`` and ``analyze`` subcommands (each sets ``func`` returning an exit
    status)."""
    _add_eval(subparsers)
    _add_compare(subparsers)
    _add_analyze(subparsers)


def _guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the expected errors into ``dylora-moe: error: ...`` and exit status 2."""

    def run(ns: argparse.Namespace) -> int:
        try:
            return command(ns)
        except (ValueError, *USER_ERRORS, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
            print(f"dylora-moe: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("dylora-moe: interrupted", file=sys.stderr)
            return 130

    return run


def _threads(ns: argparse.Namespace) -> None:
    if ns.threads:
        import torch

        torch.set_num_threads(ns.threads)


def _cmd_eval(ns: argparse.Namespace) -> int:
    if ns.timeout <= 0:
        raise EvaluationError(f"--timeout must be > 0, got {ns.timeout}")
    if ns.rescore is not None:
        return _cmd_rescore(ns)
    if ns.model is None and not ns.references:
        raise EvaluationError("MODEL is required (a checkpoint folder, or a base model with --base-only) "
                              "unless --references or --rescore is given")
    output = ns.output or f"eval/{ns.benchmark}"
    if ns.references:  # no model: torch is never imported
        from .scoring import evaluate_references

        summary = evaluate_references(ns.benchmark, output, limit=ns.limit, workers=ns.workers,
                                      timeout_s=ns.timeout, data_dir=ns.data_dir, progress=not ns.no_progress)
    else:
        from .harness import evaluate

        _threads(ns)
        try:
            summary = evaluate(
                ns.model, benchmark=ns.benchmark, output_dir=output, limit=ns.limit, n_samples=ns.n_samples,
                temperature=ns.temperature, top_p=ns.top_p, k=ns.k, batch_size=ns.batch_size,
                max_new_tokens=ns.max_new_tokens, prompt_style=ns.prompt_style, seed=ns.seed, workers=ns.workers,
                timeout_s=ns.timeout, data_dir=ns.data_dir, base_only=ns.base_only, progress=not ns.no_progress,
                device=ns.device, dtype=ns.dtype, resume=not ns.no_resume,
            )
        except KeyboardInterrupt:
            _explain_interruption(Path(output))
            raise
    if ns.references:
        refs = summary["references"]
        line = f"references: {refs['passed']}/{refs['total']} pass"
        if refs["failed_task_ids"]:
            line += f" (failing: {', '.join(refs['failed_task_ids'])})"
        if "pass_body" in refs:
            line += f"; 'pass' bodies: {refs['pass_body']['passed']}/{refs['pass_body']['total']} pass"
        print(line)
    else:
        _print_scores(summary)
        if summary.get("resumed_samples"):
            print(f"resumed: {summary['resumed_samples']} samples kept from the interrupted run's journal")
    print(f"wrote {output}/results.jsonl and {output}/summary.json")
    return 0


def _explain_interruption(output: Path) -> None:
    """After Ctrl-C: how many samples the journal kept, and how to go on from them."""
    from .journal import JOURNAL_FILE

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


def _cmd_rescore(ns: argparse.Namespace) -> int:
    from .scoring import rescore

    if ns.output is None:
        raise EvaluationError("--rescore needs --output (a new folder: the stored results are kept as they are)")
    if ns.model is not None or ns.references:
        raise EvaluationError("--rescore takes no MODEL and no --references: it re-scores stored completions")
    summary = rescore(ns.rescore, output_dir=ns.output, workers=ns.workers, timeout_s=ns.timeout,
                      data_dir=ns.data_dir, progress=not ns.no_progress)
    _print_scores(summary)
    print(f"stored run: {_scores_text(summary['previous']['pass@k'])}")
    print(f"wrote {ns.output}/results.jsonl and {ns.output}/summary.json")
    return 0


def _cmd_compare(ns: argparse.Namespace) -> int:
    from .compare import compare_runs

    result = compare_runs(ns.run_a, ns.run_b)
    a, b = result.pass_at_1
    print(f"{result.benchmark or 'benchmark unknown'}: {result.pairs} problems in both runs")
    print(f"  A {ns.run_a}: pass@1 {a:.4f}; B {ns.run_b}: pass@1 {b:.4f}")
    print(f"  both solve {result.both}, only A {result.only_a}, only B {result.only_b}, neither {result.neither}; "
          f"exact sign test p = {result.p_value:.3f}")
    if ns.list:
        print(f"  only A: {' '.join(result.only_a_tasks) or '-'}")
        print(f"  only B: {' '.join(result.only_b_tasks) or '-'}")
    if ns.json:
        Path(ns.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"wrote {ns.json}")
    return 0


def _cmd_analyze(ns: argparse.Namespace) -> int:
    from .analysis import analyze

    _threads(ns)
    report = analyze(ns.checkpoint, ns.data, output_dir=ns.output, split=ns.split, limit=ns.limit,
                     batch_size=ns.batch_size, max_seq_length=ns.max_seq_length, data_dir=ns.data_dir,
                     progress=not ns.no_progress)
    nmi = report["nmi"]
    print(f"{len(report['domains'])} domains, {report['num_experts']} experts: "
          f"NMI(domain; expert) = {'n/a' if nmi is None else f'{nmi:.3f}'}, "
          f"router entropy = {report['router_entropy']:.3f} nats")
    for name, domain in report["domains"].items():
        print(f"  {name}: loss {domain['loss']:.4f} over {domain['examples']} examples, "
              f"share {[round(s, 3) for s in domain['expert_share']]}")
    print(f"wrote {ns.output}/analysis.json and heatmaps")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m dylora_moe.evaluation.commands {eval,analyze} ...``."""
    parser = argparse.ArgumentParser(prog="dylora-moe", description="DyLoRA-MoE evaluation commands")
    add_commands(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
