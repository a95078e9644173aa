"""Sharded training with PyTorch FSDP2 (``train.distributed: fsdp``): the frozen base and the experts split
across the processes, one shard group per decoder layer.

``JointTrainer`` uses this module when the config says ``train.distributed: fsdp`` and the run was started
by a launcher (``torchrun`` or ``accelerate launch``) with at least two processes; gloo on CPUs, nccl on GPUs::

    torchrun --nproc_per_node 2 -m dylora_moe.cli train --config configs/cpu-demo.yaml train.distributed=fsdp

What it holds (each a small piece the trainer calls):

* :func:`resolve_accumulation` -- the launch checks (a process group, a global batch the processes divide);
* :func:`shard_model` -- ``fully_shard`` on every decoder block, then on the whole ``DyLoRAMoEForCausalLM``
  (embeddings, final norm, LM head and routers form the root group); parameters become ``DTensor`` shards;
* :func:`full_root` -- the root group gathered, for the calls that run part of the model without going through
  its ``forward`` (router calibration, skill embeddings);
* :class:`ExpertUsage` -- keeps sparse routing exact: an expert that no process's batch chose ends the step
  with no gradient (AdamW skips it, as in one process), while FSDP reduce-scatters zeros for it so that no
  process waits on another;
* :func:`gather_adapter` -- the expert and router tensors in full (every process calls it), for the final
  adapter and the loadable copy in each checkpoint;
* :func:`save_sharded` / :func:`load_sharded` -- adapter and optimizer state through
  ``torch.distributed.checkpoint`` (each process writes its own shards; loads re-shard to any world size).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from ..errors import ConfigError
from ..experts import experts_in_graph
from ..layer import MoELoRALayer
from ..serialization import adapter_tensors
from .config import ENGINES

__all__ = ["ENGINES", "ExpertUsage", "full_root", "full_value", "gather_adapter", "is_sharded", "load_sharded",
           "resolve_accumulation", "save_sharded", "shard_model"]


def resolve_accumulation(engine: str, world: int, per_device: int, accumulation: int, global_batch: int,
                         initialized: bool) -> int:
    """The gradient accumulation steps of this launch; a ``ConfigError`` for a launch that cannot run.

    ``global_batch`` > 0 fixes the sequences per optimizer step whatever the number of processes: it must be a
    multiple of ``world x per_device``. ``engine='fsdp'`` needs a process group of at least two processes."""
    if engine == "fsdp" and (world < 2 or not initialized):
        raise ConfigError(
            f"train.distributed=fsdp shards the model across processes, but this run has {world} process(es) "
            f"{'and no process group' if not initialized else ''}: launch it with torchrun --nproc_per_node N "
            "(N >= 2) or accelerate launch --num_processes N, or set train.distributed=ddp")
    if global_batch <= 0:
        return accumulation
    per_step = world * per_device
    if global_batch % per_step:
        raise ConfigError(
            f"train.global_batch_size={global_batch} is not a multiple of {world} process(es) x "
            f"train.per_device_batch_size {per_device} = {per_step}: choose a global batch size that {per_step} "
            "divides, or another per-device batch size or number of processes")
    return global_batch // per_step


def device_mesh(device: torch.device) -> DeviceMesh:
    """A one-dimensional mesh over all processes on ``device``'s type (cpu: gloo; cuda: nccl)."""
    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard_model(model: Any, mesh: DeviceMesh, device: torch.device) -> None:
    """Shard ``model`` (a ``DyLoRAMoEForCausalLM``, in place) with FSDP2: one group per decoder block, the rest
    (embeddings, final norm, LM head, routers) in the root group; each shard moves to ``device`` as it is made,
    so the whole model is never there at once. Experts that a process's batch did not use are reduce-scattered
    as zeros, so that every process joins every collective (:class:`ExpertUsage` restores the exact
    single-process update). Ends with a one-token forward through the root (FSDP makes the first module that
    runs forward its root; later calls may then enter the backbone directly, inside :func:`full_root`)."""
    for block in model._decoder_blocks():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.set_reduce_scatter_unused_params(True)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    model.train(was_training)
    model.reshard()  # the root group stays gathered after a forward: back to its shards (what optimizers hold)


