"""The experiment trackers ``train.report_to`` may name, and the check that each one's package is installed
(torch-free: the config validates with it; :mod:`.tracking` runs them)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from ..errors import ConfigError

__all__ = ["REPORTERS", "check_reporters"]

#: the trackers ``train.report_to`` may name, with the package each needs
REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_reporters(report_to: Sequence[str], where: str = "train.report_to") -> None:
    """Refuse unknown trackers and trackers whose package is not installed (naming the ``pip install``)."""
    for name in report_to:
        if name not in REPORTERS:
            raise ConfigError(f"{where}: unknown tracker {name!r}; choose from {sorted(REPORTERS)} (or [] for none)")
        if importlib.util.find_spec(REPORTERS[name]) is None:
            extra = "mlflow-skinny" if name == "mlflow" else REPORTERS[name]
            raise ConfigError(f"{where}: {name!r} needs the {REPORTERS[name]} package, which is not installed: "
                              f"pip install {extra} (or pip install 'dylora-moe[tracking]')")
