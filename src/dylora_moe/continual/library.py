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
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..data import DataCollator, Example, tokenize_examples
from ..serialization import CheckpointError, read_versioned_json

__all__ = ["KEEP_ROUTING", "LIBRARY_FILE", "LIBRARY_TENSORS", "Skill", "SkillLibrary", "embed_examples",
           "embedding_and_spread", "fill_missing_spreads", "pooled_states"]

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
        #: [S, hidden] per-dimension standard deviation of each skill's pooled states over its examples (NaN rows:
        #: not known, skills saved before spreads were kept); None while no skill has one
        self.spreads: torch.Tensor | None = None

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
            replay: Sequence[Example] = (), routing: str = "own", spread: torch.Tensor | None = None) -> Skill:
        """Add a skill (its name must be new); ``embedding`` and ``spread`` (the per-dimension standard deviation of
        its examples' pooled states, optional) are ``[hidden]``; ``routing`` as in :class:`Skill`."""
        if routing not in ROUTINGS:
            raise ValueError(f"skill {name!r}: routing={routing!r} is not one of {ROUTINGS}")
        if not name or name in self.names:
            raise ValueError(f"skill name {name!r} is empty or already in the library (skills: {self.names})")
        vec = embedding.detach().float().cpu().reshape(1, -1)
        if self.embeddings is not None and vec.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"embedding size {vec.shape[1]} != the library's {self.embeddings.shape[1]}")
        self.embeddings = vec if self.embeddings is None else torch.cat([self.embeddings, vec])
        self._add_spread(spread, vec.shape[1])
        skill = Skill(name, int(expert), int(examples), replay=[_example_dict(e) for e in replay], routing=routing)
        self.skills.append(skill)
        return skill

    def _add_spread(self, spread: torch.Tensor | None, hidden: int) -> None:
        row = torch.full((1, hidden), float("nan")) if spread is None else spread.detach().float().cpu().reshape(1, -1)
        if self.spreads is None and spread is None:
            return
        if self.spreads is None:  # earlier skills have none
            self.spreads = torch.full((len(self.skills), hidden), float("nan"))
        self.spreads = torch.cat([self.spreads, row])

    def update(self, name: str, embedding: torch.Tensor, examples: int, replay: Sequence[Example] = (),
               spread: torch.Tensor | None = None) -> None:
        """Fold more data into a skill: its embedding becomes the example-weighted mean (its spread, when both
        are known, the pooled standard deviation of the two sets); replay grows."""
        i, skill = self.index(name), self.get(name)
        total = skill.examples + examples
        old_mean = self.embeddings[i].clone()
        new_mean = embedding.detach().float().cpu()
        self.embeddings[i] = (old_mean * skill.examples + new_mean * examples) / max(total, 1)
        if self.spreads is not None and spread is not None and not bool(torch.isnan(self.spreads[i]).any()):
            a, b = skill.examples / max(total, 1), examples / max(total, 1)
            second = (a * (self.spreads[i].pow(2) + old_mean.pow(2))
                      + b * (spread.float().cpu().pow(2) + new_mean.pow(2)))
            self.spreads[i] = (second - self.embeddings[i].pow(2)).clamp_min(0).sqrt()
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
            tensors = {"embeddings": self.embeddings.contiguous()}
            if self.spreads is not None:
                tensors["spreads"] = self.spreads.contiguous()
            save_file(tensors, str(directory / LIBRARY_TENSORS))

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
                tensors = load_file(str(tensors_path))
                library.embeddings = tensors["embeddings"].float()
                library.spreads = tensors["spreads"].float() if "spreads" in tensors else None
            except FileNotFoundError:
                raise CheckpointError(f"{tensors_path}: file not found (the library lists skills)") from None
            except Exception as exc:
                raise CheckpointError(f"{tensors_path}: unreadable or corrupt ({exc})") from None
            if library.spreads is not None and library.spreads.shape != library.embeddings.shape:
                raise CheckpointError(f"{tensors_path}: spreads of shape {tuple(library.spreads.shape)} for embeddings "
                                      f"of shape {tuple(library.embeddings.shape)}")
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
def pooled_states(model: Any, tokenizer: Any, examples: Sequence[Example], *, batch_size: int = 8,
                  max_seq_length: int = 512) -> torch.Tensor:
    """``[N, hidden]`` float32 on the CPU: each example's mean final hidden state over its real tokens (after the
    base model's final norm, adapters disabled), formatted as in training (prompt + response); examples longer
    than ``max_seq_length`` are dropped."""
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
    rows = []
    try:
        with model.bare():  # the frozen model's states, whatever the passes before routed
            for start in range(0, len(items), batch_size):
                batch = collate(items[start : start + batch_size])
                mask = batch["attention_mask"].to(device)
                hidden = backbone(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state
                weights = mask.unsqueeze(-1).to(torch.float32)
                rows.append(((hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1)).cpu())  # [B, hidden]
    finally:
        model.train(was_training)
    return torch.cat(rows)


def embedding_and_spread(model: Any, tokenizer: Any, examples: Sequence[Example], *, limit: int | None = None,
                         seed: int = 0, max_seq_length: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """``(embedding, spread)``, each ``[hidden]``: the mean and the per-dimension standard deviation over
    ``examples`` of :func:`pooled_states` (the spread is NaN, unknown, for a single example). With ``limit``,
    at most that many examples, drawn at random with ``seed`` (data files are often ordered: the first ones
    would stand for a part of the skill only)."""
    examples = list(examples)
    if limit is not None and len(examples) > limit:
        examples = random.Random(seed).sample(examples, limit)
    states = pooled_states(model, tokenizer, examples, max_seq_length=max_seq_length)
    spread = states.std(0) if states.shape[0] > 1 else torch.full_like(states[0], float("nan"))
    return states.mean(0), spread


def fill_missing_spreads(model: Any, tokenizer: Any, library: SkillLibrary, *, max_seq_length: int = 512) -> list[str]:
    """Give every skill without a spread (learned before spreads were kept) the spread of its replay examples'
    pooled states, so the standardized similarity can compare with it; returns the names filled. Skills with
    fewer than two replay examples that fit ``max_seq_length`` stay without one (the similarity names them)."""
    if library.embeddings is None:
        return []
    filled = []
    for i, skill in enumerate(library.skills):
        if library.spreads is not None and not bool(torch.isnan(library.spreads[i]).all()):
            continue
        replay = [e for e, _ in library.replay_examples() if e.domain == skill.name]
        try:
            states = pooled_states(model, tokenizer, replay, max_seq_length=max_seq_length) if replay else None
        except ValueError:  # none fits max_seq_length
            states = None
        if states is None or states.shape[0] < 2:
            continue
        if library.spreads is None:
            library.spreads = torch.full_like(library.embeddings, float("nan"))
        library.spreads[i] = states.std(0)
        filled.append(skill.name)
    return filled


def embed_examples(model: Any, tokenizer: Any, examples: Sequence[Example], *, batch_size: int = 8,
                   max_seq_length: int = 512) -> torch.Tensor:
    """``[hidden]``: the mean over ``examples`` of :func:`pooled_states`."""
    return pooled_states(model, tokenizer, examples, batch_size=batch_size, max_seq_length=max_seq_length).mean(0)
