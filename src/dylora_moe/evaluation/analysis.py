"""Routing specialisation analysis: do the experts of a checkpoint specialise by domain?

For a DyLoRA-MoE checkpoint and one or more domain datasets (registered names such as ``code_alpaca``
and ``mbpp``, or JSON/JSONL instruction files), every held-out example is run through the model once
(teacher forcing, formatted exactly as in training) and its routing is recorded::

    report = analyze("runs/ckpt", ["code_alpaca", "mbpp"], output_dir="analysis", split="validation")
    report["nmi"], report["share_matrix"], report["domains"]["mbpp"]["loss"]

Written to ``output_dir``: ``analysis.json`` (below), ``expert_share.png`` (domain x expert share of the
chosen expert) and ``router_probs.png`` (domain x expert mean router probability), both heatmaps; with
token routing also ``decision_share.png`` (domain x expert share of the token decisions).

* ``domains[d]``: held-out ``loss`` (token-weighted cross-entropy on the response tokens), ``tokens``,
  ``examples``, ``expert_share`` (share of the domain's examples whose chosen expert is e),
  ``mean_router_probs`` and ``router_entropy`` (mean entropy of the router distribution, nats);
* ``share_matrix`` / ``count_matrix``: the domain x expert matrix (rows = ``domain_names``);
* ``nmi``: normalised mutual information between domain and chosen expert, ``I(D;E) / mean(H(D), H(E))``:
  1 when each domain goes to its own expert(s) and no expert is shared, 0 when routing is independent
  of the domain (see :func:`normalized_mutual_information`); ``null`` with a single domain;
  ``nmi_interval``: its 95% bootstrap interval ``[low, high]`` over the examples, resampled within each domain
  (:func:`nmi_interval`): how much of the value the choice of held-out examples could move;
* ``router_entropy`` (overall mean; ``max_entropy`` = ln E) and ``expert_load`` (share of all examples
  per expert) with ``mean_router_probs``.

Token routing decides per token and layer, so the per-example view above (an example's expert is the one
most of its tokens chose, its distribution the mean over its tokens) can show specialisation the router
does not have. The per-decision view counts every routing decision (``routing_unit``: one per token and
routed layer with token routing, one per example with sequence routing, where both views agree):

* ``domains[d]``: ``decisions``, ``decision_share`` (share of the domain's decisions per expert; dense
  routing: mean mixing weight), ``decision_entropy`` (mean router entropy per decision, nats) and
  ``decision_active_experts`` (mean number of experts a decision used: k, fractional with dynamic top-k);
* ``decision_share_matrix``, ``decision_nmi`` (NMI between domain and chosen expert over decisions),
  ``decision_entropy`` and ``decision_active_experts`` (overall means).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..common.inference import load_for_eval
from ..data import DataCollator, DatasetSpec, get_spec, load_examples, tokenize_examples
from ..errors import EvaluationError
from .nmi import entropy, nmi_from_joint, nmi_interval, normalized_mutual_information

__all__ = ["analyze", "entropy", "load_domain_data", "nmi_from_joint", "nmi_interval", "normalized_mutual_information",
           "plot_heatmap"]


def load_domain_data(items: Sequence[str], split: str = "validation", limit: int | None = None,
                     data_dir: str | Path | None = None) -> dict[str, list]:
    """Examples per domain: a registered dataset name, or a JSON/JSONL instruction file (domain = its stem)."""
    domains: dict[str, list] = {}
    for item in items:
        path = Path(item)
        if path.suffix.lower() in (".json", ".jsonl", ".ndjson") or path.is_file():
            spec = DatasetSpec(name=path.stem, loader="instruction", path=path.resolve(), split=split, limit=limit)
        else:
            spec = get_spec(item, split=split, limit=limit)
        if spec.domain_label in domains:
            raise ValueError(f"domain {spec.domain_label!r} is given twice")
        domains[spec.domain_label] = load_examples(spec, data_dir)
    if not domains:
        raise ValueError("no datasets given")
    return domains


def plot_heatmap(matrix: Sequence[Sequence[float]], rows: Sequence[str], title: str, path: str | Path) -> None:
    """A domain x expert heatmap with the values written in the cells (matplotlib, Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # here: start-up time (only plots need it)
    from matplotlib.figure import Figure

    cols = len(matrix[0]) if matrix else 0
    fig = Figure(figsize=(1.2 + 0.9 * max(cols, 1), 1.0 + 0.6 * max(len(rows), 1)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(cols), [f"e{j}" for j in range(cols)])
    ax.set_yticks(range(len(rows)), list(rows))
    ax.set_xlabel("expert")
    ax.set_title(title, fontsize=10)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black",
                    fontsize=8)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@torch.no_grad()
def _run_domain(model: Any, batches: list[dict[str, torch.Tensor]], num_experts: int) -> dict[str, Any]:
    device = next(model.parameters()).device
    per_token = model.moe_config.routing == "token"
    loss_sum, tokens, choices, probs = 0.0, 0, [], []
    decisions, decision_share, decision_entropy = 0, torch.zeros(num_experts, dtype=torch.float64), 0.0
    decision_k = 0.0
    for batch in batches:
        labels = batch["labels"].to(device)
        mask = batch["attention_mask"].to(device)
        out = model(input_ids=batch["input_ids"].to(device), attention_mask=mask, labels=labels,
                    supervised_logits_only=True)
        count = int((labels[:, 1:] != -100).sum())
        if count:
            loss_sum += float(out.lm_loss) * count
            tokens += count
        choices += [int(c) for c in out.expert_choice.tolist()]
        probs += [[float(p) for p in row] for row in out.router_probs.float().tolist()]
        # expert_share and router_entropy are means over the pass's routing units (real tokens or sequences),
        # the same units in every routed layer: weighting by the unit count gives the mean over decisions
        units = int(mask.sum()) if per_token else int(mask.shape[0])
        decisions += units
        decision_share += out.expert_share.double().cpu() * units
        decision_entropy += float(out.router_entropy) * units
        decision_k += float(out.active_experts) * units
    n = len(choices)
    share = [choices.count(e) / n for e in range(num_experts)]
    mean_probs = [sum(row[e] for row in probs) / n for e in range(num_experts)]
    return {"examples": n, "tokens": tokens, "loss": loss_sum / max(tokens, 1), "expert_share": share,
            "counts": [choices.count(e) for e in range(num_experts)], "mean_router_probs": mean_probs,
            "router_entropy": sum(entropy(row) for row in probs) / n,
            "decisions": decisions, "decision_share": (decision_share / max(decisions, 1)).tolist(),
            "decision_entropy": decision_entropy / max(decisions, 1),
            "decision_active_experts": decision_k / max(decisions, 1),
            "_choices": choices, "_entropies": [entropy(row) for row in probs]}


def analyze(
    model: Any,
    data: Sequence[str] | dict[str, list],
    *,
    output_dir: str | Path,
    tokenizer: Any = None,
    split: str = "validation",
    limit: int | None = None,
    batch_size: int = 4,
    max_seq_length: int = 512,
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Analyse routing of ``model`` (a checkpoint folder, or a loaded DyLoRA-MoE model with ``tokenizer``)
    over ``data`` (dataset names / files, or ``{domain: [Example, ...]}``); write JSON and PNGs."""
    name = str(model) if isinstance(model, (str, Path)) else type(model).__name__
    if isinstance(model, (str, Path)):
        model, tokenizer = load_for_eval(model)
    if not hasattr(model, "moe_config"):
        raise EvaluationError("analyze needs a DyLoRA-MoE model (routing statistics); got a plain model")
    if tokenizer is None:
        raise EvaluationError("a tokenizer is needed with a loaded model")
    by_domain = dict(data) if isinstance(data, dict) else load_domain_data(data, split, limit, data_dir)
    names = list(by_domain)
    examples = [dataclasses.replace(ex, domain=domain) for domain, exs in by_domain.items() for ex in exs]
    tokenized, stats = tokenize_examples(examples, tokenizer, max_seq_length, domains=names)
    results = _run_domains(model, tokenizer, tokenized, names, batch_size, max_seq_length, progress)
    for d in names:
        results[d]["dropped"] = stats.domains[d].dropped
    report = {"checkpoint": name, "split": split, **_summarise(model, names, results)}
    _write_report(Path(output_dir), report, results, names)
    return report


def _run_domains(model: Any, tokenizer: Any, tokenized: list[Any], names: list[str], batch_size: int,
                 max_seq_length: int, progress: bool) -> dict[str, dict[str, Any]]:
    """Each domain's routing statistics (:func:`_run_domain`), the model in eval mode meanwhile."""
    collate = DataCollator.from_tokenizer(tokenizer)
    was_training = model.training
    model.eval()
    results: dict[str, dict[str, Any]] = {}
    try:
        for domain in tqdm(names, desc="analyze", unit="domain", disable=not progress):
            items = [t for t in tokenized if t.domain == domain]
            if not items:
                raise EvaluationError(f"domain {domain!r}: no example fits max_seq_length={max_seq_length}")
            batches = [collate(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]
            results[domain] = _run_domain(model, batches, model.num_experts)
    finally:
        model.train(was_training)
    return results


def _summarise(model: Any, names: list[str], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report over all domains: share and count matrices, NMI, entropies, expert load, mean loss (per example
    and per routing decision). Removes the per-example lists of ``results``."""
    num_experts = model.num_experts
    domain_labels = [d for d in names for _ in results[d]["_choices"]]
    expert_labels = [c for d in names for c in results[d].pop("_choices")]
    entropies = [h for d in names for h in results[d].pop("_entropies")]
    total = len(expert_labels)
    decisions = [[share * results[d]["decisions"] for share in results[d]["decision_share"]] for d in names]
    return {
        "num_experts": num_experts,
        "routing": model.moe_config.routing,
        "routing_mode": model.routing_mode,
        "domain_names": names,
        "domains": results,
        "share_matrix": [results[d]["expert_share"] for d in names],
        "count_matrix": [results[d]["counts"] for d in names],
        "nmi": normalized_mutual_information(domain_labels, expert_labels) if len(names) > 1 else None,
        "nmi_interval": list(nmi_interval([results[d]["counts"] for d in names])) if len(names) > 1 else None,
        "router_entropy": sum(entropies) / total,
        "routing_unit": "token" if model.moe_config.routing == "token" else "sequence",
        "decision_share_matrix": [results[d]["decision_share"] for d in names],
        "decision_nmi": nmi_from_joint(decisions) if len(names) > 1 else None,
        "decision_entropy": sum(results[d]["decision_entropy"] * results[d]["decisions"] for d in names)
        / max(sum(results[d]["decisions"] for d in names), 1),
        "decision_active_experts": sum(results[d]["decision_active_experts"] * results[d]["decisions"]
                                       for d in names) / max(sum(results[d]["decisions"] for d in names), 1),
        "max_entropy": math.log(num_experts),
        "expert_load": [expert_labels.count(e) / total for e in range(num_experts)],
        "mean_router_probs": [sum(results[d]["mean_router_probs"][e] * results[d]["examples"] for d in names) / total
                              for e in range(num_experts)],
        "loss": sum(results[d]["loss"] * results[d]["tokens"] for d in names)
        / max(sum(results[d]["tokens"] for d in names), 1),
    }


def _write_report(out: Path, report: dict[str, Any], results: dict[str, dict[str, Any]], names: list[str]) -> None:
    """``analysis.json`` and the heatmaps (per decision too, with token routing)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_heatmap(report["share_matrix"], names, "share of examples routed to each expert", out / "expert_share.png")
    plot_heatmap([results[d]["mean_router_probs"] for d in names], names, "mean router probability",
                 out / "router_probs.png")
    if report["routing_unit"] == "token":
        plot_heatmap(report["decision_share_matrix"], names, "share of token decisions per expert",
                     out / "decision_share.png")
