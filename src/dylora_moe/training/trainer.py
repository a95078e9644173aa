"""``JointTrainer``: joint training of all experts and the router on several domains (e.g. Code Alpaca + MBPP).

Joint mode, as in the seed: every expert is created up front and marked mature, so routing is
sparse top-k from the first step; only the experts and the router train (AdamW over
``model.trainable_parameters()``). Before the first step the router's feature standardisation is
set from the first training examples (``model.calibrate_router``). The engine is Hugging Face
Accelerate (device placement, mixed precision, gradient accumulation, gradient clipping,
multi-process reduction, main-process printing); the loop itself is here, in the shape of a recipe::

    from dylora_moe.training import JointTrainer, TrainConfig

    config = TrainConfig.from_yaml("configs/cpu-demo.yaml", ["train.max_steps=4"])
    result = JointTrainer(config).train()          # loads config.model with load_base_model
    result.metrics["eval_loss"]["end"], result.final_dir

    trainer = JointTrainer(config, model=tiny_base, tokenizer=tok)   # tests: any causal LM
    state = trainer.setup()                        # data, model, optimizer, a resumed run's state: a TrainState
    for batch in trainer.batches(state):
        if trainer.step(state, batch):             # True once an optimizer step completed
            trainer.after_step(state)              # logging, evaluation (trainer.evaluate), checkpoints (.save)
    result = trainer.finish(state)                 # final adapter, metrics.json, routing.png

A passed-in base model is wrapped in place (its linear layers gain experts); pass a fresh one per
run. Data: training splits of ``config.data.datasets`` mixed by an ``InterleavedSampler`` read as
one endless seeded stream (so a run is a number of optimizer steps, and a resume restarts it at an
exact position); held-out sets: each dataset's ``validation`` split (Code Alpaca's hashed hold-out,
MBPP task ids 511-600), truncated to ``eval_examples_per_domain``. Outputs in ``output_dir``:
``checkpoint-<step>/``, ``final/``, ``metrics.json``, ``routing.png``, ``tensorboard/``,
``train_config.json``.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    GradientAccumulationPlugin,
    broadcast_object_list,
    gather_object,
    set_seed,
)
from safetensors import SafetensorError
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..atomic import temporary_sibling, write_text_atomically
from ..common import runs
from ..common.memory import peak_memory_bytes, reset_peak_memory
from ..continual.growth import domains_as_skills, grow_experts_for_domains
from ..data import DataCollator, FormatStats, InterleavedSampler, TokenizedExample
from ..errors import CheckpointError, ConfigError, TrainingError, TrainingInterrupted
from ..layout import MODEL_CARD_FILE
from ..loading import load_base_model, quantization_config
from ..model import DyLoRAMoEForCausalLM
from ..serialization import base_fingerprint, check_fingerprint, read_checkpoint_meta, save_model
from . import checkpoint as ckpt
from . import sharding
from .config import TrainConfig
from .data import StreamBatches, load_split, tokenize_split
from .domain_stats import RunningDomainRouting
from .evaluation import EvalResult, evaluate
from .interrupt import StopRequest
from .model_card import model_card
from .summary import build_metrics, plot_routing, summary_table, write_metrics
from .tracking import Trackers

# Keys a resumed run must share with its checkpoint (everything that decides the computation). The batch
# shape may change with the number of processes as long as the global batch (processes x per-device batch x
# accumulation) stays the same.
_RESUME_FIXED = ("model", "seed", "moe", "data.datasets", "data.max_seq_length", "data.mixing",
                 "data.use_chat_template")


@dataclass
class TrainResult:
    """What :meth:`JointTrainer.train` returns."""

    output_dir: Path
    final_dir: Path
    global_step: int
    total_steps: int
    epochs: float
    train_time_s: float
    eval_history: list[EvalResult]
    metrics: dict[str, Any]
    metrics_path: Path
    routing_plot: Path
    checkpoints: list[Path] = field(default_factory=list)
    resumed_from: Path | None = None
    format_stats: FormatStats | None = None

    @property
    def start_eval(self) -> EvalResult:
        return self.eval_history[0]

    @property
    def end_eval(self) -> EvalResult:
        return self.eval_history[-1]


@dataclass
class TrainState:
    """A run between steps (:meth:`JointTrainer.setup` makes it; ``step``, ``evaluate``, ``save`` advance it)."""

    model: DyLoRAMoEForCausalLM  # the bare model (never the DDP wrapper)
    tokenizer: Any
    train_set: list[TokenizedExample]
    eval_sets: dict[str, list[TokenizedExample]]
    train_stats: FormatStats
    eval_stats: FormatStats
    stream: InterleavedSampler
    collate: DataCollator
    samples_per_step: int  # sequences per optimizer step, all processes together
    total_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    wall_start: float
    step: int = 0
    start_step: int = 0
    start_position: int = 0  # of the stream, where this process's run started
    history: list[EvalResult] = field(default_factory=list)
    train_log: list[dict[str, Any]] = field(default_factory=list)
    prior_train_time_s: float = 0.0  # training time of the run before it was resumed
    resumed_from: Path | None = None
    rng_states: list[dict[str, Any]] | None = None  # restored once the loader has started
    prepared: Any = None  # the Accelerate-prepared model
    loader: Any = None
    writer: Any = None
    bar: Any = None
    loop_start: float = 0.0
    # the logging window: loss, aux loss, tokens, micro-batches, experts per routed unit; the optimizer step in
    # progress is added to it once it proves finite
    window: torch.Tensor | None = None
    pending: torch.Tensor | None = None
    window_start: float = 0.0
    grad_norm: Any = None
    bad_run: int = 0
    train_domains: dict[str, list[Any]] = field(default_factory=dict)  # the raw training examples, by domain
    #: the domain routing loss's running statistics (moe.domain_mi_decay > 0), else None
    domain_stats: RunningDomainRouting | None = None

    def epoch_at(self, step: int) -> float:
        return step * self.samples_per_step / self.stream.num_samples

    @property
    def train_time_s(self) -> float:
        return self.prior_train_time_s + time.perf_counter() - self.loop_start


class JointTrainer:
    """Train a ``DyLoRAMoEForCausalLM`` jointly on the configured domains (see the module docstring)."""

    def __init__(self, config: TrainConfig, model: Any = None, tokenizer: Any = None) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        config.validate("train config")
        if model is not None and tokenizer is None:
            raise ValueError("a model was given without its tokenizer: pass tokenizer=... too")
        self.config = config
        self.output_dir = Path(config.output_dir)
        self._model_arg, self._tokenizer = model, tokenizer
        self.model: DyLoRAMoEForCausalLM | None = None
        self.accelerator: Accelerator | None = None
        self.precision = "fp32"
        self._stale_outputs: list[Path] = []
        self._created_output_dir: Path | None = None
        self._fingerprint: dict[str, Any] | None = None  # of the base model, taken before it is sharded
        self._usage: sharding.ExpertUsage | None = None  # under FSDP: experts used in the step, on any process

    # ------------------------------------------------------------------ the recipe
    def train(self) -> TrainResult:
        """Run (or resume) training; return a :class:`TrainResult`."""
        state = self.setup()
        acc = self.accelerator
        try:
            with StopRequest(enabled=acc.num_processes == 1, say=state.bar.write) as stop:
                if not state.history:
                    self.evaluate(state)
                for batch in self.batches(state):
                    if self.step(state, batch):
                        self.after_step(state)
                        if stop.requested and state.step < state.total_steps:
                            raise TrainingInterrupted(state.step, state.total_steps, self._save_once(state),
                                                      self.output_dir)
                if not state.history or state.history[-1].step != state.step:
                    self.evaluate(state)
        except KeyboardInterrupt as exc:
            if isinstance(exc, TrainingInterrupted):
                raise
            raise TrainingInterrupted(state.step, state.total_steps, None, self.output_dir) from exc
        finally:
            self.close(state)
        return self.finish(state)

    def _save_once(self, state: TrainState) -> Path:
        """The checkpoint of the current step: written now unless ``after_step`` just did."""
        target = runs.checkpoint_dir(self.output_dir, state.step)
        return target if target.is_dir() else self.save(state)

    def setup(self) -> TrainState:
        """Everything before the first step: the accelerator, the output folder, data, model, optimizer and
        scheduler, a resumed run's state, the data loader and the router calibration."""
        wall_start = time.perf_counter()
        cfg = self.config
        if cfg.train.base_quantization != "none" and self._model_arg is None:  # refused at once where it cannot run
            quantization_config(cfg.train.base_quantization, torch.bfloat16)
        self.accelerator = acc = self._make_accelerator()
        check_engine(str(acc.distributed_type))
        self._resolve_batch()
        set_seed(cfg.seed)
        resume_from = self._prepare_output_dir()
        try:
            state = self._load(wall_start)  # data errors come before the model is loaded
        except BaseException:
            self._remove_created_output_dir()
            raise
        self._clear_stale_outputs()
        acc.print(state.model.parameter_report())
        acc.print(f"--- Training data (train split) ---\n{state.train_stats.summary()}")
        acc.print(f"--- Held-out data (validation split) ---\n{state.eval_stats.summary()}")
        if resume_from is not None:
            self.resume(state, resume_from)
        self._prepare(state)
        if resume_from is None and self.config.train.router_calibration_examples:
            self._calibrate_router(state)
        state.bar = tqdm(total=state.total_steps, initial=state.step, desc="train",
                         disable=not acc.is_local_main_process, dynamic_ncols=True)
        state.loop_start = time.perf_counter()
        state.window = torch.zeros(6, dtype=torch.float64, device=acc.device)
        state.pending = torch.zeros_like(state.window)
        return state

    def _load(self, wall_start: float) -> TrainState:
        """Data, model (and expert growth), tokenized sets, stream, optimizer, scheduler: a fresh state."""
        cfg, t, acc = self.config, self.config.train, self.accelerator
        train_raw, eval_raw = load_split(cfg, "train"), load_split(cfg, "validation")
        model, tokenizer = self._build_model()
        if t.allow_expert_growth:
            grow_experts_for_domains(model, tokenizer, train_raw, threshold=t.growth_threshold,
                                     examples_per_domain=t.growth_examples,
                                     max_seq_length=cfg.data.max_seq_length, log=acc.print)
        self.model = model
        train_set, stats = tokenize_split(cfg, train_raw, tokenizer, "training")
        eval_tokenized, eval_stats = tokenize_split(cfg, eval_raw, tokenizer, "held-out")
        domains = [ds.domain_label for ds in cfg.data.datasets]
        weights = {ds.domain_label: ds.weight for ds in cfg.data.datasets}
        stream = InterleavedSampler.from_domain_labels(
            [x.domain for x in train_set], weights=weights if cfg.data.mixing == "interleave" else None,
            seed=cfg.seed, mode=cfg.data.mixing, domains=domains)
        samples_per_step = t.per_device_batch_size * t.gradient_accumulation_steps * acc.num_processes
        total_steps = t.max_steps or max(1, math.ceil(t.num_epochs * stream.num_samples / samples_per_step))
        if t.distributed == "fsdp":  # fully_shard moves each shard to the device: the whole base never goes there
            self._fingerprint = base_fingerprint(model.base_model, model.base_name_or_path)
            sharding.shard_model(model, sharding.device_mesh(acc.device), acc.device)
            self._usage = sharding.ExpertUsage(model)
        else:
            model.to(acc.device)
        optimizer = self._optimizer(model)
        return TrainState(
            model=model, tokenizer=tokenizer, train_set=train_set,
            eval_sets={d: [x for x in eval_tokenized if x.domain == d] for d in domains},
            train_stats=stats, eval_stats=eval_stats, stream=stream, collate=DataCollator.from_tokenizer(tokenizer),
            samples_per_step=samples_per_step, total_steps=total_steps, optimizer=optimizer,
            scheduler=self._scheduler(optimizer, total_steps), wall_start=wall_start, train_domains=train_raw,
            domain_stats=self._domain_stats(model, len(domains)))

    def _domain_stats(self, model: DyLoRAMoEForCausalLM, num_domains: int) -> RunningDomainRouting | None:
        """The running statistics of the domain routing loss (one table per routing decision), when it uses them."""
        moe = self.config.moe
        if moe.domain_mi_coef == 0 or moe.domain_mi_decay == 0:
            return None
        return RunningDomainRouting(num_domains, moe.domain_mi_decay, decisions=len(model.router_slots),
                                    experts=model.num_experts)

    def resume(self, state: TrainState, checkpoint: Path) -> None:
        """Continue from ``checkpoint`` (before the loader exists): the trainer state, the global batch it was
        written with, the adapter weights, the stream's position and the random states."""
        acc, t = self.accelerator, self.config.train
        world, per_device = acc.num_processes, t.per_device_batch_size
        saved = ckpt.load_trainer_state(checkpoint)
        saved_global = saved.get("samples_per_step")
        if saved_global is None:  # written before the global batch was recorded: same world size only
            saved_global = state.samples_per_step if saved["world_size"] == world else None
        if saved_global != state.samples_per_step:
            hint = max(1, (saved.get("samples_per_step") or state.samples_per_step) // (per_device * world))
            raise CheckpointError(
                f"{checkpoint}: written with {saved.get('samples_per_step', '?')} sequences per optimizer step "
                f"({saved['world_size']} processes); now {state.samples_per_step} ({world} x per_device_batch_size "
                f"{per_device} x gradient_accumulation_steps {t.gradient_accumulation_steps}): keep the global "
                f"batch the same, e.g. train.gradient_accumulation_steps={hint}")
        if saved["world_size"] != world:
            acc.print(f"resuming a {saved['world_size']}-process checkpoint with {world} process(es): same "
                      "global batch and data order; dropout random streams restart per process")
        self._load_weights(state, checkpoint)
        try:
            state.stream.load_state_dict(saved["sampler"])
        except ValueError as exc:  # e.g. another number of examples: the data files changed
            raise CheckpointError(f"{checkpoint}: the training data differ from the checkpoint's ({exc})") from None
        state.rng_states = ckpt.load_torch_file(checkpoint, ckpt.RNG_FILE)
        state.step = state.start_step = saved["global_step"]
        state.history = [EvalResult.from_dict(h) for h in saved["eval_history"]]
        state.train_log = list(saved["train_log"])
        if state.domain_stats is not None and "domain_routing" in saved:
            state.domain_stats.load_state_dict(saved["domain_routing"], where=f"{checkpoint}/{ckpt.STATE_FILE}")
        state.prior_train_time_s = saved["train_time_s"]
        state.resumed_from = checkpoint
        acc.print(f"resuming from {checkpoint} (step {state.step} of {state.total_steps})")

    def _prepare(self, state: TrainState) -> None:
        """The loader over the stream from its position, Accelerate's wrappers, a resumed optimizer and scheduler,
        the TensorBoard writer and the run's train_config.json."""
        acc, cfg = self.accelerator, self.config
        world, accum = acc.num_processes, cfg.train.gradient_accumulation_steps
        state.start_position = state.stream.epoch * state.stream.num_samples + state.stream.position
        batches = StreamBatches(state.stream, cfg.train.per_device_batch_size, state.start_position,
                                (state.total_steps - state.start_step) * accum * world)
        loader = DataLoader(state.train_set, batch_sampler=batches, collate_fn=state.collate,
                            generator=torch.Generator().manual_seed(cfg.seed))
        if sharding.is_sharded(state.model):  # already FSDP2 modules: Accelerate places nothing and wraps nothing
            state.optimizer, state.loader = acc.prepare(state.optimizer, loader)
            state.prepared = state.model
        else:
            state.prepared, state.optimizer, state.loader = acc.prepare(state.model, state.optimizer, loader)
        if state.resumed_from is not None:
            if not (state.resumed_from / ckpt.SHARDED_DIR).is_dir():  # else loaded with the adapter (resume)
                state.optimizer.load_state_dict(ckpt.load_torch_file(state.resumed_from, ckpt.OPTIMIZER_FILE))
            state.scheduler.load_state_dict(ckpt.load_torch_file(state.resumed_from, ckpt.SCHEDULER_FILE))
        if acc.is_main_process:
            state.writer = self._writer(state.start_step if state.resumed_from is not None else None)
            cfg.to_json_file(self.output_dir / runs.TRAIN_CONFIG_FILE)
        reset_peak_memory(acc.device)  # the training loop's peak (metrics.json: peak_memory_mib)

    def batches(self, state: TrainState) -> Iterator[dict[str, torch.Tensor]]:
        """The run's remaining micro-batches; a resumed run's random states are restored once the loader has
        started (nothing random happens in between)."""
        state.prepared.train()
        iterator = iter(state.loader)
        first = next(iterator, None)
        if state.rng_states is not None and len(state.rng_states) == self.accelerator.num_processes:
            ckpt.restore_rng_state(state.rng_states[self.accelerator.process_index])
        state.window_start = time.perf_counter()  # throughput counts from here (not the step-0 evaluation)
        if first is None:
            return
        yield first
        yield from iterator

    def step(self, state: TrainState, batch: dict[str, torch.Tensor]) -> bool:
        """Forward and backward of one micro-batch; at the end of an accumulation the optimizer and scheduler
        step (a non-finite gradient skips the update, with a warning, and enough in a row stop the run).
        Returns True once an optimizer step completed (``state.step`` advanced)."""
        acc, t, stats = self.accelerator, self.config.train, state.domain_stats
        domain_ids = batch.pop("domain_ids", None)
        forced = domain_ids if t.route_by_domain else None
        bad = False
        with acc.accumulate(state.prepared):
            if self._usage is not None:  # FSDP reduce-scatters once per optimizer step, at its last micro-batch
                state.model.set_requires_gradient_sync(acc.sync_gradients)
            # the model uses the domains only for the domain routing loss (ignored when moe.domain_mi_coef is 0)
            out = state.prepared(**batch, supervised_logits_only=True, forced_expert=forced, domain_ids=domain_ids,
                                 domain_pmi=None if stats is None else stats.pmi(acc.device))
            if stats is not None and out.domain_mass is not None and domain_ids is not None:
                stats.add(out.domain_mass, domain_ids)
            acc.backward(out.loss)
            if acc.sync_gradients:
                # The gradients are reduced across processes here, so every process sees the same norm and
                # takes the same decision; a non-finite loss makes non-finite gradients.
                if self._usage is not None:
                    self._usage.drop_unused_gradients(acc.device)
                params = state.model.trainable_parameters()
                state.grad_norm = sharding.full_value(
                    acc.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm > 0 else _grad_norm(params))
                bad = not math.isfinite(float(state.grad_norm))
                if bad:
                    state.optimizer.zero_grad(set_to_none=True)  # the step below then changes nothing
            state.optimizer.step()
            state.optimizer.zero_grad(set_to_none=True)
        state.pending += torch.stack([out.lm_loss.detach().double(), out.aux_loss.detach().double(),
                                      batch["attention_mask"].sum().double(),
                                      torch.ones((), dtype=torch.float64, device=acc.device),
                                      out.active_experts.detach().double(),
                                      _scalar(out.domain_mi, state.pending)])
        if not acc.sync_gradients:
            return False
        if stats is not None and bad:  # every process decides alike (the gradient norm is reduced)
            stats.discard_step()
        elif stats is not None:  # every process, so that the sums are reduced over all of them
            stats.end_step(lambda x: acc.reduce(x, reduction="sum") if acc.num_processes > 1 else x)
        if not acc.optimizer_step_was_skipped:
            state.scheduler.step()
        state.step += 1
        self._account(state, bad)
        return True

    def _account(self, state: TrainState, bad: bool) -> None:
        """Add a finite step to the logging window; warn about a non-finite one, and stop after too many."""
        t = self.config.train
        if bad:
            state.bad_run += 1
            self.accelerator.print(
                f"warning: step {state.step}: non-finite loss or gradient (grad norm {float(state.grad_norm)}): "
                f"skipped, parameters unchanged ({state.bad_run} in a row)")
            if t.max_bad_steps and state.bad_run >= t.max_bad_steps:
                good = runs.latest_checkpoint(self.output_dir)
                raise TrainingError(
                    f"stopping at step {state.step}: {state.bad_run} consecutive steps with a non-finite loss or "
                    f"gradient (train.max_bad_steps={t.max_bad_steps}); the last good checkpoint is "
                    f"{good if good is not None else 'none (no checkpoint was written yet)'}. Lower "
                    "train.lr, check the data, or train in fp32 (train.precision=fp32)")
        else:
            state.bad_run = 0
            state.window += state.pending
        state.pending.zero_()

    def after_step(self, state: TrainState) -> None:
        """After an optimizer step: the log line on its cadence, then evaluation and a checkpoint on theirs
        (both always at the last step); the time they take does not count as training throughput."""
        t, step = self.config.train, state.step
        if step % t.log_every == 0 or step == state.total_steps:
            self._log(state)
        state.bar.update(1)
        pause_start = time.perf_counter()
        if (t.eval_every and step % t.eval_every == 0) or step == state.total_steps:
            self.evaluate(state)
        if (t.save_every and step % t.save_every == 0) or step == state.total_steps:
            self.save(state)
        state.window_start += time.perf_counter() - pause_start

    def _log(self, state: TrainState) -> None:
        acc = self.accelerator
        totals = acc.reduce(state.window.clone(), reduction="sum") if acc.num_processes > 1 else state.window
        loss_sum, aux_sum, tokens, micro, k_sum, mi_sum = totals.tolist()
        elapsed = max(time.perf_counter() - state.window_start, 1e-9)
        lm, aux = loss_sum / max(micro, 1), aux_sum / max(micro, 1)
        row = {"step": state.step, "epoch": state.epoch_at(state.step), "lm_loss": lm, "aux_loss": aux,
               "loss": lm + self.config.moe.balance_coef * aux, "lr": state.scheduler.get_last_lr()[0],
               "grad_norm": None if state.grad_norm is None else float(state.grad_norm),
               "tokens_per_s": tokens / elapsed, "mean_k": k_sum / max(micro, 1)}
        if state.domain_stats is not None:  # the running statistics' mutual information (nats), mean over decisions
            row["domain_mi"] = state.domain_stats.mutual_information()
        elif self.config.moe.domain_mi_coef > 0:  # the micro-batches' mutual information (nats)
            row["domain_mi"] = mi_sum / max(micro, 1)
        thresholds = state.model.threshold_parameters()
        if thresholds:  # the learned dynamic top-k thresholds, mean over the routers
            logits = torch.cat([sharding.full_value(p.detach()).float().reshape(1) for p in thresholds])
            row["threshold"] = float(torch.sigmoid(logits).mean())
        state.train_log.append(row)
        state.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if state.writer is not None:
            for key in ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "mean_k", "threshold", "domain_mi"):
                if row.get(key) is not None:
                    state.writer.add_scalar(f"train/{key}", row[key], state.step)
        state.window.zero_()
        state.window_start = time.perf_counter()

    def evaluate(self, state: TrainState) -> EvalResult:
        """Held-out loss and routing statistics per domain, at the current step (logged and kept in history)."""
        # The bare model, not the DDP wrapper: each process runs its own share of the held-out batches, and a
        # DDP forward would start collectives (buffer broadcast) the other processes never join.
        acc, step = self.accelerator, state.step
        result = evaluate(state.model, state.eval_sets, state.collate, self.config.data.eval_batch_size,
                          state.model.num_experts, step=step, epoch=state.epoch_at(step), accelerator=acc,
                          route_by_domain=self.config.train.route_by_domain,
                          lockstep=sharding.is_sharded(state.model))
        state.history.append(result)
        if acc.is_main_process:
            state.bar.write(result.line())  # keeps the progress bar intact
        if state.writer is not None:
            for name, d in result.domains.items():
                state.writer.add_scalar(f"eval/loss/{name}", d.loss, step)
                state.writer.add_scalar(f"eval/aux_loss/{name}", d.aux_loss, step)
                state.writer.add_scalar(f"eval/router_entropy/{name}", d.router_entropy, step)
                for e, share in enumerate(d.expert_share):
                    state.writer.add_scalar(f"eval/expert_share/{name}/expert_{e}", share, step)
            state.writer.add_scalar("eval/loss/overall", result.loss, step)
        return result

    def save(self, state: TrainState) -> Path:
        """Write ``checkpoint-<step>`` (atomically; from the main process, or from every process's shards under
        FSDP) and rotate the old ones."""
        acc, step = self.accelerator, state.step
        position = state.start_position + (step - state.start_step) * state.samples_per_step
        sampler_state = {**state.stream.state_dict(), "epoch": position // state.stream.num_samples,
                         "position": position % state.stream.num_samples}
        states = gather_object([ckpt.capture_rng_state()])
        target = runs.checkpoint_dir(self.output_dir, step)
        payload = {"global_step": step, "total_steps": state.total_steps, "epoch": state.epoch_at(step),
                   "sampler": sampler_state, "world_size": acc.num_processes,
                   "samples_per_step": state.samples_per_step, "engine": self.config.train.distributed,
                   "eval_history": [h.to_dict() for h in state.history], "train_log": state.train_log,
                   "train_time_s": state.train_time_s}
        if state.domain_stats is not None:
            payload["domain_routing"] = state.domain_stats.state_dict()
        try:
            if sharding.is_sharded(state.model):
                self._save_sharded(state, target, states, payload)
            elif acc.is_main_process:
                ckpt.save_checkpoint(target, model=acc.unwrap_model(state.prepared), optimizer=state.optimizer,
                                     scheduler=state.scheduler, rng_states=states, state=payload, config=self.config)
        except (OSError, SafetensorError) as exc:  # disk full, size limit: nothing half-written is left
            good = runs.latest_checkpoint(self.output_dir)
            why = getattr(exc, "strerror", None) or str(exc)
            raise TrainingError(
                f"could not write {target}: {why} (disk full or a file size limit?); nothing of it was kept, "
                f"and the previous checkpoint {good if good is not None else '(none yet)'} is intact: free "
                "space, then resume") from exc
        if acc.is_main_process:
            ckpt.prune_checkpoints(self.output_dir, self.config.train.save_total_limit)
        acc.wait_for_everyone()
        return target

    def _save_sharded(self, state: TrainState, target: Path, rng_states: list[Any], payload: dict[str, Any]) -> None:
        """Every process writes its adapter and optimizer shards into one temporary folder (which the main
        process made); the main process adds the gathered adapter and the rest, then renames it into place."""
        acc = self.accelerator
        tmp = broadcast_object_list([temporary_sibling(target) if acc.is_main_process else None])[0]
        sharding.save_sharded(tmp / ckpt.SHARDED_DIR, state.model, state.optimizer)
        adapter = sharding.gather_adapter(state.model)
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.finish_sharded_checkpoint(tmp, target, model=state.model, adapter=adapter,
                                           fingerprint=self._fingerprint or {}, scheduler=state.scheduler,
                                           rng_states=rng_states, state=payload, config=self.config)

    def shutdown(self) -> None:
        """Leave the process group of a multi-process run (all processes wait for each other first, so that none
        exits while another still exchanges with it); nothing to do in one process. Call it last."""
        if self.accelerator is not None and dist.is_available() and dist.is_initialized():
            self.accelerator.wait_for_everyone()
            dist.destroy_process_group()

    def close(self, state: TrainState) -> None:
        if state.bar is not None:
            state.bar.close()
        if state.writer is not None:
            state.writer.close()

    def finish(self, state: TrainState) -> TrainResult:
        """The final adapter, metrics.json, routing.png and the summary table; the :class:`TrainResult`."""
        acc, out, step = self.accelerator, self.output_dir, state.step
        final_dir, metrics_path, plot_path = out / runs.FINAL_DIR, out / "metrics.json", out / "routing.png"
        model, train_time = acc.unwrap_model(state.prepared), state.train_time_s
        metrics = build_metrics(state.history, train_log=state.train_log, train_time_s=train_time, extra={
            "model": self.config.model, "num_experts": model.num_experts, "global_step": step,
            "total_steps": state.total_steps, "epochs": state.epoch_at(step), "precision": self.precision,
            "wall_time_s": time.perf_counter() - state.wall_start, "world_size": acc.num_processes,
            "peak_memory_mib": _mib(peak_memory_bytes(acc.device)),
            "data": {"train": state.train_stats.as_dict(), "validation": state.eval_stats.as_dict()},
            "special_tokens": {role: getattr(state.tokenizer, f"{role}_token", None) for role in ("bos", "eos", "pad")},
            "versions": library_versions()})
        sharded = sharding.is_sharded(model)
        if self.config.train.register_skills and model.skill_library is None and (sharded or acc.is_main_process):
            with sharding.full_root(model):  # sharded: every process runs the same embedding forwards
                self._register_skills(state, model)
        adapter = sharding.gather_adapter(model) if sharded else None
        if acc.is_main_process:
            save_model(model, final_dir, tensors=adapter, fingerprint=self._fingerprint)
            write_metrics(metrics_path, metrics)
            write_text_atomically(final_dir / MODEL_CARD_FILE, model_card(self.config, metrics, model))
            plot_routing(metrics.get("expert_share", {}), plot_path,
                         title=f"Expert share per domain (held-out, step {step})")
            acc.print("--- Summary ---")
            acc.print(summary_table(state.history))
            acc.print(f"train time {train_time:.1f}s; adapter: {final_dir}; metrics: {metrics_path}")
        acc.wait_for_everyone()
        return TrainResult(out, final_dir, step, state.total_steps, state.epoch_at(step), train_time, state.history,
                           metrics, metrics_path, plot_path, runs.list_checkpoints(out), state.resumed_from,
                           state.train_stats)

    # ------------------------------------------------------------------ setup helpers
    def _register_skills(self, state: TrainState, model: DyLoRAMoEForCausalLM) -> None:
        """The training domains as skills of the final adapter's library (``train.register_skills``)."""
        t = self.config.train
        shares = {name: d.expert_share for name, d in state.history[-1].domains.items()} if state.history else {}
        was_training = model.training
        library = domains_as_skills(model, state.tokenizer, state.train_domains, shares,
                                    examples_per_domain=t.growth_examples,
                                    max_seq_length=self.config.data.max_seq_length, seed=self.config.seed)
        model.train(was_training)
        self.accelerator.print(f"skills registered for continual learning: {', '.join(library.names)}")

    def _resolve_batch(self) -> None:
        """The launch checks of ``train.distributed`` and ``train.global_batch_size``; a global batch size fixes
        the gradient accumulation steps of this number of processes (Accelerate and the config both take it)."""
        acc, t = self.accelerator, self.config.train
        accumulation = sharding.resolve_accumulation(
            t.distributed, acc.num_processes, t.per_device_batch_size, t.gradient_accumulation_steps,
            t.global_batch_size, dist.is_available() and dist.is_initialized())
        if accumulation != t.gradient_accumulation_steps:
            self.config = self.config.replace(**{"train.gradient_accumulation_steps": accumulation})
            acc.gradient_accumulation_steps = accumulation
            acc.print(f"train.global_batch_size {t.global_batch_size} over {acc.num_processes} process(es) x "
                      f"{t.per_device_batch_size} sequences: gradient accumulation {accumulation}")

    def _load_weights(self, state: TrainState, checkpoint: Path) -> None:
        """The adapter (and, from a sharded checkpoint, the optimizer state) of ``checkpoint`` into the model."""
        if (checkpoint / ckpt.SHARDED_DIR).is_dir():  # written under FSDP: loads on any engine and world size
            meta = read_checkpoint_meta(checkpoint / runs.ADAPTER_DIR)
            check_fingerprint(meta["base_model"], None if self._fingerprint else state.model.base_model,
                              str(checkpoint), current=self._fingerprint)
            if list(meta["expert_ranks"]) != list(state.model.expert_ranks):
                raise CheckpointError(f"{checkpoint}: expert ranks {meta['expert_ranks']} do not match the model's "
                                      f"{state.model.expert_ranks} (was the moe config changed?)")
            sharding.load_sharded(checkpoint / ckpt.SHARDED_DIR, state.model, state.optimizer)
        elif sharding.is_sharded(state.model):
            raise CheckpointError(f"{checkpoint}: written without train.distributed=fsdp (one optimizer file, not "
                                  f"shards): resume it with train.distributed=ddp")
        else:
            ckpt.load_adapter_weights(state.model, checkpoint / runs.ADAPTER_DIR)

    def _make_accelerator(self) -> Accelerator:
        precision = self.config.train.precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
        self.precision = precision
        plugin = GradientAccumulationPlugin(num_steps=self.config.train.gradient_accumulation_steps,
                                            sync_with_dataloader=False)
        # Under torchrun / accelerate launch without a GPU, several CPU processes (gloo): Accelerate only
        # takes that route when asked for the CPU explicitly.
        multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        return Accelerator(
            cpu=multi_cpu,
            mixed_precision="no" if precision == "fp32" else precision,
            gradient_accumulation_plugin=plugin,
            # Sparse top-1 routing leaves the unchosen experts without gradient in a step: DDP must look for
            # unused parameters (their gradients then stay None, exactly as in one process; see
            # docs/distributed.md). Router buffers are identical everywhere: no per-step broadcast.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True, broadcast_buffers=False)],
        )

    def _prepare_output_dir(self) -> Path | None:
        """Return the checkpoint to resume from (or None); refuse to mix with an earlier run's files.

        Nothing is deleted here: with ``overwrite_output_dir`` the earlier run's checkpoints are only noted,
        and :meth:`_clear_stale_outputs` removes them once the data and the model have loaded, so a run that
        fails during setup leaves them as they were.
        """
        cfg, out = self.config, self.output_dir
        if self.accelerator.is_main_process:  # fail now, not after an hour of training at the first save
            try:
                missing = [p for p in (out, *out.parents) if not p.exists()]
                out.mkdir(parents=True, exist_ok=True)
                self._created_output_dir = missing[-1] if missing else None
                probe = out / f".write-test-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as exc:
                raise ConfigError(f"output_dir {out}: cannot be created or written to "
                                  f"({exc.strerror or exc}); choose another --output-dir") from None
        existing = runs.list_checkpoints(out)
        if cfg.resume:
            return self._checkpoint_to_resume(existing)
        if existing and not cfg.overwrite_output_dir:
            raise ConfigError(f"output_dir {out} already holds checkpoints ({existing[-1].name}) of an earlier run: "
                              "pass --resume to continue it, choose another --output-dir, or set "
                              "overwrite_output_dir=true to start afresh")
        if existing:
            self._stale_outputs = [*existing, out / runs.FINAL_DIR, out / "tensorboard", out / "wandb", out / "mlruns"]
        return None

    def _checkpoint_to_resume(self, existing: list[Path]) -> Path:
        out = self.output_dir
        if not existing:
            raise CheckpointError(f"{out}: resume requested but there is no {runs.CHECKPOINT_PREFIX}<step> "
                                  "folder to resume from (run without --resume to start)")
        latest, skipped = ckpt.newest_valid_checkpoint(out)
        for path, why in skipped:
            self.accelerator.print(f"warning: skipping {path.name}, it fails its integrity check: {why}")
        if latest is None:
            raise CheckpointError(f"{out}: no checkpoint passes its integrity check (" +
                                  "; ".join(why for _, why in skipped) + ")")
        self._check_resume_config(TrainConfig.from_json_file(latest / runs.TRAIN_CONFIG_FILE), latest)
        return latest

    def _clear_stale_outputs(self) -> None:
        """Delete the earlier run's outputs noted by :meth:`_prepare_output_dir` (``overwrite_output_dir``)."""
        if self.accelerator.is_main_process:
            for path in self._stale_outputs:
                shutil.rmtree(path, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _remove_created_output_dir(self) -> None:
        """After a failed setup: remove the folders this run created for its outputs if still empty."""
        top = self._created_output_dir
        if top is None or not self.accelerator.is_main_process:
            return
        for path in (self.output_dir, *self.output_dir.parents):
            try:
                path.rmdir()  # only ever succeeds on an empty folder
            except OSError:
                return
            if path == top:
                return

    def _check_resume_config(self, saved: TrainConfig, where: Path) -> None:
        now, old = self.config.to_dict(), saved.to_dict()
        for key in _RESUME_FIXED:
            a, b = _get(now, key), _get(old, key)
            if a != b:
                if isinstance(a, dict) and isinstance(b, dict):  # name the field, not the whole section
                    field_name = next(k for k in [*b, *a] if a.get(k) != b.get(k))
                    key, a, b = f"{key}.{field_name}", a.get(field_name), b.get(field_name)
                raise CheckpointError(f"{where}: cannot resume with a different '{key}' "
                                      f"(checkpoint: {b!r}, now: {a!r}); set {key}={b} to continue it")

    def _build_model(self) -> tuple[DyLoRAMoEForCausalLM, Any]:
        cfg = self.config
        model, tokenizer = self._model_arg, self._tokenizer
        if model is None:
            dtype = cfg.train.base_dtype
            if dtype == "auto":
                dtype = "bfloat16" if self.precision == "bf16" else "float32"
            model, loaded_tokenizer = load_base_model(cfg.model, dtype=dtype, quantization=cfg.train.base_quantization)
            tokenizer = tokenizer or loaded_tokenizer
        if not isinstance(model, DyLoRAMoEForCausalLM):
            name = getattr(model, "name_or_path", "") or cfg.model
            model = DyLoRAMoEForCausalLM(model, cfg.moe, mature=True, base_name_or_path=name)
        model.set_all_mature()
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model, tokenizer

    def _optimizer(self, model: DyLoRAMoEForCausalLM) -> torch.optim.Optimizer:
        params = model.trainable_parameters()
        thresholds = {id(p) for p in model.threshold_parameters()}
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2 and id(p) not in thresholds]
        groups: list[dict[str, Any]] = [{"params": decay, "weight_decay": self.config.train.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        learned = [p for p in params if id(p) in thresholds]
        if learned:
            groups.append({"params": learned, "weight_decay": 0.0, "lr": self.config.train.threshold_lr})
        # the fused kernel: one pass over all tensors (on the CPU 4x faster than the per-tensor loop, ~1% of a
        # default step); not for FSDP's sharded tensors
        fused = self.config.train.distributed != "fsdp" and all(
            p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
            for p in params)
        return torch.optim.AdamW(groups, lr=self.config.train.lr, fused=fused or None)

    def _scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
        t = self.config.train
        warmup = t.warmup_steps or math.ceil(t.warmup_ratio * total_steps)
        name = "constant_with_warmup" if t.lr_scheduler == "constant" else t.lr_scheduler
        return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    def _calibrate_router(self, state: TrainState) -> None:
        """Router feature standardisation from the first training examples of the stream (deterministic)."""
        count = min(self.config.train.router_calibration_examples, state.stream.num_samples)
        indices = [int(i) for i in state.stream.take(0, count)]
        size = self.config.data.eval_batch_size
        batches = (state.collate([state.train_set[i] for i in indices[k : k + size]]) for k in range(0, count, size))
        model = state.model
        was_training = model.training
        model.eval()
        with torch.no_grad(), sharding.full_root(model):
            seen = model.calibrate_router(batches)
        model.train(was_training)
        self.accelerator.print(f"router calibrated on {count} training examples ({seen} routed units)")

    def _writer(self, purge_step: int | None) -> Trackers | None:
        """The experiment trackers of ``train.report_to`` (main process), or None."""
        t = self.config.train
        if not t.report_to:
            return None
        return Trackers(t.report_to, self.output_dir, self.config.to_dict(), purge_step=purge_step,
                        run_name=t.run_name or self.output_dir.resolve().name, project=t.tracker_project)


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that decide a run's numbers (tokenizer conversion, kernels), for metrics.json."""
    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "tokenizers", "accelerate", "gguf"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def check_engine(distributed_type: str) -> None:
    """Refuse Accelerate's own FSDP engine before any work is done: sharding is the trainer's
    ``train.distributed: fsdp`` (PyTorch FSDP2 on CPUs and GPUs, sharded checkpoints that resume exactly), which
    any launcher starts; Accelerate's FSDP wrapper would shard the model a second way and its checkpoints would
    hold the main process's shard only. docs/distributed.md has the engines."""
    if distributed_type.rsplit(".", 1)[-1] == "FSDP":
        raise TrainingError(
            "Accelerate's FSDP engine (distributed_type: FSDP in the accelerate config) is not how this trainer "
            "shards: launch with configs/accelerate/ddp.yaml or torchrun and set train.distributed=fsdp (PyTorch "
            "FSDP2, sharded checkpoints); see docs/distributed.md")


def _mib(size: int | None) -> float | None:
    return None if size is None else size / 2**20


def _grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    grads = [p.grad.detach() for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def _get(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _scalar(value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``value`` detached as a float64 scalar on ``like``'s device, or 0 where a forward produced none."""
    if value is None:
        return torch.zeros((), dtype=torch.float64, device=like.device)
    return value.detach().double()
