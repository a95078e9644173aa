"""``TrainConfig``: everything a joint-training run needs, loaded from YAML with ``key=value`` overrides.

A config file has four top-level keys plus three sections, each a dataclass below::

    model: smollm2-135m            # hub id, local folder, or the embedded alias
    output_dir: runs/cpu-demo
    seed: 0
    moe:   {num_experts: 4, r: 16, alpha: 32, dropout: 0.05}      # DyLoRAMoEConfig
    data:                                                          # DataConfig
      datasets: [{name: code_alpaca}, {name: mbpp}]                # DatasetConfig each
      max_seq_length: 256
    train: {lr: 3.0e-4, per_device_batch_size: 4, max_steps: 20}   # TrainingArgs

Overrides address a key by its dotted path (``moe.num_experts=8``, ``train.lr=1e-4``,
``data.datasets.1.weight=2``, ``model=smollm2-135m``): the config engine (``dylora_moe.common.configs``)
type-checks every value against the dataclass annotations, and ``validate`` checks the values; a
``ConfigError`` names the file (or the override) and the dotted key::

    cfg = TrainConfig.from_yaml("configs/cpu-demo.yaml", ["train.max_steps=2"])
    cfg.to_json_file("runs/x/train_config.json")      # {"format_version": 1, "config": {...}}
    cfg = TrainConfig.from_json_file("runs/x/train_config.json")
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common.configs import apply_overrides, build, lookup, read_yaml_mapping
from ..common.configs import config_reference as _reference
from ..common.configs import config_reference_markdown as _reference_markdown
from ..config import DyLoRAMoEConfig, with_predating_values
from ..config import help_metadata as _help
from ..data.mixing import MODES
from ..errors import ConfigError
from .reporters import check_reporters

CONFIG_FORMAT_VERSION = 1
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BASE_DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
DATASET_FORMATS = ("instruction", "messages")  # as loading.QUANTIZATIONS (this module stays torch-free)
SCHEDULERS = ("cosine", "linear", "constant")
#: multi-process engines of train.distributed (training/sharding.py has FSDP)
ENGINES = ("ddp", "fsdp")
DEFAULT_MODEL = "Qwen/Qwen2.5-Coder-0.5B-Instruct"


@dataclass
class DatasetConfig:
    """One training dataset (an entry of ``data.datasets``)."""

    name: str = field(metadata=_help(
        "Registered dataset ('code_alpaca', 'mbpp') or a new name for a local instruction file (then 'path' "
        "is required)."))
    path: str | None = field(default=None, metadata=_help(
        "JSON/JSONL file; relative paths are looked up in the data directory. Default: the registered file."))
    domain: str | None = field(default=None, metadata=_help("Domain label (default: the name); must be unique."))
    weight: float = field(default=1.0, metadata=_help(
        "Mixing weight in 'interleave' mode (any scale; equal weights = the seed's 50/50)."))
    limit: int | None = field(default=None, metadata=_help("Use at most this many training examples (first ones)."))
    hub_id: str | None = field(default=None, metadata=_help(
        "Load from this Hugging Face Hub dataset id instead of the file (needs network, or a cached copy)."))
    hub_config: str | None = field(default=None, metadata=_help("The Hub dataset's configuration (subset) name."))
    hub_split: str = field(default="train", metadata=_help(
        "The Hub split read; the training and held-out examples are then split off it as from a file."))
    format: str = field(default="instruction", metadata=_help(
        "'instruction' (instruction / input / output records) or 'messages' (chat conversations: a list of "
        "{role, content} per record, rendered with the tokenizer's chat template, loss on assistant turns only)."))
    columns: dict[str, str] | None = field(default=None, metadata=_help(
        "Source column of each field, e.g. {instruction: question, output: answer} (instruction format) or "
        "{messages: conversations} (messages format)."))

    @property
    def domain_label(self) -> str:
        return self.domain or self.name


def _default_datasets() -> list[DatasetConfig]:
    return [DatasetConfig("code_alpaca"), DatasetConfig("mbpp")]


@dataclass
class DataConfig:
    """The ``data:`` section: what to train and evaluate on."""

    datasets: list[DatasetConfig] = field(default_factory=_default_datasets, metadata=_help(
        "Training datasets, one domain each: list of {name, path, domain, weight, limit, hub_id, hub_config, "
        "hub_split, format, columns}."))
    data_dir: str | None = field(default=None, metadata=_help(
        "Data directory for relative paths (default: $DYLORA_MOE_DATA_DIR, else shared/data beside the "
        "checkout, from any working directory)."))
    max_seq_length: int = field(default=1024, metadata=_help(
        "Maximum tokens per sequence; longer responses are cut on the right."))
    mixing: str = field(default="interleave", metadata=_help(
        "'interleave' (weighted, seeded draws per domain) or 'concatenate' (domains in proportion to size)."))
    eval_examples_per_domain: int = field(default=0, metadata=_help(
        "Held-out examples per domain (the first ones of its validation split); 0 = the whole split."))
    eval_batch_size: int = field(default=8, metadata=_help("Batch size of evaluation."))
    use_chat_template: bool | None = field(default=None, metadata=_help(
        "Format prompts with the tokenizer's chat template (null = when it has one)."))


@dataclass
class TrainingArgs:
    """The ``train:`` section: optimisation, precision, and evaluation / checkpoint cadence."""

    lr: float = field(default=2e-5, metadata=_help("Peak learning rate of AdamW."))
    per_device_batch_size: int = field(default=4, metadata=_help("Sequences per micro-batch and device."))
    gradient_accumulation_steps: int = field(default=8, metadata=_help("Micro-batches per optimizer step."))
    global_batch_size: int = field(default=0, metadata=_help(
        "If > 0: sequences per optimizer step over all processes; gradient_accumulation_steps is then derived "
        "(global_batch_size / (processes x per_device_batch_size), which must divide), so the same config trains "
        "the same way on any number of processes."))
    distributed: str = field(default="ddp", metadata=_help(
        "With several processes: 'ddp' (each process holds the whole model) or 'fsdp' (PyTorch FSDP2 shards the "
        "frozen base and the experts per decoder layer; docs/distributed.md)."))
    num_epochs: float = field(default=10.0, metadata=_help(
        "Training length in epochs (an epoch = one pass worth of samples); ignored when max_steps > 0."))
    max_steps: int = field(default=0, metadata=_help("If > 0: exactly this many optimizer steps."))
    lr_scheduler: str = field(default="cosine", metadata=_help("'cosine', 'linear' or 'constant' (after warmup)."))
    warmup_ratio: float = field(default=0.03, metadata=_help("Warmup steps as a fraction of all steps."))
    warmup_steps: int = field(default=0, metadata=_help("If > 0: warmup steps (overrides warmup_ratio)."))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay (not applied to 1-D tensors)."))
    threshold_lr: float = field(default=1e-2, metadata=_help(
        "Peak learning rate of the learned dynamic top-k thresholds (moe.threshold_learned; one scalar logit per "
        "router, no weight decay, same schedule): at the adapters' rate a threshold would hardly move in a run."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm (0 = no clipping)."))
    max_bad_steps: int = field(default=5, metadata=_help(
        "A step with a non-finite loss or gradient is skipped with a warning; after this many in a row training "
        "stops with an error, leaving the last good checkpoint (0 = never stop)."))
    precision: str = field(default="auto", metadata=_help(
        "'auto' (bf16 on a GPU that supports it, else fp32), 'fp32', 'bf16' or 'fp16' mixed precision."))
    base_dtype: str = field(default="auto", metadata=_help(
        "dtype of the frozen base weights: 'auto' (bfloat16 when precision is bf16, else float32), 'float32', "
        "'bfloat16', 'float16'. Experts and router always stay float32."))
    base_quantization: str = field(default="none", metadata=_help(
        "Hold the frozen base quantized by bitsandbytes on a CUDA GPU, QLoRA's way: 'nf4' (4-bit NormalFloat, double "
        "quantization), 'fp4', 'int8', or 'none'. Experts and router stay float32; matmuls run in the precision's "
        "dtype. Needs a GPU and the bitsandbytes package (refused clearly otherwise); configs/qlora.yaml."))
    gradient_checkpointing: bool = field(default=False, metadata=_help(
        "Recompute the base model's activations in backward (less memory; the forward runs twice)."))
    allow_expert_growth: bool = field(default=False, metadata=_help(
        "Before training, embed each training domain and give every novel one (cosine similarity below "
        "growth_threshold to the domains seen before) an expert of its own, adding experts when the pool is "
        "exhausted; the resulting skill library is saved with the checkpoints (docs/continual.md)."))
    growth_threshold: float = field(default=0.75, metadata=_help(
        "Novelty threshold of allow_expert_growth (raw cosine similarity, the seed's form and value)."))
    route_by_domain: bool = field(default=False, metadata=_help(
        "Oracle routing: every sequence goes to the expert of its domain (expert i = data.datasets[i]), in training "
        "and in the held-out evaluation; the router is not used. With moe.num_experts equal to the number of "
        "datasets this is one LoRA per domain with the domain given: the upper bound of a routing study."))
    growth_examples: int = field(default=64, metadata=_help(
        "Examples per domain embedded for the growth test and for register_skills."))
    register_skills: bool = field(default=True, metadata=_help(
        "At the end, record every training domain as a skill of the checkpoint's skill library (its embedding, "
        "32 replay examples, its routing kept as trained), so that continual learning (learn-skill) can extend "
        "the checkpoint without disturbing the domains it was trained on (docs/continual.md)."))
    router_calibration_examples: int = field(default=256, metadata=_help(
        "Set the router's feature standardisation (model.calibrate_router) from this many training examples "
        "(the start of the training stream) before the first step; 0 = skip."))
    eval_every: int = field(default=100, metadata=_help(
        "Evaluate every N optimizer steps (also always at step 0 and at the end); 0 = only start and end."))
    save_every: int = field(default=100, metadata=_help(
        "Write checkpoint-<step> every N optimizer steps (and always at the end); 0 = only at the end."))
    save_total_limit: int = field(default=2, metadata=_help("Keep the last K checkpoints; 0 = keep all."))
    log_every: int = field(default=10, metadata=_help("Log training loss and throughput every N optimizer steps."))
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"], metadata=_help(
        "Experiment trackers (Accelerate's): any of 'tensorboard' (<output_dir>/tensorboard), 'wandb', 'mlflow' "
        "(<output_dir>/mlruns unless $MLFLOW_TRACKING_URI); [] for none. docs/training.md, 'Experiment tracking'."))
    run_name: str | None = field(default=None, metadata=_help(
        "Run name in W&B and MLflow (default: the output folder's name)."))
    tracker_project: str = field(default="dylora-moe", metadata=_help(
        "W&B project / MLflow experiment the run is logged under."))


@dataclass
class TrainConfig:
    """A complete joint-training run (the YAML file's top level)."""

    model: str = field(default=DEFAULT_MODEL, metadata=_help(
        "Base model: Hugging Face hub id, local folder, or the embedded offline default 'smollm2-135m'."))
    output_dir: str = field(default="runs/default", metadata=_help(
        "Run directory: checkpoints, final adapter, metrics.json, routing.png, tensorboard/."))
    seed: int = field(default=0, metadata=_help("Seed of data order, dropout and everything else random."))
    resume: bool = field(default=False, metadata=_help(
        "Continue from the latest checkpoint-<step> in output_dir (optimizer, scheduler, RNG, data position)."))
    overwrite_output_dir: bool = field(default=False, metadata=_help(
        "Start afresh even if output_dir holds checkpoints of an earlier run (deleted once data and model "
        "have loaded)."))
    moe: DyLoRAMoEConfig = field(default_factory=DyLoRAMoEConfig, metadata=_help(
        "Expert pool and router (DyLoRAMoEConfig; all experts are created up front and mature)."))
    data: DataConfig = field(default_factory=DataConfig, metadata=_help("Datasets and formatting."))
    train: TrainingArgs = field(default_factory=TrainingArgs, metadata=_help("Optimisation and cadence."))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config",
                  origins: dict[str, str] | None = None) -> TrainConfig:
        """Build and validate from a plain dict; errors name ``source`` (or the override that set the key)."""
        config = build(cls, data, source, origins)
        config.validate(source, origins)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
        """Read a YAML file and apply ``key=value`` overrides (see the module docstring)."""
        origins: dict[str, str] = {}
        data = apply_overrides(read_yaml_mapping(path), overrides, TrainConfig, origins)
        return cls.from_dict(data, str(path), origins)

    @classmethod
    def from_json_file(cls, path: str | Path) -> TrainConfig:
        """Read a config written by :meth:`to_json_file`."""
        path = Path(path)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        version = payload.get("format_version") if isinstance(payload, dict) else None
        if not isinstance(version, int) or "config" not in payload:
            raise ConfigError(f"{path}: not a train config file (needs 'format_version' and 'config')")
        if version > CONFIG_FORMAT_VERSION:
            raise ConfigError(f"{path}: format_version {version} is newer than this dylora-moe reads "
                              f"({CONFIG_FORMAT_VERSION}); upgrade dylora-moe")
        data = payload["config"]
        if isinstance(data, dict) and "moe" in data:  # a saved run: fields it predates keep what it was trained with
            data = {**data, "moe": with_predating_values(data["moe"])}
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps({"format_version": CONFIG_FORMAT_VERSION, "config": self.to_dict()}, indent=2) + "\n"

    def to_json_file(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    def replace(self, **changes: Any) -> TrainConfig:
        """A validated copy with top-level fields changed, or dotted keys (``**{"train.lr": 1e-4}``)."""
        data = self.to_dict()
        origins: dict[str, str] = {}
        data = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in changes.items()], TrainConfig, origins)
        return TrainConfig.from_dict(data, "replace()", origins)

    # ------------------------------------------------------------------ validation
    def validate(self, source: str = "config", origins: dict[str, str] | None = None) -> None:
        """Raise ``ConfigError`` naming the source and the dotted key of the first invalid value."""
        origins = origins or {}

        def fail(key: str, why: str) -> ConfigError:
            value = lookup(self, key)
            where = origins.get(key) or source
            return ConfigError(f"{where}: key '{key}' = {value!r}: {why}")

        d, t = self.data, self.train
        if not self.model.strip():
            raise fail("model", "must name a base model")
        if not self.output_dir.strip():
            raise fail("output_dir", "must be a directory path")
        if self.seed < 0:
            raise fail("seed", "must be >= 0")
        _validate_datasets(d.datasets, fail)
        if t.route_by_domain and self.moe.num_experts != len(d.datasets):
            raise fail("train.route_by_domain", f"needs moe.num_experts = the {len(d.datasets)} datasets "
                       f"(one expert per domain), got {self.moe.num_experts}")
        if d.max_seq_length <= 0:
            raise fail("data.max_seq_length", "must be a positive integer")
        if d.mixing not in MODES:
            raise fail("data.mixing", f"must be one of {MODES}")
        if d.eval_examples_per_domain < 0:
            raise fail("data.eval_examples_per_domain", "must be >= 0 (0 = whole validation split)")
        if d.eval_batch_size < 1:
            raise fail("data.eval_batch_size", "must be >= 1")
        if not t.lr > 0:
            raise fail("train.lr", "must be > 0")
        if not t.threshold_lr > 0:
            raise fail("train.threshold_lr", "must be > 0")
        if not -1.0 <= t.growth_threshold <= 1.0:
            raise fail("train.growth_threshold", "is a cosine similarity in [-1, 1]")
        for key in ("per_device_batch_size", "gradient_accumulation_steps", "log_every", "growth_examples"):
            if getattr(t, key) < 1:
                raise fail(f"train.{key}", "must be an integer >= 1")
        if t.distributed not in ENGINES:
            raise fail("train.distributed", f"must be one of {ENGINES}")
        if t.global_batch_size < 0:
            raise fail("train.global_batch_size", "must be an integer >= 0 (0 = per device x accumulation x "
                       "processes)")
        if t.global_batch_size and t.global_batch_size % t.per_device_batch_size:
            raise fail("train.global_batch_size", f"{t.global_batch_size} is not a multiple of "
                       f"train.per_device_batch_size {t.per_device_batch_size}")
        for key in ("max_steps", "warmup_steps", "eval_every", "save_every", "save_total_limit",
                    "router_calibration_examples", "max_bad_steps"):
            if getattr(t, key) < 0:
                raise fail(f"train.{key}", "must be an integer >= 0")
        check_reporters(t.report_to, "train config: key 'train.report_to'")
        if t.max_steps == 0 and not t.num_epochs > 0:
            raise fail("train.num_epochs", "must be > 0 (or set train.max_steps)")
        if t.lr_scheduler not in SCHEDULERS:
            raise fail("train.lr_scheduler", f"must be one of {SCHEDULERS}")
        if not 0 <= t.warmup_ratio < 1:
            raise fail("train.warmup_ratio", "must be in [0, 1)")
        if t.weight_decay < 0:
            raise fail("train.weight_decay", "must be >= 0")
        if t.max_grad_norm < 0:
            raise fail("train.max_grad_norm", "must be >= 0 (0 disables clipping)")
        if t.precision not in PRECISIONS:
            raise fail("train.precision", f"must be one of {PRECISIONS}")
        if t.base_quantization not in QUANTIZATIONS:
            raise fail("train.base_quantization", f"must be one of {QUANTIZATIONS}")
        if t.base_quantization != "none" and self.moe.expert_init == "svd":
            raise fail("train.base_quantization", "a quantized base has no dense weights to take SVD segments from: "
                       "use moe.expert_init=zero_b")
        if t.base_dtype not in BASE_DTYPES:
            raise fail("train.base_dtype", f"must be one of {BASE_DTYPES}")


