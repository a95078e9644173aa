"""The records a study keeps (``unit.json``, ``quality.json``): writing them atomically, and reading the
per-decision routing statistics and the NMI interval of units written before they were recorded. torch-free, like
the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomically
from ..evaluation.nmi import nmi_interval

__all__ = ["nmi_interval_of", "per_decision", "write_json"]


def write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically (a reader sees the old file or the new one)."""
    write_text_atomically(path, json.dumps(payload, indent=2) + "\n")


def per_decision(unit: dict[str, Any], name: str, unit_dir: Path | None = None) -> Any:
    """A unit's per-decision routing statistic (``nmi``, ``entropy`` or ``share_matrix``). Units written before
    the per-decision view lack it: with one expert or sequence routing a decision is an example, so the
    per-example value is the same; for a token-routed unit it is unknown (None)."""
    if f"decision_{name}" in unit:
        return unit[f"decision_{name}"]
    if unit["num_experts"] == 1 or _unit_routing(unit, unit_dir) == "sequence":
        return unit["router_entropy" if name == "entropy" else name]
    return None


def nmi_interval_of(unit: dict[str, Any], unit_dir: Path | None = None) -> list[float] | None:
    """The 95% bootstrap interval of a unit's NMI per example (``evaluation.nmi.nmi_interval``): recorded in
    ``unit.json``, else computed from the domain x expert counts of its routing analysis (``analysis/analysis.json``
    in ``unit_dir``, for units written before the interval was recorded); None for one expert or without counts."""
    if unit.get("nmi_interval") is not None:
        return list(unit["nmi_interval"])
    if unit.get("num_experts", 1) < 2 or unit.get("nmi") is None:
        return None
    counts = unit.get("count_matrix")
    saved = unit_dir / "analysis" / "analysis.json" if unit_dir is not None else None
    if counts is None and saved is not None and saved.is_file():
        counts = json.loads(saved.read_text()).get("count_matrix")
    return list(nmi_interval(counts)) if counts else None


def _unit_routing(unit: dict[str, Any], unit_dir: Path | None) -> str | None:
    """The routing granularity a unit trained with: ``unit.json``'s ``moe`` config, else the variant's
    overrides, else the unit's saved train config (units from before ``unit.json`` recorded it)."""
    routing = unit.get("moe", {}).get("routing")
    if routing is not None:
        return routing
    pinned = [o.split("=", 1)[1] for o in unit.get("overrides", []) if o.startswith("moe.routing=")]
    if pinned:
        return pinned[-1]
    saved = unit_dir / "train" / "train_config.json" if unit_dir is not None else None
    if saved is not None and saved.is_file():
        return json.loads(saved.read_text()).get("config", {}).get("moe", {}).get("routing")
    return None
