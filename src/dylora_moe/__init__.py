"""DyLoRA-MoE: a Dynamic LoRA Mixture-of-Experts for Hugging Face causal language models.

A frozen causal LM carries a pool of LoRA experts sharing its weights; a learned router mixes all
experts densely while any expert is immature and sends each input to its top-k experts once all
are mature. See ``DyLoRAMoEForCausalLM`` and ``DyLoRAMoEConfig``.

The names below are imported on first use, so that ``import dylora_moe.sandbox`` (or a command that needs
no model, such as ``dylora-moe eval --rescore``) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "BaseModelError": ".loading",
    "CheckpointError": ".serialization",
    "ConfigError": ".config",
    "DyLoRAMoECausalLMOutput": ".outputs",
    "DyLoRAMoEConfig": ".config",
    "DyLoRAMoEForCausalLM": ".api",
    "FORMAT_VERSION": ".serialization",
    "LinearRouter": ".router",
    "MLPRouter": ".router",
    "ParameterReport": ".report",
    "Router": ".router",
    "RoutingDecision": ".routing",
    "TargetError": ".targets",
    "build_router": ".router",
    "find_targets": ".targets",
    "load_base_model": ".loading",
    "parameter_report": ".report",
}

if TYPE_CHECKING:
    from .api import DyLoRAMoEForCausalLM
    from .config import ConfigError, DyLoRAMoEConfig
    from .loading import BaseModelError, load_base_model
    from .outputs import DyLoRAMoECausalLMOutput
    from .report import ParameterReport, parameter_report
    from .router import LinearRouter, MLPRouter, Router, build_router
    from .routing import RoutingDecision
    from .serialization import FORMAT_VERSION, CheckpointError
    from .targets import TargetError, find_targets


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())


__all__ = [
    "BaseModelError",
    "CheckpointError",
    "ConfigError",
    "DyLoRAMoECausalLMOutput",
    "DyLoRAMoEConfig",
    "DyLoRAMoEForCausalLM",
    "FORMAT_VERSION",
    "LinearRouter",
    "MLPRouter",
    "ParameterReport",
    "Router",
    "RoutingDecision",
    "TargetError",
    "__version__",
    "build_router",
    "find_targets",
    "load_base_model",
    "parameter_report",
]