def config_reference() -> list[tuple[str, str, Any, str]]:
    """``(dotted key, type, default, help)`` for every key of ``TrainConfig``."""
    return _reference(TrainConfig)


def config_reference_markdown() -> str:
    """The ``TrainConfig`` reference as a Markdown table (docs/training.md embeds it)."""
    return _reference_markdown(TrainConfig)


def _validate_datasets(datasets: list[DatasetConfig], fail: Callable[[str, str], ConfigError]) -> None:
    """The checks of ``data.datasets``: at least one, names given, domains unique, weights and limits sane."""
    if not datasets:
        raise fail("data.datasets", "needs at least one dataset")
    seen: set[str] = set()
    for i, ds in enumerate(datasets):
        key = f"data.datasets.{i}"
        if not ds.name.strip():
            raise fail(f"{key}.name", "must not be empty")
        if ds.domain_label in seen:
            raise fail(f"{key}.domain", f"domain '{ds.domain_label}' is used twice; give each dataset its own")
        seen.add(ds.domain_label)
        if not ds.weight >= 0:
            raise fail(f"{key}.weight", "must be >= 0")
        if ds.limit is not None and ds.limit <= 0:
            raise fail(f"{key}.limit", "must be a positive integer or null")
        if ds.format not in DATASET_FORMATS:
            raise fail(f"{key}.format", f"must be one of {DATASET_FORMATS}")
        allowed = {"instruction": {"instruction", "input", "output"}, "messages": {"messages"}}[ds.format]
        unknown = sorted(set(ds.columns or {}) - allowed)
        if unknown:
            raise fail(f"{key}.columns",
                       f"unknown field(s) {unknown} for the {ds.format} format; map {sorted(allowed)}")
    if not any(ds.weight > 0 for ds in datasets):
        raise fail("data.datasets", "at least one dataset needs a weight > 0")
