"""``JointTrainer``: joint training of all experts and the router on several domains (e.g. Code Alpaca + MBPP).

Joint mode, as in the seed: every expert is created up front and marked mature, so routing is
sparse top-k from the first step; only the experts and the router train (AdamW over
``model.trainable_parameters()``). Before the first step the router's feature standardisation is
set from the first training examples (``model.calibrate_router``). The engine is Hugging Face
Accelerate (device placement, mixed precision, gradient accumulation, gradient clipping,
multi-process reduction, main-process printing); the loop itself is here::

    from dylora_moe.training import JointTrainer, TrainConfig

    config = TrainConfig.from_yaml("configs/cpu-demo.yaml", ["train.max_steps=4"])
    result = JointTrainer(config).train()          # loads config.model with load_base_model
    result.metrics["eval_loss"]["end"], result.final_dir

    JointTrainer(config, model=tiny_base, tokenizer=tok).train()   # tests: any causal LM

A passed-in base model is wrapped in place (its linear layers gain experts); pass a fresh one per
run. Data: training splits of ``config.data.datasets`` mixed by an ``InterleavedSampler`` read as
one endless seeded stream (so a run is a number of optimizer steps, and a resume restarts it at an
exact position); held-out sets: each dataset's ``validation`` split (Code Alpaca's hashed hold-out,
MBPP task ids 511-600), truncated to ``eval_examples_per_domain``. Outputs in ``output_dir``:
``checkpoint-<step>/``, ``final/``, ``metrics.json``, ``routing.png``, ``tensorboard/``,
``train_config.json``.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch.utils.data import DataLoader

from ..config import ConfigError
from ..data import (
    DataCollator,
    DataError,
    DatasetSpec,
    Example,
    FormatStats,
    InterleavedSampler,
    get_spec,
    list_datasets,
    load_examples,
    tokenize_examples,
)
from ..errors import TrainingError
from ..serialization import CheckpointError
from . import checkpoint as ckpt
from .config import DatasetConfig, TrainConfig
from .evaluation import EvalResult, evaluate
from .summary import build_metrics, plot_routing, summary_table, write_metrics

# config keys that must not change when resuming (everything that decides the computation)
# Keys a resumed run must share with its checkpoint. The batch shape may change with the number of
# processes as long as the global batch (processes x per-device batch x accumulation) stays the same.
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


class _StreamBatches:
    """Batches of indices read from an ``InterleavedSampler``'s endless stream, from a global position.

    Deliberately has no ``set_epoch`` and no ``sampler`` attribute, so Accelerate's data loader does
    not reset the stream at each iteration; the trainer saves and restores the position itself.
    """

    drop_last = False

    def __init__(self, stream: InterleavedSampler, batch_size: int, start: int, num_batches: int) -> None:
        self.stream, self.batch_size, self.start, self.num_batches = stream, batch_size, start, num_batches

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        n, cached_epoch, indices = self.stream.num_samples, -1, None
        for k in range(self.num_batches):
            begin = self.start + k * self.batch_size
            batch = []
            for position in range(begin, begin + self.batch_size):
                if position // n != cached_epoch:
                    cached_epoch = position // n
                    indices = self.stream.epoch_indices(cached_epoch)
                batch.append(int(indices[position % n]))
            yield batch


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
        self.model = None
        self.accelerator = None

    # ------------------------------------------------------------------ setup
    def _make_accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, GradientAccumulationPlugin

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
        self._stale_outputs: list[Path] = []
        self._created_output_dir = None
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
        existing = ckpt.list_checkpoints(out)
        if cfg.resume:
            if not existing:
                raise CheckpointError(f"{out}: resume requested but there is no {ckpt.CHECKPOINT_PREFIX}<step> "
                                      "folder to resume from (run without --resume to start)")
            latest, skipped = ckpt.newest_valid_checkpoint(out)
            for path, why in skipped:
                self.accelerator.print(f"warning: skipping {path.name}, it fails its integrity check: {why}")
            if latest is None:
                raise CheckpointError(f"{out}: no checkpoint passes its integrity check (" +
                                      "; ".join(why for _, why in skipped) + ")")
            saved = ckpt.TRAIN_CONFIG_FILE
            self._check_resume_config(TrainConfig.from_json_file(latest / saved), latest)
            return latest
        if existing and not cfg.overwrite_output_dir:
            raise ConfigError(f"output_dir {out} already holds checkpoints ({existing[-1].name}) of an earlier run: "
                              "pass --resume to continue it, choose another --output-dir, or set "
                              "overwrite_output_dir=true to start afresh")
        if existing:
            self._stale_outputs = [*existing, out / ckpt.FINAL_DIR, out / "tensorboard"]
        return None

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

    def _specs(self, split: str) -> list[DatasetSpec]:
        specs = []
        limit_eval = self.config.data.eval_examples_per_domain or None
        for i, ds in enumerate(self.config.data.datasets):
            specs.append(_dataset_spec(ds, i, split, ds.limit if split == "train" else limit_eval))
        return specs

    def _load(self, split: str) -> dict[str, list[Example]]:
        out = {}
        for i, spec in enumerate(self._specs(split)):
            try:
                out[spec.domain_label] = load_examples(spec, self.config.data.data_dir)
            except DataError:
                raise
            except ValueError as exc:  # configuration mistakes of the data layer
                raise ConfigError(f"train config: key 'data.datasets.{i}': {exc}") from None
        return out

    def _build_model(self):
        from ..loading import load_base_model
        from ..model import DyLoRAMoEForCausalLM

        cfg = self.config
        model, tokenizer = self._model_arg, self._tokenizer
        if model is None:
            dtype = cfg.train.base_dtype
            if dtype == "auto":
                dtype = "bfloat16" if self.precision == "bf16" else "float32"
            model, loaded_tokenizer = load_base_model(cfg.model, dtype=dtype)
            tokenizer = tokenizer or loaded_tokenizer
        if not isinstance(model, DyLoRAMoEForCausalLM):
            name = getattr(model, "name_or_path", "") or cfg.model
            model = DyLoRAMoEForCausalLM(model, cfg.moe, mature=True, base_name_or_path=name)
        model.set_all_mature()
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model, tokenizer

    def _grow_experts(self, model, tokenizer, train_raw: dict[str, list[Example]]) -> None:
        """``allow_expert_growth``: one expert per novel domain (continual learning's detector and library)."""
        from ..continual import NoveltyDetector, SkillLibrary, embed_examples

        t = self.config.train
        library, detector, claimed = SkillLibrary(), NoveltyDetector(t.growth_threshold), 0
        for domain, examples in train_raw.items():
            vec = embed_examples(model, tokenizer, examples[: t.growth_examples],
                                 max_seq_length=self.config.data.max_seq_length)
            decision = detector.decide(vec, library)
            if decision.novel:
                expert = claimed if claimed < model.num_experts else model.add_expert()
                claimed += 1
                library.add(domain, vec, expert, len(examples))
                self.accelerator.print(f"growth: domain {domain!r} is novel ({decision.reason}): expert {expert}")
            else:
                library.update(decision.best_skill, vec, len(examples))
                self.accelerator.print(f"growth: domain {domain!r} is not novel ({decision.reason}): shares "
                                       f"expert {library.get(decision.best_skill).expert}")
        model.set_all_mature()
        model.skill_library = library

    def _tokenize(self, by_domain: dict[str, list[Example]], tokenizer, what: str):
        domains = [ds.domain_label for ds in self.config.data.datasets]
        examples = [ex for name in domains for ex in by_domain.get(name, [])]
        tokenized, stats = tokenize_examples(examples, tokenizer, self.config.data.max_seq_length, domains=domains,
                                             use_chat_template=self.config.data.use_chat_template)
        for name in domains:
            if stats.domains[name].kept == 0:
                raise DataError(f"no {what} example of domain '{name}' fits data.max_seq_length="
                                f"{self.config.data.max_seq_length} ({stats.domains[name].dropped} dropped)")
        return tokenized, stats

    def _optimizer(self, model) -> torch.optim.Optimizer:
        params = model.trainable_parameters()
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.config.train.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        return torch.optim.AdamW(groups, lr=self.config.train.lr)

    def _scheduler(self, optimizer, total_steps: int):
        from transformers import get_scheduler

        t = self.config.train
        warmup = t.warmup_steps or math.ceil(t.warmup_ratio * total_steps)
        name = "constant_with_warmup" if t.lr_scheduler == "constant" else t.lr_scheduler
        return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    # ------------------------------------------------------------------ training
    def train(self) -> TrainResult:
        """Run (or resume) training; return a :class:`TrainResult`."""
        from accelerate.utils import gather_object, set_seed

        wall_start = time.perf_counter()
        cfg, t = self.config, self.config.train
        self.accelerator = acc = self._make_accelerator()
        check_engine(str(acc.distributed_type))
        set_seed(cfg.seed)
        resume_from = self._prepare_output_dir()
        try:
            train_raw, eval_raw = self._load("train"), self._load("validation")  # data errors before the model
            model, tokenizer = self._build_model()
            if t.allow_expert_growth:
                self._grow_experts(model, tokenizer, train_raw)
            self.model = model
            train_set, stats = self._tokenize(train_raw, tokenizer, "training")
            eval_tokenized, eval_stats = self._tokenize(eval_raw, tokenizer, "held-out")
        except BaseException:
            self._remove_created_output_dir()
            raise
        self._clear_stale_outputs()
        domains = [ds.domain_label for ds in cfg.data.datasets]
        eval_sets = {d: [x for x in eval_tokenized if x.domain == d] for d in domains}
        acc.print(model.parameter_report())
        acc.print(f"--- Training data (train split) ---\n{stats.summary()}")
        acc.print(f"--- Held-out data (validation split) ---\n{eval_stats.summary()}")

        weights = {ds.domain_label: ds.weight for ds in cfg.data.datasets}
        stream = InterleavedSampler.from_domain_labels(
            [x.domain for x in train_set], weights=weights if cfg.data.mixing == "interleave" else None,
            seed=cfg.seed, mode=cfg.data.mixing, domains=domains)
        world, accum, per_device = acc.num_processes, t.gradient_accumulation_steps, t.per_device_batch_size
        samples_per_step = per_device * accum * world
        total_steps = t.max_steps or max(1, math.ceil(t.num_epochs * stream.num_samples / samples_per_step))

        model.to(acc.device)
        optimizer = self._optimizer(model)
        scheduler = self._scheduler(optimizer, total_steps)
        state: dict[str, Any] = {"global_step": 0, "eval_history": [], "train_log": [], "train_time_s": 0.0}
        rng_states = None
        if resume_from is not None:
            state = ckpt.load_trainer_state(resume_from)
            saved_global = state.get("samples_per_step")
            if saved_global is None:  # written before the global batch was recorded: same world size only
                saved_global = samples_per_step if state["world_size"] == world else None
            if saved_global != samples_per_step:
                hint = max(1, (state.get("samples_per_step") or samples_per_step) // (per_device * world))
                raise CheckpointError(
                    f"{resume_from}: written with {state.get('samples_per_step', '?')} sequences per optimizer step "
                    f"({state['world_size']} processes); now {samples_per_step} ({world} x per_device_batch_size "
                    f"{per_device} x gradient_accumulation_steps {accum}): keep the global batch the same, e.g. "
                    f"train.gradient_accumulation_steps={hint}")
            if state["world_size"] != world:
                acc.print(f"resuming a {state['world_size']}-process checkpoint with {world} process(es): same "
                          "global batch and data order; dropout random streams restart per process")
            ckpt.load_adapter_weights(model, resume_from / ckpt.ADAPTER_DIR)
            try:
                stream.load_state_dict(state["sampler"])
            except ValueError as exc:  # e.g. another number of examples: the data files changed
                raise CheckpointError(f"{resume_from}: the training data differ from the checkpoint's ({exc})"
                                      ) from None
            rng_states = ckpt.load_torch_file(resume_from, ckpt.RNG_FILE)
            acc.print(f"resuming from {resume_from} (step {state['global_step']} of {total_steps})")
        start_step = state["global_step"]
        start_position = stream.epoch * stream.num_samples + stream.position
        batches = _StreamBatches(stream, per_device, start_position, (total_steps - start_step) * accum * world)
        collate = DataCollator.from_tokenizer(tokenizer)
        loader = DataLoader(train_set, batch_sampler=batches, collate_fn=collate,
                            generator=torch.Generator().manual_seed(cfg.seed))
        prepared, optimizer, loader = acc.prepare(model, optimizer, loader)
        if resume_from is not None:
            optimizer.load_state_dict(ckpt.load_torch_file(resume_from, ckpt.OPTIMIZER_FILE))
            scheduler.load_state_dict(ckpt.load_torch_file(resume_from, ckpt.SCHEDULER_FILE))
        history = [EvalResult.from_dict(h) for h in state["eval_history"]]
        train_log: list[dict[str, Any]] = list(state["train_log"])
        writer = self._writer(start_step if resume_from is not None else None)
        if acc.is_main_process:
            cfg.to_json_file(self.output_dir / ckpt.TRAIN_CONFIG_FILE)

        def epoch_at(step: int) -> float:
            return step * samples_per_step / stream.num_samples

        def run_eval(step: int) -> None:
            # The bare model, not the DDP wrapper: each process runs its own share of the held-out batches,
            # and a DDP forward would start collectives (buffer broadcast) the other processes never join.
            result = evaluate(model, eval_sets, collate, cfg.data.eval_batch_size, model.num_experts,
                              step=step, epoch=epoch_at(step), accelerator=acc)
            history.append(result)
            if acc.is_main_process:
                bar.write(result.line())  # keeps the progress bar intact
            if writer is not None:
                for name, d in result.domains.items():
                    writer.add_scalar(f"eval/loss/{name}", d.loss, step)
                    writer.add_scalar(f"eval/aux_loss/{name}", d.aux_loss, step)
                    writer.add_scalar(f"eval/router_entropy/{name}", d.router_entropy, step)
                    for e, share in enumerate(d.expert_share):
                        writer.add_scalar(f"eval/expert_share/{name}/expert_{e}", share, step)
                writer.add_scalar("eval/loss/overall", result.loss, step)

        def save(step: int, loop_time: float) -> None:
            position = start_position + (step - start_step) * samples_per_step
            sampler_state = {**stream.state_dict(), "epoch": position // stream.num_samples,
                             "position": position % stream.num_samples}
            states = gather_object([ckpt.capture_rng_state()])
            if acc.is_main_process:
                payload = {"global_step": step, "total_steps": total_steps, "epoch": epoch_at(step),
                           "sampler": sampler_state, "world_size": world, "samples_per_step": samples_per_step,
                           "eval_history": [h.to_dict() for h in history], "train_log": train_log,
                           "train_time_s": state["train_time_s"] + loop_time}
                target = ckpt.checkpoint_dir(self.output_dir, step)
                try:
                    ckpt.save_checkpoint(target, model=acc.unwrap_model(prepared), optimizer=optimizer,
                                         scheduler=scheduler, rng_states=states, state=payload, config=cfg)
                except (OSError, SafetensorError) as exc:  # disk full, size limit: nothing half-written is left
                    good = ckpt.latest_checkpoint(self.output_dir)
                    why = getattr(exc, "strerror", None) or str(exc)
                    raise TrainingError(
                        f"could not write {target}: {why} (disk full or a file size limit?); "
                        f"nothing of it was kept, and the previous checkpoint "
                        f"{good if good is not None else '(none yet)'} is intact: free space, then resume") from exc
                ckpt.prune_checkpoints(self.output_dir, t.save_total_limit)
            acc.wait_for_everyone()

        if resume_from is None and t.router_calibration_examples:
            self._calibrate_router(model, train_set, stream, collate)

        from tqdm.auto import tqdm

        loop_start = time.perf_counter()
        step = start_step
        params = model.trainable_parameters()
        bar = tqdm(total=total_steps, initial=start_step, desc="train", disable=not acc.is_local_main_process,
                   dynamic_ncols=True)
        try:
            if not history:
                run_eval(0)
            prepared.train()
            iterator = iter(loader)
            first = next(iterator, None)
            if rng_states is not None and len(rng_states) == world:  # after the loader started: nothing random
                ckpt.restore_rng_state(rng_states[acc.process_index])   # may happen in between
            window = torch.zeros(4, dtype=torch.float64, device=acc.device)  # loss, aux, tokens, micro-batches
            pending = torch.zeros_like(window)  # the optimizer step in progress, added once it proves finite
            window_start, grad_norm, bad_run = time.perf_counter(), None, 0
            for batch in itertools.chain([first] if first is not None else [], iterator):
                batch.pop("domain_ids", None)
                bad = False
                with acc.accumulate(prepared):
                    out = prepared(**batch, supervised_logits_only=True)
                    acc.backward(out.loss)
                    if acc.sync_gradients:
                        # The gradients are reduced across processes here, so every process sees the same norm
                        # and takes the same decision; a non-finite loss makes non-finite gradients.
                        grad_norm = (acc.clip_grad_norm_(params, t.max_grad_norm) if t.max_grad_norm > 0
                                     else _grad_norm(params))
                        bad = not math.isfinite(float(grad_norm))
                        if bad:
                            optimizer.zero_grad(set_to_none=True)  # the step below then changes nothing
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                pending += torch.stack([out.lm_loss.detach().double(), out.aux_loss.detach().double(),
                                        batch["attention_mask"].sum().double(), torch.ones((), dtype=torch.float64,
                                        device=acc.device)])
                if not acc.sync_gradients:
                    continue
                if not acc.optimizer_step_was_skipped:
                    scheduler.step()
                step += 1
                if bad:
                    bad_run += 1
                    acc.print(f"warning: step {step}: non-finite loss or gradient (grad norm {float(grad_norm)}): "
                              f"skipped, parameters unchanged ({bad_run} in a row)")
                    if t.max_bad_steps and bad_run >= t.max_bad_steps:
                        good = ckpt.latest_checkpoint(self.output_dir)
                        raise TrainingError(
                            f"stopping at step {step}: {bad_run} consecutive steps with a non-finite loss or "
                            f"gradient (train.max_bad_steps={t.max_bad_steps}); the last good checkpoint is "
                            f"{good if good is not None else 'none (no checkpoint was written yet)'}. Lower "
                            "train.lr, check the data, or train in fp32 (train.precision=fp32)")
                else:
                    bad_run = 0
                    window += pending
                pending.zero_()
                if step % t.log_every == 0 or step == total_steps:
                    row = self._log_row(window, window_start, step, epoch_at(step), scheduler, grad_norm)
                    train_log.append(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                    if writer is not None:
                        for key in ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s"):
                            if row.get(key) is not None:
                                writer.add_scalar(f"train/{key}", row[key], step)
                    window.zero_()
                    window_start = time.perf_counter()
                bar.update(1)
                pause_start = time.perf_counter()
                if (t.eval_every and step % t.eval_every == 0) or step == total_steps:
                    run_eval(step)
                if (t.save_every and step % t.save_every == 0) or step == total_steps:
                    save(step, time.perf_counter() - loop_start)
                window_start += time.perf_counter() - pause_start  # throughput counts training time only
            if not history or history[-1].step != step:
                run_eval(step)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
        train_time = state["train_time_s"] + time.perf_counter() - loop_start
        return self._finish(prepared, history, train_log, step, total_steps, epoch_at(step), train_time,
                            time.perf_counter() - wall_start, resume_from, stats, eval_stats, tokenizer)

    def _calibrate_router(self, model, train_set, stream: InterleavedSampler, collate) -> None:
        """Router feature standardisation from the first training examples of the stream (deterministic)."""
        count = min(self.config.train.router_calibration_examples, stream.num_samples)
        indices = [int(i) for i in stream.take(0, count)]
        size = self.config.data.eval_batch_size
        batches = (collate([train_set[i] for i in indices[k : k + size]]) for k in range(0, count, size))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            seen = model.calibrate_router(batches)
        model.train(was_training)
        self.accelerator.print(f"router calibrated on {count} training examples ({seen} routed units)")

    def _log_row(self, window, window_start, step, epoch, scheduler, grad_norm) -> dict[str, Any]:
        acc = self.accelerator
        totals = acc.reduce(window.clone(), reduction="sum") if acc.num_processes > 1 else window
        loss_sum, aux_sum, tokens, micro = totals.tolist()
        elapsed = max(time.perf_counter() - window_start, 1e-9)
        lm = loss_sum / max(micro, 1)
        aux = aux_sum / max(micro, 1)
        return {"step": step, "epoch": epoch, "loss": lm + self.config.moe.balance_coef * aux, "lm_loss": lm,
                "aux_loss": aux, "lr": scheduler.get_last_lr()[0],
                "grad_norm": None if grad_norm is None else float(grad_norm), "tokens_per_s": tokens / elapsed}

    def _writer(self, purge_step: int | None):
        if not self.accelerator.is_main_process:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.output_dir / "tensorboard"), purge_step=purge_step)

    def _finish(self, prepared, history, train_log, step, total_steps, epoch, train_time, wall_time,
                resume_from, stats, eval_stats, tokenizer) -> TrainResult:
        acc, out = self.accelerator, self.output_dir
        final_dir = out / ckpt.FINAL_DIR
        metrics_path, plot_path = out / "metrics.json", out / "routing.png"
        model = acc.unwrap_model(prepared)
        metrics = build_metrics(history, train_log=train_log, train_time_s=train_time, extra={
            "model": self.config.model, "num_experts": model.num_experts, "global_step": step,
            "total_steps": total_steps, "epochs": epoch, "precision": self.precision,
            "wall_time_s": wall_time, "world_size": acc.num_processes,
            "data": {"train": stats.as_dict(), "validation": eval_stats.as_dict()},
            "special_tokens": {role: getattr(tokenizer, f"{role}_token", None) for role in ("bos", "eos", "pad")},
            "versions": library_versions()})
        if acc.is_main_process:
            model.save_pretrained(final_dir)
            write_metrics(metrics_path, metrics)
            plot_routing(metrics.get("expert_share", {}), plot_path,
                         title=f"Expert share per domain (held-out, step {step})")
            acc.print("--- Summary ---")
            acc.print(summary_table(history))
            acc.print(f"train time {train_time:.1f}s; adapter: {final_dir}; metrics: {metrics_path}")
        acc.wait_for_everyone()
        return TrainResult(out, final_dir, step, total_steps, epoch, train_time, history, metrics, metrics_path,
                           plot_path, ckpt.list_checkpoints(out), resume_from, stats)


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that decide a run's numbers (tokenizer conversion, kernels), for metrics.json."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "tokenizers", "accelerate", "gguf"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def check_engine(distributed_type: str) -> None:
    """Refuse the engines whose checkpoints this trainer cannot yet write correctly, before any work is done.

    Under FSDP each process holds only a shard of the adapter and optimizer tensors, and checkpoints are
    written from the main process's tensors: they would be incomplete. DDP (the base model is frozen and
    the adapters are small, so replicating them is cheap) and ZeRO-2 (full parameters on every process)
    are the supported engines; docs/distributed.md has the status.
    """
    if distributed_type.rsplit(".", 1)[-1] == "FSDP":
        raise TrainingError(
            "training under FSDP is not supported yet: its checkpoints would hold only the main process's shard "
            "of the adapter and optimizer tensors. Use DDP (accelerate launch --config_file "
            "configs/accelerate/ddp.yaml; the frozen base model is replicated, the adapters are small) or "
            "DeepSpeed ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml); see docs/distributed.md")


def _grad_norm(params) -> torch.Tensor:
    grads = [p.grad.detach().norm() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(grads)) if grads else torch.zeros(())


def _dataset_spec(ds: DatasetConfig, index: int, split: str, limit: int | None) -> DatasetSpec:
    """The data-layer spec of one configured dataset and split."""
    if ds.name in list_datasets():
        spec = get_spec(ds.name)
    elif ds.path is None and ds.hub_id is None:
        raise ConfigError(f"train config: key 'data.datasets.{index}.name' = {ds.name!r} is not a registered "
                          f"dataset ({list_datasets()}); give 'path' to train on a local instruction file")
    else:
        spec = DatasetSpec(name=ds.name, loader="instruction")
    changes: dict[str, Any] = {"domain": ds.domain_label, "split": split, "limit": limit}
    if ds.path is not None:
        changes["path"] = ds.path
    if ds.hub_id is not None:
        changes["hub_id"] = ds.hub_id
    return spec.replace(**changes)


def _get(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data
