"""What continual learning keeps with a model: its skill library, as a checkpoint attachment.

The core never imports this package; this module registers the library's loader with the checkpoint format
(``serialization.register_attachment``) and adds ``model.skill_library`` (a property) to
``DyLoRAMoEForCausalLM`` through its extension point. A checkpoint loaded before this module was imported
holds the library as its stored files; the property turns them into a :class:`SkillLibrary` on first use::

    model.skill_library                     # SkillLibrary or None
    model.skill_library = SkillLibrary()    # saved with the next save_pretrained
"""

from __future__ import annotations

import tempfile

from ..model import DyLoRAMoEForCausalLM
from ..serialization import StoredAttachment, register_attachment
from .library import SkillLibrary

__all__ = ["ATTACHMENT", "set_skill_library", "skill_library"]

ATTACHMENT = "skill_library"


def skill_library(model: DyLoRAMoEForCausalLM) -> SkillLibrary | None:
    """The model's skill library (None until a skill is learned)."""
    value = model.attachments.get(ATTACHMENT)
    if isinstance(value, StoredAttachment):  # loaded before this module registered the loader
        with tempfile.TemporaryDirectory(prefix="dylora-skill-library-") as tmp:
            value = SkillLibrary.load(value.materialize(tmp))
        value.check_against(model, "the model's stored skill library")
        model.attachments[ATTACHMENT] = value
    return value


def set_skill_library(model: DyLoRAMoEForCausalLM, library: SkillLibrary | None) -> None:
    if library is None:
        model.attachments.pop(ATTACHMENT, None)
    else:
        model.attachments[ATTACHMENT] = library


register_attachment(ATTACHMENT, SkillLibrary.load)
DyLoRAMoEForCausalLM.register_extension("skill_library", property(skill_library, set_skill_library))
