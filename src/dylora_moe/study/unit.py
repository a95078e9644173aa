"""One unit of the study (one variant, one seed): train, analyse routing, measure pass@1; ``unit.json``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..common.inference import load_for_eval
from ..data import load_examples
from ..evaluation.analysis import analyze
from ..evaluation.compare import read_verdicts
from ..evaluation.exact_match import exact_match
from ..evaluation.harness import evaluate
from ..layout import WEIGHTS_FILE
from ..training.data import dataset_spec
from ..training.trainer import JointTrainer
from .config import STUDY_FORMAT_VERSION, UNIT_FILE, StudyConfig, StudyError, VariantConfig
from .records import per_decision, write_json


def run_unit(study: StudyConfig, variant: VariantConfig, seed: int, progress: bool = True) -> dict[str, Any]:
    """Train, analyse and evaluate one (variant, seed); returns (and writes) the unit's ``unit.json``.

    Each pass@1 keeps its per-problem ``verdicts`` (``{task_id: passed}``) in ``unit.json``, so the study can
    pair two units problem by problem after their ``eval/`` folders are gone (another machine, say).

    ``unit.json`` is written after training and the routing analysis, then rewritten after each benchmark's
    pass@1, so a unit cut short keeps what it measured. A unit whose ``unit.json`` lacks a pass@1 the study
    asks for (cut short, or run earlier with fewer benchmarks) resumes from its saved adapter and only
    evaluates what is missing (or, when that adapter is gone, runs again from training).
    """
    done = study.unit_dir(variant.name, seed) / UNIT_FILE
    unit = json.loads(done.read_text()) if done.is_file() else None
    if unit is not None and not _unit_stale(study, variant, unit):
        return unit
    config = study.unit_train_config(variant, seed)
    adapter = done.parent / "train" / "final"
    earlier = None
    if unit is not None and not (adapter / WEIGHTS_FILE).is_file():
        if not _missing_metrics(study, variant, unit):  # only the per-decision routing view is missing:
            return unit                                      # keep the unit; without its adapter it stays so
        print(f"{variant.name} seed {seed}: {done} lacks pass@1 and its adapter {adapter} is gone: "
              "training the unit again (the pass@1 it has is kept if the training reproduces its losses)",
              flush=True)
        earlier, unit = unit, None
    if unit is None:
        unit, model, tokenizer = _train_and_analyse(study, variant, seed, config, progress)
        if earlier is not None and keep_earlier_pass_at_1(unit, earlier):
            write_json(done, unit)
    else:
        model, tokenizer = load_for_eval(adapter, device=study.device)
        model.eval()
        if per_decision(unit, "share_matrix", done.parent) is None:  # from before the per-decision view
            unit.update(_analyse(study, variant, seed, config, model, tokenizer, progress))
            write_json(done, unit)
    for benchmark in _missing_benchmarks(study, variant, unit):
        unit["pass_at_1"][benchmark] = _pass_at_1(study, model, tokenizer, benchmark, done.parent, config, progress)
        write_json(done, unit)
    for domain in _missing_exact_match(study, variant, unit):
        unit.setdefault("exact_match", {})[domain] = _exact_match(study, model, tokenizer, domain, config, progress)
        write_json(done, unit)
    return unit


REPRODUCED_LOSS_TOLERANCE = 1e-3
"""Held-out losses of a unit trained again within this of the earlier training's (per domain, same token
digests) count as the same training: the pass@1 measured on the earlier adapter still describes it. Training
again on the same machine reproduces the losses to about 2e-5, the CPU and a GPU agree to about 3e-4."""


def keep_earlier_pass_at_1(unit: dict[str, Any], earlier: dict[str, Any]) -> bool:
    """Copy into ``unit`` (trained again) the pass@1 its ``earlier`` record measured, when the two trainings
    are the same (same token digests, held-out losses within :data:`REPRODUCED_LOSS_TOLERANCE`). Each kept
    entry notes the earlier training's losses (``from_earlier_training``). Returns whether anything was kept;
    when the trainings differ, nothing is, and the study measures every benchmark it asks for again."""
    before, now = earlier.get("eval_loss_end") or {}, unit["eval_loss_end"]
    same = (earlier.get("data_sha256") == unit.get("data_sha256") and set(before) == set(now)
            and all(abs(before[d] - now[d]) <= REPRODUCED_LOSS_TOLERANCE for d in now))
    kept = {b: r for b, r in (earlier.get("pass_at_1") or {}).items() if b not in unit["pass_at_1"]}
    if not same or not kept:
        if kept:
            print(f"{unit['variant']} seed {unit['seed']}: held-out losses {now} differ from the earlier "
                  f"training's {before}: the pass@1 measured on that training ({', '.join(kept)}) is not kept",
                  flush=True)
        return False
    for benchmark, result in kept.items():
        unit["pass_at_1"][benchmark] = {**result, "from_earlier_training": {"eval_loss_end": before}}
    return True


def _missing_benchmarks(study: StudyConfig, variant: VariantConfig, unit: dict[str, Any]) -> list[str]:
    return [b for b in study.benchmarks if variant.pass_at_1 and b not in unit["pass_at_1"]]


def _missing_exact_match(study: StudyConfig, variant: VariantConfig, unit: dict[str, Any]) -> list[str]:
    return [d for d in study.exact_match if variant.pass_at_1 and d not in unit.get("exact_match", {})]


def _missing_metrics(study: StudyConfig, variant: VariantConfig, unit: dict[str, Any]) -> list[str]:
    """The pass@1 benchmarks and exact-match domains the study asks of the unit that it lacks."""
    return [*_missing_benchmarks(study, variant, unit), *_missing_exact_match(study, variant, unit)]


def _unit_stale(study: StudyConfig, variant: VariantConfig, unit: dict[str, Any]) -> bool:
    """The unit lacks a pass@1 the study asks for, or (with its adapter still there) the per-decision routing
    view where it differs from the per-example one (token routing), which units written before it lack."""
    if _missing_metrics(study, variant, unit):
        return True
    unit_dir = study.unit_dir(variant.name, unit["seed"])
    adapter = unit_dir / "train" / "final" / WEIGHTS_FILE
    return per_decision(unit, "share_matrix", unit_dir) is None and adapter.is_file()


def _pass_at_1(study: StudyConfig, model: Any, tokenizer: Any, benchmark: str, unit_dir: Path, config: Any,
               progress: bool) -> dict[str, Any]:
    summary = evaluate(model, tokenizer, benchmark=benchmark, output_dir=unit_dir / "eval" / benchmark,
                       expert=_oracle_expert(config, "mbpp"),
                       limit=study.eval_limit, batch_size=study.eval_batch_size,
                       max_new_tokens=study.max_new_tokens, workers=study.eval_workers,
                       data_dir=config.data.data_dir, progress=progress,
                       overwrite=True)  # a unit trained again replaces its stale pass@1 (the journal still resumes)
    return {"pass@1": summary["pass@k"]["pass@1"], "problems": summary["problems"],
            "outcomes": summary["outcomes"], "experts": summary["experts"],
            "eval_time_s": summary["timing"]["total_s"], "resumed_samples": summary.get("resumed_samples", 0),
            "verdicts": read_verdicts(unit_dir / "eval" / benchmark)}


def _oracle_expert(config: Any, domain: str) -> int | None:
    """With oracle routing (``train.route_by_domain``): the expert of ``domain``, else None (the router)."""
    if not config.train.route_by_domain:
        return None
    labels = [ds.domain_label for ds in config.data.datasets]
    if domain not in labels:
        raise StudyError(f"oracle routing: no dataset of domain {domain!r} to route to (domains: {labels})")
    return labels.index(domain)


def _exact_match(study: StudyConfig, model: Any, tokenizer: Any, domain: str, config: Any,
                 progress: bool) -> dict[str, Any]:
    """Numeric exact match on ``domain``'s held-out examples (the train config's dataset of that domain)."""
    specs = [dataset_spec(ds, i, "validation", study.exact_match_limit) for i, ds in enumerate(config.data.datasets)
             if ds.domain_label == domain]
    if not specs:
        raise StudyError(f"exact_match: {domain!r} is not a domain of the train config")
    started = time.monotonic()
    result = exact_match(model, tokenizer, load_examples(specs[0], config.data.data_dir),
                         batch_size=study.eval_batch_size, forced_expert=_oracle_expert(config, domain),
                         progress=progress)
    return {"exact_match": result.accuracy, "correct": result.correct, "total": result.total,
            "eval_time_s": time.monotonic() - started}


def _train_and_analyse(study: StudyConfig, variant: VariantConfig, seed: int, config: Any,
                       progress: bool) -> tuple[dict[str, Any], Any, Any]:
    """Train the unit, run the routing analysis, write ``unit.json`` (no pass@1 yet); ``(unit, model, tok)``."""
    unit_dir = study.unit_dir(variant.name, seed)
    started = time.monotonic()
    metrics = finished_training(unit_dir / "train", config)
    earlier = 0.0 if metrics is None else float(metrics.get("wall_time_s") or 0.0)  # the reused training's time
    if metrics is None:
        result = JointTrainer(config).train()
        metrics = result.metrics
        del result
    else:
        print(f"{variant.name} seed {seed}: training finished earlier ({unit_dir / 'train'}): analysing its adapter",
              flush=True)
    model, tokenizer = load_for_eval(unit_dir / "train" / "final", device=study.device)
    model.eval()
    routing = _analyse(study, variant, seed, config, model, tokenizer, progress)
    unit = {
        "format_version": STUDY_FORMAT_VERSION,
        "variant": variant.name,
        "group": variant.group,
        "seed": seed,
        "overrides": [*study.overrides, *variant.overrides],
        "moe": model.moe_config.to_dict(),
        "num_experts": model.num_experts,
        "trainable_parameters": sum(p.numel() for p in model.expert_parameters()),
        "router_parameters": sum(p.numel() for p in model.router_parameters()),
        "steps": metrics["global_step"],
        "precision": metrics["precision"],
        "train_time_s": metrics["train_time_s"],
        "peak_memory_mib": metrics.get("peak_memory_mib"),
        "unit_time_s": time.monotonic() - started + earlier,
        "device": str(next(model.parameters()).device),
        "eval_loss_start": metrics["eval_loss"]["start"],
        "eval_loss_end": metrics["eval_loss"]["end"],
        "eval_curve": [{"step": h["step"], **{d: h["domains"][d]["loss"] for d in h["domains"]}}
                       for h in metrics["eval_history"]],
        "train_curve": [{"step": r["step"], "loss": r.get("lm_loss", r.get("loss"))} for r in metrics["train_log"]],
        "pass_at_1": {},
        "data_sha256": {split: metrics["data"][split]["sha256"] for split in ("train", "validation")},
        "special_tokens": metrics["special_tokens"],
        "versions": metrics["versions"],
        **routing,
    }
    write_json(unit_dir / UNIT_FILE, unit)
    return unit, model, tokenizer


def finished_training(train_dir: Path, config: Any) -> dict[str, Any] | None:
    """``metrics.json`` of a training run in ``train_dir`` that finished with exactly ``config`` (its final
    adapter saved, every step done; whether it was resumed on the way does not matter), else None. A unit that
    died after training (in the routing analysis, say) then resumes from its adapter instead of training again."""
    metrics_path, saved = train_dir / "metrics.json", train_dir / "train_config.json"
    if not ((train_dir / "final" / WEIGHTS_FILE).is_file() and metrics_path.is_file() and saved.is_file()):
        return None
    try:
        metrics = json.loads(metrics_path.read_text())
        same = _trained_as(json.loads(saved.read_text()).get("config")) == _trained_as(
            json.loads(config.to_json())["config"])
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
        return None
    if not same or metrics.get("global_step") != metrics.get("total_steps"):
        return None
    return metrics


#: train config fields that say how a run was started, not what it trains (a run finished by resuming it is the same
#: training: the exact-resume tests hold it to that)
RUN_CONTROL_FIELDS = ("resume", "overwrite_output_dir")


def _trained_as(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in RUN_CONTROL_FIELDS}


def _analyse(study: StudyConfig, variant: VariantConfig, seed: int, config: Any, model: Any, tokenizer: Any,
             progress: bool) -> dict[str, Any]:
    """The unit's routing analysis on the validation splits: per example (``share_matrix``, ``nmi``,
    ``router_entropy``, ``expert_load``) and per routing decision (``decision_*``; token routing decides
    per token and layer, so only this view shows what the routers do)."""
    data = [d.path or d.name for d in config.data.datasets]
    with torch.inference_mode():
        analysis = analyze(model, data, tokenizer=tokenizer, output_dir=study.unit_dir(variant.name, seed) / "analysis",
                           limit=study.analysis_examples, batch_size=config.data.eval_batch_size,
                           max_seq_length=config.data.max_seq_length, data_dir=config.data.data_dir,
                           progress=progress)
    load = analysis["expert_load"]
    return {
        "domains": [d.domain or d.name for d in config.data.datasets],
        "share_matrix": analysis["share_matrix"],
        "nmi": analysis["nmi"],
        "nmi_interval": analysis["nmi_interval"],
        "count_matrix": analysis["count_matrix"],
        "router_entropy": analysis["router_entropy"],
        "expert_load": load,
        "load_imbalance": max(load) / (1.0 / len(load)) if load else None,
        "routing_unit": analysis["routing_unit"],
        "decision_share_matrix": analysis["decision_share_matrix"],
        "decision_nmi": analysis["decision_nmi"],
        "decision_entropy": analysis["decision_entropy"],
        "mean_k": analysis["decision_active_experts"],
        "thresholds": [float(torch.sigmoid(p.detach()).item()) for p in model.threshold_parameters()],
        "analysis_loss": {d: analysis["domains"][d]["loss"] for d in analysis["domain_names"]},
    }
