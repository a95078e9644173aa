"""DyLoRA-MoE: a Dynamic LoRA Mixture-of-Experts for Hugging Face causal language models.

A frozen causal LM carries a pool of LoRA experts sharing its weights; a learned router mixes all
experts densely while any expert is immature and sends each input to its top-k experts once all
are mature. See ``DyLoRAMoEForCausalLM`` and ``DyLoRAMoEConfig``.
"""

from .config import ConfigError, DyLoRAMoEConfig
from .loading import BaseModelError, load_base_model
from .model import DyLoRAMoEForCausalLM
from .outputs import DyLoRAMoECausalLMOutput
from .report import ParameterReport, parameter_report
from .router import LinearRouter, MLPRouter, Router, build_router
from .routing import RoutingDecision
from .serialization import FORMAT_VERSION, CheckpointError
from .targets import TargetError, find_targets

__version__ = "0.1.0"

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
    "build_router",
    "find_targets",
    "load_base_model",
    "parameter_report",
    "__version__",
]
