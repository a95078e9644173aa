"""Quality study: does the mixture earn its keep against single-LoRA baselines with the same budget?

Every *unit* (one variant, one seed) trains from the same train config (default ``configs/cpu-demo.yaml``:
the default model, Code Alpaca 2k + MBPP train), with the same steps, data order and seed, changed only by
the variant's overrides; then it measures

* per-domain held-out loss (the trainer's evaluation, the same examples for every unit) and its curve,
* sandboxed greedy pass@1 on HumanEval and the MBPP test split (:func:`dylora_moe.evaluation.evaluate`,
  full sets unless ``eval_limit``),
* routing specialisation on the validation splits (:func:`dylora_moe.evaluation.analyze`: the domain x
  expert share matrix, normalised mutual information, router entropy, per-expert load),
* training time.

A unit's results go to ``<output_dir>/<variant>/seed<k>/unit.json`` (written last, atomically), and a study
skips complete units, so an interrupted study resumes. :func:`report` aggregates every unit into
``quality.json`` (mean and spread over seeds) and plots ``loss_curves.png``, ``share_matrices.png`` and
``pass_at_1.png``. Units record a digest of the token ids they trained and were evaluated on; the report
refuses to aggregate units whose digests differ (e.g. made with a tokenizer that chose another EOS), since
their losses are not comparable. Run it from the command line::

    dylora-moe study --config configs/study.yaml [--parallel 4] [--report-only] [KEY=VALUE ...]
    python benchmarks/quality.py --config configs/study.yaml          # the same

or from Python: ``run_study(StudyConfig.from_yaml("configs/study.yaml"))``. The single-LoRA baselines run
through the same code as the mixture: one expert is one LoRA (the router has nothing to choose), so data,
formatting, optimiser and evaluation are identical by construction. docs/results.md has the results.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ConfigError

__all__ = ["StudyConfig", "StudyError", "VariantConfig", "default_variants", "report", "run_study", "run_unit"]

STUDY_FORMAT_VERSION = 1
UNIT_FILE = "unit.json"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


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
    started from (the default then: temperature 2), and the temperature of the token-routed mixture. Every
    mixture names its routing and temperature, so the variants mean the same whatever the defaults."""
    v, sequence, token, t2 = VariantConfig, "moe.routing=sequence", "moe.routing=token", "moe.temperature=2.0"
    seq, tok = [sequence, t2], [token, t2]
    return [
        v("moe4_seq", seq, "main", description="DyLoRA-MoE 4 x r=16, sequence routing, temperature 2"),
        v("moe4_token", tok, "main", description="DyLoRA-MoE 4 x r=16, token routing, temperature 2"),
        v("lora_r16", ["moe.num_experts=1"], "main", description="one LoRA r=16"),
        v("lora_r64", ["moe.num_experts=1", "moe.r=64", "moe.alpha=128"], "main",
          description="one LoRA r=64 (adapter parameters of 4 x r=16)"),
        v("coef_0", [*seq, "moe.balance_coef=0.0"], "balance_coef", [0], False, "balance_coef 0"),
        v("coef_0.001", [*seq, "moe.balance_coef=0.001"], "balance_coef", [0], False, "balance_coef 0.001"),
        v("coef_0.1", [*seq, "moe.balance_coef=0.1"], "balance_coef", [0], False, "balance_coef 0.1"),
        v("temp_1", [sequence, "moe.temperature=1.0"], "temperature", [0], False, "router temperature 1"),
        v("temp_4", [sequence, "moe.temperature=4.0"], "temperature", [0], False, "router temperature 4"),
        v("token_temp_1", [token, "moe.temperature=1.0"], "temperature", None, False,
          "token routing, router temperature 1 (the defaults since the study; every seed)"),
        v("concat", [*seq, "data.mixing=concatenate"], "mixing", [0], False, "plain concatenation (no 50/50)"),
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
    eval_batch_size: int = field(default=8, metadata=_help("Generation batch size of pass@1."))
    max_new_tokens: int = field(default=512, metadata=_help("Generation length cap of pass@1."))
    eval_workers: int | None = field(default=None, metadata=_help("Sandbox workers (default: CPU count)."))
    analysis_examples: int | None = field(default=None, metadata=_help(
        "Validation examples per domain for the routing analysis (None = whole split)."))
    device: str = field(default="auto", metadata=_help("Device of pass@1 and analysis: auto, cpu, cuda[:N]."))
    parallel: int = field(default=1, metadata=_help(
        "Units run at once, each in its own process; with several GPUs each running unit gets its own. "
        "On one GPU, training units share it well (9 at once kept an H100 at 100%: 18 units in 7.3 min), "
        "but each pass@1 at batch 256 needs about 38 GB: run losses first with benchmarks=[]."))
    data_dir: str | None = field(default=None, metadata=_help("Data directory (sets data.data_dir of every unit)."))

    def validate(self, source: str = "study config") -> None:
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
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ConfigError(f"{source}: 'eval_limit' must be >= 1 or null, got {self.eval_limit}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "study config",
                  overrides: Sequence[str] = ()) -> StudyConfig:
        from .training.config import build_config

        config = build_config(cls, data, source, list(overrides))
        config.validate(source)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> StudyConfig:
        from .training.config import read_yaml_mapping

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

    def unit_train_config(self, variant: VariantConfig, seed: int):
        """The unit's TrainConfig: the YAML, the common overrides, the variant's, then seed and output."""
        from .training import TrainConfig

        out = self.unit_dir(variant.name, seed) / "train"
        pinned = [f"seed={seed}", f"output_dir={out}", "overwrite_output_dir=true"]
        if self.data_dir is not None:
            pinned.append(f"data.data_dir={self.data_dir}")
        return TrainConfig.from_yaml(self.train_config, [*self.overrides, *variant.overrides, *pinned])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- one unit
def run_unit(study: StudyConfig, variant: VariantConfig, seed: int, progress: bool = True) -> dict[str, Any]:
    """Train, analyse and evaluate one (variant, seed); returns (and writes) the unit's ``unit.json``.

    ``unit.json`` is written after training and the routing analysis, then rewritten after each benchmark's
    pass@1, so a unit cut short keeps what it measured. A unit whose ``unit.json`` lacks a pass@1 the study
    asks for (cut short, or run earlier with fewer benchmarks) resumes from its saved adapter and only
    evaluates what is missing (or, when that adapter is gone, runs again from training).
    """
    from .evaluation.harness import load_for_eval
    from .serialization import WEIGHTS_FILE

    done = study.unit_dir(variant.name, seed) / UNIT_FILE
    unit = json.loads(done.read_text()) if done.is_file() else None
    if unit is not None and not _missing_benchmarks(study, variant, unit):
        return unit
    config = study.unit_train_config(variant, seed)
    adapter = done.parent / "train" / "final"
    if unit is not None and not (adapter / WEIGHTS_FILE).is_file():
        print(f"{variant.name} seed {seed}: {done} lacks pass@1 and its adapter {adapter} is gone: "
              "training the unit again", flush=True)
        unit = None
    if unit is None:
        unit, model, tokenizer = _train_and_analyse(study, variant, seed, config, progress)
    else:
        model, tokenizer = load_for_eval(adapter, device=study.device)
        model.eval()
    for benchmark in _missing_benchmarks(study, variant, unit):
        unit["pass_at_1"][benchmark] = _pass_at_1(study, model, tokenizer, benchmark, done.parent, config, progress)
        _write_json(done, unit)
    return unit


def _missing_benchmarks(study: StudyConfig, variant: VariantConfig, unit: dict[str, Any]) -> list[str]:
    return [b for b in study.benchmarks if variant.pass_at_1 and b not in unit["pass_at_1"]]


def _pass_at_1(study: StudyConfig, model: Any, tokenizer: Any, benchmark: str, unit_dir: Path, config: Any,
               progress: bool) -> dict[str, Any]:
    from .evaluation import evaluate

    summary = evaluate(model, tokenizer, benchmark=benchmark, output_dir=unit_dir / "eval" / benchmark,
                       limit=study.eval_limit, batch_size=study.eval_batch_size,
                       max_new_tokens=study.max_new_tokens, workers=study.eval_workers,
                       data_dir=config.data.data_dir, progress=progress)
    return {"pass@1": summary["pass@k"]["pass@1"], "problems": summary["problems"],
            "outcomes": summary["outcomes"], "experts": summary["experts"],
            "eval_time_s": summary["timing"]["total_s"]}


def _train_and_analyse(study: StudyConfig, variant: VariantConfig, seed: int, config: Any,
                       progress: bool) -> tuple[dict[str, Any], Any, Any]:
    """Train the unit, run the routing analysis, write ``unit.json`` (no pass@1 yet); ``(unit, model, tok)``."""
    import torch

    from .evaluation import analyze
    from .evaluation.harness import load_for_eval
    from .training import JointTrainer

    unit_dir = study.unit_dir(variant.name, seed)
    started = time.monotonic()
    result = JointTrainer(config).train()
    metrics = result.metrics
    del result
    model, tokenizer = load_for_eval(unit_dir / "train" / "final", device=study.device)
    model.eval()
    domains = [d.domain or d.name for d in config.data.datasets]
    data = [d.path or d.name for d in config.data.datasets]
    with torch.inference_mode():
        analysis = analyze(model, data, tokenizer=tokenizer, output_dir=unit_dir / "analysis",
                           limit=study.analysis_examples, batch_size=config.data.eval_batch_size,
                           max_seq_length=config.data.max_seq_length, data_dir=config.data.data_dir,
                           progress=progress)
    load = analysis["expert_load"]
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
        "unit_time_s": time.monotonic() - started,
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
        "domains": domains,
        "share_matrix": analysis["share_matrix"],
        "nmi": analysis["nmi"],
        "router_entropy": analysis["router_entropy"],
        "expert_load": load,
        "load_imbalance": max(load) / (1.0 / len(load)) if load else None,
        "analysis_loss": {d: analysis["domains"][d]["loss"] for d in analysis["domain_names"]},
    }
    _write_json(unit_dir / UNIT_FILE, unit)
    return unit, model, tokenizer


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(payload, indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the study
def _unit_complete(study: StudyConfig, variant: VariantConfig, seed: int) -> bool:
    path = study.unit_dir(variant.name, seed) / UNIT_FILE
    return path.is_file() and not _missing_benchmarks(study, variant, json.loads(path.read_text()))


def run_study(study: StudyConfig, progress: bool = True, report_only: bool = False) -> dict[str, Any]:
    """Run every unit not yet complete (``parallel`` at a time, each in its own process when > 1), then
    :func:`report`. A failing unit is reported by name at the end; the others still run."""
    out = Path(study.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "study_config.json"
    _write_json(config_path, {"format_version": STUDY_FORMAT_VERSION, "config": study.to_dict()})
    pending = [(v, s) for v, s in study.units() if not _unit_complete(study, v, s)]
    failures: list[str] = []
    if not report_only and pending:
        if study.parallel == 1:
            for variant, seed in pending:
                print(f"--- unit {variant.name} seed {seed} ---", flush=True)
                run_unit(study, variant, seed, progress)
        else:
            failures = _run_parallel(study, config_path, pending)
    quality = report(study)
    if failures:
        raise RuntimeError(f"{len(failures)} unit(s) failed (logs next to them): {', '.join(failures)}")
    return quality


def _visible_gpus() -> list[str]:
    """The GPUs units can be spread over: CUDA_VISIBLE_DEVICES's entries, else every device torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _run_parallel(study: StudyConfig, config_path: Path, pending: list[tuple[VariantConfig, int]]) -> list[str]:
    """Each unit in a child process (``python -m dylora_moe.study unit ...``), ``parallel`` at a time. With
    several GPUs, each running unit gets its own (``CUDA_VISIBLE_DEVICES``, round robin over free slots)."""
    queue, running, failures = list(pending), [], []
    gpus = _visible_gpus() if study.device in ("auto", "cuda") else []
    while queue or running:
        while queue and len(running) < study.parallel:
            variant, seed = queue.pop(0)
            log = study.unit_dir(variant.name, seed) / "unit.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            slot = min(set(range(study.parallel)) - {item[4] for item in running})
            env = dict(os.environ)
            if len(gpus) > 1:
                env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
            handle = open(log, "w")  # noqa: SIM115 (closed when the child ends)
            cmd = [sys.executable, "-m", "dylora_moe.study", "unit", str(config_path), variant.name, str(seed)]
            proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            running.append((proc, handle, f"{variant.name}/seed{seed}", time.monotonic(), slot))
            where = f" on GPU {env['CUDA_VISIBLE_DEVICES']}" if len(gpus) > 1 else ""
            print(f"started {variant.name} seed {seed}{where} (log: {log})", flush=True)
        time.sleep(0.5)
        for item in list(running):
            proc, handle, name, began, _ = item
            if proc.poll() is not None:
                handle.close()
                running.remove(item)
                status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                print(f"{name}: {status} in {time.monotonic() - began:.0f}s", flush=True)
                if proc.returncode != 0:
                    failures.append(name)
    return failures


# ----------------------------------------------------------------------------- aggregation
def _spread(values: Sequence[float]) -> dict[str, Any]:
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


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
            "eval_loss_start": {d: _spread([u["eval_loss_start"][d] for u in units]) for d in domains},
            "pass_at_1": {b: _spread([u["pass_at_1"][b]["pass@1"] for u in units if b in u["pass_at_1"]])
                          for b in study.benchmarks if any(b in u["pass_at_1"] for u in units)},
            "nmi": _spread([u["nmi"] for u in units]),
            "router_entropy": _spread([u["router_entropy"] for u in units]),
            "load_imbalance": _spread([u["load_imbalance"] for u in units]),
            "expert_load": [u["expert_load"] for u in units],
            "share_matrix": units[0]["share_matrix"],
            "train_time_s": _spread([u["train_time_s"] for u in units]),
            "eval_curve": _mean_curve([u["eval_curve"] for u in units], domains),
            "units": units,
        }
        variants[variant.name] = entry
    quality = {"format_version": STUDY_FORMAT_VERSION, "train_config": study.train_config,
               "overrides": study.overrides, "benchmarks": study.benchmarks, "eval_limit": study.eval_limit,
               "baseline": study.baseline, "data_sha256": data_sha256, "variants": variants,
               "vs_baseline": _versus(variants, study.baseline)}
    _write_json(out / "quality.json", quality)
    if variants:
        plot_study(quality, out)
        (out / "results_table.md").write_text(results_table(quality) + "\n")
    return quality


class StudyError(RuntimeError):
    """The study's units cannot be aggregated as they are; the message names the units."""


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
        head = (["variant", "seeds", "adapter params"] + [f"loss {d}" for d in domains]
                + [f"pass@1 {b}" for b in benchmarks] + ["NMI", "router entropy", "max load / uniform", "train s"])
        lines += [f"### {group}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for n in names:
            v = variants[n]
            cells = [f"`{n}`", str(len(v["seeds"])), f"{v['trainable_parameters']:,}"]
            cells += [_fmt(v["eval_loss"][d], 4) for d in domains]
            cells += [_fmt(v["pass_at_1"].get(b), seeds=len(v["seeds"])) for b in benchmarks]
            cells += [_fmt(v["nmi"]), _fmt(v["router_entropy"]), _fmt(v["load_imbalance"], 2),
                      _fmt(v["train_time_s"], 1)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_study(quality: dict[str, Any], out: Path) -> list[Path]:
    """``loss_curves.png`` (held-out loss per domain over steps), ``share_matrices.png`` (one heatmap per
    mixture variant, first seed) and ``pass_at_1.png`` (bars with the spread over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    variants = quality["variants"]
    written = []
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
    fig.tight_layout()
    written.append(out / "loss_curves.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    mixtures = [(n, v) for n, v in variants.items() if v["num_experts"] > 1]
    if mixtures:
        cols = min(4, len(mixtures))
        rows = math.ceil(len(mixtures) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False)
        for ax in axes.flat[len(mixtures):]:
            ax.axis("off")
        for ax, (name, v) in zip(axes.flat, mixtures):
            matrix = v["share_matrix"]
            ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for i, row in enumerate(matrix):
                for j, value in enumerate(row):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if value < 0.5 else "black")
            ax.set_yticks(range(len(domains)), domains, fontsize=7)
            ax.set_xticks(range(len(matrix[0])), [f"e{j}" for j in range(len(matrix[0]))], fontsize=7)
            nmi = v["nmi"]["mean"]
            ax.set_title(f"{name}  NMI {nmi:.2f}" if nmi is not None else name, fontsize=8)
        fig.tight_layout()
        written.append(out / "share_matrices.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    scored = [(n, v) for n, v in variants.items() if v["pass_at_1"]]
    if scored:
        benchmarks = [b for b in quality["benchmarks"] if any(b in v["pass_at_1"] for _, v in scored)]
        fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(scored), 3.6))
        width = 0.8 / len(benchmarks)
        for k, b in enumerate(benchmarks):
            xs = [i + k * width for i in range(len(scored))]
            means = [v["pass_at_1"].get(b, {}).get("mean") or 0.0 for _, v in scored]
            errs = [v["pass_at_1"].get(b, {}).get("std") or 0.0 for _, v in scored]
            ax.bar(xs, means, width, yerr=errs, label=b, capsize=3)
        ax.set_xticks([i + width * (len(benchmarks) - 1) / 2 for i in range(len(scored))], [n for n, _ in scored],
                      fontsize=8)
        ax.set_ylabel("pass@1 (greedy)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(out / "pass_at_1.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def _unit_main(argv: Sequence[str]) -> int:
    """``python -m dylora_moe.study unit STUDY_CONFIG_JSON VARIANT SEED``: one unit (used by --parallel)."""
    if len(argv) != 4 or argv[0] != "unit":
        print("usage: python -m dylora_moe.study unit STUDY_CONFIG_JSON VARIANT SEED", file=sys.stderr)
        return 2
    payload = json.loads(Path(argv[1]).read_text())
    study = StudyConfig.from_dict(payload["config"], argv[1])
    run_unit(study, study.variant(argv[2]), int(argv[3]), progress=False)
    return 0


if __name__ == "__main__":
    sys.exit(_unit_main(sys.argv[1:]))
