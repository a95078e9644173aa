"""The continual-learning benchmark: skills learned one after another, in several orders, DyLoRA-MoE against
sequential LoRA, replay LoRA and O-LoRA, with the multi-task and oracle bounds (study/continual_baselines.py).

``run_continual(ContinualRunConfig(...))`` (CLI: ``dylora-moe continual --config configs/continual-five.yaml``)
measures, for every task order (``orders``) and sequential method, the held-out loss of every skill after every
stage (and numeric exact match for the ``exact_match`` skills), with no task identity at inference. From those
matrices (:mod:`dylora_moe.continual.metrics`): average performance after the last stage (AP), backward transfer (BWT),
forgetting (FT) and forward transfer (FWT, against the base model's losses before training). DyLoRA-MoE also
reports its novelty detector's precision and recall on a labelled stream (held-out batches of known skills must
not be flagged, the next skill's batches must be) and its router's accuracy: the share of each skill's held-out
inputs sent to that skill's expert. Written to ``output_dir``:

* ``units/<method>[-order<k>].json``: one per method and order, written when it finishes; a run resumes from
  them (a unit whose settings differ is run again);
* ``continual.json``: the units, the summary (mean and spread over orders) and the bar of issue #29;
* ``continual.png``: the skill x stage matrices of the first order; ``routing.png``: DyLoRA's routing accuracy.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomically
from ..continual.config import ContinualConfig, ContinualRunConfig
from ..continual.learner import batched_outputs, learn_skill
from ..continual.library import SkillLibrary, embedding_and_spread
from ..continual.metrics import continual_metrics, forgetting_metrics, routing_accuracy
from ..continual.novelty import NoveltyDetector
from ..continual.skills import load_skill_examples
from ..data import Example
from ..evaluation.exact_match import exact_match
from .continual_baselines import lora_model, run_multitask_lora, run_olora, run_oracle, run_sequential_lora

__all__ = ["ContinualRunConfig", "forgetting_metrics", "run_continual", "skill_loss"]

REPORT_VERSION = 2
SEQUENTIAL = ("dylora", "sequential_lora", "replay_lora", "olora")


def _split(source: str, split: str, limit: int | None, data_dir: str | None) -> list[Example]:
    """Training examples (``split="train"``) or held-out ones (``"held_out"``: the validation split)."""
    return load_skill_examples(source, split="validation" if split == "held_out" else "train", limit=limit,
                               data_dir=data_dir)


def skill_loss(model: Any, tokenizer: Any, examples: list[Example], batch_size: int = 8,
               max_seq_length: int = 512) -> float:
    """Token-weighted cross-entropy on the response tokens of ``examples`` (normal routing, eval mode)."""
    total, tokens = 0.0, 0
    for inputs, out in batched_outputs(model, tokenizer, examples, batch_size=batch_size,
                                       max_seq_length=max_seq_length):
        count = int((inputs["labels"][:, 1:] != -100).sum())
        total += float(out.lm_loss) * count
        tokens += count
    return total / max(tokens, 1)


class _Skills:
    """The skills' names, training and held-out examples, and their evaluation (loss, exact match)."""

    def __init__(self, run: ContinualRunConfig, tokenizer: Any) -> None:
        self.run, self.tokenizer = run, tokenizer
        self.names = [Path(s).stem if s.endswith((".json", ".jsonl")) else s.replace(":", "-") for s in run.stages]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"stages must be distinct skills, got {run.stages}")
        self.train = [_split(s, "train", run.train_examples, run.data_dir) for s in run.stages]
        self.held_out = [_split(s, "held_out", run.eval_examples, run.data_dir) for s in run.stages]
        for name, a, b in zip(self.names, self.train, self.held_out):
            if not a or not b:
                raise ValueError(f"stage {name!r}: {len(a)} training and {len(b)} held-out examples; both must be "
                                 "> 0")
        self.exact = {self.names[run.stages.index(s)] for s in run.exact_match}

    def evaluate_one(self, model: Any, name: str) -> dict[str, float]:
        i, tokenizer = self.names.index(name), self.tokenizer
        config = self.run.continual
        row = {"loss": skill_loss(model, tokenizer, self.held_out[i], self.run.eval_batch_size,
                                  config.max_seq_length)}
        if name in self.exact:
            result = exact_match(model, tokenizer, self.held_out[i][: self.run.exact_match_limit],
                                 batch_size=self.run.eval_batch_size, progress=False)
            row["exact_match"] = result.accuracy
        return row

    def evaluate(self, model: Any) -> dict[str, dict[str, float]]:
        return {name: self.evaluate_one(model, name) for name in self.names}


