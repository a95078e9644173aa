"""The core's extension points: checkpoint attachments (serialization.py) and model extensions (model.py).

Continual learning keeps its skill library through them; the core itself never imports a feature.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dylora_moe import DyLoRAMoEConfig
from dylora_moe.api import DyLoRAMoEForCausalLM
from dylora_moe.continual.library import LIBRARY_FILE, SkillLibrary, embed_examples
from dylora_moe.serialization import CONFIG_FILE, StoredAttachment, load_attachments
from tests.continual import A_WORDS, skill_examples
from tests.tiny import make_base, make_tokenizer


def model_with_library() -> DyLoRAMoEForCausalLM:
    model = DyLoRAMoEForCausalLM(make_base("llama"), DyLoRAMoEConfig(num_experts=2, r=4, alpha=8), mature=True)
    model.skill_library = SkillLibrary()
    model.skill_library.add("a", embed_examples(model, make_tokenizer(), skill_examples(A_WORDS, 4, 0)), expert=1)
    return model


def test_the_checkpoint_lists_its_attachments_and_loads_them(tmp_path):
    model_with_library().save_pretrained(tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert LIBRARY_FILE in meta["attachments"]["skill_library"]
    loaded = DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=make_base("llama"))
    assert loaded.skill_library.expert_of() == {"a": 1}


def test_checkpoints_from_before_the_list_still_load_their_skill_library(tmp_path):
    model_with_library().save_pretrained(tmp_path / "ckpt")
    config = tmp_path / "ckpt" / CONFIG_FILE
    meta = json.loads(config.read_text())
    del meta["attachments"]  # as the format was before attachments were listed
    config.write_text(json.dumps(meta))
    loaded = DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=make_base("llama"))
    assert loaded.skill_library.expert_of() == {"a": 1}


def test_an_attachment_nobody_registered_is_kept_byte_for_byte(tmp_path):
    model_with_library().save_pretrained(tmp_path / "ckpt")
    config = tmp_path / "ckpt" / CONFIG_FILE
    meta = json.loads(config.read_text())
    meta["attachments"]["notes"] = ["notes.bin"]  # a feature this process never imported
    config.write_text(json.dumps(meta))
    payload = bytes(range(256)) * 3
    (tmp_path / "ckpt" / "notes.bin").write_bytes(payload)
    attachments = load_attachments(tmp_path / "ckpt", meta)
    assert isinstance(attachments["notes"], StoredAttachment)
    loaded = DyLoRAMoEForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=make_base("llama"))
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "notes.bin").read_bytes() == payload
    assert json.loads((tmp_path / "again" / CONFIG_FILE).read_text())["attachments"]["notes"] == ["notes.bin"]


def test_an_extension_cannot_replace_what_the_model_has():
    with pytest.raises(ValueError, match="already has 'forward'"):
        DyLoRAMoEForCausalLM.register_extension("forward", lambda self: None)
    # a feature's own extension may be registered again (a module reloaded)
    DyLoRAMoEForCausalLM.register_extension("skill_library", DyLoRAMoEForCausalLM.__dict__["skill_library"])


def test_the_core_imports_no_feature():
    code = ("import sys; import dylora_moe.model, dylora_moe.serialization; "
            "print(sorted(m for m in sys.modules if m.split('.')[:2] in (['dylora_moe', 'continual'], "
            "['dylora_moe', 'training'], ['dylora_moe', 'evaluation'], ['dylora_moe', 'study'], "
            "['dylora_moe', 'cli'])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_config_counts_experts_added_later():
    given = DyLoRAMoEConfig(num_experts=2, r=4, alpha=8)
    model = DyLoRAMoEForCausalLM(make_base("llama"), given)
    model.add_expert(rank=8)
    assert model.moe_config.num_experts == 3 == model.num_experts
    assert given.num_experts == 2  # the caller's config is not changed under it
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[5, 6, 7]])).router_probs.shape[-1] == 3
