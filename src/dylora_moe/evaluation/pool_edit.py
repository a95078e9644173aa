"""Prune under-used experts and merge similar ones in a checkpoint, measured before and after.

``prune_checkpoint(ckpt, data, output, min_load=0.05)`` routes the held-out examples of ``data`` (dataset names
or files, as :func:`~dylora_moe.evaluation.analysis.analyze`) through the checkpoint, removes the experts whose
share of the routing decisions is below ``min_load`` (or the ``experts`` given), measures the held-out loss per
domain again and saves the result to ``output``. ``merge_checkpoint(ckpt, data, output, min_similarity=0.5)``
merges every group of experts whose dense updates are at least that similar (cosine, :mod:`dylora_moe.surgery`),
or the ``groups`` given, by ``"average"`` or ``"ties"``, each member weighted by its load. Both return a
:class:`PoolEditReport` (also ``pool_edit.json`` in ``output``)::

    report = prune_checkpoint("runs/cpu-demo/final", ["code_alpaca", "mbpp"], "runs/pruned", min_load=0.05)
    report.loss_before, report.loss_after, report.parameters_before, report.parameters_after

What would break a checkpoint is refused with the reason: removing every expert, or an expert a skill of the
library owns (``routing: own``), unless ``remap`` gives it another expert (``{3: 0}``). Skills whose routing is
*kept* (domains of joint training) point at an expert for reference only; theirs is moved to the merged expert,
or to the expert ``remap`` names, else to the first expert kept. The output loads with ``from_pretrained``,
trains on (``JointTrainer(config, model=...)``, ``learn-skill``) and exports.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomically
from ..common.inference import load_for_eval
from ..errors import EvaluationError
from ..surgery import merge_experts, remove_experts, update_similarity_matrix
from .analysis import analyze, load_domain_data

__all__ = ["PoolEditReport", "decision_load", "merge_checkpoint", "prune_checkpoint", "similar_groups"]


@dataclass
class PoolEditReport:
    """What a prune or merge did and what it cost; ``loss_*`` are held-out losses per domain."""

    action: str
    checkpoint: str
    output: str
    experts_before: int
    experts_after: int
    parameters_before: int
    parameters_after: int
    load_before: list[float]
    loss_before: dict[str, float]
    loss_after: dict[str, float]
    removed: list[int] = field(default_factory=list)
    groups: list[list[int]] = field(default_factory=list)
    skills_moved: dict[str, list[int]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        saved = 1 - self.parameters_after / max(self.parameters_before, 1)
        out = [f"{self.action}: {self.experts_before} -> {self.experts_after} experts; adapter parameters "
               f"{self.parameters_before:,} -> {self.parameters_after:,} ({saved:.1%} fewer); saved {self.output}",
               "domain           loss before  loss after    change"]
        for name, before in self.loss_before.items():
            after = self.loss_after[name]
            out.append(f"{name:<16} {before:11.4f} {after:11.4f} {after - before:+9.4f}")
        return out


def decision_load(report: Mapping[str, Any]) -> list[float]:
    """Share of all routing decisions per expert, from an :func:`analyze` report."""
    names = report["domain_names"]
    counts = [report["domains"][d]["decisions"] for d in names]
    total = max(sum(counts), 1)
    return [sum(report["domains"][d]["decision_share"][e] * c for d, c in zip(names, counts)) / total
            for e in range(report["num_experts"])]


def similar_groups(similarity: Any, min_similarity: float) -> list[list[int]]:
    """Groups of experts joined by a pairwise similarity >= ``min_similarity`` (connected components)."""
    n = similarity.shape[0]
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if float(similarity[i, j]) >= min_similarity:
                parent[root(j)] = root(i)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


class _Session:
    """A loaded checkpoint, its data, and the measurement before any edit."""

    def __init__(self, checkpoint: str | Path, data: Sequence[str], *, limit: int | None, batch_size: int,
                 max_seq_length: int, data_dir: str | Path | None, progress: bool) -> None:
        self.checkpoint = str(checkpoint)
        self.model, self.tokenizer = load_for_eval(checkpoint)
        if not hasattr(self.model, "moe_config"):
            raise EvaluationError(f"{checkpoint}: not a DyLoRA-MoE checkpoint")
        self.data = load_domain_data(data, "validation", limit, data_dir)
        self.options = {"batch_size": batch_size, "max_seq_length": max_seq_length, "progress": progress}
        self.experts_before = self.model.num_experts
        self.parameters_before = self._parameters()
        self.before = self._measure()

    def _parameters(self) -> int:
        return sum(p.numel() for p in self.model.expert_parameters()) + sum(
            p.numel() for p in self.model.router_parameters())

    def _measure(self) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:  # analyze's files are not kept: the report carries the numbers
            return analyze(self.model, self.data, output_dir=tmp, tokenizer=self.tokenizer, **self.options)

    def check_skills(self, gone: Sequence[int], target: Mapping[int, int],
                     given: Mapping[int, int]) -> dict[str, list[int]]:
        """The skills whose expert goes (name -> [old expert, the old index of the expert it moves to]): to
        ``target[e]``; an 'own' skill only where ``given`` names its new expert (else the edit is refused)."""
        library = getattr(self.model, "skill_library", None)
        moves: dict[str, list[int]] = {}
        for skill in library.skills if library is not None else []:
            if skill.expert not in gone:
                continue
            if skill.routing == "own" and skill.expert not in given:
                raise EvaluationError(
                    f"expert {skill.expert} holds skill {skill.name!r} of the skill library: removing it would break "
                    f"that skill; give it another expert (remap {skill.expert}:<expert>) or keep the expert")
            moves[skill.name] = [skill.expert, target[skill.expert]]
        return moves

    def finish(self, action: str, output: str | Path, kept: list[int], moves: dict[str, list[int]],
               removed: list[int], groups: list[list[int]]) -> PoolEditReport:
        library = getattr(self.model, "skill_library", None)
        for skill in library.skills if library is not None else []:
            old = moves.get(skill.name, [skill.expert, skill.expert])[1]
            skill.expert = kept.index(old) if old in kept else 0
        after = self._measure()
        self.model.save_pretrained(output)
        report = PoolEditReport(
            action, self.checkpoint, str(output), self.experts_before, self.model.num_experts,
            self.parameters_before, self._parameters(), decision_load(self.before),
            {d: self.before["domains"][d]["loss"] for d in self.before["domain_names"]},
            {d: after["domains"][d]["loss"] for d in after["domain_names"]}, removed, groups, moves)
        write_text_atomically(Path(output) / "pool_edit.json", json.dumps(asdict(report), indent=2) + "\n")
        return report


def prune_checkpoint(checkpoint: str | Path, data: Sequence[str], output: str | Path, *, min_load: float | None = None,
                     experts: Sequence[int] = (), remap: Mapping[int, int] | None = None, limit: int | None = None,
                     batch_size: int = 8, max_seq_length: int = 512, data_dir: str | Path | None = None,
                     progress: bool = True) -> PoolEditReport:
    """Remove ``experts``, or those whose decision load is below ``min_load`` (see the module docstring)."""
    if (min_load is None) == (not experts):
        raise EvaluationError("give the experts to remove, or min_load (a share of the routing decisions), not both")
    session = _Session(checkpoint, data, limit=limit, batch_size=batch_size, max_seq_length=max_seq_length,
                       data_dir=data_dir, progress=progress)
    load = decision_load(session.before)
    gone = sorted(experts) if experts else [e for e, share in enumerate(load) if share < (min_load or 0.0)]
    if not gone:
        raise EvaluationError(f"no expert has a load below {min_load} (loads {[round(x, 3) for x in load]}): "
                              "nothing to prune")
    if len(gone) >= session.model.num_experts:
        raise EvaluationError(f"pruning experts {gone} would leave none: a checkpoint needs at least one expert")
    remap = dict(remap or {})
    bad = {k: v for k, v in remap.items() if v in gone or not 0 <= v < session.model.num_experts}
    if bad:
        raise EvaluationError(f"remap {bad}: the experts skills move to must exist and be kept")
    first_kept = next(e for e in range(session.model.num_experts) if e not in gone)
    moves = session.check_skills(gone, {**{e: first_kept for e in gone}, **remap}, remap)
    kept = remove_experts(session.model, gone)
    return session.finish("prune", output, kept, moves, gone, [])


def merge_checkpoint(checkpoint: str | Path, data: Sequence[str], output: str | Path, *,
                     min_similarity: float | None = None, groups: Sequence[Sequence[int]] = (),
                     method: str = "average", density: float = 0.5, limit: int | None = None, batch_size: int = 8,
                     max_seq_length: int = 512, data_dir: str | Path | None = None,
                     progress: bool = True) -> PoolEditReport:
    """Merge ``groups``, or the groups of experts at least ``min_similarity`` alike (see the module docstring)."""
    if (min_similarity is None) == (not groups):
        raise EvaluationError("give the groups to merge, or min_similarity (cosine of the experts' updates)")
    session = _Session(checkpoint, data, limit=limit, batch_size=batch_size, max_seq_length=max_seq_length,
                       data_dir=data_dir, progress=progress)
    chosen = [sorted(set(g)) for g in groups] or similar_groups(update_similarity_matrix(session.model),
                                                                float(min_similarity or 0.0))
    if not chosen:
        raise EvaluationError(f"no two experts are at least {min_similarity} alike: nothing to merge")
    members = [e for g in chosen for e in g]
    if len(members) != len(set(members)):
        raise EvaluationError(f"groups {chosen} overlap")
    load = decision_load(session.before)
    gone = [e for g in chosen for e in g[1:]]
    into = {e: g[0] for g in chosen for e in g[1:]}
    moves = session.check_skills(gone, into, into)  # a merged expert keeps serving its skills
    originals = list(range(session.model.num_experts))
    for group in sorted(chosen, key=lambda g: -g[0]):  # later groups first: earlier indices stay valid
        merge_experts(session.model, group, method=method, weights=[load[e] + 1e-6 for e in group], density=density)
        originals = [e for e in originals if e not in group[1:]]
    return session.finish(f"merge ({method})", output, originals, moves, gone, chosen)