def _fingerprint(run: ContinualRunConfig, order: list[int] | None) -> dict[str, Any]:
    """What a unit's results depend on: a finished unit with another fingerprint is run again."""
    keep = ("model", "stages", "train_examples", "eval_examples", "rank", "multitask_rank", "olora_lambda",
            "exact_match", "exact_match_limit", "detector_batches", "detector_batch_size", "data_dir")
    return {**{k: getattr(run, k) for k in keep}, "continual": asdict(run.continual), "order": order}


def _matrices(rows: list[dict[str, dict[str, float]]], names: list[str], metric: str) -> list[list[float]]:
    return [[row[n][metric] for n in names] for row in rows]


def _sequential_unit(run: ContinualRunConfig, skills: _Skills, method: str, order: list[int],
                     before: dict[str, dict[str, float]], progress: bool,
                     variant: ContinualConfig | None = None) -> dict[str, Any]:
    """Run one sequential method in one order; the loss (and exact-match) matrix in that order, and metrics.
    ``variant``: DyLoRA-MoE with these settings (another router protection), without the detector's stream."""
    names = [skills.names[i] for i in order]
    train = [skills.train[i] for i in order]
    started = time.monotonic()
    if variant is not None:
        result = _run_dylora(run, variant, skills, order, progress, detector_stream=False)
    elif method == "dylora":
        result = _run_dylora(run, run.continual, skills, order, progress)
    elif method in ("sequential_lora", "replay_lora"):
        result = run_sequential_lora(run, train, names, skills.evaluate, replay=method == "replay_lora",
                                     progress=progress)
    else:
        result = run_olora(run, train, names, skills.evaluate, progress=progress)
    rows = result.pop("rows")
    loss = _matrices(rows, names, "loss")
    unit = {"method": method, "order": order, "skills": names, "loss": loss,
            "metrics": continual_metrics(loss, [before[n]["loss"] for n in names]), "final": rows[-1],
            **forgetting_metrics(loss), **result, "seconds": time.monotonic() - started}
    exact = [n for n in names if n in skills.exact]
    if exact:
        unit["exact_match"] = {"skills": exact, "matrix": _matrices(rows, exact, "exact_match")}
    return unit


def _stream(detector: NoveltyDetector, model: Any, tokenizer: Any, library: SkillLibrary, batches: list[list[Example]],
            max_seq_length: int) -> list[bool]:
    decisions = []
    for batch in batches:
        vec, spread = embedding_and_spread(model, tokenizer, batch, max_seq_length=max_seq_length)
        decisions.append(detector.decide(vec, library, spread=spread, count=len(batch)).novel)
    return decisions


def _run_dylora(run: ContinualRunConfig, config: ContinualConfig, skills: _Skills, order: list[int],
                progress: bool, detector_stream: bool = True) -> dict[str, Any]:
    """DyLoRA-MoE on the skills in ``order``: ``rows`` (evaluations after each stage), the stages, the detector's
    stream counts and the router's accuracy at the end."""
    model, tokenizer = lora_model(run, run.rank, mature=False)
    names = [skills.names[i] for i in order]
    rows, stages, stream = [], [], {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    rng = random.Random(config.seed)
    detector = NoveltyDetector(config.threshold, config.reduction, similarity=config.similarity)
    expert_of: dict[str, int] = {}
    for k, i in enumerate(order):
        name, examples = skills.names[i], skills.train[i]
        library = model.skill_library or SkillLibrary()
        if detector_stream and len(library):  # labelled stream: known skills' held-out batches, then the new one's
            size = run.detector_batch_size
            known = [rng.sample(skills.held_out[j], min(size, len(skills.held_out[j])))
                     for j in order[:k] for _ in range(run.detector_batches)]
            new = [rng.sample(examples, min(size, len(examples))) for _ in range(run.detector_batches)]
            for novel in _stream(detector, model, tokenizer, library, known, config.max_seq_length):
                stream["fp" if novel else "tn"] += 1
            for novel in _stream(detector, model, tokenizer, library, new, config.max_seq_length):
                stream["tp" if novel else "fn"] += 1
        started = time.monotonic()
        result = learn_skill(model, tokenizer, examples, name, config, progress=progress)
        expert_of[name] = result.expert
        rows.append(skills.evaluate(model))
        stages.append({"skill": name, "created": result.created, "expert": result.expert, "rank": result.rank,
                       "decision": asdict(result.decision), "seconds": time.monotonic() - started,
                       "final_lm_loss": result.losses[-1]["lm_loss"] if result.losses else None,
                       "guard": asdict(result.guard) if result.guard is not None else None})
        print(f"[dylora {config.protection}] stage {k} {name}: {result.summary()}; held-out losses "
              f"{ {n: round(v['loss'], 4) for n, v in rows[-1].items()} }", flush=True)
    shares = {}
    for name in names:
        held = skills.held_out[skills.names.index(name)]
        choices = [c for _, out in batched_outputs(model, tokenizer, held, batch_size=run.eval_batch_size,
                                                   max_seq_length=config.max_seq_length)
                   for c in out.expert_choice.tolist()]
        shares[name] = [choices.count(e) / max(len(choices), 1) for e in range(model.num_experts)]
    tp, fp, fn = stream["tp"], stream["fp"], stream["fn"]
    return {"rows": rows, "stages": stages, "routing_share": shares, "expert_of": expert_of,
            "routing_accuracy": routing_accuracy(shares, expert_of), "num_experts": model.num_experts,
            "expert_ranks": list(model.expert_ranks),
            "detector": {**stream, "precision": tp / (tp + fp) if tp + fp else None,
                         "recall": tp / (tp + fn) if tp + fn else None, "threshold": config.resolved_threshold(),
                         "similarity": config.similarity}}


def _unit(out: Path, key: str, fingerprint: dict[str, Any], make: Any) -> dict[str, Any]:
    """The finished unit ``key`` from ``out/units``, or ``make()`` written there (atomically) when it is missing
    or was measured with other settings."""
    path = out / "units" / f"{key}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == fingerprint:
            print(f"unit {key}: done before ({path})", flush=True)
            return saved
        print(f"unit {key}: {path} was measured with other settings; running it again", flush=True)
    unit = {**make(), "fingerprint": fingerprint}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(unit, indent=2) + "\n")
    return unit


