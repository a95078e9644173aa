"""Configuration of a DyLoRA-MoE model: the expert pool, the router and the load-balancing loss.

``DyLoRAMoEConfig`` is a plain dataclass. It is validated on construction (every error names
the field), serialised as JSON next to the weights with a format version, and is the single
source the CLI builds its options from::

    cfg = DyLoRAMoEConfig(num_experts=4, r=16, alpha=32, routing="sequence")
    cfg.to_json_file("out/config.json")
    cfg = DyLoRAMoEConfig.from_dict(json.load(open("out/config.json")))
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

ROUTING_GRANULARITIES = ("sequence", "token")
ROUTING_MODES = ("auto", "dense", "sparse")
BALANCE_LOSSES = ("seed", "switch")
GATES = ("probability", "straight_through")
EXPERT_INITS = ("zero_b", "svd")
LAYER_ALLOCATIONS = ("increasing", "decreasing")
SCALINGS = ("alpha_r", "goat")
ROUTER_CONTEXTS = ("none", "prompt")
# Fields added to DyLoRAMoEConfig after files were first saved with it, and the value that reproduces
# what those older files were trained with (the probability gate was the only gate before `gate`).
PREDATING_VALUES = {"gate": "probability"}


def with_predating_values(saved: Any) -> Any:
    """A saved ``DyLoRAMoEConfig`` dict with :data:`PREDATING_VALUES` filled in where the file predates a field.

    Anything but a dict is returned unchanged, for ``DyLoRAMoEConfig.from_dict`` to reject with its own error.
    """
    return {**PREDATING_VALUES, **saved} if isinstance(saved, dict) else saved


def help_metadata(text: str, *, flag: str | None = None) -> dict[str, str]:
    """``field(metadata=help_metadata("..."))``: the help text of a config dataclass field (shown by the CLI
    and the generated option tables); ``flag`` names its command-line option when that is not the field's
    name (``output_dir`` as ``--output``)."""
    return {"help": text} if flag is None else {"help": text, "flag": flag}


def experts_per_block(config: DyLoRAMoEConfig, blocks: int) -> list[int]:
    """The number of experts of each of ``blocks`` adapted decoder blocks (in order) under
    ``config.layer_experts``; a list must name one count per block."""
    spec, most = config.layer_experts, config.num_experts
    if spec is None:
        return [most] * blocks
    if isinstance(spec, list):
        if len(spec) != blocks:
            raise ConfigError(f"DyLoRAMoEConfig.layer_experts={spec!r}: {len(spec)} counts for {blocks} adapted "
                              "decoder blocks")
        return list(spec)
    least = max(1, round(most / 3))
    rising = [round(least + (most - least) * b / max(blocks - 1, 1)) for b in range(blocks)]
    return rising if spec == "increasing" else rising[::-1]


@dataclass
class DyLoRAMoEConfig:
    """Settings of the expert pool and router (defaults are the seed's)."""

    num_experts: int = field(default=4, metadata={"help": (
        "Number of LoRA experts created up front (a model's own config also counts the experts added later).")})
    r: int = field(default=16, metadata={"help": "LoRA rank of each initial expert."})
    alpha: float = field(
        default=32.0,
        metadata={"help": "LoRA alpha of each initial expert; the expert's output is scaled by alpha / r."},
    )
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the expert input (0 disables it)."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Modules that receive experts: a list of module names (last name component, e.g. "
            "'q_proj', or a full dotted path), 'attention' (attention projections, the seed's choice), "
            "'all-linear' (attention and MLP projections), or None for 'attention'."
        },
    )
    top_k: int = field(default=1, metadata={"help": "Experts chosen per routed unit in sparse mode (with top_p: "
                                                   "the most that may be chosen)."})
    top_p: float | None = field(
        default=None,
        metadata={"help": "Dynamic top-k: each routed unit takes its most probable experts until their probability "
                  "adds up to top_p (at least 1, at most top_k; the others get weight 0). None = always top_k. "
                  "With threshold_learned, the threshold's starting value."},
    )
    threshold_learned: bool = field(
        default=False,
        metadata={"help": "Learn the dynamic top-k threshold: each router holds one (starting at top_p, which must "
                  "be set, with top_k >= 2 as the cap on k), trained by the LM loss through a straight-through "
                  "keep mask and pulled down by dynamic_k_coef times the mean k (docs/architecture.md)."},
    )
    dynamic_k_coef: float = field(
        default=0.0,
        metadata={"help": "With threshold_learned: coefficient of the compute penalty, the mean soft count of "
                  "experts kept per routed unit (its gradient reaches only the thresholds); 0 lets the LM loss "
                  "alone set them."},
    )
    gate: str = field(
        default="straight_through",
        metadata={
            "help": "Weight of a chosen expert in sparse mode: 'straight_through' (exactly 1 in the forward "
            "pass with top_k=1, like a single LoRA, while the router still gets the gradient of its probability: "
            "p / p.detach(); with top_k>1 the chosen experts' probabilities renormalised to sum to 1; "
            "the default since the quality study in docs/results.md, where it gave lower "
            "held-out loss) or 'probability' (its router probability, as in Switch Transformer and the seed; "
            "below 1 whenever the router is unsure, so the expert's update is shrunk). Checkpoints saved "
            "before this field existed load with 'probability'."
        },
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature of the router (the seed's 2.0; 1.0 since the quality "
                               "study in docs/results.md: with top-1 the chosen expert's gate is its probability, "
                               "and a lower temperature gave lower held-out loss)."}
    )
    routing: str = field(
        default="token",
        metadata={
            "help": "Routing granularity: 'token' (one decision per token and decoder layer, from the hidden "
            "state entering that layer; the default, chosen by the quality study in docs/results.md) or "
            "'sequence' (one decision per sequence from its prompt, shared by every layer: the cost of one "
            "LoRA, one expert per request, the seed's semantics)."
        },
    )
    routing_mode: str = field(
        default="auto",
        metadata={
            "help": "'auto': dense while any expert is immature, sparse top-k once all are mature; "
            "'dense' or 'sparse' force one mode."
        },
    )
    router_type: str = field(default="linear", metadata={"help": "Router network: 'linear' or 'mlp'."})
    router_context: str = field(
        default="none",
        metadata={
            "help": "What a token router sees besides the token's hidden state: 'none', or 'prompt' (the mean input "
            "embedding of the sequence's prompt, as sequence routing pools it, through a linear term of its own "
            "per router, so each token's choice can lean on what the whole request asks for; pinned at the "
            "prefill during generation). Token routing only."
        },
    )
    router_hidden: int = field(default=256, metadata={"help": "Hidden width of the 'mlp' router."})
    balance_loss: str = field(
        default="seed",
        metadata={
            "help": "Load-balancing loss: 'seed' (squared distance of mean expert usage from uniform) or "
            "'switch' (Switch/Mixtral: num_experts * sum(fraction routed * mean probability))."
        },
    )
    balance_coef: float = field(
        default=0.01, metadata={"help": "Coefficient of the load-balancing loss added to the LM loss."}
    )
    init_seed: int = field(default=0, metadata={"help": "Seed for initialising experts and router."})
    shared_a: bool = field(
        default=False,
        metadata={
            "help": "Asymmetric experts (HydraLoRA): one A [r, d_in] per adapted module shared by every expert, "
            "and one B head [d_out, r] per expert; E experts of rank r then hold r*d_in + E*r*d_out parameters "
            "per module. Every expert has rank r."
        },
    )
    expert_init: str = field(
        default="zero_b",
        metadata={
            "help": "'zero_b': A Kaiming-uniform, B zero (a fresh model computes exactly the base model); 'svd' "
            "(GOAT): expert e starts from the e-th of E evenly spaced segments of the frozen weight's singular "
            "vectors, scaled down by svd_rho, and the initial adapters are subtracted from the layer's output "
            "(a frozen residual saved with the checkpoint), so experts start distinct and the base is kept "
            "except for a small share of the unchosen experts' segments."
        },
    )
    svd_rho: float = field(
        default=10.0, metadata={"help": "With expert_init='svd': the initial segments' singular values divided by "
                                "scale * svd_rho (GOAT's rho)."})
    scaling: str = field(
        default="alpha_r",
        metadata={
            "help": "Output scale of expert e: 'alpha_r' (alpha_e / r_e, LoRA's) or 'goat' (sqrt(3 * d_in / r_e), "
            "GOAT's scale that aligns the mixture's updates with full fine-tuning instead of shrinking them; "
            "alpha is then not used)."
        },
    )
    z_loss_coef: float = field(
        default=0.0, metadata={"help": "Coefficient of the router z-loss (ST-MoE: mean squared log-sum-exp of the "
                               "router logits), which keeps logits small; 0 disables it."})
    layer_experts: list[int] | str | None = field(
        default=None,
        metadata={
            "help": "Experts per adapted decoder block (MoLA): None (num_experts in every block), 'increasing' "
            "(linearly from a third of num_experts in the first adapted block to num_experts in the last: with "
            "num_experts=6 the blocks hold 2 to 6, 4 on average), 'decreasing', or one count per adapted block "
            "(the largest equal to num_experts). Token routing only; such a pool does not grow (add_expert)."
        },
    )
    domain_mi_coef: float = field(
        default=0.0,
        metadata={
            "help": "Coefficient of the domain routing loss: minus the mutual information between each training "
            "example's domain and the router's choice (Mod-Squad), so that domains concentrate on experts of their "
            "own while the router itself, not a fixed assignment, picks which; it needs the domain of every "
            "training example (the trainer passes it) and changes nothing at inference; 0 disables it."
        },
    )
    domain_mi_decay: float = field(
        default=0.0,
        metadata={
            "help": "How the domain routing loss estimates the domain x expert statistics: 0 from each micro-batch "
            "alone (few sequences: mostly one per domain, so it rewards examples that route differently, domain or "
            "not); in (0, 1) from running statistics the trainer keeps over the optimizer steps, each step's "
            "weight decaying by this factor per step, and the loss then follows the gradient of the mutual "
            "information of the whole stream (domain_routing.py); e.g. 0.9."
        },
    )
    ortho_coef: float = field(
        default=0.0,
        metadata={
            "help": "Coefficient of the expert similarity loss: the mean squared cosine similarity between the "
            "weight updates B_e A_e of every pair of experts in each adapted module, which pushes experts "
            "apart; 0 disables it."
        },
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: str = "config", origins: dict[str, str] | None = None) -> None:
        """Raise ``ConfigError`` naming the first invalid field (``source`` and ``origins`` are accepted for the
        shared config interface; the message names the field)."""

        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"DyLoRAMoEConfig.{name}={getattr(self, name)!r}: {why}")

        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise bad("num_experts", "must be an integer >= 1")
        if not isinstance(self.r, int) or self.r <= 0:
            raise bad("r", "the LoRA rank must be an integer > 0")
        if not self.alpha > 0:
            raise bad("alpha", "must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "must be in [0, 1)")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise bad("top_k", "must be an integer >= 1")
        if self.top_k > self.num_experts:
            raise bad("top_k", f"is larger than num_experts={self.num_experts}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1] (or None for a fixed top_k)")
        if self.threshold_learned and (self.top_p is None or self.top_p >= 1):
            raise bad("threshold_learned", f"needs top_p in (0, 1) as the threshold's starting value, got "
                                           f"top_p={self.top_p!r}")
        if self.threshold_learned and self.top_k < 2:
            raise bad("threshold_learned", "needs top_k >= 2 (the cap on k); with top_k=1 there is nothing to learn")
        if not self.dynamic_k_coef >= 0:
            raise bad("dynamic_k_coef", "must be >= 0")
        if self.dynamic_k_coef > 0 and not self.threshold_learned:
            raise bad("dynamic_k_coef", "penalises the learned threshold: set threshold_learned=True too")
        if self.gate not in GATES:
            raise bad("gate", f"must be one of {GATES}")
        if not self.temperature > 0:
            raise bad("temperature", "must be > 0")
        if self.routing not in ROUTING_GRANULARITIES:
            raise bad("routing", f"must be one of {ROUTING_GRANULARITIES}")
        if self.router_context not in ROUTER_CONTEXTS:
            raise bad("router_context", f"must be one of {ROUTER_CONTEXTS}")
        if self.router_context != "none" and self.routing != "token":
            raise bad("router_context", "needs routing='token' (a sequence router already sees the whole prompt)")
        if self.routing_mode not in ROUTING_MODES:
            raise bad("routing_mode", f"must be one of {ROUTING_MODES}")
        if self.balance_loss not in BALANCE_LOSSES:
            raise bad("balance_loss", f"must be one of {BALANCE_LOSSES}")
        if self.balance_coef < 0:
            raise bad("balance_coef", "must be >= 0")
        if not isinstance(self.router_hidden, int) or self.router_hidden < 1:
            raise bad("router_hidden", "must be an integer >= 1")
        if self.expert_init not in EXPERT_INITS:
            raise bad("expert_init", f"must be one of {EXPERT_INITS}")
        if self.expert_init == "svd" and self.shared_a:
            raise bad("expert_init", "'svd' gives every expert its own A; it does not go with shared_a=True")
        if not self.svd_rho > 0:
            raise bad("svd_rho", "must be > 0")
        if self.scaling not in SCALINGS:
            raise bad("scaling", f"must be one of {SCALINGS}")
        for name in ("z_loss_coef", "ortho_coef", "domain_mi_coef"):
            if not getattr(self, name) >= 0:
                raise bad(name, "must be >= 0")
        if not 0 <= self.domain_mi_decay < 1:
            raise bad("domain_mi_decay", "must be in [0, 1): 0 for the micro-batch estimator, e.g. 0.9 for running "
                      "statistics")
        le = self.layer_experts
        if le is not None:
            if self.routing != "token":
                raise bad("layer_experts", "needs routing='token' (one router per block)")
            if isinstance(le, str) and le not in LAYER_ALLOCATIONS:
                raise bad("layer_experts", f"must be one of {LAYER_ALLOCATIONS}, a list of counts or None")
            if isinstance(le, list) and (not le or not all(isinstance(n, int) and n >= 1 for n in le)
                                         or max(le) != self.num_experts):
                raise bad("layer_experts", f"a list needs counts >= 1, the largest equal to num_experts="
                          f"{self.num_experts}")
            if self.top_k > min(le if isinstance(le, list) else experts_per_block(self, 2)):
                raise bad("top_k", "is larger than the fewest experts of a block")
        tm = self.target_modules
        if isinstance(tm, list):
            if not tm or not all(isinstance(t, str) and t for t in tm):
                raise bad("target_modules", "must be a non-empty list of module names")
        elif tm is not None and not isinstance(tm, str):
            raise bad("target_modules", "must be a list of names, 'attention', 'all-linear' or None")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> DyLoRAMoEConfig:
        """Build from a dict, rejecting unknown keys with a message naming them and ``source``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown DyLoRAMoEConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
