"""Study configuration: the variants (arms) of the quality study and the study config (YAML / JSON)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.configs import build_config, read_yaml_mapping
from ..config import help_metadata as _help
from ..errors import ConfigError
from ..errors import StudyError as StudyError
from ..training.config import TrainConfig

STUDY_FORMAT_VERSION = 1
UNIT_FILE = "unit.json"


@dataclass
class VariantConfig:
    """One arm of the study: train-config overrides applied on top of the study's common ones."""

    name: str = field(metadata=_help("Unique name; also the folder of its units."))
    overrides: list[str] = field(default_factory=list, metadata=_help(
        "Train-config overrides (dotted KEY=VALUE), e.g. moe.num_experts=1 or moe.routing=token."))
    group: str = field(default="main", metadata=_help(
        "Table the variant belongs to: 'main' (mixture vs LoRA) or a sweep name (balance_coef, ...)."))
    seeds: list[int] | None = field(default=None, metadata=_help(
        "Seeds of this variant (default: the study's seeds)."))
    pass_at_1: bool = field(default=True, metadata=_help(
        "Measure sandboxed pass@1 on the study's benchmarks (the expensive part)."))
    description: str = field(default="", metadata=_help("One line for the tables."))


def default_variants() -> list[VariantConfig]:
    """The study of issue #8: 4 x r=16 (sequence and token routing) against LoRA r=16 and r=64 (the same
    trainable adapter parameters as 4 x r=16), plus sweeps of the balance coefficient, the router
    temperature and the data mixing, each changing one setting of the sequence-routed mixture the study
    started from (the default then: temperature 2), the temperature of the token-routed mixture, and the
    straight-through gate on token routing at temperature 1. Every mixture names its routing, temperature
    and gate, so the variants mean the same whatever the defaults."""
    v, pg = VariantConfig, "moe.gate=probability"
    sequence, token, t2 = ["moe.routing=sequence", pg], ["moe.routing=token", pg], "moe.temperature=2.0"
    seq, tok = [*sequence, t2], [*token, t2]
    return [
        v("moe4_seq", seq, "main", description="DyLoRA-MoE 4 x r=16, sequence routing, temperature 2"),
        v("moe4_token", tok, "main", description="DyLoRA-MoE 4 x r=16, token routing, temperature 2"),
        v("lora_r16", ["moe.num_experts=1"], "main", description="one LoRA r=16"),
        v("lora_r64", ["moe.num_experts=1", "moe.r=64", "moe.alpha=128"], "main",
          description="one LoRA r=64 (adapter parameters of 4 x r=16)"),
        v("coef_0", [*seq, "moe.balance_coef=0.0"], "balance_coef", [0], False, "balance_coef 0"),
        v("coef_0.001", [*seq, "moe.balance_coef=0.001"], "balance_coef", [0], False, "balance_coef 0.001"),
        v("coef_0.1", [*seq, "moe.balance_coef=0.1"], "balance_coef", [0], False, "balance_coef 0.1"),
        v("temp_1", [*sequence, "moe.temperature=1.0"], "temperature", [0], False, "router temperature 1"),
        v("temp_4", [*sequence, "moe.temperature=4.0"], "temperature", [0], False, "router temperature 4"),
        v("token_temp_1", [*token, "moe.temperature=1.0"], "temperature", None, True,
          "token routing, router temperature 1, probability gate (the defaults before the gate study; every "
          "seed, with pass@1)"),
        v("concat", [*seq, "data.mixing=concatenate"], "mixing", [0], False, "plain concatenation (no 50/50)"),
        v("token_st", ["moe.routing=token", "moe.temperature=1.0", "moe.gate=straight_through"], "gate", None,
          True, "token routing, temperature 1, straight-through gate (exactly 1; docs/results.md proposal 1; "
          "the defaults since; every seed, with pass@1)"),
    ]