def _spread(values: list[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values) if values else None,
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0 if values else None,
            "min": min(values) if values else None, "max": max(values) if values else None}


def _summary(units: dict[str, Any], bounds: dict[str, float]) -> dict[str, Any]:
    """Per sequential method: AP, BWT, FT, FWT over the orders (mean, sd, min, max)."""
    summary: dict[str, Any] = {}
    for unit in units.values():
        summary.setdefault(unit["method"], []).append(unit)
    table: dict[str, Any] = {}
    for method, runs in summary.items():
        table[method] = {m: _spread([r["metrics"][m] for r in runs if r["metrics"][m] is not None])
                         for m in ("ap", "bwt", "ft", "fwt", "max_forgetting")}
        table[method]["orders"] = len(runs)
    table.update({name: {"ap": _spread([value])} for name, value in bounds.items()})
    return table


def _bar(units: dict[str, Any], bounds: dict[str, float]) -> dict[str, Any]:
    """Issue #29's bar: DyLoRA's AP within 3% of the multi-task bound, BWT >= -1%, ahead of every sequential
    baseline on AP and BWT in every order, detector precision and recall >= 0.9."""
    ours = [u for u in units.values() if u["method"] == "dylora"]
    checks: dict[str, Any] = {}
    if ours and "multitask_lora" in bounds:
        limit = 1.03 * bounds["multitask_lora"]
        checks["ap_within_3pct_of_multitask"] = all(u["metrics"]["ap"] <= limit for u in ours)
    if ours:
        checks["bwt_at_least_minus_1pct"] = all((u["metrics"]["bwt"] or 0.0) >= -0.01 for u in ours)
        for u in ours:
            for other in units.values():
                if other["method"] != "dylora" and other["order"] == u["order"]:
                    name = f"ahead_of_{other['method']}"
                    ahead = (u["metrics"]["ap"] < other["metrics"]["ap"]
                             and (u["metrics"]["bwt"] or 0.0) > (other["metrics"]["bwt"] or 0.0))
                    checks[name] = checks.get(name, True) and ahead
        tp = sum(u["detector"]["tp"] for u in ours)
        fp = sum(u["detector"]["fp"] for u in ours)
        fn = sum(u["detector"]["fn"] for u in ours)
        precision, recall = (tp / (tp + fp) if tp + fp else None), (tp / (tp + fn) if tp + fn else None)
        checks["detector_precision"], checks["detector_recall"] = precision, recall
        checks["detector_at_least_0.9"] = precision is not None and recall is not None and min(precision, recall) >= 0.9
    checks["met"] = bool(ours) and all(v for k, v in checks.items() if isinstance(v, bool))
    return checks


