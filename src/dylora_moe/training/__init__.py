"""Joint training of DyLoRA-MoE experts on several domains (Code Alpaca + MBPP by default).

* :mod:`.config`: ``TrainConfig`` (sections ``moe``, ``data``, ``train``), YAML + ``key=value``
  overrides, validation naming file and key, JSON in the run directory;
* :mod:`.trainer`: ``JointTrainer(config, model=None, tokenizer=None).train() -> TrainResult``
  (Accelerate engine, our loop);
* :mod:`.evaluation`: per-domain held-out loss and routing statistics;
* :mod:`.checkpoint`: atomic ``checkpoint-<step>`` folders and exact resume;
* :mod:`.summary`: summary table, ``metrics.json``, ``routing.png``.

Usage::

    from dylora_moe.training import JointTrainer, TrainConfig

    config = TrainConfig.from_yaml("configs/cpu-demo.yaml", ["train.max_steps=4"])
    result = JointTrainer(config).train()
    print(result.metrics["eval_loss"])

See docs/training.md.
"""

from typing import TYPE_CHECKING

from ..common.runs import latest_checkpoint, list_checkpoints, resolve_adapter_dir
from ..errors import TrainingError
from ..lazy import lazy_exports
from .config import (
    CONFIG_FORMAT_VERSION,
    DataConfig,
    DatasetConfig,
    TrainConfig,
    TrainingArgs,
    apply_overrides,
    config_reference,
    config_reference_markdown,
)

# the torch-using parts, imported on first use: the command line reads TrainConfig without them
_LAZY = {"DomainEval": ".evaluation", "EvalResult": ".evaluation", "evaluate": ".evaluation",
         "build_metrics": ".summary", "plot_routing": ".summary", "summary_table": ".summary",
         "write_metrics": ".summary", "JointTrainer": ".trainer", "TrainResult": ".trainer", "TrainState": ".trainer"}

if TYPE_CHECKING:
    from .evaluation import DomainEval, EvalResult, evaluate
    from .summary import build_metrics, plot_routing, summary_table, write_metrics
    from .trainer import JointTrainer, TrainResult, TrainState

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

__all__ = [
    "CONFIG_FORMAT_VERSION",
    "DataConfig",
    "DatasetConfig",
    "DomainEval",
    "EvalResult",
    "JointTrainer",
    "TrainingError",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "TrainingArgs",
    "apply_overrides",
    "build_metrics",
    "config_reference",
    "config_reference_markdown",
    "evaluate",
    "latest_checkpoint",
    "list_checkpoints",
    "plot_routing",
    "resolve_adapter_dir",
    "summary_table",
    "write_metrics",
]
