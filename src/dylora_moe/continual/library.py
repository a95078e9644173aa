"""The skill library of continual learning: one embedding per skill, the expert that holds it, and a small
replay buffer of each skill's examples; saved inside the checkpoint folder next to the weights.

A skill's embedding is the mean, over its examples, of the mean over each example's real tokens of the
*base* model's final hidden states after its final norm (``embed_examples``; adapters are disabled, so an
embedding does not drift as experts are trained)::

    library = SkillLibrary()
    vec = embed_examples(model, tokenizer, examples)          # [hidden]
    library.add("mbpp-python", vec, expert=0, replay=examples[:32])
    library.save(folder); SkillLibrary.load(folder)

Files (written by ``DyLoRAMoEForCausalLM.save_pretrained`` when ``model.skill_library`` is set):
``skill_library.json`` (format version, skills: name, expert, example count, time, replay examples) and
``skill_library.safetensors`` (``embeddings`` ``[S, hidden]``, float32).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..data import DataCollator, Example, tokenize_examples
from ..serialization import CheckpointError, read_versioned_json

__all__ = ["KEEP_ROUTING", "LIBRARY_FILE", "LIBRARY_TENSORS", "Skill", "SkillLibrary", "embed_examples"]

LIBRARY_FILE = "skill_library.json"
LIBRARY_TENSORS = "skill_library.safetensors"
LIBRARY_FORMAT_VERSION = 1


#: a replay target meaning "keep the routing this input had": the expert being trained must stay off it
KEEP_ROUTING = -1
ROUTINGS = ("own", "kept")


@dataclass
class Skill:
    """One learned skill: its name, the expert that holds it, and the examples kept for replay.

    ``routing``: 'own' (a skill learned by continual learning or given its own expert by growth: its inputs
    are routed to ``expert``), or 'kept' (a domain of joint training, spread over the experts as the router
    learned: replay keeps a newer expert off its inputs and leaves their routing as it was; ``expert`` is the
    one they use most)."""

    name: str
    expert: int
    examples: int
    created: float = field(default_factory=time.time)
    replay: list[dict[str, str]] = field(default_factory=list)
    routing: str = "own"


class SkillLibrary:
    """Skill names, their embeddings ``[S, hidden]`` and experts; plus each skill's replay examples."""

    def __init__(self) -> None:
        self.skills: list[Skill] = []
        self.embeddings: torch.Tensor | None = None  # [S, hidden] float32, CPU

    def __len__(self) -> int:
        return len(self.skills)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.skills]

    def get(self, name: str) -> Skill:
        for skill in self.skills:
            if skill.name == name:
                return skill
        raise KeyError(f"no skill named {name!r} in the library (skills: {self.names})")

    def index(self, name: str) -> int:
        return self.names.index(self.get(name).name)

    def add(self, name: str, embedding: torch.Tensor, expert: int, examples: int = 0,
            replay: Sequence[Example] = (), routing: str = "own") -> Skill:
        """Add a skill (its name must be new); ``embedding`` is ``[hidden]``; ``routing`` as in :class:`Skill`."""
        if routing not in ROUTINGS:
            raise ValueError(f"skill {name!r}: routing={routing!r} is not one of {ROUTINGS}")
        if not name or name in self.names:
            raise ValueError(f"skill name {name!r} is empty or already in the library (skills: {self.names})")
        vec = embedding.detach().float().cpu().reshape(1, -1)
        if self.embeddings is not None and vec.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"embedding size {vec.shape[1]} != the library's {self.embeddings.shape[1]}")
        self.embeddings = vec if self.embeddings is None else torch.cat([self.embeddings, vec])
        skill = Skill(name, int(expert), int(examples), replay=[_example_dict(e) for e in replay], routing=routing)
        self.skills.append(skill)
        return skill

    def update(self, name: str, embedding: torch.Tensor, examples: int, replay: Sequence[Example] = ()) -> None:
        """Fold more data into a skill: its embedding becomes the example-weighted mean; replay grows."""
        i, skill = self.index(name), self.get(name)
        total = skill.examples + examples
        old = self.embeddings[i] * skill.examples
        self.embeddings[i] = (old + embedding.detach().float().cpu() * examples) / max(total, 1)
        skill.examples = total
        skill.replay.extend(_example_dict(e) for e in replay)

    def replay_examples(self, exclude: Sequence[str] = ()) -> list[tuple[Example, int]]:
        """``(example, target)`` for every replay example of every skill not in ``exclude``: the target is the
        skill's expert, or :data:`KEEP_ROUTING` for a 'kept' skill."""
        return [(Example(domain=s.name, instruction=r["instruction"], input=r.get("input", ""),
                         output=r["output"]), s.expert if s.routing == "own" else KEEP_ROUTING)
                for s in self.skills if s.name not in exclude for r in s.replay]

    @property
    def has_kept_routing(self) -> bool:
        """Whether some skill keeps the routing joint training gave it (the router rows must then stay)."""
        return any(s.routing == "kept" for s in self.skills)

    def expert_of(self) -> dict[str, int]:
        return {s.name: s.expert for s in self.skills}

    # ------------------------------------------------------------------ persistence
    @staticmethod
    def exists(directory: str | Path) -> bool:
        return (Path(directory) / LIBRARY_FILE).is_file()

    def save(self, directory: str | Path) -> None:
        """Write the two library files into ``directory`` (the caller makes the folder write atomic)."""
        directory = Path(directory)
        meta = {"format_version": LIBRARY_FORMAT_VERSION, "skills": [asdict(s) for s in self.skills]}
        (directory / LIBRARY_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        if self.embeddings is not None:
            save_file({"embeddings": self.embeddings.contiguous()}, str(directory / LIBRARY_TENSORS))

    @classmethod
    def load(cls, directory: str | Path) -> SkillLibrary:
        meta = read_versioned_json(directory, LIBRARY_FILE, what="skill library",
                                   max_version=LIBRARY_FORMAT_VERSION, required=("skills",))
        library = cls()
        where = Path(directory) / LIBRARY_FILE
        for i, item in enumerate(meta["skills"]):
            try:
                library.skills.append(Skill(**item))
            except TypeError as exc:
                raise CheckpointError(f"{where}: skills[{i}] is malformed ({exc})") from None
            if library.skills[-1].routing not in ROUTINGS:
                raise CheckpointError(f"{where}: skills[{i}].routing={library.skills[-1].routing!r} is not one of "
                                      f"{ROUTINGS}")
        if library.skills:
            tensors_path = Path(directory) / LIBRARY_TENSORS
            try:
                library.embeddings = load_file(str(tensors_path))["embeddings"].float()
            except FileNotFoundError:
                raise CheckpointError(f"{tensors_path}: file not found (the library lists skills)") from None
            except Exception as exc:
                raise CheckpointError(f"{tensors_path}: unreadable or corrupt ({exc})") from None
            if library.embeddings.shape[0] != len(library.skills):
                raise CheckpointError(f"{tensors_path}: {library.embeddings.shape[0]} embeddings for "
                                      f"{len(library.skills)} skills")
        return library

    def check_against(self, model: Any, where: str) -> None:
        """Every skill's expert exists in ``model`` and the embedding size is the base model's hidden size."""
        for skill in self.skills:
            if not 0 <= skill.expert < model.num_experts:
                raise CheckpointError(f"{where}: skill {skill.name!r} names expert {skill.expert}, but the model "
                                      f"has {model.num_experts}")
        hidden = model.base_model.get_input_embeddings().embedding_dim
        if self.embeddings is not None and self.embeddings.shape[1] != hidden:
            raise CheckpointError(f"{where}: skill embeddings have size {self.embeddings.shape[1]}, the base "
                                  f"model's hidden size is {hidden}")


def _example_dict(example: Example) -> dict[str, str]:
    return {"instruction": example.instruction, "input": example.input, "output": example.output}


@torch.no_grad()
def embed_examples(model: Any, tokenizer: Any, examples: Sequence[Example], *, batch_size: int = 8,
                   max_seq_length: int = 512) -> torch.Tensor:
    """``[hidden]``: the mean over ``examples`` of each example's mean final hidden state (after the base
    model's final norm, adapters disabled), formatted as in training (prompt + response)."""
    if not examples:
        raise ValueError("cannot embed an empty set of examples")
    items, stats = tokenize_examples(list(examples), tokenizer, max_seq_length)
    if not items:
        raise ValueError(f"no example fits max_seq_length={max_seq_length} ({stats.total.dropped} too long)")
    collate = DataCollator.from_tokenizer(tokenizer)
    backbone = model.base_model.base_model  # the transformer body: its last_hidden_state is after the final norm
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = None, 0
    try:
        with model.disable_adapters():
            for start in range(0, len(items), batch_size):
                batch = collate(items[start : start + batch_size])
                mask = batch["attention_mask"].to(device)
                hidden = backbone(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state
                weights = mask.unsqueeze(-1).to(torch.float32)
                per_example = (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1)  # [B, hidden]
                summed = per_example.sum(0)
                total = summed if total is None else total + summed
                count += per_example.shape[0]
    finally:
        model.train(was_training)
    return (total / count).cpu()