def run_continual(run: ContinualRunConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the benchmark; returns and writes ``continual.json`` and the plots."""
    run.validate()
    out = Path(run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    methods = run.active_methods()
    fresh: Any
    fresh, tokenizer = lora_model(run, 1)  # its one expert computes exactly the base model
    skills = _Skills(run, tokenizer)
    before = _unit(out, "before", _fingerprint(run, None), lambda: {"final": skills.evaluate(fresh)})["final"]
    fresh = None  # its memory back before the methods train
    units: dict[str, Any] = {}
    for k, order in enumerate(run.task_orders()):
        for method in [m for m in methods if m in SEQUENTIAL]:
            key = f"{method}-order{k}"
            units[key] = _unit(out, key, _fingerprint(run, order),
                               lambda m=method, o=order: _sequential_unit(run, skills, m, o, before, progress))
        for protection in run.protections:
            if protection != run.continual.protection and "dylora" in methods:
                variant = ContinualConfig(**{**asdict(run.continual), "protection": protection})
                key = f"dylora_{protection}-order{k}"
                units[key] = _unit(out, key, _fingerprint(run, order), lambda v=variant, o=order: _sequential_unit(
                    run, skills, f"dylora_{v.protection}", o, before, progress, variant=v))
    bounds_units: dict[str, Any] = {}
    makers = {"multitask_lora": lambda: run_multitask_lora(run, skills.train, skills.evaluate, progress=progress),
              "oracle": lambda: run_oracle(run, skills.train, skills.names, skills.evaluate_one, progress=progress)}
    for name in [m for m in methods if m in makers]:
        bounds_units[name] = _unit(out, name, _fingerprint(run, None), makers[name])
    bounds = {name: statistics.fmean(v["loss"] for v in unit["final"].values()) for name, unit in bounds_units.items()}
    report: dict[str, Any] = {"format_version": REPORT_VERSION, "run": asdict(run), "skills": skills.names,
                              "orders": run.task_orders(), "train_examples": [len(t) for t in skills.train],
                              "held_out_examples": [len(h) for h in skills.held_out], "before": before,
                              "units": units, "bounds": bounds_units,
                              "summary": _summary(units, bounds), "bar": _bar(units, bounds),
                              "seconds": time.monotonic() - started}
    write_text_atomically(out / "continual.json", json.dumps(report, indent=2) + "\n")
    _plot(report, out / "continual.png")
    return report


def _plot(report: dict[str, Any], path: Path) -> None:
    """The skill x stage loss matrices of the first order (with each skill's rise since its own stage), one
    panel per sequential method, and DyLoRA-MoE's routing accuracy per skill and order."""
    import matplotlib  # here, not at the top: start-up time (only the plot needs it)

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    first = [u for u in report["units"].values() if u["order"] == report["orders"][0]]
    ours = [u for u in report["units"].values() if "routing_accuracy" in u]
    panels = len(first) + (1 if ours else 0)
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(4.2 * max(panels, 1), 3.8), squeeze=False,
                             layout="constrained")
    for ax, unit in zip(axes[0], first):
        matrix, names = unit["loss"], unit["skills"]
        rel = [[(matrix[i][j] - matrix[j][j]) / matrix[j][j] if i >= j else float("nan") for j in range(len(names))]
               for i in range(len(matrix))]
        ax.imshow(rel, cmap="coolwarm", vmin=-0.1, vmax=0.1)
        for i, row in enumerate(rel):
            for j, value in enumerate(row):
                if i >= j:
                    ax.text(j, i, f"{matrix[i][j]:.3f}\n{value:+.1%}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(names)), names, fontsize=7, rotation=20)
        ax.set_yticks(range(len(matrix)), [f"after {n}" for n in names[: len(matrix)]], fontsize=7)
        m = unit["metrics"]
        bwt = f", BWT {m['bwt']:+.1%}" if m["bwt"] is not None else ""
        ax.set_title(f"{unit['method']}: AP {m['ap']:.3f}{bwt}", fontsize=9)
    if ours:
        ax = axes[0][len(first)]
        names = report["skills"]
        width = 0.8 / len(ours)
        for k, unit in enumerate(ours):
            acc = unit["routing_accuracy"]
            ax.bar([j + k * width for j in range(len(names))], [acc.get(n, 0.0) for n in names], width,
                   label=f"order {report['orders'].index(unit['order'])}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, fontsize=7, rotation=20)
        ax.set_ylim(0, 1)
        ax.set_title("DyLoRA-MoE: held-out inputs routed to the skill's expert", fontsize=8)
        ax.legend(fontsize=6)
    fig.suptitle("held-out loss of each skill after each stage (and its rise since its own stage), first order",
                 fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