@dataclass
class StudyConfig:
    """A quality study: a train config, common overrides, variants, seeds and what to measure."""

    train_config: str = field(default="configs/cpu-demo.yaml", metadata=_help(
        "YAML TrainConfig every unit starts from (model, data, steps, optimiser)."))
    output_dir: str = field(default="runs/study", metadata=_help("Where units, quality.json and plots go."))
    overrides: list[str] = field(default_factory=list, metadata=_help(
        "Train-config overrides applied to every unit, before the variant's."))
    seeds: list[int] = field(default_factory=lambda: [0], metadata=_help("Seeds of every variant by default."))
    variants: list[VariantConfig] = field(default_factory=default_variants, metadata=_help(
        "The arms of the study (see default_variants)."))
    baseline: str = field(default="lora_r64", metadata=_help(
        "Variant the others are compared with in quality.json's 'vs_baseline' (equal adapter parameters)."))
    benchmarks: list[str] = field(default_factory=lambda: ["humaneval", "mbpp"], metadata=_help(
        "Benchmarks of pass@1 (greedy, sandboxed)."))
    eval_limit: int | None = field(default=None, metadata=_help("First N problems per benchmark (None = all)."))
    exact_match: list[str] = field(default_factory=list, metadata=_help(
        "Domains of the train config whose held-out answers are scored by numeric exact match (e.g. asdiv), with "
        "the variants that measure pass@1."))
    exact_match_limit: int | None = field(default=None, metadata=_help(
        "First N held-out examples per exact-match domain (None = all)."))
    eval_batch_size: int = field(default=8, metadata=_help("Generation batch size of pass@1."))
    max_new_tokens: int = field(default=512, metadata=_help("Generation length cap of pass@1."))
    eval_workers: int | None = field(default=None, metadata=_help("Sandbox workers (default: CPU count)."))
    analysis_examples: int | None = field(default=None, metadata=_help(
        "Validation examples per domain for the routing analysis (None = whole split)."))
    device: str = field(default="auto", metadata=_help("Device of pass@1 and analysis: auto, cpu, cuda[:N]."))
    parallel: int = field(default=1, metadata=_help(
        "Units run at once, each in its own process; with several GPUs each running unit gets its own. "
        "On one GPU, training units share it well (9 at once kept an H100 at 100%: 18 units in 7.3 min), "
        "but each pass@1 at batch 256 needs about 38 GB: run losses first with benchmarks=[]. Each unit gets "
        "its share of the CPU cores (OMP_NUM_THREADS / MKL_NUM_THREADS, unless set already)."))
    data_dir: str | None = field(default=None, metadata=_help("Data directory (sets data.data_dir of every unit)."))

    def validate(self, source: str = "study config", origins: dict[str, str] | None = None) -> None:
        names = [v.name for v in self.variants]
        if not names:
            raise ConfigError(f"{source}: 'variants' is empty")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"{source}: variant names must be unique, repeated: {duplicates}")
        for v in self.variants:
            if not v.name or "/" in v.name or v.name.startswith("."):
                raise ConfigError(f"{source}: variant name {v.name!r} must be a plain folder name")
        if self.baseline not in names:
            raise ConfigError(f"{source}: baseline {self.baseline!r} is not a variant (variants: {names})")
        if not self.seeds:
            raise ConfigError(f"{source}: 'seeds' is empty")
        unknown = sorted(set(self.benchmarks) - {"humaneval", "mbpp"})
        if unknown:
            raise ConfigError(f"{source}: unknown benchmark(s) {unknown}; known: humaneval, mbpp")
        for name in ("eval_batch_size", "max_new_tokens", "parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{source}: '{name}' must be >= 1, got {getattr(self, name)}")
        for name in ("exact_match_limit",):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{source}: '{name}' must be >= 1 or null, got {getattr(self, name)}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ConfigError(f"{source}: 'eval_limit' must be >= 1 or null, got {self.eval_limit}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "study config",
                  overrides: Sequence[str] = ()) -> StudyConfig:
        config = build_config(cls, data, source, list(overrides))
        config.validate(source)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> StudyConfig:
        return cls.from_dict(read_yaml_mapping(path, "study config file"), str(path), overrides)

    def variant(self, name: str) -> VariantConfig:
        for v in self.variants:
            if v.name == name:
                return v
        raise ConfigError(f"no variant {name!r} in the study (variants: {[v.name for v in self.variants]})")

    def units(self) -> list[tuple[VariantConfig, int]]:
        """Every (variant, seed), first seeds first: a study cut short still covers every variant once."""
        seeds = {v.name: list(v.seeds or self.seeds) for v in self.variants}
        rounds = max(len(s) for s in seeds.values())
        return [(v, seeds[v.name][i]) for i in range(rounds) for v in self.variants if i < len(seeds[v.name])]

    def unit_dir(self, variant: str, seed: int) -> Path:
        return Path(self.output_dir) / variant / f"seed{seed}"

    def unit_train_config(self, variant: VariantConfig, seed: int) -> TrainConfig:
        """The unit's TrainConfig: the YAML, the common overrides, the variant's, then seed and output."""
        out = self.unit_dir(variant.name, seed) / "train"
        pinned = [f"seed={seed}", f"output_dir={out}", "overwrite_output_dir=true"]
        if self.data_dir is not None:
            pinned.append(f"data.data_dir={self.data_dir}")
        return TrainConfig.from_yaml(self.train_config, [*self.overrides, *variant.overrides, *pinned])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

