"""Measured forgetting: a sequence of skills learned one after another, against a sequential LoRA baseline.

``run_continual(ContinualRunConfig(...))`` (CLI: ``dylora-moe continual``) learns the stages in order (by
default MBPP Python, then Code Alpaca SQL, then Code Alpaca JavaScript) with :func:`.learner.learn_skill`,
starting from the base model with one immature expert; after every stage it measures the held-out loss
of every skill. The baseline is one ordinary LoRA (rank ``rank``) fine-tuned on the same stages with the
same steps, learning rates, batch size and data. Written to ``output_dir``:

* ``continual.json``: per method (``dylora`` and, if asked, ``dylora_<protection>`` variants, and
  ``baseline``) the loss matrix ``loss[i][j]`` (held-out loss of skill ``j`` after stage ``i``),
  ``max_forgetting`` (the largest relative rise of an earlier skill's loss after a later stage),
  ``average_forgetting`` (mean relative rise of each earlier skill from just after its stage to the end),
  ``backward_transfer`` (mean of ``loss[j][j] - loss[last][j]``: negative means forgetting), the experts
  created and their routing shares; and the novelty detector's precision and recall on a labelled stream
  of batches (known skills' held-out batches should not be novel, the next skill's batches should be);
* ``continual.png``: the relative-rise matrices side by side.

The bar of issue #5: an earlier skill's loss rises by at most 2% (``max_forgetting <= 0.02``), clearly
less than the baseline's.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..common.devices import resolve_device
from ..config import DyLoRAMoEConfig
from ..data import Example
from ..loading import load_base_model
from ..model import DyLoRAMoEForCausalLM
from .config import ContinualConfig, ContinualRunConfig
from .learner import batched_outputs, learn_skill, train_expert
from .library import SkillLibrary, embed_examples
from .novelty import NoveltyDetector
from .skills import load_skill_examples

__all__ = ["ContinualRunConfig", "forgetting_metrics", "run_continual", "skill_loss"]


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


def forgetting_metrics(matrix: list[list[float]]) -> dict[str, float | None]:
    """``max_forgetting``, ``average_forgetting`` (relative loss rises) and ``backward_transfer``."""
    last = len(matrix) - 1
    if last < 1:
        return {"max_forgetting": None, "average_forgetting": None, "backward_transfer": None}
    rises = [(matrix[i][j] - matrix[j][j]) / matrix[j][j] for j in range(last) for i in range(j + 1, last + 1)]
    final = [(matrix[last][j] - matrix[j][j]) / matrix[j][j] for j in range(last)]
    return {"max_forgetting": max(rises), "average_forgetting": sum(final) / len(final),
            "backward_transfer": sum(matrix[j][j] - matrix[last][j] for j in range(last)) / last}


def _fresh_model(run: ContinualRunConfig, mature: bool):
    base, tokenizer = load_base_model(run.model, device=resolve_device(run.device))
    # sequence routing at temperature 2 with the probability gate: a skill (one request) goes to one expert,
    # as docs/continual.md measured
    cfg = DyLoRAMoEConfig(num_experts=1, r=run.rank, alpha=run.continual.alpha_ratio * run.rank,
                          routing="sequence", temperature=2.0, gate="probability", init_seed=run.continual.seed)
    model = DyLoRAMoEForCausalLM(base, cfg, mature=mature, base_name_or_path=run.model)
    return model, tokenizer


def _run_dylora(run: ContinualRunConfig, config: ContinualConfig, train: list[list[Example]],
                held_out: list[list[Example]], names: list[str], progress: bool,
                detector_stream: bool = True) -> dict[str, Any]:
    model, tokenizer = _fresh_model(run, mature=False)
    matrix, stages, stream = [], [], {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    rng = random.Random(config.seed)
    detector = NoveltyDetector(config.threshold, config.reduction)
    for i, (name, examples) in enumerate(zip(names, train)):
        library = model.skill_library or SkillLibrary()
        if detector_stream and len(library):  # labelled stream: known skills' held-out batches, then the new skill's
            for j in range(i):
                for _ in range(run.detector_batches):
                    batch = rng.sample(held_out[j], min(run.detector_batch_size, len(held_out[j])))
                    novel = detector.decide(embed_examples(model, tokenizer, batch), library).novel
                    stream["fp" if novel else "tn"] += 1
            for _ in range(run.detector_batches):
                batch = rng.sample(examples, min(run.detector_batch_size, len(examples)))
                novel = detector.decide(embed_examples(model, tokenizer, batch), library).novel
                stream["tp" if novel else "fn"] += 1
        started = time.monotonic()
        result = learn_skill(model, tokenizer, examples, name, config, progress=progress)
        losses = [skill_loss(model, tokenizer, h, run.eval_batch_size, config.max_seq_length) for h in held_out]
        matrix.append(losses)
        stages.append({"skill": name, "created": result.created, "expert": result.expert, "rank": result.rank,
                       "decision": {k: v for k, v in asdict(result.decision).items()},
                       "seconds": time.monotonic() - started, "final_lm_loss": result.losses[-1]["lm_loss"]
                       if result.losses else None, "routing_mode_after": model.routing_mode})
        print(f"[{config.protection}] stage {i} {name}: {result.summary()}; held-out losses "
              f"{[round(x, 4) for x in losses]}", flush=True)
    routing = {}
    for name, examples in zip(names, held_out):
        choices = [c for _, out in batched_outputs(model, tokenizer, examples, batch_size=run.eval_batch_size,
                                                   max_seq_length=config.max_seq_length)
                   for c in out.expert_choice.tolist()]
        routing[name] = [choices.count(e) / len(choices) for e in range(model.num_experts)]
    tp, fp, fn = stream["tp"], stream["fp"], stream["fn"]
    return {"loss": matrix, **forgetting_metrics(matrix), "stages": stages, "routing_share": routing,
            "num_experts": model.num_experts, "expert_ranks": list(model.expert_ranks),
            "detector": {**stream, "precision": tp / (tp + fp) if tp + fp else None,
                         "recall": tp / (tp + fn) if tp + fn else None, "threshold": config.threshold}}


def _run_baseline(run: ContinualRunConfig, config: ContinualConfig, train: list[list[Example]],
                  held_out: list[list[Example]], names: list[str], progress: bool) -> dict[str, Any]:
    model, tokenizer = _fresh_model(run, mature=True)
    phases = [("seed", config.seed_steps, config.seed_lr), ("consolidate", config.consolidate_steps,
                                                             config.consolidate_lr)]
    matrix = []
    for i, (name, examples) in enumerate(zip(names, train)):
        train_expert(model, tokenizer, examples, 0, SkillLibrary(), config, phases=phases, fine_tune=True,
                     progress=progress)
        losses = [skill_loss(model, tokenizer, h, run.eval_batch_size, config.max_seq_length) for h in held_out]
        matrix.append(losses)
        print(f"[baseline LoRA] stage {i} {name}: held-out losses {[round(x, 4) for x in losses]}", flush=True)
    return {"loss": matrix, **forgetting_metrics(matrix)}


def run_continual(run: ContinualRunConfig, progress: bool = True) -> dict[str, Any]:
    """Run the benchmark; returns and writes ``continual.json`` (and ``continual.png``)."""
    run.continual.validate()
    out = Path(run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [Path(s).stem if s.endswith((".json", ".jsonl")) else s.replace(":", "-") for s in run.stages]
    if len(set(names)) != len(names):
        raise ValueError(f"stages must be distinct skills, got {run.stages}")
    train = [_split(s, "train", run.train_examples, run.data_dir) for s in run.stages]
    held_out = [_split(s, "held_out", run.eval_examples, run.data_dir) for s in run.stages]
    for name, a, b in zip(names, train, held_out):
        if not a or not b:
            raise ValueError(f"stage {name!r}: {len(a)} training and {len(b)} held-out examples; both must be > 0")
    started = time.monotonic()
    report: dict[str, Any] = {"format_version": 1, "run": asdict(run), "skills": names,
                              "train_examples": [len(t) for t in train],
                              "held_out_examples": [len(h) for h in held_out], "methods": {}}
    report["methods"]["dylora"] = _run_dylora(run, run.continual, train, held_out, names, progress)
    if run.baseline:  # before the protection variants: the comparison that matters most comes first
        report["methods"]["baseline"] = _run_baseline(run, run.continual, train, held_out, names, progress)
    for protection in run.protections:
        if protection != run.continual.protection:
            variant = ContinualConfig(**{**asdict(run.continual), "protection": protection})
            report["methods"][f"dylora_{protection}"] = _run_dylora(run, variant, train, held_out, names, progress,
                                                                    detector_stream=False)
    dylora = report["methods"]["dylora"]
    report["max_forgetting"] = {m: r["max_forgetting"] for m, r in report["methods"].items()}
    report["bar"] = {"max_forgetting_at_most": 0.02, "met": dylora["max_forgetting"] is not None
                     and dylora["max_forgetting"] <= 0.02 and (not run.baseline or dylora["max_forgetting"]
                                                               < report["methods"]["baseline"]["max_forgetting"])}
    report["seconds"] = time.monotonic() - started
    (out / "continual.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out / "continual.png")
    return report


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib  # here, not at the top: start-up time (only the plot needs it)

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    methods = list(report["methods"])
    names = report["skills"]
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.8), squeeze=False, layout="constrained")
    for ax, method in zip(axes[0], methods):
        matrix = report["methods"][method]["loss"]
        rel = [[(matrix[i][j] - matrix[j][j]) / matrix[j][j] if i >= j else float("nan") for j in range(len(names))]
               for i in range(len(matrix))]
        ax.imshow(rel, cmap="coolwarm", vmin=-0.1, vmax=0.1)
        for i, row in enumerate(rel):
            for j, value in enumerate(row):
                if i >= j:
                    ax.text(j, i, f"{matrix[i][j]:.3f}\n{value:+.1%}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(names)), names, fontsize=7, rotation=20)
        ax.set_yticks(range(len(matrix)), [f"after {n}" for n in names[: len(matrix)]], fontsize=7)
        mf = report["methods"][method]["max_forgetting"]
        ax.set_title(f"{method}: max forgetting {mf:+.1%}" if mf is not None else method, fontsize=9)
    fig.suptitle("held-out loss of each skill after each stage (and rise since its own stage)", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
