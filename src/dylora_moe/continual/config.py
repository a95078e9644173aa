"""``ContinualConfig``: how a new skill is detected, which expert it gets and how that expert is trained.

Read from YAML (``dylora-moe learn-skill --config continual.yaml``) or built in code; every field has
help text, and ``KEY=VALUE`` overrides use the field names (``seed_steps=20 protection=both``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..common.configs import build_config
from ..config import help_metadata as _help
from ..errors import ConfigError

__all__ = ["DEFAULT_THRESHOLDS", "METHODS", "PROTECTIONS", "ContinualConfig", "ContinualRunConfig"]

PROTECTIONS = ("replay", "freeze_rows", "both", "none")
#: the novelty threshold each similarity gets when none is given: the seed's 0.75 for 'raw'; for 'standardized'
#: the value calibrated once on SmolLM2 over six domains (benchmarks/novelty_calibration.py: asked with 4 to 64
#: examples, known skills' held-out splits >= 0.843, other skills <= 0.727; docs/continual.md)
DEFAULT_THRESHOLDS = {"raw": 0.75, "standardized": 0.8}


@dataclass
class ContinualConfig:
    """Settings of the skill lifecycle (:func:`dylora_moe.continual.learner.learn_skill`)."""

    threshold: float | None = field(default=None, metadata=_help(
        "Novel when the (max or median) similarity to every known skill is below this; None = the similarity's "
        "default (0.8 standardized, calibrated once; 0.75 raw, the seed's)."))
    reduction: str = field(default="max", metadata=_help("'max' or 'median' similarity over the library."))
    similarity: str = field(default="standardized", metadata=_help(
        "How a new skill's data are compared with a known skill's: 'standardized' (default), exp(-z^2) with z^2 "
        "the squared difference of the means in units of the examples' spread, averaged over dimensions and "
        "corrected for the sample sizes (continual/novelty.py); 'raw', the seed's cosine of mean final hidden "
        "states, whose threshold depends on the model."))
    entropy_threshold: float | None = field(default=None, metadata=_help(
        "Also novel when the router's mean entropy on the new data exceeds this (nats); None = off."))
    force: bool = field(default=False, metadata=_help("Create a new expert even if the data are not novel."))
    fine_tune_existing: bool = field(default=True, metadata=_help(
        "Not novel: fine-tune the matched skill's expert (consolidation phase); False = leave it as is."))
    rank_schedule: list[int] = field(default_factory=lambda: [16], metadata=_help(
        "Rank of the expert of the k-th skill (k = skills already in the library); the last value repeats, "
        "e.g. [8, 16, 32]."))
    alpha_ratio: float = field(default=2.0, metadata=_help("alpha = alpha_ratio x rank for a new expert."))
    seed_steps: int = field(default=10, metadata=_help("Steps of the high-rate seeding phase."))
    seed_lr: float = field(default=1e-3, metadata=_help("Learning rate of the seeding phase (constant)."))
    consolidate_steps: int = field(default=20, metadata=_help("Steps of the low-rate consolidation phase."))
    consolidate_lr: float = field(default=1e-4, metadata=_help(
        "Peak learning rate of the consolidation phase (cosine decay to 0)."))
    batch_size: int = field(default=4, metadata=_help("Sequences per step (new skill and replay together)."))
    max_seq_length: int = field(default=512, metadata=_help("Longer examples are dropped."))
    protection: str = field(default="replay", metadata=_help(
        "How the router keeps routing old skills: 'replay' (replayed examples of earlier skills in every "
        "batch, with routing supervision), 'freeze_rows' (the router outputs of earlier experts are frozen), "
        "'both' or 'none'."))
    router_lr: float = field(default=1e-2, metadata=_help(
        "Learning rate of the router (constant, both phases): it is tiny and must re-learn where every skill "
        "goes within a few dozen steps."))
    router_loss_coef: float = field(default=1.0, metadata=_help(
        "Weight of the routing supervision: cross-entropy of the router towards the skill's expert."))
    router_guard: bool = field(default=True, metadata=_help(
        "After training a new expert, lower its router bias until no routed unit of the replayed examples of "
        "earlier skills picks it (continual/protection.py); needs a library with replay examples."))
    router_guard_margin: float = field(default=0.5, metadata=_help(
        "Margin of the router guard, in log-probability: the new expert ends at least this far below the "
        "chosen experts on the replayed units it guards."))
    router_guard_leak: float = field(default=0.0, metadata=_help(
        "Share of the replayed units of earlier skills the router guard may leave routed to the new expert: 0 "
        "guards every one (the strongest protection; the new skill may then keep fewer of its own units)."))
    replay_fraction: float = field(default=0.5, metadata=_help(
        "Share of each batch taken from the replay buffer (when there are earlier skills and replay is on)."))
    replay_per_skill: int = field(default=32, metadata=_help(
        "Examples of each skill kept in the checkpoint's replay buffer."))
    embed_examples: int = field(default=256, metadata=_help("Examples used for a skill's embedding."))
    seed: int = field(default=0, metadata=_help("Seed of data order, dropout and replay sampling."))

    def validate(self, source: str = "continual config", origins: dict[str, str] | None = None) -> None:
        def fail(key: str, message: str) -> ConfigError:
            return ConfigError(f"{source}: '{key}' {message}")

        if self.similarity not in ("raw", "standardized"):
            raise fail("similarity", f"must be 'raw' or 'standardized', got {self.similarity!r}")
        if self.reduction not in ("max", "median"):
            raise fail("reduction", f"must be 'max' or 'median', got {self.reduction!r}")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise fail("threshold", f"is a similarity in [-1, 1] (or null for the default), got {self.threshold}")
        if self.protection not in PROTECTIONS:
            raise fail("protection", f"must be one of {PROTECTIONS}, got {self.protection!r}")
        if not self.rank_schedule or any(r < 1 for r in self.rank_schedule):
            raise fail("rank_schedule", f"must be a non-empty list of ranks >= 1, got {self.rank_schedule}")
        for key in ("seed_steps", "consolidate_steps", "replay_per_skill"):
            if getattr(self, key) < 0:
                raise fail(key, f"must be >= 0, got {getattr(self, key)}")
        if self.seed_steps + self.consolidate_steps < 1:
            raise fail("seed_steps", "and consolidate_steps must add up to at least one step")
        for key in ("batch_size", "max_seq_length", "embed_examples"):
            if getattr(self, key) < 1:
                raise fail(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("seed_lr", "consolidate_lr", "alpha_ratio", "router_lr"):
            if not getattr(self, key) > 0:
                raise fail(key, f"must be > 0, got {getattr(self, key)}")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise fail("replay_fraction", f"must be in [0, 1), got {self.replay_fraction}")
        if not 0.0 <= self.router_guard_leak < 1.0:
            raise fail("router_guard_leak", f"must be in [0, 1), got {self.router_guard_leak}")
        if self.router_guard_margin < 0:
            raise fail("router_guard_margin", f"must be >= 0, got {self.router_guard_margin}")
        if self.router_loss_coef < 0:
            raise fail("router_loss_coef", f"must be >= 0, got {self.router_loss_coef}")

    def resolved_threshold(self) -> float:
        """``threshold``, or the default of ``similarity`` when it is None."""
        return self.threshold if self.threshold is not None else DEFAULT_THRESHOLDS[self.similarity]

    def rank_for(self, skill_number: int) -> int:
        return self.rank_schedule[min(skill_number, len(self.rank_schedule) - 1)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "continual config",
                  overrides: list[str] | tuple[str, ...] = ()) -> ContinualConfig:
        config = build_config(cls, data, source, list(overrides))
        config.validate(source)
        return config


#: the methods of the continual benchmark (study/continual_benchmark.py): ours, three sequential baselines, two bounds
METHODS = ("dylora", "sequential_lora", "replay_lora", "olora", "multitask_lora", "oracle")


@dataclass
class ContinualRunConfig:
    """A continual-learning benchmark run (study/continual_benchmark.py): skills learned in order, several orders,
    DyLoRA-MoE against sequential baselines and bounds."""

    model: str = field(default="smollm2-135m", metadata=_help("Base model: hub id, folder or 'smollm2-135m'."))
    stages: list[str] = field(default_factory=lambda: ["mbpp", "code_alpaca:sql", "code_alpaca:javascript"],
                              metadata=_help("Skills in order: dataset names, code_alpaca:<language> or files."))
    orders: list[list[int]] | None = field(default=None, metadata=_help(
        "Task orders, each a permutation of the stage indices (e.g. [[0,1,2],[2,0,1]]); None = the stages' order."))
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata=_help(
        "Methods side by side: 'dylora' (novelty detection, expert growth, router protection), "
        "'sequential_lora' (one LoRA fine-tuned stage after stage), 'replay_lora' (the same with DyLoRA's replay "
        "buffer in every batch), 'olora' (a new LoRA block per stage, earlier blocks frozen, its A kept "
        "orthogonal to theirs; all summed at inference), and the bounds 'multitask_lora' (one LoRA on every skill "
        "at once, the same total steps) and 'oracle' (one LoRA per skill, the true skill given)."))
    output_dir: str = field(default="runs/continual", metadata=_help(
        "Where continual.json, the plots and the finished units (units/*.json, so a run resumes) go."))
    train_examples: int | None = field(default=256, metadata=_help("Training examples per stage (None = all)."))
    eval_examples: int = field(default=32, metadata=_help("Held-out examples per skill for the loss matrix."))
    rank: int = field(default=16, metadata=_help("Rank of each expert, of the sequential LoRAs and of each O-LoRA "
                                                 "block and oracle LoRA."))
    multitask_rank: int | None = field(default=None, metadata=_help(
        "Rank of the multi-task LoRA; None = rank x the number of skills (DyLoRA's adapter size at the end)."))
    olora_lambda: float = field(default=0.5, metadata=_help(
        "Weight of O-LoRA's orthogonality loss: the squared entries of A_new A_old^T, summed over earlier blocks "
        "and adapted modules."))
    baseline: bool = field(default=True, metadata=_help(
        "False drops 'sequential_lora' from the methods (kept for older configs)."))
    protections: list[str] = field(default_factory=list, metadata=_help(
        "Extra DyLoRA runs with these router protections, to compare with continual.protection."))
    exact_match: list[str] = field(default_factory=list, metadata=_help(
        "Stages whose held-out answers are also scored by numeric exact match after every stage (e.g. asdiv)."))
    exact_match_limit: int = field(default=50, metadata=_help("Held-out examples of each exact-match score."))
    detector_batches: int = field(default=4, metadata=_help("Batches per skill in the detector's stream."))
    detector_batch_size: int = field(default=16, metadata=_help("Examples per detector batch."))
    eval_batch_size: int = field(default=8, metadata=_help("Batch size of the held-out loss."))
    data_dir: str | None = field(default=None, metadata=_help("Data directory."))
    device: str = field(default="cpu", metadata=_help("cpu, cuda or auto."))
    continual: ContinualConfig = field(default_factory=ContinualConfig, metadata=_help(
        "The skill lifecycle settings (every method uses the same phases, rates, batch size and replay buffer)."))

    def validate(self, source: str = "continual run config", origins: dict[str, str] | None = None) -> None:
        if not self.stages:
            raise ConfigError(f"{source}: 'stages' is empty")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"{source}: 'methods' {unknown or '[]'} not known; choose from {list(METHODS)}")
        for i, order in enumerate(self.orders or []):
            if sorted(order) != list(range(len(self.stages))):
                raise ConfigError(f"{source}: 'orders[{i}]' = {order} is not a permutation of the stage indices "
                                  f"0..{len(self.stages) - 1}")
        missing = [s for s in self.exact_match if s not in self.stages]
        if missing:
            raise ConfigError(f"{source}: 'exact_match' names {missing}, which are not stages ({self.stages})")
        for key in ("rank", "eval_examples", "exact_match_limit", "detector_batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{source}: '{key}' must be >= 1, got {getattr(self, key)}")
        if self.multitask_rank is not None and self.multitask_rank < 1:
            raise ConfigError(f"{source}: 'multitask_rank' must be >= 1 or null, got {self.multitask_rank}")
        if self.olora_lambda < 0:
            raise ConfigError(f"{source}: 'olora_lambda' must be >= 0, got {self.olora_lambda}")
        self.continual.validate(source, origins)

    def task_orders(self) -> list[list[int]]:
        """The orders to run (stage indices)."""
        return [list(o) for o in self.orders] if self.orders else [list(range(len(self.stages)))]

    def active_methods(self) -> list[str]:
        return [m for m in self.methods if self.baseline or m != "sequential_lora"]