def full_value(value: Any) -> Any:
    """A ``DTensor`` result (e.g. the gradient norm of sharded parameters) as a plain tensor; anything else as is.
    Every process must call it for a sharded value."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def is_sharded(model: Any) -> bool:
    return isinstance(model, FSDPModule)


@contextmanager
def full_root(model: Any) -> Iterator[None]:
    """Gather the root group (embeddings, norm, LM head, routers) for the duration: for code that calls the
    base model or its backbone directly instead of the wrapper's ``forward``. All processes must enter it and
    run the same number of forwards inside. A no-op on an unsharded model."""
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


@contextmanager
def _single_process_is_meant() -> Iterator[None]:
    """Without a process group torch.distributed.checkpoint warns that it assumes one process: that is the intent
    here (a sharded checkpoint resumed by one process, or the tests)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _resharded(model: Any) -> None:
    """The root group back to its shards (after an evaluation forward it stays gathered): the module then holds
    the sharded parameters that the optimizer holds."""
    if is_sharded(model):
        model.reshard()


def gather_adapter(model: Any) -> dict[str, torch.Tensor]:
    """The adapter's tensors (experts, routers, their saved buffers) in full, on the CPU. Every process must
    call it (the shards are all-gathered in a fixed order)."""
    _resharded(model)
    out = {}
    for name, tensor in adapter_tensors(model).items():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        out[name] = full.detach().contiguous().cpu()
    return out


def _state(model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    optimizer = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer
    _resharded(model)
    return {"adapter": {name: t.detach() for name, t in adapter_tensors(model).items()},
            "optimizer": get_optimizer_state_dict(model, optimizer)}


def save_sharded(directory: Path, model: Any, optimizer: torch.optim.Optimizer) -> None:
    """Write the adapter and optimizer state into ``directory`` with ``torch.distributed.checkpoint`` (every
    process of the group calls it; each writes its own shards). Works unsharded too (one process)."""
    state = _state(model, optimizer)
    with _single_process_is_meant():
        dcp.save(state, checkpoint_id=str(directory), no_dist=not _distributed())


def load_sharded(directory: Path, model: Any, optimizer: torch.optim.Optimizer) -> None:
    """Load what :func:`save_sharded` wrote into ``model`` and ``optimizer``, in place, re-sharding to the
    current processes (a checkpoint of 2 processes loads under 1 or 4). Parameters that had no optimizer state
    when it was saved (an expert never chosen yet) get none now either, as in the run that wrote it."""
    saved = set(dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata)
    state = _state(model, optimizer)  # a fresh optimizer gets zero states for every parameter here
    optim_state = state["optimizer"]["state"]
    for name in [n for n in optim_state if f"optimizer.state.{n}.step" not in saved]:
        del optim_state[name]
    with _single_process_is_meant():
        dcp.load(state, checkpoint_id=str(directory), no_dist=not _distributed())
    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state["optimizer"],
                             options=StateDictOptions(strict=False))  # the states left out above stay out


class ExpertUsage:
    """Which experts took part in the training forwards of an optimizer step, on any process.

    With sequence routing only the chosen experts enter the autograd graph; in one process the others end the
    step with ``grad = None`` and AdamW leaves them alone. Under FSDP every process reduce-scatters a gradient
    for every expert (zeros where its batch chose none), so ``drop_unused_gradients`` sets ``grad = None`` on the
    experts that no process used in the step, which gives the single process's update exactly.
    """

    def __init__(self, model: Any) -> None:
        self.layers: list[MoELoRALayer] = list(model.expert_layers)
        self.used = [torch.zeros(layer.num_experts, dtype=torch.bool) for layer in self.layers]
        self._hooks = [layer.register_forward_pre_hook(self._recorder(i)) for i, layer in enumerate(self.layers)]

    def _recorder(self, index: int) -> Any:
        def record(layer: MoELoRALayer, args: tuple[Any, ...]) -> None:
            if not (torch.is_grad_enabled() and layer.training) or layer.context.adapters_disabled:
                return
            decision = layer.context.decision_for(layer.layer_index)
            if decision is not None:
                for e in experts_in_graph(decision, layer.num_experts):
                    self.used[index][e] = True
        return record

    def drop_unused_gradients(self, device: torch.device) -> int:
        """Call after the gradients are reduced, before the optimizer step (every process); returns the number of
        experts without gradient this step, and starts recording the next step."""
        flags = torch.cat(self.used).to(device=device, dtype=torch.int32)
        if _distributed():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        used = flags.bool().cpu().split([layer.num_experts for layer in self.layers])
        unused = 0
        for layer, mask in zip(self.layers, used, strict=True):
            for e in range(layer.num_experts):
                if not mask[e]:
                    unused += 1
                    layer.lora_B[e].grad = None
                    if not layer.shared_a:
                        layer.lora_A[e].grad = None
            if layer.shared_a and not bool(mask.any()):
                layer.lora_A[0].grad = None
        for mask in self.used:
            mask.zero_()
        return unused

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
