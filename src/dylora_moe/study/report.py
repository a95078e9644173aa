"""Aggregate a study's units: ``quality.json`` (mean and spread over seeds, paired pass@1), the markdown
tables and the plots."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..evaluation.compare import count_pairs, read_verdicts, sign_test
from .config import STUDY_FORMAT_VERSION, UNIT_FILE, StudyConfig, StudyError
from .records import nmi_interval_of, per_decision, write_json


# ----------------------------------------------------------------------------- aggregation
def _spread(values: Sequence[float]) -> dict[str, Any]:
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def _mean_k(unit: dict[str, Any]) -> float | None:
    """Experts used per routing decision on the analysis data: recorded by the unit, else (units written before it
    was) known from a fixed k: ``top_k``, or every expert when dense; None for an older dynamic top-k unit."""
    if unit.get("mean_k") is not None:
        return float(unit["mean_k"])
    moe = unit.get("moe") or {}
    if moe.get("routing_mode") == "dense":
        return float(unit["num_experts"])
    if moe.get("top_p") is None and unit.get("num_experts"):
        return float(min(int(moe.get("top_k", 1)), int(unit["num_experts"])))
    return None


def report(study: StudyConfig) -> dict[str, Any]:
    """Aggregate the complete units into ``quality.json`` and the plots; returns the quality dict."""
    out = Path(study.output_dir)
    variants: dict[str, Any] = {}
    found = {variant.name: [json.loads((study.unit_dir(variant.name, s) / UNIT_FILE).read_text())
                            for s in (variant.seeds or study.seeds)
                            if (study.unit_dir(variant.name, s) / UNIT_FILE).is_file()]
             for variant in study.variants}
    data_sha256 = _common_data(study, found)
    for variant in study.variants:
        units = found[variant.name]
        if not units:
            continue
        domains = units[0]["domains"]
        entry: dict[str, Any] = {
            "group": variant.group, "description": variant.description, "overrides": units[0]["overrides"],
            "seeds": [u["seed"] for u in units], "num_experts": units[0]["num_experts"],
            "trainable_parameters": units[0]["trainable_parameters"], "steps": units[0]["steps"],
            "eval_loss": {d: _spread([u["eval_loss_end"][d] for u in units]) for d in domains},
            "mean_eval_loss": _spread([statistics.fmean(u["eval_loss_end"][d] for d in domains) for u in units]),
            "exact_match": {d: _spread([u["exact_match"][d]["exact_match"] for u in units
                                        if d in u.get("exact_match", {})])
                            for d in study.exact_match if any(d in u.get("exact_match", {}) for u in units)},
            "eval_loss_start": {d: _spread([u["eval_loss_start"][d] for u in units]) for d in domains},
            "pass_at_1": {b: _spread([u["pass_at_1"][b]["pass@1"] for u in units if b in u["pass_at_1"]])
                          for b in study.benchmarks if any(b in u["pass_at_1"] for u in units)},
            "nmi": _spread([u["nmi"] for u in units]),
            "nmi_by_seed": [{"seed": u["seed"], "nmi": u["nmi"],
                             "interval": nmi_interval_of(u, study.unit_dir(variant.name, u["seed"]))} for u in units],
            "router_entropy": _spread([u["router_entropy"] for u in units]),
            "decision_nmi": _spread([per_decision(u, "nmi", study.unit_dir(variant.name, u["seed"])) for u in units]),
            "decision_entropy": _spread([per_decision(u, "entropy", study.unit_dir(variant.name, u["seed"]))
                                         for u in units]),
            "decision_share_matrix": per_decision(units[0], "share_matrix",
                                                   study.unit_dir(variant.name, units[0]["seed"])),
            "mean_k": _spread([_mean_k(u) for u in units]),
            "thresholds": [u.get("thresholds") or [] for u in units],
            "load_imbalance": _spread([u["load_imbalance"] for u in units]),
            "expert_load": [u["expert_load"] for u in units],
            "share_matrix": units[0]["share_matrix"],
            "train_time_s": _spread([u["train_time_s"] for u in units]),
            "peak_memory_mib": _spread([u.get("peak_memory_mib") for u in units]),
            "eval_curve": _mean_curve([u["eval_curve"] for u in units], domains),
            "units": units,
        }
        variants[variant.name] = entry
    quality = {"format_version": STUDY_FORMAT_VERSION, "train_config": study.train_config,
               "overrides": study.overrides, "benchmarks": study.benchmarks, "eval_limit": study.eval_limit,
               "baseline": study.baseline, "data_sha256": data_sha256, "variants": variants,
               "vs_baseline": _versus(variants, study.baseline),
               "paired_pass_at_1": _paired_pass_at_1(study, variants)}
    write_json(out / "quality.json", quality)
    if variants:
        plot_study(quality, out)
        (out / "results_table.md").write_text(results_table(quality) + "\n")
    return quality


def _verdicts(study: StudyConfig, unit: dict[str, Any], benchmark: str) -> dict[str, bool] | None:
    """``{task_id: passed}`` of a unit's greedy pass@1: from its ``results.jsonl``, else from the verdicts its
    ``unit.json`` kept (units evaluated on another machine); None when neither has them."""
    path = study.unit_dir(unit["variant"], unit["seed"]) / "eval" / benchmark
    if (path / "results.jsonl").is_file():
        return read_verdicts(path)
    kept = unit.get("pass_at_1", {}).get(benchmark, {}).get("verdicts")
    return {str(task): bool(ok) for task, ok in kept.items()} if isinstance(kept, dict) else None


def _paired_pass_at_1(study: StudyConfig, variants: dict[str, Any]) -> dict[str, Any]:
    """Each variant's pass@1 paired with the baseline's, problem by problem, for the seeds both measured
    (same seed, same problems): how many problems only one side solves, pooled over those seeds, and the
    exact sign test on them. pass@1 differences of a few problems are within what chance gives."""
    base = study.baseline
    if base not in variants:
        return {}
    table: dict[str, Any] = {}
    baseline_units = {u["seed"]: u for u in variants[base]["units"]}
    for name, v in variants.items():
        if name == base:
            continue
        units = {u["seed"]: u for u in v["units"]}
        for b in v["pass_at_1"]:
            counts = {"both": 0, "only_variant": 0, "only_baseline": 0, "neither": 0}
            seeds = []
            for seed in sorted(units.keys() & baseline_units.keys()):
                mine, theirs = _verdicts(study, units[seed], b), _verdicts(study, baseline_units[seed], b)
                if mine is None or theirs is None:
                    continue
                seeds.append(seed)
                pairs = count_pairs(mine, theirs)
                for key, theirs_key in (("both", "both"), ("only_variant", "only_a"),
                                        ("only_baseline", "only_b"), ("neither", "neither")):
                    counts[key] += pairs[theirs_key]
            if seeds:
                table.setdefault(name, {})[b] = {
                    "seeds": seeds, "pairs": sum(counts.values()), **counts,
                    "p_value": sign_test(counts["only_variant"], counts["only_baseline"])}
    return table


def _common_data(study: StudyConfig, found: dict[str, list[dict[str, Any]]]) -> dict[str, str] | None:
    """The token-id digests every unit shares (None for units of the first format, which did not record
    them); raises :class:`StudyError` naming the units when they differ."""
    groups: dict[str, list[str]] = {}
    for name, units in found.items():
        for u in units:
            digest = u.get("data_sha256")
            key = ("not recorded" if digest is None
                   else f"train {digest['train'][:12]}, validation {digest['validation'][:12]}")
            groups.setdefault(key, []).append(f"{name}/seed{u['seed']}")
    if len(groups) > 1:
        lines = "; ".join(f"{key}: {', '.join(units)}" for key, units in groups.items())
        raise StudyError(
            f"{study.output_dir}: the units were trained or evaluated on different token sequences (another "
            f"tokenizer, data or max_seq_length), so their losses are not comparable: {lines}. Keep one kind of "
            "unit per output_dir (move the others away, or rerun them).")
    units = [u for us in found.values() for u in us]
    return units[0].get("data_sha256") if units else None


def _mean_curve(curves: list[list[dict[str, Any]]], domains: list[str]) -> list[dict[str, Any]]:
    steps = sorted({row["step"] for curve in curves for row in curve})
    mean = []
    for step in steps:
        rows = [row for curve in curves for row in curve if row["step"] == step]
        mean.append({"step": step, **{d: statistics.fmean(r[d] for r in rows) for d in domains}})
    return mean


def _versus(variants: dict[str, Any], baseline: str) -> dict[str, Any]:
    """Each variant minus the baseline: held-out loss (negative = better) and pass@1 (positive = better)."""
    if baseline not in variants:
        return {}
    base = variants[baseline]
    table = {}
    for name, v in variants.items():
        if name == baseline:
            continue
        row = {f"eval_loss.{d}": v["eval_loss"][d]["mean"] - base["eval_loss"][d]["mean"] for d in v["eval_loss"]}
        for b, s in v["pass_at_1"].items():
            if b in base["pass_at_1"] and s["mean"] is not None and base["pass_at_1"][b]["mean"] is not None:
                row[f"pass@1.{b}"] = s["mean"] - base["pass_at_1"][b]["mean"]
        table[name] = row
    return table


def _fmt(spread: dict[str, Any] | None, digits: int = 3, seeds: int | None = None) -> str:
    """``mean ± std`` of a :func:`_spread`; with ``seeds``, says when fewer units than seeds measured it."""
    if not spread or spread["mean"] is None:
        return "–"
    text = f"{spread['mean']:.{digits}f}" + (f" ± {spread['std']:.{digits}f}" if spread["n"] > 1 else "")
    return text + (f" ({spread['n']} of {seeds} seeds)" if seeds is not None and spread["n"] < seeds else "")


def results_table(quality: dict[str, Any]) -> str:
    """Markdown tables of quality.json: one per group (main, then the sweeps)."""
    variants = quality["variants"]
    groups: dict[str, list[str]] = {}
    for name, v in variants.items():
        groups.setdefault(v["group"], []).append(name)
    lines = []
    for group, names in groups.items():
        domains = list(variants[names[0]]["eval_loss"])
        benchmarks = [b for b in quality["benchmarks"] if any(b in variants[n]["pass_at_1"] for n in names)]
        exact = sorted({d for n in names for d in variants[n].get("exact_match", {})})
        head = (["variant", "seeds", "adapter params"] + [f"loss {d}" for d in domains] + ["mean loss"]
                + [f"pass@1 {b}" for b in benchmarks] + [f"exact match {d}" for d in exact]
                + ["NMI per example", "NMI per decision", "router entropy per decision", "mean k",
                   "max load / uniform", "train s", "peak MiB"])
        lines += [f"### {group}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for n in names:
            v = variants[n]
            cells = [f"`{n}`", str(len(v["seeds"])), f"{v['trainable_parameters']:,}"]
            cells += [_fmt(v["eval_loss"][d], 4) for d in domains] + [_fmt(v.get("mean_eval_loss"), 4)]
            cells += [_fmt(v["pass_at_1"].get(b), seeds=len(v["seeds"])) for b in benchmarks]
            cells += [_fmt(v.get("exact_match", {}).get(d), seeds=len(v["seeds"])) for d in exact]
            cells += [_fmt(v["nmi"]), _fmt(v.get("decision_nmi")), _fmt(v.get("decision_entropy")),
                      _fmt(v.get("mean_k"), 2), _fmt(v["load_imbalance"], 2), _fmt(v["train_time_s"], 1),
                      _fmt(v.get("peak_memory_mib"), 0)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += _nmi_table(variants)
    paired = quality.get("paired_pass_at_1") or {}
    if paired:
        lines += [f"### pass@1 paired with `{quality['baseline']}`", "",
                  "Problems only one side solves (same seed, same problems, pooled over the seeds both "
                  "measured) and the exact two-sided sign test on them.", "",
                  "| variant | benchmark | seeds | pairs | only variant | only baseline | both | p |",
                  "|" + " --- |" * 8]
        for name, per in paired.items():
            for b, row in per.items():
                lines.append(f"| `{name}` | {b} | {len(row['seeds'])} | {row['pairs']} | {row['only_variant']} | "
                             f"{row['only_baseline']} | {row['both']} | {row['p_value']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def _nmi_table(variants: dict[str, Any]) -> list[str]:
    """Lines of the per-seed NMI table (mixtures only): each unit's NMI per example with its 95% bootstrap
    interval over the held-out examples (``nmi_by_seed``; quality files from before it have none)."""
    rows = []
    for name, v in variants.items():
        for row in v.get("nmi_by_seed") or []:
            if row["interval"] is not None and v["num_experts"] > 1:
                low, high = row["interval"]
                rows.append(f"| `{name}` | {row['seed']} | {row['nmi']:.3f} | {low:.3f} – {high:.3f} |")
    if not rows:
        return []
    return ["### NMI per example by seed", "",
            "With its 95% percentile bootstrap interval: the held-out examples drawn again within each domain "
            "(how much the choice of examples moves the value; finite samples bias NMI upwards).", "",
            "| variant | seed | NMI per example | 95% interval |", "|" + " --- |" * 4, *rows, ""]


@dataclass(frozen=True)
class PassBar:
    """One bar of ``pass_at_1.png``: a variant's mean pass@1 on a benchmark over the ``seeds`` units that
    measured it, with the standard deviation between them (``None`` for a single seed)."""

    variant: str
    benchmark: str
    mean: float
    std: float | None
    seeds: int


def pass_at_1_bars(quality: dict[str, Any]) -> list[PassBar]:
    """The bars of ``pass_at_1.png``, in variant then benchmark order: only the (variant, benchmark) pairs
    that some unit measured, so that a missing measurement shows as no bar rather than as a zero."""
    bars = []
    for name, v in quality["variants"].items():
        for b in quality["benchmarks"]:
            spread = v["pass_at_1"].get(b)
            if spread and spread.get("mean") is not None:
                bars.append(PassBar(name, b, spread["mean"], spread["std"] if spread["n"] > 1 else None,
                                    spread["n"]))
    return bars


def plot_study(quality: dict[str, Any], out: Path) -> list[Path]:
    """``loss_curves.png`` (held-out loss per domain over steps), ``share_matrices.png`` (one heatmap per
    mixture variant, first seed: the share of routing decisions, per token for token routing, where the unit
    recorded it) and ``pass_at_1.png`` (:func:`pass_at_1_bars`: the mean over the seeds measured, the spread
    as a whisker). Returns the files written."""
    import matplotlib  # here, not at the top: matplotlib takes a second to import, and only plots need it

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    written = []
    for name, draw in (("loss_curves.png", _plot_loss_curves), ("share_matrices.png", _plot_share_matrices),
                       ("pass_at_1.png", _plot_pass_at_1)):
        fig = draw(plt, quality)
        if fig is None:  # nothing to draw (no mixture, no pass@1)
            continue
        fig.tight_layout()
        written.append(out / name)
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def _plot_loss_curves(plt: Any, quality: dict[str, Any]) -> Any:
    variants = quality["variants"]
    domains = list(next(iter(variants.values()))["eval_loss"])
    fig, axes = plt.subplots(1, len(domains), figsize=(6 * len(domains), 4), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        for name, v in variants.items():
            curve = v["eval_curve"]
            ax.plot([r["step"] for r in curve], [r[domain] for r in curve], marker="o", markersize=3,
                    label=name, linestyle="-" if v["group"] == "main" else ":")
        ax.set_title(f"held-out loss: {domain}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (response tokens)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    return fig


def _plot_share_matrices(plt: Any, quality: dict[str, Any]) -> Any:
    variants = quality["variants"]
    domains = list(next(iter(variants.values()))["eval_loss"])
    mixtures = [(n, v) for n, v in variants.items() if v["num_experts"] > 1]
    if not mixtures:
        return None
    cols = min(4, len(mixtures))
    rows = math.ceil(len(mixtures) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat[len(mixtures):]:
        ax.axis("off")
    for ax, (name, v) in zip(axes.flat, mixtures):
        # per routing decision where known (token routing: per token and layer), else per example
        per_decision = v.get("decision_share_matrix") is not None
        matrix = v["decision_share_matrix"] if per_decision else v["share_matrix"]
        nmi = (v["decision_nmi"] if per_decision else v["nmi"])["mean"]
        token = v["units"][0].get("routing_unit", v["units"][0].get("moe", {}).get("routing")) == "token"
        view = ("per token" if per_decision else "per example (token majority)") if token else ""
        ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i, row in enumerate(matrix):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if value < 0.5 else "black")
        ax.set_yticks(range(len(domains)), domains, fontsize=7)
        ax.set_xticks(range(len(matrix[0])), [f"e{j}" for j in range(len(matrix[0]))], fontsize=7)
        title = f"{name}  NMI {nmi:.2f}" if nmi is not None else name
        ax.set_title(f"{title}\n{view}" if view else title, fontsize=8)
    return fig


def _plot_pass_at_1(plt: Any, quality: dict[str, Any]) -> Any:
    bars = pass_at_1_bars(quality)
    if not bars:
        return None
    names = list(dict.fromkeys(bar.variant for bar in bars))
    benchmarks = [b for b in quality["benchmarks"] if any(bar.benchmark == b for bar in bars)]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names), 3.6))
    width = 0.8 / len(benchmarks)
    for k, b in enumerate(benchmarks):
        mine = [bar for bar in bars if bar.benchmark == b]
        xs = [names.index(bar.variant) + k * width for bar in mine]
        drawn = ax.bar(xs, [bar.mean for bar in mine], width, label=b, color=f"C{k}")
        spread = [(x, bar) for x, bar in zip(xs, mine) if bar.std is not None]
        if spread:
            ax.errorbar([x for x, _ in spread], [bar.mean for _, bar in spread],
                        yerr=[bar.std for _, bar in spread], fmt="none", ecolor="black", capsize=3)
        # how many seeds each bar averages (inside the bar); a bar without a whisker is one seed
        ax.bar_label(drawn, labels=[f"n={bar.seeds}" for bar in mine], fontsize=7, label_type="center",
                     color="white")
    ax.set_xticks([i + width * (len(benchmarks) - 1) / 2 for i in range(len(names))], names, fontsize=8)
    ax.set_ylabel("pass@1 (greedy)")
    ax.set_title("variants without a bar for a benchmark have not been measured on it", fontsize=7)
    ax.legend(fontsize=8)
    return fig
