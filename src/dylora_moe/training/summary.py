"""End-of-run outputs: the summary table, ``metrics.json`` and the ``routing.png`` heatmap.

Usage::

    print(summary_table(history))                      # eval loss at start and end, expert shares
    metrics = build_metrics(history, train_log=log, train_time_s=312.5, extra={"model": "..."})
    write_metrics(out / "metrics.json", metrics)
    plot_routing(metrics["expert_share"], out / "routing.png")

``metrics.json`` holds nested ``eval_loss.start.<domain>`` / ``eval_loss.end.<domain>`` (floats),
``expert_share.<domain>`` (one share per expert, at the end), ``router_entropy`` and ``aux_loss``
per domain, the full ``eval_history`` and ``train_log``, ``train_time_s``; the same three summaries
are repeated under flat keys such as ``"eval_loss.end.mbpp"`` for quick lookups.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .evaluation import EvalResult

METRICS_FORMAT_VERSION = 1


def summary_table(history: Sequence[EvalResult]) -> str:
    """Per-domain eval loss at the first and last evaluation, its change, and the final expert shares."""
    if not history:
        return "(no evaluation ran)"
    start, end = history[0], history[-1]
    names = list(end.domains)
    width = max(len("domain"), *(len(n) for n in names), len("overall"))
    head = (f"{'domain':<{width}}  {'loss@' + str(start.step):>12}  {'loss@' + str(end.step):>12}  "
            f"{'change':>8}  expert share (end)")
    lines = [head, "-" * len(head)]
    for name in names:
        a, b = start.domains[name].loss, end.domains[name].loss
        share = " ".join(f"{s:.2f}" for s in end.domains[name].expert_share)
        lines.append(f"{name:<{width}}  {a:>12.4f}  {b:>12.4f}  {b - a:>+8.4f}  [{share}]")
    lines.append(f"{'overall':<{width}}  {start.loss:>12.4f}  {end.loss:>12.4f}  {end.loss - start.loss:>+8.4f}")
    return "\n".join(lines)


def build_metrics(
    history: Sequence[EvalResult],
    *,
    train_log: Sequence[Mapping[str, Any]] = (),
    train_time_s: float = 0.0,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of ``metrics.json`` (see the module docstring)."""
    metrics: dict[str, Any] = {"format_version": METRICS_FORMAT_VERSION, **(extra or {})}
    metrics["train_time_s"] = float(train_time_s)
    if history:
        start, end = history[0], history[-1]
        metrics["domains"] = list(end.domains)
        metrics["eval_loss"] = {
            "start": {n: d.loss for n, d in start.domains.items()},
            "end": {n: d.loss for n, d in end.domains.items()},
            "start_step": start.step,
            "end_step": end.step,
        }
        metrics["expert_share"] = {n: list(d.expert_share) for n, d in end.domains.items()}
        metrics["router_entropy"] = {n: d.router_entropy for n, d in end.domains.items()}
        metrics["aux_loss"] = {n: d.aux_loss for n, d in end.domains.items()}
        for n in end.domains:
            metrics[f"eval_loss.start.{n}"] = start.domains[n].loss
            metrics[f"eval_loss.end.{n}"] = end.domains[n].loss
            metrics[f"expert_share.{n}"] = list(end.domains[n].expert_share)
    metrics["eval_history"] = [h.to_dict() for h in history]
    metrics["train_log"] = [dict(row) for row in train_log]
    return metrics


def write_metrics(path: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Write ``metrics`` as JSON (via a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def plot_routing(shares: Mapping[str, Sequence[float]], path: str | Path, title: str | None = None) -> Path:
    """Save a domain x expert heatmap of expert shares (matplotlib's Agg canvas, no pyplot) to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # here: start-up time (only plots need it)
    from matplotlib.figure import Figure

    names = list(shares)
    data = [list(shares[n]) for n in names]
    experts = len(data[0]) if data else 0
    fig = Figure(figsize=(1.6 + 0.9 * max(experts, 1), 1.2 + 0.6 * max(len(names), 1)), dpi=120)
    FigureCanvasAgg(fig)  # the Agg backend, without touching pyplot's global state
    ax = fig.subplots()
    image = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(experts), [f"expert {i}" for i in range(experts)])
    ax.set_yticks(range(len(names)), names)
    for row, values in enumerate(data):
        for col, value in enumerate(values):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center",
                    color="black" if value > 0.6 else "white", fontsize=9)
    ax.set_title(title or "Expert share per domain")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return Path(path)
