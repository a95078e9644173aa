"""The public API as ``import dylora_moe`` exposes it: the core model with the features' extensions registered.

``from dylora_moe import DyLoRAMoEForCausalLM`` resolves here, so the seed's continual-learning API
(``model.add_new_skill(...)``, ``model.skill_library``) is there too; the core module
``dylora_moe.model`` alone never imports a feature (docs/architecture.md, "Layers").
"""

from __future__ import annotations

from .continual import learner as _continual  # noqa: F401  (registers add_new_skill and skill_library)
from .model import DyLoRAMoEForCausalLM

__all__ = ["DyLoRAMoEForCausalLM"]
