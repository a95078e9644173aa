"""Loading a model for inference: a DyLoRA-MoE checkpoint folder, or a plain base model, with its tokenizer.

::

    model, tokenizer = load_for_eval("runs/cpu-demo/final")                  # float32, stays on the CPU
    model, tokenizer = load_for_eval("smollm2-135m", base_only=True, dtype="bf16", device="auto")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from ..errors import EvaluationError
from ..hub import resolve_checkpoint
from ..loading import load_base_model, resolve_model_path
from ..model import DyLoRAMoEForCausalLM
from ..serialization import CONFIG_FILE, read_checkpoint_meta
from .devices import resolve_device, resolve_dtype

__all__ = ["load_for_eval"]


def load_for_eval(name_or_path: str | Path, base_only: bool = False, dtype: Any = None,
                  device: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: a DyLoRA-MoE checkpoint folder, or (``base_only``) a plain base model.

    ``dtype`` (default float32) and ``device`` (default: stay on the CPU) as in :func:`resolve_dtype` and
    :func:`resolve_device`.
    """
    model, tokenizer = _load_for_eval(name_or_path, base_only, resolve_dtype(dtype))
    if device is not None:
        model.to(resolve_device(device))
    return model, tokenizer


def _load_for_eval(name_or_path: str | Path, base_only: bool, dtype: Any) -> tuple[Any, Any]:
    if base_only:
        return load_base_model(str(name_or_path), dtype=dtype)
    path = resolve_checkpoint(name_or_path)  # a Hub id: its downloaded (or cached) folder
    if not (path / CONFIG_FILE).is_file():
        raise EvaluationError(
            f"{name_or_path}: not a DyLoRA-MoE checkpoint folder ({CONFIG_FILE} not found); "
            "pass --base-only (base_only=True) to evaluate a plain base model"
        )
    meta = read_checkpoint_meta(path)
    model = DyLoRAMoEForCausalLM.from_pretrained(path, dtype=dtype)
    source = path if (path / "tokenizer_config.json").is_file() else resolve_model_path(
        meta["base_model"]["name_or_path"])
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
