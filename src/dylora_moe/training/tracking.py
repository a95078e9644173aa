"""Experiment tracking through Accelerate's trackers: TensorBoard, Weights & Biases and MLflow (``train.report_to``).

The trainer logs every training row (``train/loss``, ``train/lr``, ...) and every evaluation (``eval/loss/<domain>``,
``eval/expert_share/<domain>/expert_<e>``, ...) through one :class:`Trackers`, on the main process only:

* ``tensorboard``: event files in ``<output_dir>/tensorboard`` (a resumed run purges the steps after its
  checkpoint, so curves do not fork);
* ``wandb``: a run of the project ``train.tracker_project`` named ``train.run_name`` (default: the output folder's
  name), its files in ``<output_dir>/wandb``; offline with ``WANDB_MODE=offline``, as its users know;
* ``mlflow``: a run of the experiment ``train.tracker_project``; the store is ``$MLFLOW_TRACKING_URI``, else
  ``<output_dir>/mlruns`` (a local file store, offline; MLflow 3 wants ``MLFLOW_ALLOW_FILE_STORE=true`` for it,
  which is set then unless set already).

The run's configuration (flattened: ``train.lr``, ``moe.num_experts``, ...) is stored with each. A requested
tracker whose package is missing is refused before training starts (:func:`check_reporters`)::

    trackers = Trackers(["tensorboard", "mlflow"], Path("runs/x"), config, run_name="x", project="dylora-moe")
    trackers.add_scalar("train/loss", 1.23, step=10)
    trackers.close()
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .reporters import REPORTERS, check_reporters

__all__ = ["REPORTERS", "Trackers", "check_reporters", "flat_config"]

def flat_config(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 0.01, "moe.num_experts": 4, ...}``: nested dicts flattened, lists as text (trackers take
    scalars)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value if value is not None else "null"
        else:
            out[name] = str(value)
    return out


class Trackers:
    """The requested trackers, started; :meth:`add_scalar` logs to every one of them (see the module docstring)."""

    def __init__(self, report_to: Sequence[str], output_dir: Path, config: dict[str, Any], *, run_name: str,
                 project: str, purge_step: int | None = None) -> None:
        check_reporters(report_to)
        from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker  # tracker code on demand

        self.trackers: list[Any] = []
        for name in report_to:
            if name == "tensorboard":
                extra = {"purge_step": purge_step} if purge_step is not None else {}
                self.trackers.append(TensorBoardTracker("tensorboard", str(output_dir), **extra))
            elif name == "wandb":
                (output_dir / "wandb").mkdir(parents=True, exist_ok=True)
                self.trackers.append(WandBTracker(project, name=run_name, dir=str(output_dir), resume="allow",
                                                  id=_stable_id(output_dir)))
            else:
                if not os.environ.get("MLFLOW_TRACKING_URI"):  # a local file store: offline, no database needed
                    import mlflow

                    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                    mlflow.set_tracking_uri((output_dir / "mlruns").resolve().as_uri())
                self.trackers.append(MLflowTracker(experiment_name=project, run_name=run_name))
        for tracker in self.trackers:
            tracker.start()
            tracker.store_init_configuration(flat_config(config))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for tracker in self.trackers:
            tracker.log({tag: float(value)}, step=step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def _stable_id(output_dir: Path) -> str:
    """A W&B run id of the output folder, so a resumed run goes on in the same W&B run."""
    return hashlib.sha256(str(output_dir.resolve()).encode()).hexdigest()[:16]
