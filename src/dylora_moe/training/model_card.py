"""The model card (``README.md``) joint training writes into the final adapter folder, as Hub users expect.

``model_card(config, metrics, model)`` returns the Markdown: a YAML header the Hugging Face Hub reads
(``library_name``, ``base_model``, ``tags``, ``datasets``), then the base model, the experts and routing, the
training data with their licences, the training settings, the held-out loss per domain before and after, the
routing statistics per domain and how to load the adapter. Every number comes from ``metrics.json``::

    (final_dir / "README.md").write_text(model_card(config, metrics, model))
"""

from __future__ import annotations

from typing import Any

from ..data import dataset_licence
from ..loading import ALIASES, SMOLLM2_HUB_ID
from .config import TrainConfig

__all__ = ["model_card"]


def _hub_base(name: str) -> str | None:
    """The base model's Hub id for the card's header (the embedded default is SmolLM2-135M-Instruct's
    GGUF, converted), or None for a local folder."""
    if name.lower() in ALIASES:
        return SMOLLM2_HUB_ID
    return name if name.count("/") == 1 and not name.startswith((".", "/", "~")) else None


def _header(config: TrainConfig) -> str:
    base = _hub_base(config.model)
    lines = ["---", "library_name: dylora-moe"]
    if base is not None:
        lines.append(f"base_model: {base}")
    lines += ["tags:", "  - dylora-moe", "  - lora", "  - mixture-of-experts", "  - peft"]
    hub_data = [ds.hub_id for ds in config.data.datasets if ds.hub_id]
    if hub_data:
        lines += ["datasets:", *[f"  - {d}" for d in hub_data]]
    return "\n".join([*lines, "---"])


def _data_rows(config: TrainConfig, metrics: dict[str, Any]) -> list[str]:
    stats = metrics.get("data", {})
    rows = ["| domain | data set | train examples (kept) | held-out examples | licence |", "|---|---|---|---|---|"]
    for ds in config.data.datasets:
        train = stats.get("train", {}).get("domains", {}).get(ds.domain_label, {})
        held = stats.get("validation", {}).get("domains", {}).get(ds.domain_label, {})
        source = ds.hub_id or ds.path or ds.name
        licence = dataset_licence(ds.name) if ds.path is None and ds.hub_id is None else None
        rows.append(f"| {ds.domain_label} | {source} | {train.get('kept', '?')} | {held.get('kept', '?')} | "
                    f"{licence or 'not recorded: state the licence of your data'} |")
    return rows


def _loss_rows(metrics: dict[str, Any]) -> list[str]:
    loss = metrics.get("eval_loss")
    if not loss:
        return ["No held-out evaluation was recorded."]
    rows = [f"| domain | step {loss['start_step']} | step {loss['end_step']} | change |", "|---|---|---|---|"]
    for name in metrics.get("domains", []):
        start, end = loss["start"][name], loss["end"][name]
        rows.append(f"| {name} | {start:.4f} | {end:.4f} | {end - start:+.4f} |")
    return rows


def _routing_rows(metrics: dict[str, Any], num_experts: int) -> list[str]:
    shares = metrics.get("expert_share", {})
    if not shares:
        return []
    experts = " | ".join(f"expert {e}" for e in range(num_experts))
    rows = [f"| domain | {experts} | router entropy (nats) |", "|---|" + "---|" * (num_experts + 1)]
    for name, share in shares.items():
        cells = " | ".join(f"{s:.2f}" for s in share)
        rows.append(f"| {name} | {cells} | {metrics.get('router_entropy', {}).get(name, float('nan')):.3f} |")
    return rows


def model_card(config: TrainConfig, metrics: dict[str, Any], model: Any) -> str:
    """The README.md of a final adapter folder (see the module docstring)."""
    moe, t = config.moe, config.train
    report = model.parameter_report()
    ranks = ", ".join(str(r) for r in model.expert_ranks)
    global_batch = t.per_device_batch_size * t.gradient_accumulation_steps * metrics.get("world_size", 1)
    sections = [
        _header(config),
        "# DyLoRA-MoE adapter",
        f"A mixture of {model.num_experts} LoRA experts on the frozen base model `{config.model}`, trained "
        "jointly with a learned router by DyLoRA-MoE (`dylora-moe train`).",
        "## Experts and routing",
        f"- experts: {model.num_experts} (ranks {ranks}), alpha {moe.alpha:g}, dropout {moe.dropout:g}, "
        f"targets `{moe.target_modules or 'attention'}` ({report.num_target_modules} modules)",
        f"- routing: {moe.routing}, top-{moe.top_k}, temperature {moe.temperature:g}, gate `{moe.gate}`",
        f"- trainable parameters: {report.trainable_params:,} (experts {report.lora_params:,}, router "
        f"{report.router_params:,}); the base model's {report.base_params:,} are frozen and shared",
        "## Training data",
        *_data_rows(config, metrics),
        "## Training settings",
        f"- {metrics.get('global_step', '?')} optimizer steps of {global_batch} sequences (per device "
        f"{t.per_device_batch_size} x accumulation {t.gradient_accumulation_steps} x "
        f"{metrics.get('world_size', 1)} process(es)), at most {config.data.max_seq_length} tokens, mixing "
        f"`{config.data.mixing}`",
        f"- AdamW at lr {t.lr:g} ({t.lr_scheduler}, {t.warmup_steps} warm-up steps), weight decay "
        f"{t.weight_decay:g}, precision {metrics.get('precision', t.precision)}, seed {config.seed}, balance "
        f"coefficient {moe.balance_coef:g}",
        f"- training time {metrics.get('train_time_s', 0.0):.0f} s",
        "## Held-out loss per domain",
        "Token-weighted cross-entropy on the response tokens of the validation split.",
        *_loss_rows(metrics),
        "## Routing per domain (held-out)",
        *(_routing_rows(metrics, model.num_experts) or ["No routing statistics were recorded."]),
        "## Use",
        "```python\nfrom dylora_moe import DyLoRAMoEForCausalLM\n"
        "model = DyLoRAMoEForCausalLM.from_pretrained(\"path/to/this/folder\")   # eval mode\n```",
        "```bash\ndylora-moe generate path/to/this/folder --prompt \"Write a function that reverses a string.\"\n"
        "dylora-moe eval path/to/this/folder --benchmark humaneval\n```",
        "Each expert exports as a standard PEFT LoRA adapter (`model.export_expert(i, dir)`).",
    ]
    return "\n\n".join(s for s in sections if s) + "\n"
